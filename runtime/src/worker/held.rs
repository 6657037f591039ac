//! Deliveries the worker holds in memory before they run — waiting out a near eta or a
//! rate-limit turn, without a task slot — so remote control can list them (Celery's
//! `inspect reserved` and `inspect scheduled`) and `query_task` can find them.
//!
//! A message further than a second from its eta is not held: it goes back to the broker as
//! a delayed message (see `admit`), so `scheduled` lists only what waits here. Messages
//! prefetched but not yet handed to a runner are inside the broker client and are counted
//! by `stats`' `prefetch_count`, not listed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};

use super::run::ActiveTask;
use crate::broker::Delivery;
use crate::protocol::TaskMessage;

/// A held delivery, as remote control shows it.
#[derive(Debug, Clone)]
pub(super) struct HeldTask {
    /// The task, as `inspect active` would show it once it runs.
    pub(super) task: ActiveTask,
    /// When it is due, when it waits for its eta (none: it waits for a rate-limit turn).
    pub(super) eta: Option<DateTime<Utc>>,
}

/// The deliveries held now (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct HeldDeliveries {
    held: Mutex<HashMap<u64, HeldTask>>,
    next: AtomicU64,
}

impl HeldDeliveries {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, HeldTask>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `message` as held (for its eta when `eta` is given) until the returned
    /// guard is dropped.
    pub(super) fn hold(
        &self,
        message: &TaskMessage,
        delivery: &Delivery,
        eta: Option<DateTime<Utc>>,
    ) -> Holding<'_> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let task = ActiveTask::of(message, delivery);
        self.lock().insert(number, HeldTask { task, eta });
        Holding {
            registry: self,
            number,
        }
    }

    /// The held deliveries, in the order they were held.
    pub(super) fn snapshot(&self) -> Vec<HeldTask> {
        let held = self.lock();
        let mut numbered: Vec<(&u64, &HeldTask)> = held.iter().collect();
        numbered.sort_by_key(|(number, _)| **number);
        numbered.into_iter().map(|(_, held)| held.clone()).collect()
    }
}

/// A delivery registered as held until this is dropped (see [`HeldDeliveries::hold`]).
#[derive(Debug)]
pub(super) struct Holding<'a> {
    registry: &'a HeldDeliveries,
    number: u64,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.number);
    }
}
