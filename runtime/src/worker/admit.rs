//! Admission: whether a decoded message may run now, and if not, what happens to it.
//!
//! On arrival a message is refused when it is poison (delivered too often), revoked or
//! expired; it waits when its eta is near (in memory, without a task slot) and goes back to
//! the broker when its eta is further than [`HOLD_AT_MOST`]. Once due, a rate-limited task
//! takes its turn the same way: a turn less than a second away is waited for, a later one
//! defers the message. Nothing here runs a task or settles a message: admission returns
//! what to do, and `decision` says how each refusal ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::decision::{self, Decision};
use super::revoked::RevokedSet;
use crate::broker::Delivery;
use crate::policy::RateLimit;
use crate::protocol::TaskMessage;

/// The longest a worker holds a message in memory before its eta or its rate-limit turn;
/// longer waits go back to the broker as delayed messages.
pub(super) const HOLD_AT_MOST: Duration = Duration::from_secs(1);

/// What to do with a message now.
#[derive(Debug)]
pub(super) enum Admission {
    /// Run it after waiting this long (zero: at once) without holding a task slot.
    RunAfter(Duration),
    /// Do not run it: settle it as decided (boxed: refusals are rare, runs are not).
    Refuse(Box<Decision>),
}

/// Admission on arrival: poison, revoked, expired, and the eta.
pub(super) fn on_arrival(
    delivery: &Delivery,
    message: &TaskMessage,
    max_deliveries: u32,
    revoked: &RevokedSet,
    now: DateTime<Utc>,
) -> Admission {
    if delivery.delivery_count > max_deliveries {
        tracing::error!(task = %message.task, id = %message.id, deliveries = delivery.delivery_count,
            "poison message: delivered too many times without finishing; dead-lettering it");
        return Admission::Refuse(Box::new(decision::poison(
            message,
            delivery.delivery_count,
            max_deliveries,
        )));
    }
    if revoked.get(&message.id).is_some() {
        tracing::info!(task = %message.task, id = %message.id, "revoked; not run");
        return Admission::Refuse(Box::new(decision::revoked(message, "revoked")));
    }
    if let Some((header, value)) = revoking_stamp(revoked, message) {
        tracing::info!(task = %message.task, id = %message.id, %header, %value,
            "revoked by a stamped header; not run");
        return Admission::Refuse(Box::new(decision::revoked(message, "revoked")));
    }
    if message.expires.is_some_and(|expires| expires <= now) {
        tracing::info!(task = %message.task, id = %message.id, "expired; not run");
        return Admission::Refuse(Box::new(decision::expired(message)));
    }
    match message.eta.and_then(|eta| (eta - now).to_std().ok()) {
        // Not due for a while: hand it back to the broker as a delayed message instead of
        // holding it unacknowledged (Celery's ETA problem with RabbitMQ's
        // consumer_timeout). The broker may deliver it up to a second early; the remainder
        // is held here.
        Some(wait) if wait > HOLD_AT_MOST => Admission::Refuse(Box::new(decision::deferred(wait))),
        Some(wait) => Admission::RunAfter(wait),
        None => Admission::RunAfter(Duration::ZERO),
    }
}

/// The revoked stamp `message` carries, if any (its `stamped_headers` and `stamps`
/// headers, as Celery's stamping writes them).
pub(super) fn revoking_stamp(
    revoked: &RevokedSet,
    message: &TaskMessage,
) -> Option<(String, serde_json::Value)> {
    let stamped_headers = message.extra_headers.get("stamped_headers")?.as_array()?;
    let stamps = message.extra_headers.get("stamps")?.as_object()?;
    revoked.revoking_stamp(stamped_headers, stamps)
}

/// Per-task rate limits of one worker (Celery's token bucket of capacity 1): when each task
/// may next run, and how many messages wait in memory for their turn.
#[derive(Debug)]
pub(super) struct RateTurns {
    /// Per task name: when its rate limit next lets one run.
    next: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Messages held waiting for a turn.
    waiting: AtomicUsize,
    /// The most messages held waiting for a turn (half the prefetch): a backlog beyond it
    /// goes back to the broker instead of filling the worker's memory.
    hold_limit: usize,
}

impl RateTurns {
    /// Turns for a worker holding at most `prefetch` messages.
    pub(super) fn new(prefetch: usize) -> Self {
        Self {
            next: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            hold_limit: (prefetch / 2).max(1),
        }
    }

    /// Takes `task`'s next turn under `rate` if it comes soon enough to wait for it in
    /// memory: run after the returned wait. Otherwise the message is deferred until then.
    pub(super) fn take(&self, task: &str, rate: RateLimit) -> Admission {
        let now = tokio::time::Instant::now();
        let mut turns = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = turns.get(task).copied().unwrap_or(now).max(now);
        let wait = next - now;
        if wait.is_zero()
            || (wait <= HOLD_AT_MOST && self.waiting.load(Ordering::Relaxed) < self.hold_limit)
        {
            turns.insert(task.to_owned(), next + rate.interval);
            Admission::RunAfter(wait)
        } else {
            Admission::Refuse(Box::new(decision::deferred(wait.max(HOLD_AT_MOST))))
        }
    }

    /// Counts a message waiting for its turn until the returned guard is dropped.
    pub(super) fn waiting(&self) -> WaitingForTurn<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingForTurn(self)
    }
}

/// A message counted as waiting for its rate-limit turn (see [`RateTurns::waiting`]).
pub(super) struct WaitingForTurn<'a>(&'a RateTurns);

impl Drop for WaitingForTurn<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::decision::Settlement;

    fn rate(per_second: u32) -> RateLimit {
        RateLimit::parse(&format!("{per_second}/s")).unwrap()
    }

    /// A wait of about `ms` milliseconds (the clock moves between two takes).
    fn about(wait: Duration, ms: u64) -> bool {
        wait <= Duration::from_millis(ms)
            && wait + Duration::from_millis(50) >= Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn rate_turns_wait_in_memory_up_to_a_second_then_defer() {
        let turns = RateTurns::new(4);
        assert!(matches!(turns.take("t", rate(2)), Admission::RunAfter(w) if w.is_zero()));
        assert!(matches!(turns.take("t", rate(2)), Admission::RunAfter(w) if about(w, 500)));
        assert!(matches!(turns.take("t", rate(2)), Admission::RunAfter(w) if about(w, 1000)));
        let Admission::Refuse(deferred) = turns.take("t", rate(2)) else {
            panic!("a turn 1.5 s away is not held in memory");
        };
        assert!(
            matches!(deferred.settlement, Settlement::Defer { delay } if about(delay, 1500)),
            "{deferred:?}"
        );
        assert!(
            matches!(turns.take("other", rate(2)), Admission::RunAfter(w) if w.is_zero()),
            "each task has its own bucket"
        );
    }

    #[tokio::test]
    async fn no_more_than_half_the_prefetch_waits_for_a_turn() {
        let turns = RateTurns::new(2);
        assert!(matches!(turns.take("t", rate(10)), Admission::RunAfter(_)));
        let held = turns.waiting();
        assert!(
            matches!(turns.take("t", rate(10)), Admission::Refuse(_)),
            "one message already waits, the limit for a prefetch of 2"
        );
        drop(held);
        assert!(matches!(turns.take("t", rate(10)), Admission::RunAfter(_)));
    }
}
