//! One occurrence of an entry — the entry's name and a scheduled instant — and what is
//! derived from it alone, identically on every beat: its task id and its jitter.
//!
//! **The task id** is a UUID v5 of `"<entry>@<instant>"` (the instant as RFC 3339 UTC with
//! milliseconds, e.g. `ping@2026-12-01T15:00:10.000Z`) in the namespace [`NAMESPACE`]. So the
//! same occurrence has the same id whichever beat sends it, a duplicate is visible as a
//! repeated id, and anyone can recompute the id of a run from the schedule.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

/// The UUID v5 namespace of occurrence ids: the v5 id of the URL `https://wasmq.dev/beat`
/// in the URL namespace.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6ea3_716f_88a1_5800_ba02_d302_d1ad_1c45);

/// An entry's run at one scheduled instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    /// The entry's name.
    pub entry: String,
    /// When it is scheduled (before any jitter).
    pub at: DateTime<Utc>,
}

impl Occurrence {
    /// The run of `entry` scheduled at `at`.
    pub fn new(entry: impl Into<String>, at: DateTime<Utc>) -> Self {
        Self {
            entry: entry.into(),
            at,
        }
    }

    /// The name hashed into the id: `<entry>@<instant>`.
    pub fn key(&self) -> String {
        format!(
            "{}@{}",
            self.entry,
            self.at.to_rfc3339_opts(SecondsFormat::Millis, true)
        )
    }

    /// Its task id, the same on every beat.
    pub fn task_id(&self) -> String {
        Uuid::new_v5(&NAMESPACE, self.key().as_bytes()).to_string()
    }

    /// Its delay within `jitter`: taken from the id, so every beat would delay it alike.
    pub fn jitter(&self, jitter: Duration) -> Duration {
        let id = Uuid::new_v5(&NAMESPACE, self.key().as_bytes());
        let span = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX).max(1);
        let draw = u64::from_le_bytes(id.as_bytes()[8..16].try_into().unwrap_or([0; 8]));
        Duration::from_millis(draw % span)
    }

    /// Its instant in Unix milliseconds (what the lease store compares).
    pub fn at_ms(&self) -> i64 {
        self.at.timestamp_millis()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_is_the_v5_id_of_the_beat_url() {
        assert_eq!(
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://wasmq.dev/beat"),
            NAMESPACE
        );
    }

    #[test]
    fn ids_depend_on_the_entry_and_the_instant_only() {
        let at = DateTime::parse_from_rfc3339("2026-12-01T15:00:10Z")
            .unwrap()
            .with_timezone(&Utc);
        let one = Occurrence::new("ping", at);
        assert_eq!(one.key(), "ping@2026-12-01T15:00:10.000Z");
        assert_eq!(one.task_id(), Occurrence::new("ping", at).task_id());
        assert_eq!(
            Uuid::parse_str(&one.task_id()).unwrap().get_version_num(),
            5
        );
        assert_ne!(one.task_id(), Occurrence::new("pong", at).task_id());
        let later = Occurrence::new("ping", at + chrono::Duration::seconds(10));
        assert_ne!(one.task_id(), later.task_id());
        let jitter = Duration::from_secs(30);
        assert_eq!(one.jitter(jitter), one.jitter(jitter));
        assert!(one.jitter(jitter) < jitter);
        assert_ne!(one.jitter(jitter), later.jitter(jitter), "spread out");
    }
}
