//! The schedule file (`beat.toml`): strict TOML → a validated [`Schedule`].
//!
//! ```toml
//! timezone = "Europe/Paris"        # default zone of cron entries (default: UTC)
//!
//! [beat.nightly-report]
//! task = "text.render"
//! args = ["nightly"]
//! kwargs = { format = "pdf" }
//! cron = "0 3 * * *"               # minute hour day-of-month month day-of-week
//! timezone = "America/New_York"    # this entry's zone
//! queue = "reports"
//! priority = 5
//! expires = "1h"                   # after it is sent
//! headers = { team = "ops" }
//! catch_up = "one"                 # a run missed while no beat ran fires once ("none": skipped)
//! jitter = "30s"                   # delay each run by up to this (same delay on every beat)
//! enabled = true
//!
//! [beat.ping]
//! task = "math.add"
//! args = [1, 1]
//! every = "10s"                    # on multiples of 10 s since the Unix epoch
//! ```
//!
//! An unknown key, a missing `task`, both or neither of `every` and `cron`, an unknown time
//! zone or a bad pattern is an error naming the file, the entry and the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::when::When;
use crate::units::parse_duration;

/// The shortest `every` (each occurrence costs one compare-and-set in the lease store).
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// Errors reading a schedule file. Each displays as one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The file cannot be read.
    #[error("cannot read the schedule {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has a key or type the format does not know.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// Where (1-based).
        line: usize,
        /// toml's explanation, naming the key.
        message: String,
    },
    /// An entry's value is not valid.
    #[error("{path}: [beat.{entry}] {key}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The entry.
        entry: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// What to do with runs missed while no beat ran (or the leader was changing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Celery's behaviour: the latest missed run fires once, at once.
    One,
    /// Missed runs are skipped; the next one fires on time.
    None,
}

/// One periodic task, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its name, the key of its `[beat.<name>]` table (part of each occurrence's id).
    pub name: String,
    /// The task to send.
    pub task: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// The queue (none: the task's route, else `celery`).
    pub queue: Option<String>,
    /// Message priority.
    pub priority: Option<u8>,
    /// How long after it is sent the task may still start.
    pub expires: Option<Duration>,
    /// Custom headers.
    pub headers: Map<String, Value>,
    /// When it fires.
    pub when: When,
    /// What a missed run does.
    pub catch_up: CatchUp,
    /// The most each run is delayed (by a countdown derived from its id).
    pub jitter: Option<Duration>,
    /// A disabled entry never fires and keeps its last run.
    pub enabled: bool,
}

/// A validated schedule: its entries, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    /// The entries, sorted by name.
    pub entries: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    timezone: Option<String>,
    #[serde(default)]
    beat: BTreeMap<String, RawEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    task: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: Map<String, Value>,
    queue: Option<String>,
    priority: Option<u8>,
    expires: Option<String>,
    #[serde(default)]
    headers: Map<String, Value>,
    every: Option<String>,
    cron: Option<String>,
    timezone: Option<String>,
    catch_up: Option<String>,
    jitter: Option<String>,
    enabled: Option<bool>,
}

impl Schedule {
    /// Reads and validates the schedule at `path`.
    ///
    /// # Errors
    /// [`ScheduleError`] naming the file, and the entry and key when one is wrong.
    pub fn load(path: &Path) -> Result<Self, ScheduleError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&shown, &text)
    }

    /// Validates schedule text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Schedule::load`].
    pub fn from_toml(origin: &str, text: &str) -> Result<Self, ScheduleError> {
        let raw: RawSchedule = toml::from_str(text).map_err(|e| ScheduleError::Syntax {
            path: origin.to_owned(),
            line: e
                .span()
                .map_or(1, |span| text[..span.start].matches('\n').count() + 1),
            message: e.message().trim().replace('\n', " "),
        })?;
        let default_zone = raw.timezone.as_deref().unwrap_or("UTC");
        if default_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(ScheduleError::Syntax {
                path: origin.to_owned(),
                line: 1,
                message: format!(
                    "timezone: unknown time zone {default_zone:?} (try \"UTC\" or \"Europe/Paris\")"
                ),
            });
        }
        let entries = raw
            .beat
            .into_iter()
            .map(|(name, entry)| Entry::resolve(origin, name, entry, default_zone))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { entries })
    }
}

