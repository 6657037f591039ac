//! [`PrefetchLimit`]: how many unsettled deliveries a running consumer may hold, changeable
//! while it runs — the worker's autoscaler moves it with the number of task slots, so a
//! worker that shrank does not keep holding messages another worker could run.
//!
//! The worker holds one handle and sets it; the consumer reads it (a relaxed atomic load)
//! each time it decides how much more to fetch. A consumer that cannot change its window
//! while it runs does not offer one ([`Consumer::prefetch_limit`](super::Consumer)).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A consumer's prefetch window (see the module documentation). Cheap to clone: every
/// clone changes the same limit.
#[derive(Debug, Clone)]
pub struct PrefetchLimit(Arc<AtomicUsize>);

impl PrefetchLimit {
    /// A limit of `n` deliveries (at least 1).
    pub fn new(n: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(n.max(1))))
    }

    /// The limit now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the limit to `n` (at least 1); deliveries already held above it are kept until
    /// settled.
    pub fn set(&self, n: usize) {
        self.0.store(n.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clone_sees_the_same_limit_never_zero() {
        let limit = PrefetchLimit::new(0);
        assert_eq!(limit.get(), 1);
        let seen = limit.clone();
        limit.set(64);
        assert_eq!(seen.get(), 64);
        seen.set(0);
        assert_eq!(limit.get(), 1);
    }
}
