//! Per-task retry and rate-limit policy (Celery's task attributes `autoretry_for`,
//! `max_retries`, `default_retry_delay`, `retry_backoff`, `retry_backoff_max`,
//! `retry_jitter` and `rate_limit`).
//!
//! A policy is layered: the worker's defaults, then what the plugin's `describe` declares
//! for the task, then the worker configuration's `[tasks."<name or glob>"]` table (Celery's
//! `task_annotations`), each layer filling only what it says.

use std::time::Duration;

use serde::Deserialize;

use crate::units::parse_duration;

/// A rate limit: at most one run per `interval` (a token bucket of capacity 1 refilled at
/// the given rate, as Celery's worker does it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Time between two runs.
    pub interval: Duration,
}

impl RateLimit {
    /// Parses Celery's forms: `"100/s"`, `"10/m"`, `"1/h"`, or a bare number (per second).
    ///
    /// # Errors
    /// A message naming the expected forms.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a rate limit (try 100/s, 10/m or 1/h)");
        let (number, unit) = text.trim().split_once('/').unwrap_or((text.trim(), "s"));
        let per = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let count: f64 = number.trim().parse().map_err(|_| bad())?;
        if !count.is_finite() || count <= 0.0 {
            return Err(bad());
        }
        Duration::try_from_secs_f64(per / count)
            .ok()
            .filter(|d| !d.is_zero())
            .map(|interval| Self { interval })
            .ok_or_else(bad)
    }
}

/// How a task is retried, resolved from every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first; past it the result is `MaxRetriesExceededError` (or, for an
    /// automatic retry, the failure itself, as Celery raises the original exception).
    /// Default 3.
    pub max_retries: u32,
    /// Delay when the task gives none and there is no backoff (Celery's
    /// `default_retry_delay`). Default 3 minutes.
    pub default_delay: Duration,
    /// Failure kinds retried automatically (Celery's `autoretry_for`). Default: none.
    pub autoretry_for: Vec<String>,
    /// Exponential backoff factor for automatic retries: retry n waits `factor × 2^n`.
    /// Default: none (automatic retries wait `default_delay`).
    pub backoff: Option<Duration>,
    /// The backoff cap. Default 600 s (Celery's).
    pub backoff_max: Duration,
    /// Full jitter: the backoff is drawn uniformly from `[0, backoff]`. Default true.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            default_delay: Duration::from_secs(180),
            autoretry_for: Vec::new(),
            backoff: None,
            backoff_max: Duration::from_secs(600),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Whether a failure of `kind` is retried automatically.
    pub fn autoretries(&self, kind: &str) -> bool {
        self.autoretry_for.iter().any(|k| k == kind || k == "*")
    }

    /// The delay before automatic retry number `retries + 1`: the capped exponential
    /// backoff, with full jitter when enabled; `default_delay` without a backoff.
    pub fn automatic_delay(&self, retries: u32) -> Duration {
        let Some(factor) = self.backoff else {
            return self.default_delay;
        };
        let exponential = factor
            .checked_mul(1_u32.checked_shl(retries.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        let capped = exponential.min(self.backoff_max);
        if self.jitter {
            let ms = u64::try_from(capped.as_millis()).unwrap_or(u64::MAX);
            Duration::from_millis(rand::random_range(0..=ms))
        } else {
            capped
        }
    }
}

/// A task's policy after layering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskPolicy {
    /// Retries.
    pub retry: RetryPolicy,
    /// Rate limit per worker, if any.
    pub rate_limit: Option<RateLimit>,
}

/// One layer of policy: what a plugin declares or what the worker configuration says for a
/// task. `None` leaves the value to the layer below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverrides {
    /// Failure kinds retried automatically.
    pub autoretry_for: Option<Vec<String>>,
    /// Retries before giving up.
    pub max_retries: Option<u32>,
    /// Retry delay when none is given.
    #[serde(default, deserialize_with = "de::duration")]
    pub default_retry_delay: Option<Duration>,
    /// Backoff factor for automatic retries.
    #[serde(default, deserialize_with = "de::duration")]
    pub retry_backoff: Option<Duration>,
    /// Backoff cap.
    #[serde(default, deserialize_with = "de::duration")]
    pub retry_backoff_max: Option<Duration>,
    /// Full jitter on the backoff.
    pub retry_jitter: Option<bool>,
    /// Rate limit, e.g. `"10/s"`.
    #[serde(default, deserialize_with = "de::rate_limit")]
    pub rate_limit: Option<RateLimit>,
}

impl PolicyOverrides {
    /// Applies this layer on top of `base`.
    pub fn apply(&self, base: &mut TaskPolicy) {
        let retry = &mut base.retry;
        if let Some(kinds) = &self.autoretry_for {
            retry.autoretry_for.clone_from(kinds);
        }
        if let Some(n) = self.max_retries {
            retry.max_retries = n;
        }
        if let Some(d) = self.default_retry_delay {
            retry.default_delay = d;
        }
        if let Some(d) = self.retry_backoff {
            retry.backoff = Some(d);
        }
        if let Some(d) = self.retry_backoff_max {
            retry.backoff_max = d;
        }
        if let Some(j) = self.retry_jitter {
            retry.jitter = j;
        }
        if let Some(rate) = self.rate_limit {
            base.rate_limit = Some(rate);
        }
    }
}