impl Entry {
    fn resolve(
        origin: &str,
        name: String,
        raw: RawEntry,
        default_zone: &str,
    ) -> Result<Self, ScheduleError> {
        let invalid = |key: &'static str, message: String| ScheduleError::Invalid {
            path: origin.to_owned(),
            entry: name.clone(),
            key,
            message,
        };
        let duration = |key: &'static str, text: Option<&String>| {
            text.map(|t| parse_duration(t).map_err(|e| invalid(key, e.to_string())))
                .transpose()
        };
        if name.trim().is_empty() {
            return Err(invalid("name", "an entry needs a name".into()));
        }
        if raw.task.trim().is_empty() {
            return Err(invalid("task", "must name a task".into()));
        }
        if raw.queue.as_ref().is_some_and(|q| q.trim().is_empty()) {
            return Err(invalid("queue", "must not be empty".into()));
        }
        let when = match (&raw.every, &raw.cron) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "every",
                    "give either `every` or `cron`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "every",
                    "give `every = \"10s\"` or `cron = \"0 3 * * *\"`".into(),
                ));
            }
            (Some(_), None) => {
                if raw.timezone.is_some() {
                    return Err(invalid(
                        "timezone",
                        "only a cron entry has a time zone (`every` counts from the Unix epoch)"
                            .into(),
                    ));
                }
                let every = duration("every", raw.every.as_ref())?.unwrap_or_default();
                if every < MIN_EVERY {
                    return Err(invalid("every", "must be at least 1s".into()));
                }
                When::every(every)
            }
            (None, Some(pattern)) => {
                let zone = raw.timezone.as_deref().unwrap_or(default_zone);
                let tz = zone.parse::<chrono_tz::Tz>().map_err(|_| {
                    invalid(
                        "timezone",
                        format!("unknown time zone {zone:?} (try \"UTC\" or \"Europe/Paris\")"),
                    )
                })?;
                When::cron(pattern, tz).map_err(|e| invalid("cron", e))?
            }
        };
        let catch_up = match raw.catch_up.as_deref() {
            None | Some("one") => CatchUp::One,
            Some("none") => CatchUp::None,
            Some(other) => {
                return Err(invalid(
                    "catch_up",
                    format!("{other:?} is not \"one\" or \"none\""),
                ));
            }
        };
        Ok(Self {
            expires: duration("expires", raw.expires.as_ref())?,
            jitter: duration("jitter", raw.jitter.as_ref())?.filter(|j| !j.is_zero()),
            name,
            task: raw.task,
            args: raw.args,
            kwargs: raw.kwargs,
            queue: raw.queue,
            priority: raw.priority,
            headers: raw.headers,
            when,
            catch_up,
            enabled: raw.enabled.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Schedule::from_toml("beat.toml", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_full_entry_reads_as_written() {
        let schedule = Schedule::from_toml(
            "beat.toml",
            r#"
            timezone = "Europe/Paris"
            [beat.report]
            task = "text.render"
            args = [1, "a"]
            kwargs = { format = "pdf" }
            cron = "0 3 * * *"
            queue = "reports"
            priority = 5
            expires = "1h"
            headers = { team = "ops" }
            catch_up = "none"
            jitter = "30s"
            enabled = false
            [beat.ping]
            task = "math.add"
            every = "10s"
            "#,
        )
        .unwrap();
        let [ping, report] = &schedule.entries[..] else {
            panic!("{schedule:?}")
        };
        assert_eq!(ping.name, "ping");
        assert_eq!(ping.when, When::every(Duration::from_secs(10)));
        assert_eq!(ping.catch_up, CatchUp::One, "Celery's default");
        assert!(ping.enabled && ping.args.is_empty() && ping.jitter.is_none());
        assert_eq!(report.task, "text.render");
        assert_eq!(report.args, [Value::from(1), Value::from("a")]);
        assert_eq!(report.kwargs["format"], "pdf");
        assert_eq!(report.when.to_string(), "cron 0 3 * * * (Europe/Paris)");
        assert_eq!(report.queue.as_deref(), Some("reports"));
        assert_eq!(report.priority, Some(5));
        assert_eq!(report.expires, Some(Duration::from_secs(3600)));
        assert_eq!(report.headers["team"], "ops");
        assert_eq!(report.catch_up, CatchUp::None);
        assert_eq!(report.jitter, Some(Duration::from_secs(30)));
        assert!(!report.enabled);
    }

    #[test]
    fn bad_schedules_name_the_file_the_line_the_entry_and_the_key() {
        let unknown = error("[beat.ping]\ntask = \"math.add\"\nevry = \"1s\"\n");
        assert!(
            unknown.starts_with("beat.toml:3: unknown field `evry`"),
            "{unknown}"
        );
        let missing = error("[beat.ping]\nevery = \"1s\"\n");
        assert!(missing.contains("missing field `task`"), "{missing}");
        assert_eq!(
            error("[beat.ping]\ntask = \"t\"\n"),
            "beat.toml: [beat.ping] every: give `every = \"10s\"` or `cron = \"0 3 * * *\"`"
        );
        assert_eq!(
            error("[beat.ping]\ntask = \"t\"\nevery = \"1s\"\ncron = \"* * * * *\""),
            "beat.toml: [beat.ping] every: give either `every` or `cron`, not both"
        );
        assert_eq!(
            error("[beat.ping]\ntask = \"t\"\nevery = \"soon\""),
            "beat.toml: [beat.ping] every: `soon` is not a duration (try 2s, 500ms or 1m)"
        );
        assert_eq!(
            error("[beat.ping]\ntask = \"t\"\nevery = \"100ms\""),
            "beat.toml: [beat.ping] every: must be at least 1s"
        );
        let zone =
            error("[beat.r]\ntask = \"t\"\ncron = \"0 3 * * *\"\ntimezone = \"Mars/Olympus\"");
        assert!(
            zone.contains("[beat.r] timezone: unknown time zone \"Mars/Olympus\""),
            "{zone}"
        );
        let pattern = error("[beat.r]\ntask = \"t\"\ncron = \"0 25 * * *\"");
        assert!(
            pattern.starts_with("beat.toml: [beat.r] cron: "),
            "{pattern}"
        );
        let catch_up = error("[beat.r]\ntask = \"t\"\nevery = \"1s\"\ncatch_up = \"all\"");
        assert!(catch_up.contains("catch_up: \"all\" is not"), "{catch_up}");
        let every_zone = error("[beat.r]\ntask = \"t\"\nevery = \"1s\"\ntimezone = \"UTC\"");
        assert!(every_zone.contains("only a cron entry"), "{every_zone}");
        for bad in [unknown, missing, zone, pattern] {
            assert!(!bad.contains('\n'), "one line: {bad}");
        }
    }
}
