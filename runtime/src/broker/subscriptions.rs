//! [`Subscriptions`]: the queues a running consumer consumes, changeable while it runs
//! (Celery's `add_consumer` and `cancel_consumer` remote-control commands).
//!
//! The worker holds one handle and changes the set; the consumer watches it and starts or
//! cancels consuming a queue as it changes (RabbitMQ: a `basic.consume` / `basic.cancel` on
//! its channel, and the whole set again after a reconnect; embedded: the next lease reads
//! the new set). A queue is only ever named once, and the set may become empty: the
//! consumer then waits for a queue to be added.

use std::sync::Arc;

use tokio::sync::watch;

/// The queues a consumer consumes (see the module documentation). Cheap to clone: every
/// clone changes the same set.
#[derive(Debug, Clone)]
pub struct Subscriptions(Arc<watch::Sender<Vec<String>>>);

impl Subscriptions {
    /// A set holding `queues` (each once, in their order).
    pub fn new(queues: &[String]) -> Self {
        let mut unique: Vec<String> = Vec::with_capacity(queues.len());
        for queue in queues {
            if !unique.contains(queue) {
                unique.push(queue.clone());
            }
        }
        Self(Arc::new(watch::channel(unique).0))
    }

    /// The queues consumed now, in the order they were added.
    pub fn current(&self) -> Vec<String> {
        self.0.borrow().clone()
    }

    /// Starts consuming `queue`; false when it is consumed already.
    pub fn add(&self, queue: &str) -> bool {
        self.0.send_if_modified(|queues| {
            if queues.iter().any(|q| q == queue) {
                return false;
            }
            queues.push(queue.to_owned());
            true
        })
    }

    /// Stops consuming `queue`; false when it was not consumed.
    pub fn cancel(&self, queue: &str) -> bool {
        self.0.send_if_modified(|queues| {
            let before = queues.len();
            queues.retain(|q| q != queue);
            queues.len() != before
        })
    }

    /// A receiver that sees every change (for the consumer).
    pub fn watch(&self) -> watch::Receiver<Vec<String>> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_added_and_cancelled_once() {
        let set = Subscriptions::new(&["a".into(), "b".into(), "a".into()]);
        assert_eq!(set.current(), ["a", "b"]);
        let mut seen = set.watch();
        assert!(set.add("c"));
        assert!(!set.add("c"), "already consumed");
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), ["a", "b", "c"]);
        assert!(set.cancel("a"));
        assert!(!set.cancel("a"), "no longer consumed");
        assert!(!set.cancel("zzz"));
        assert_eq!(set.clone().current(), ["b", "c"]);
        assert!(set.cancel("b") && set.cancel("c"));
        assert!(set.current().is_empty(), "a consumer may consume nothing");
    }
}