/// Whether `name` matches `pattern`, a task name or a glob where `*` matches any run of
/// characters (Celery's `task_routes` and `task_annotations` glob keys).
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let mut pieces: Vec<&str> = rest.split('*').collect();
    let last = pieces.pop().unwrap_or("");
    for piece in pieces {
        match remaining.find(piece) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

/// Sorts `(pattern, value)` pairs so the first match is the most specific: exact names,
/// then globs from the longest pattern to the shortest.
pub fn most_specific_first<V>(mut entries: Vec<(String, V)>) -> Vec<(String, V)> {
    entries.sort_by_key(|(pattern, _)| {
        (
            pattern.contains('*'),
            std::cmp::Reverse(pattern.len()),
            pattern.clone(),
        )
    });
    entries
}

/// Per-task configuration: `(pattern, overrides)`; an exact name wins, otherwise the first
/// matching glob in order (see [`TaskAnnotations::new`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskAnnotations(Vec<(String, PolicyOverrides)>);

impl TaskAnnotations {
    /// Annotations from `(pattern, overrides)` pairs, most specific first (exact names,
    /// then globs from the longest pattern to the shortest).
    pub fn new(entries: impl IntoIterator<Item = (String, PolicyOverrides)>) -> Self {
        Self(most_specific_first(entries.into_iter().collect()))
    }

    /// The configured overrides for `task`, if any.
    pub fn find(&self, task: &str) -> Option<&PolicyOverrides> {
        self.0
            .iter()
            .find(|(pattern, _)| glob_matches(pattern, task))
            .map(|(_, overrides)| overrides)
    }

    /// The policy of `task`: `defaults`, then the plugin's declaration, then this
    /// configuration.
    pub fn resolve(
        &self,
        defaults: &RetryPolicy,
        declared: Option<&PolicyOverrides>,
        task: &str,
    ) -> TaskPolicy {
        let mut policy = TaskPolicy {
            retry: defaults.clone(),
            rate_limit: None,
        };
        if let Some(declared) = declared {
            declared.apply(&mut policy);
        }
        if let Some(configured) = self.find(task) {
            configured.apply(&mut policy);
        }
        policy
    }
}

mod de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    use super::RateLimit;

    pub(super) fn duration<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }

    pub(super) fn rate_limit<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<RateLimit>, D::Error> {
        let text = String::deserialize(deserializer)?;
        RateLimit::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse_like_celery() {
        assert_eq!(
            RateLimit::parse("100/s").unwrap().interval,
            Duration::from_millis(10)
        );
        assert_eq!(
            RateLimit::parse("10/m").unwrap().interval,
            Duration::from_secs(6)
        );
        assert_eq!(
            RateLimit::parse("1/h").unwrap().interval,
            Duration::from_secs(3600)
        );
        assert_eq!(
            RateLimit::parse("4").unwrap().interval,
            Duration::from_millis(250)
        );
        for bad in ["", "0/s", "-1/s", "10/d", "x/s", "inf/s"] {
            assert!(RateLimit::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_inside() {
        let policy = RetryPolicy {
            backoff: Some(Duration::from_secs(1)),
            backoff_max: Duration::from_secs(10),
            jitter: false,
            ..RetryPolicy::default()
        };
        let delays: Vec<u64> = (0..6)
            .map(|n| policy.automatic_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(policy.automatic_delay(u32::MAX), Duration::from_secs(10));
        let jittered = RetryPolicy {
            jitter: true,
            ..policy.clone()
        };
        let draws: Vec<Duration> = (0..200).map(|_| jittered.automatic_delay(3)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(8)));
        assert!(
            draws.iter().any(|d| *d < Duration::from_secs(4)),
            "full jitter draws from [0, backoff]"
        );
        let no_backoff = RetryPolicy::default();
        assert_eq!(no_backoff.automatic_delay(5), no_backoff.default_delay);
    }

    #[test]
    fn globs_match_like_celery_routes() {
        assert!(glob_matches("math.*", "math.add"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("*.add", "math.add"));
        assert!(glob_matches("a*c*e", "abcde"));
        assert!(!glob_matches("math.*", "text.slugify"));
        assert!(!glob_matches("a*c*e", "abcd"));
        assert!(!glob_matches("ab*ba", "aba"));
        assert!(glob_matches("math.add", "math.add"));
    }

    #[test]
    fn layers_apply_in_order_and_exact_names_beat_globs() {
        let declared = PolicyOverrides {
            max_retries: Some(7),
            autoretry_for: Some(vec!["ConnectionError".into()]),
            rate_limit: Some(RateLimit::parse("5/s").unwrap()),
            ..PolicyOverrides::default()
        };
        let annotations = TaskAnnotations::new([
            (
                "math.*".into(),
                PolicyOverrides {
                    max_retries: Some(1),
                    ..PolicyOverrides::default()
                },
            ),
            (
                "math.flaky".into(),
                PolicyOverrides {
                    rate_limit: Some(RateLimit::parse("1/s").unwrap()),
                    ..PolicyOverrides::default()
                },
            ),
        ]);
        let policy = annotations.resolve(&RetryPolicy::default(), Some(&declared), "math.flaky");
        assert_eq!(
            policy.retry.max_retries, 7,
            "the exact entry wins over the glob"
        );
        assert_eq!(policy.retry.autoretry_for, ["ConnectionError"]);
        assert_eq!(policy.rate_limit.unwrap().interval, Duration::from_secs(1));
        let policy = annotations.resolve(&RetryPolicy::default(), Some(&declared), "math.add");
        assert_eq!(
            policy.retry.max_retries, 1,
            "configuration beats the plugin"
        );
        let policy = annotations.resolve(&RetryPolicy::default(), None, "text.slugify");
        assert_eq!(policy, TaskPolicy::default());
    }
}
