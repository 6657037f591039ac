//! Per-task settings changed at runtime by remote control (Celery's `rate_limit` and
//! `time_limit` commands set the task's attributes in the worker; wasmq keeps them here,
//! by task name, for as long as the worker runs).
//!
//! * A rate limit set here replaces the one the task's policy resolves to (its plugin's
//!   declaration, then the configuration's annotations); set to none it disables the
//!   task's rate limit. `dispatch` applies it to each message's policy.
//! * Time limits set here replace the task's declared soft limit and its wall-clock
//!   (hard) limit; a message may still ask for a shorter hard limit, never a longer one,
//!   and the sandbox's ceiling bounds everything. A hard limit of none falls back to the
//!   task's own: a wasmq task always runs under a deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::policy::{RateLimit, TaskPolicy};

/// Time limits set by remote control for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct TimeLimits {
    /// The soft limit (the task may catch it); none: none.
    pub(super) soft: Option<Duration>,
    /// The hard (wall-clock) limit; none: the task's own.
    pub(super) hard: Option<Duration>,
}

/// Rate and time limits set at runtime, by task name.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    /// `Some(None)`: the rate limit is disabled.
    rate_limits: Mutex<HashMap<String, Option<RateLimit>>>,
    time_limits: Mutex<HashMap<String, TimeLimits>>,
    /// Set once anything was set: until then a lookup (every task's) takes no lock.
    any: AtomicBool,
}

impl Overrides {
    /// Sets `task`'s rate limit (none: no rate limit).
    pub(super) fn set_rate_limit(&self, task: &str, rate: Option<RateLimit>) {
        self.rate_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(task.to_owned(), rate);
        self.any.store(true, Ordering::Release);
    }

    /// Applies what was set for `task` to its resolved `policy`.
    pub(super) fn apply(&self, task: &str, policy: &mut TaskPolicy) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        if let Some(rate) = self
            .rate_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task)
        {
            policy.rate_limit = *rate;
        }
    }

    /// The rate limit set for `task`: `None` when none was set, `Some(None)` when disabled.
    pub(super) fn rate_limit(&self, task: &str) -> Option<Option<RateLimit>> {
        self.rate_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task)
            .copied()
    }

    /// Sets `task`'s time limits.
    pub(super) fn set_time_limits(&self, task: &str, limits: TimeLimits) {
        self.time_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(task.to_owned(), limits);
        self.any.store(true, Ordering::Release);
    }

    /// The time limits set for `task`, if any.
    pub(super) fn time_limits(&self, task: &str) -> Option<TimeLimits> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.time_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task)
            .copied()
    }
}

/// The hard limit a run of a task gets: the limit set at runtime (else the task's own
/// `declared`), lowered to what the message asks for (`requested`, when shorter).
pub(super) fn hard_limit(
    set: Option<Duration>,
    declared: Duration,
    requested: Option<Duration>,
) -> Duration {
    let limit = set.unwrap_or(declared);
    requested.map_or(limit, |requested| requested.min(limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RetryPolicy;

    fn policy(rate: Option<&str>) -> TaskPolicy {
        TaskPolicy {
            retry: RetryPolicy::default(),
            rate_limit: rate.map(|r| RateLimit::parse(r).unwrap()),
        }
    }

    #[test]
    fn a_rate_limit_set_at_runtime_replaces_or_disables_the_tasks() {
        let overrides = Overrides::default();
        let mut declared = policy(Some("10/s"));
        overrides.apply("math.add", &mut declared);
        assert_eq!(declared, policy(Some("10/s")), "nothing set: unchanged");
        overrides.set_rate_limit("math.add", Some(RateLimit::parse("2/s").unwrap()));
        overrides.apply("math.add", &mut declared);
        assert_eq!(declared, policy(Some("2/s")));
        let mut other = policy(None);
        overrides.apply("math.sub", &mut other);
        assert_eq!(other, policy(None), "only the task named");
        overrides.set_rate_limit("math.add", None);
        overrides.apply("math.add", &mut declared);
        assert_eq!(declared, policy(None), "disabled");
        assert_eq!(overrides.rate_limit("math.add"), Some(None));
        assert_eq!(overrides.rate_limit("math.sub"), None);
    }

    #[test]
    fn time_limits_set_at_runtime_bound_the_next_runs() {
        let overrides = Overrides::default();
        assert_eq!(overrides.time_limits("math.sleep"), None);
        let set = TimeLimits {
            soft: Some(Duration::from_millis(500)),
            hard: Some(Duration::from_secs(1)),
        };
        overrides.set_time_limits("math.sleep", set);
        assert_eq!(overrides.time_limits("math.sleep"), Some(set));
        let s = Duration::from_secs;
        assert_eq!(hard_limit(Some(s(1)), s(30), None), s(1), "set wins");
        assert_eq!(hard_limit(Some(s(60)), s(30), None), s(60), "may raise it");
        assert_eq!(
            hard_limit(Some(s(10)), s(30), Some(s(2))),
            s(2),
            "message lowers"
        );
        assert_eq!(
            hard_limit(Some(s(1)), s(30), Some(s(5))),
            s(1),
            "never raises"
        );
        assert_eq!(hard_limit(None, s(30), Some(s(50))), s(30));
    }
}
