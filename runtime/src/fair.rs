//! Fair task slots for a worker serving several tenants: when a slot frees, whose task
//! runs next.
//!
//! A worker has a fixed number of task slots and runs tasks without preemption: a task
//! keeps its slot until it ends. A plain semaphore hands slots out first come, first
//! served, so one tenant with a deep backlog fills every slot and the others queue behind
//! it. This module hands them out by *start-time fair queuing* (SFQ): each tenant carries a
//! virtual time `v = service received / weight`, and a free slot goes to the backlogged
//! tenant with the smallest `v`. Tenants that stay backlogged receive service in
//! proportion to their weights, up to a bounded lag.
//!
//! The service is charged *after* a task ends (post-hoc): what a wasm task costs — the fuel
//! it burnt, the wall time it held its slot — is known only then, and guessing up front
//! would let a tenant of long tasks pass for one of short tasks. Charging the measured cost
//! makes the share one of slot time, not of task counts: a tenant whose tasks are ten times
//! longer gets a tenth as many grants. The price is a lag: a tenant's running tasks are not
//! charged yet, so its `v` trails by at most `max_concurrency × longest task / weight`.
//!
//! A tenant that goes idle banks no credit: when its queue turns non-empty again and it runs
//! nothing, its `v` is raised to the smallest `v` among the tenants still active. It then
//! competes as an equal from now on instead of taking every slot until it has caught up
//! with the time it was away. A tenant that overspent keeps its debt.
//!
//! Three limits shape who is *eligible* for a free slot, and bind only under contention
//! (the scheduler is work-conserving: a slot is never left free while some request could
//! take it):
//! * `max_concurrency` caps the tenant's running tasks;
//! * `reserved` slots are served first: while a tenant with waiting work runs fewer than its
//!   reservation, only such tenants are considered. Without preemption this is kept at the
//!   next releases, not at once: a lone tenant below its reservation gets the very next;
//! * `memory_budget` bounds the sum of the memory limits of the tenant's running tasks
//!   (requests are FIFO per tenant: a head that does not fit blocks its tenant, never
//!   overtaken by a smaller one). A request larger than the whole budget runs when the
//!   tenant runs nothing, alone, rather than never.
//!
//! [`FairQueue`] is the deterministic core: no clock, no I/O, costs passed in, so it is
//! tested by simulation. [`SlotArbiter`] is the async face the worker's tasks call, and
//! [`Slot`] the granted slot, charged its wall time when dropped. This file is longer than
//! the usual 400 lines because it owns one idea, the fair slot scheduler, with its
//! simulation tests.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::oneshot;

/// One tenant's share of the slots.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantShare {
    /// The tenant's name, unique among the shares (for errors, logs and metrics).
    pub name: String,
    /// Its weight: under contention tenants get slot time in proportion to their weights.
    /// Positive and finite.
    pub weight: f64,
    /// The most tasks it runs at once, at least 1 and at least `reserved`; clamped to the
    /// slots.
    pub max_concurrency: usize,
    /// Slots it gets before tenants at or above their own reservation; the reservations of
    /// all tenants add up to at most the slots.
    pub reserved: usize,
    /// The most memory (the sum of its running tasks' memory limits, in bytes) it may hold
    /// at once; `None` for no bound.
    pub memory_budget: Option<u64>,
}

impl TenantShare {
    /// A share of weight 1, no cap (clamped to the slots), no reservation, no memory budget.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            weight: 1.0,
            max_concurrency: usize::MAX,
            reserved: 0,
            memory_budget: None,
        }
    }

    /// The same share with `weight`.
    #[must_use]
    pub fn with_weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// The same share with `max_concurrency`.
    #[must_use]
    pub fn with_max_concurrency(mut self, max_concurrency: usize) -> Self {
        self.max_concurrency = max_concurrency;
        self
    }

    /// The same share with `reserved` slots.
    #[must_use]
    pub fn with_reserved(mut self, reserved: usize) -> Self {
        self.reserved = reserved;
        self
    }

    /// The same share with a memory budget of `bytes`.
    #[must_use]
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = Some(bytes);
        self
    }
}

/// Shares that cannot be scheduled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FairError {
    /// Zero slots: nothing could ever run.
    #[error("a worker needs at least one task slot")]
    NoSlots,
    /// No tenant to share the slots between.
    #[error("no tenant to share the slots between")]
    NoTenant,
    /// Two shares have the same name.
    #[error("two tenants are named {0:?}")]
    DuplicateTenant(String),
    /// A weight that is zero, negative, infinite or NaN.
    #[error("tenant {tenant:?}: weight {weight} is not a positive finite number")]
    BadWeight {
        /// The tenant's name.
        tenant: String,
        /// Its weight.
        weight: f64,
    },
    /// A `max_concurrency` of 0: the tenant could never run.
    #[error("tenant {tenant:?}: max_concurrency must be at least 1")]
    ZeroConcurrency {
        /// The tenant's name.
        tenant: String,
    },
    /// A tenant reserves more slots than it may use.
    #[error("tenant {tenant:?} reserves {reserved} slots but may run only {max_concurrency}")]
    ReservedOverCap {
        /// The tenant's name.
        tenant: String,
        /// Its reservation.
        reserved: usize,
        /// Its cap.
        max_concurrency: usize,
    },
    /// The reservations add up to more than the slots.
    #[error("the tenants reserve {reserved} slots in all but there are only {slots}")]
    ReservationsExceedSlots {
        /// The sum of the reservations.
        reserved: usize,
        /// The slots.
        slots: usize,
    },
}

/// A request for a slot, from [`FairQueue::enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// A request granted a slot, from [`FairQueue::grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The tenant (its index in the shares).
    pub tenant: usize,
    /// The request granted.
    pub request: RequestId,
    /// The memory it asked for, now counted against the tenant's budget.
    pub memory: u64,
}

/// One tenant's scheduling state.
#[derive(Debug, Default)]
struct TenantState {
    /// Waiting requests, oldest first; their ids increase (they are handed out in order).
    queue: VecDeque<(RequestId, u64)>,
    running: usize,
    memory_in_use: u64,
    /// Service received / weight, plus the catch-up applied when returning from idle.
    vtime: f64,
}

impl TenantState {
    fn fits(&self, share: &TenantShare, memory: u64) -> bool {
        share.memory_budget.is_none_or(|budget| {
            self.running == 0 || self.memory_in_use.saturating_add(memory) <= budget
        })
    }
}

/// The deterministic core of the scheduler (used by [`SlotArbiter`], and by simulation
/// tests): requests wait in per-tenant FIFOs; [`grant`](Self::grant) says which one runs
/// next, [`release`](Self::release) ends one and charges its cost.
#[derive(Debug)]
pub struct FairQueue {
    slots: usize,
    shares: Vec<TenantShare>,
    tenants: Vec<TenantState>,
    running: usize,
    waiting: usize,
    next_request: u64,
    /// Ties in virtual time go to the first tenant after this one (round robin).
    last_picked: usize,
}

impl FairQueue {
    /// A queue sharing `slots` between `shares` (tenant `i` is `shares[i]`); caps are
    /// clamped to the slots.
    ///
    /// # Errors
    /// A [`FairError`] naming the first share that cannot be scheduled.
    pub fn new(slots: usize, mut shares: Vec<TenantShare>) -> Result<Self, FairError> {
        if slots == 0 {
            return Err(FairError::NoSlots);
        }
        if shares.is_empty() {
            return Err(FairError::NoTenant);
        }
        let mut reserved = 0usize;
        for (i, share) in shares.iter().enumerate() {
            if shares[..i].iter().any(|other| other.name == share.name) {
                return Err(FairError::DuplicateTenant(share.name.clone()));
            }
            if !share.weight.is_finite() || share.weight <= 0.0 {
                return Err(FairError::BadWeight {
                    tenant: share.name.clone(),
                    weight: share.weight,
                });
            }
            if share.max_concurrency == 0 {
                return Err(FairError::ZeroConcurrency {
                    tenant: share.name.clone(),
                });
            }
            if share.reserved > share.max_concurrency {
                return Err(FairError::ReservedOverCap {
                    tenant: share.name.clone(),
                    reserved: share.reserved,
                    max_concurrency: share.max_concurrency,
                });
            }
            reserved = reserved.saturating_add(share.reserved);
        }
        if reserved > slots {
            return Err(FairError::ReservationsExceedSlots { reserved, slots });
        }
        for share in &mut shares {
            share.max_concurrency = share.max_concurrency.min(slots);
        }
        Ok(Self::from_valid(slots, shares))
    }

    fn from_valid(slots: usize, shares: Vec<TenantShare>) -> Self {
        Self {
            slots,
            tenants: shares.iter().map(|_| TenantState::default()).collect(),
            last_picked: shares.len() - 1,
            shares,
            running: 0,
            waiting: 0,
            next_request: 0,
        }
    }

    /// Adds a request of `tenant` for a slot and `memory` bytes of its budget, behind the
    /// tenant's other waiting requests. It runs once [`grant`](Self::grant) returns it.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn enqueue(&mut self, tenant: usize, memory: u64) -> RequestId {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let state = &self.tenants[tenant];
        if state.queue.is_empty() && state.running == 0 {
            // Back from idle: no credit for the time away. The tenant is not active, so the
            // floor is taken over the others only.
            let floor = self
                .tenants
                .iter()
                .filter(|t| !t.queue.is_empty() || t.running > 0)
                .map(|t| t.vtime)
                .min_by(f64::total_cmp);
            if let Some(floor) = floor {
                let state = &mut self.tenants[tenant];
                state.vtime = state.vtime.max(floor);
            }
        }
        self.tenants[tenant].queue.push_back((request, memory));
        self.waiting += 1;
        request
    }

    /// Withdraws a request that has not been granted; false when it is not waiting (granted
    /// already, or withdrawn). Withdrawing a request may let others run: call
    /// [`grant`](Self::grant) after.
    pub fn cancel(&mut self, request: RequestId) -> bool {
        for state in &mut self.tenants {
            if let Ok(at) = state.queue.binary_search_by_key(&request.0, |(id, _)| id.0) {
                state.queue.remove(at);
                self.waiting -= 1;
                return true;
            }
        }
        false
    }

    /// The next request to run now, if a slot is free and some request is eligible; call it
    /// in a loop until `None`. The request leaves its queue and holds a slot until
    /// [`release`](Self::release).
    pub fn grant(&mut self) -> Option<Grant> {
        if self.running >= self.slots || self.waiting == 0 {
            return None;
        }
        let n = self.tenants.len();
        // (tenant, below its reservation, virtual time) of the best candidate so far.
        let mut best: Option<(usize, bool, f64)> = None;
        for step in 1..=n {
            let i = (self.last_picked + step) % n;
            let (share, state) = (&self.shares[i], &self.tenants[i]);
            let Some(&(_, memory)) = state.queue.front() else {
                continue;
            };
            if state.running >= share.max_concurrency || !state.fits(share, memory) {
                continue;
            }
            let reserved = state.running < share.reserved;
            let better = match best {
                None => true,
                Some((_, best_reserved, best_vtime)) => {
                    (reserved && !best_reserved)
                        || (reserved == best_reserved && state.vtime < best_vtime)
                }
            };
            if better {
                best = Some((i, reserved, state.vtime));
            }
        }
        let (tenant, _, _) = best?;
        let state = &mut self.tenants[tenant];
        let (request, memory) = state.queue.pop_front()?;
        state.running += 1;
        state.memory_in_use = state.memory_in_use.saturating_add(memory);
        self.running += 1;
        self.waiting -= 1;
        self.last_picked = tenant;
        Some(Grant {
            tenant,
            request,
            memory,
        })
    }

    /// Ends one of `tenant`'s granted slots, which held `memory` bytes of its budget, and
    /// charges the tenant `cost` (any unit, the same for all tenants; negative or non-finite
    /// costs are charged 0). Call [`grant`](Self::grant) after: the slot is free. A release
    /// for a tenant that holds no slot is ignored.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn release(&mut self, tenant: usize, memory: u64, cost: f64) {
        let weight = self.shares[tenant].weight;
        let state = &mut self.tenants[tenant];
        if state.running == 0 {
            // A release without a grant must not free a slot someone else holds.
            return;
        }
        state.running -= 1;
        state.memory_in_use = state.memory_in_use.saturating_sub(memory);
        if cost.is_finite() && cost > 0.0 {
            state.vtime += cost / weight;
        }
        self.running -= 1;
    }

    /// Sets how many slots `tenant` may hold at once (its cap), clamped to 1..=slots;
    /// returns the cap in force. A lower cap takes effect as running tasks end (none is
    /// interrupted); call [`grant`](Self::grant) after a raise, as waiting requests may
    /// run now.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn set_max_concurrency(&mut self, tenant: usize, cap: usize) -> usize {
        let cap = cap.clamp(1, self.slots);
        self.shares[tenant].max_concurrency = cap;
        cap
    }

    /// The slots `tenant` holds now.
    pub fn running(&self, tenant: usize) -> usize {
        self.tenants[tenant].running
    }

    /// The requests of `tenant` waiting for a slot.
    pub fn waiting(&self, tenant: usize) -> usize {
        self.tenants[tenant].queue.len()
    }

    /// The memory `tenant`'s running requests asked for, in all.
    pub fn memory_in_use(&self, tenant: usize) -> u64 {
        self.tenants[tenant].memory_in_use
    }

    /// `tenant`'s virtual time: the cost charged to it over its weight, plus catch-up after
    /// idle periods. Only differences between tenants mean something.
    pub fn virtual_time(&self, tenant: usize) -> f64 {
        self.tenants[tenant].vtime
    }

    /// Slots no request holds.
    pub fn free_slots(&self) -> usize {
        self.slots - self.running
    }

    /// All the slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The tenants' shares as scheduled (caps clamped to the slots).
    pub fn shares(&self) -> &[TenantShare] {
        &self.shares
    }
}

/// The async face of the scheduler the worker uses: many tasks call
/// [`acquire`](Self::acquire) concurrently. Cloning it is cheap (an `Arc`).
#[derive(Clone)]
pub struct SlotArbiter {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    slots: usize,
    tenants: usize,
}

/// The queue and, for each waiting request whose future is parked, how to wake it.
struct State {
    queue: FairQueue,
    waiters: HashMap<RequestId, oneshot::Sender<()>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held (tenants are checked before), so a poisoned
        // state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Grants every request that can run now and wakes their futures; true when `own` (a
    /// request whose caller holds the lock, with no waiter yet) is among them. A grant whose
    /// waiter is gone is released at once, charged nothing, so no slot leaks.
    fn hand_out(&mut self, own: Option<RequestId>) -> bool {
        let mut own_granted = false;
        while let Some(grant) = self.queue.grant() {
            if Some(grant.request) == own {
                own_granted = true;
                continue;
            }
            let woken = self
                .waiters
                .remove(&grant.request)
                .is_some_and(|waiter| waiter.send(()).is_ok());
            if !woken {
                self.queue.release(grant.tenant, grant.memory, 0.0);
            }
        }
        own_granted
    }
}

impl SlotArbiter {
    /// An arbiter sharing `slots` between `shares` (tenant `i` is `shares[i]`).
    ///
    /// # Errors
    /// A [`FairError`] naming the first share that cannot be scheduled.
    pub fn new(slots: usize, shares: Vec<TenantShare>) -> Result<Self, FairError> {
        Ok(Self::from_queue(FairQueue::new(slots, shares)?))
    }

    /// A single tenant (index 0) with `slots` slots (at least 1): behaves like a semaphore
    /// (used when no tenants are configured).
    pub fn single(slots: usize) -> Self {
        let slots = slots.max(1);
        let mut share = TenantShare::new("default");
        share.max_concurrency = slots;
        Self::from_queue(FairQueue::from_valid(slots, vec![share]))
    }

    fn from_queue(queue: FairQueue) -> Self {
        Self {
            inner: Arc::new(Inner {
                slots: queue.slots(),
                tenants: queue.shares().len(),
                state: Mutex::new(State {
                    queue,
                    waiters: HashMap::new(),
                }),
            }),
        }
    }

    /// Waits for a slot for `tenant` needing `memory` bytes of its budget (0 when it has
    /// none). Cancel-safe: dropping the future before it completes withdraws the request,
    /// and a slot granted to a dropped future is released at once (charged 0), so no slot
    /// ever leaks.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub async fn acquire(&self, tenant: usize, memory: u64) -> Slot {
        assert!(
            tenant < self.inner.tenants,
            "tenant {tenant} out of range ({} tenants)",
            self.inner.tenants
        );
        loop {
            let (request, waiter) = {
                let mut state = self.inner.lock();
                let request = state.queue.enqueue(tenant, memory);
                if state.hand_out(Some(request)) {
                    // The fast path: a slot was free and this tenant was next; no channel.
                    return self.slot(tenant, memory);
                }
                let (sender, waiter) = oneshot::channel();
                state.waiters.insert(request, sender);
                (request, waiter)
            };
            let mut pending = Pending {
                inner: &self.inner,
                request,
                tenant,
                memory,
                waiter,
                done: false,
            };
            if (&mut pending.waiter).await.is_ok() {
                pending.done = true;
                return self.slot(tenant, memory);
            }
            // The sender went away without a grant, which only happens if the request was
            // withdrawn: `pending` settles the request as a drop would, and we ask again.
        }
    }

    fn slot(&self, tenant: usize, memory: u64) -> Slot {
        Slot {
            inner: Arc::clone(&self.inner),
            tenant,
            memory,
            started: Instant::now(),
            cost: None,
        }
    }

    /// Slots no task holds.
    pub fn free_slots(&self) -> usize {
        self.inner.lock().queue.free_slots()
    }

    /// The slots `tenant` holds now.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn running(&self, tenant: usize) -> usize {
        self.inner.lock().queue.running(tenant)
    }

    /// The requests of `tenant` waiting for a slot.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn waiting(&self, tenant: usize) -> usize {
        self.inner.lock().queue.waiting(tenant)
    }

    /// The memory `tenant`'s running tasks asked for, in all.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn memory_in_use(&self, tenant: usize) -> u64 {
        self.inner.lock().queue.memory_in_use(tenant)
    }

    /// All the slots.
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// How many slots `tenant` may hold at once now (its cap).
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn max_concurrency(&self, tenant: usize) -> usize {
        self.inner.lock().queue.shares()[tenant].max_concurrency
    }

    /// Changes `tenant`'s cap (see [`FairQueue::set_max_concurrency`]), waking the requests
    /// a raise lets run; returns the cap in force.
    ///
    /// # Panics
    /// When `tenant` is not an index into the shares.
    pub fn set_max_concurrency(&self, tenant: usize, cap: usize) -> usize {
        let mut state = self.inner.lock();
        let cap = state.queue.set_max_concurrency(tenant, cap);
        state.hand_out(None);
        cap
    }

    /// How many tenants share the slots.
    pub fn tenants(&self) -> usize {
        self.inner.tenants
    }
}

impl fmt::Debug for SlotArbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotArbiter")
            .field("slots", &self.inner.slots)
            .field("tenants", &self.inner.tenants)
            .finish_non_exhaustive()
    }
}

/// A request of [`SlotArbiter::acquire`] while its future waits: dropped before the grant
/// is observed, it withdraws the request or gives the slot back.
struct Pending<'a> {
    inner: &'a Inner,
    request: RequestId,
    tenant: usize,
    memory: u64,
    /// Kept alive until the request is settled under the lock, so a grant made meanwhile
    /// is always delivered here, never released twice.
    waiter: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.inner.lock();
        if state.queue.cancel(self.request) {
            state.waiters.remove(&self.request);
        } else {
            // Granted, but nobody is left to use it.
            state.queue.release(self.tenant, self.memory, 0.0);
        }
        state.hand_out(None);
    }
}

/// A granted slot; dropping it releases the slot, charging its tenant the wall time it was
/// held (in microseconds, as f64), unless [`set_cost`](Self::set_cost) was called.
pub struct Slot {
    inner: Arc<Inner>,
    tenant: usize,
    memory: u64,
    started: Instant,
    cost: Option<f64>,
}

impl Slot {
    /// The tenant holding it.
    pub fn tenant(&self) -> usize {
        self.tenant
    }

    /// The memory it holds of its tenant's budget.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// Charges `cost` when released instead of the wall time (e.g. the fuel the task
    /// burnt); the unit must be the same for every tenant of the arbiter.
    pub fn set_cost(&mut self, cost: f64) {
        self.cost = Some(cost);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let cost = self
            .cost
            .unwrap_or_else(|| self.started.elapsed().as_secs_f64() * 1e6);
        let mut state = self.inner.lock();
        state.queue.release(self.tenant, self.memory, cost);
        state.hand_out(None);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("tenant", &self.tenant)
            .field("memory", &self.memory)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// A discrete-event simulation of a worker over a [`FairQueue`]: a simulated clock,
    /// tasks of given durations charged their duration when they end. It mirrors each
    /// tenant's FIFO and checks the scheduler's invariants after every event.
    struct Sim {
        queue: FairQueue,
        now: u64,
        /// Waiting tasks: (duration, memory).
        tasks: HashMap<RequestId, (u64, u64)>,
        /// The waiting requests of each tenant, as submitted.
        fifo: Vec<VecDeque<RequestId>>,
        in_flight: BinaryHeap<Reverse<Running>>,
        /// Tenants kept backlogged: a new task of (duration, memory) per grant.
        refill: Vec<Option<(u64, u64)>>,
        /// The tenant of each grant, in order.
        grants: Vec<usize>,
        /// Slot time used per tenant.
        busy: Vec<u64>,
        /// Most tasks run at once per tenant.
        peak: Vec<usize>,
        releases: usize,
    }

    /// A running task of a simulation; the next to end first (ties: the first granted).
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct Running {
        end: u64,
        grant: usize,
        tenant: usize,
        duration: u64,
        memory: u64,
    }

    impl Sim {
        fn new(slots: usize, shares: Vec<TenantShare>) -> Self {
            let n = shares.len();
            Self {
                queue: FairQueue::new(slots, shares).unwrap(),
                now: 0,
                tasks: HashMap::new(),
                fifo: vec![VecDeque::new(); n],
                in_flight: BinaryHeap::new(),
                refill: vec![None; n],
                grants: Vec::new(),
                busy: vec![0; n],
                peak: vec![0; n],
                releases: 0,
            }
        }

        fn tenants(&self) -> usize {
            self.fifo.len()
        }

        fn submit(&mut self, tenant: usize, duration: u64, memory: u64) -> RequestId {
            let request = self.queue.enqueue(tenant, memory);
            self.tasks.insert(request, (duration, memory));
            self.fifo[tenant].push_back(request);
            self.check();
            request
        }

        fn backlog(&mut self, tenant: usize, tasks: usize, duration: u64, memory: u64) {
            for _ in 0..tasks {
                self.submit(tenant, duration, memory);
            }
        }

        /// Keeps `tenant` backlogged with tasks of `duration` from now on.
        fn keep_backlogged(&mut self, tenant: usize, duration: u64, memory: u64) {
            self.refill[tenant] = Some((duration, memory));
            if self.fifo[tenant].is_empty() {
                self.submit(tenant, duration, memory);
            }
        }

        fn cancel(&mut self, tenant: usize, at: usize) {
            let Some(request) = self.fifo[tenant].remove(at) else {
                return;
            };
            assert!(self.queue.cancel(request));
            assert!(!self.queue.cancel(request), "withdrawn twice");
            self.tasks.remove(&request);
            self.check();
        }

        /// Could `tenant`'s head request run if a slot were free (as the spec says)?
        fn eligible(&self, tenant: usize) -> bool {
            let Some(head) = self.fifo[tenant].front() else {
                return false;
            };
            let share = &self.queue.shares()[tenant];
            let running = self.queue.running(tenant);
            let memory = self.tasks[head].1;
            running < share.max_concurrency
                && share.memory_budget.is_none_or(|budget| {
                    running == 0 || self.queue.memory_in_use(tenant) + memory <= budget
                })
        }

        fn below_reservation(&self, tenant: usize) -> bool {
            self.queue.running(tenant) < self.queue.shares()[tenant].reserved
        }

        /// Starts every task the queue grants now.
        fn dispatch(&mut self) {
            loop {
                let reserved: Vec<usize> = (0..self.tenants())
                    .filter(|&t| self.eligible(t) && self.below_reservation(t))
                    .collect();
                let Some(grant) = self.queue.grant() else {
                    break;
                };
                let tenant = grant.tenant;
                assert!(
                    reserved.is_empty() || reserved.contains(&tenant),
                    "granted tenant {tenant} while tenants {reserved:?} wait below their reservation"
                );
                assert_eq!(
                    self.fifo[tenant].pop_front(),
                    Some(grant.request),
                    "FIFO within a tenant"
                );
                let (duration, memory) = self.tasks.remove(&grant.request).unwrap();
                assert_eq!(memory, grant.memory);
                self.in_flight.push(Reverse(Running {
                    end: self.now + duration,
                    grant: self.grants.len(),
                    tenant,
                    duration,
                    memory,
                }));
                self.grants.push(tenant);
                self.peak[tenant] = self.peak[tenant].max(self.queue.running(tenant));
                self.check();
                if let Some((duration, memory)) = self.refill[tenant] {
                    self.submit(tenant, duration, memory);
                }
            }
            if self.queue.free_slots() > 0 {
                for tenant in 0..self.tenants() {
                    assert!(
                        !self.eligible(tenant),
                        "a slot is free but tenant {tenant} waits (not work-conserving)"
                    );
                }
            }
        }

        /// Ends the next task to end, charges it its duration, and dispatches; the tenant
        /// of the task ended.
        fn complete_next(&mut self) -> Option<usize> {
            let Reverse(Running {
                end,
                tenant,
                duration,
                memory,
                ..
            }) = self.in_flight.pop()?;
            for t in 0..self.tenants() {
                self.busy[t] += (end - self.now) * self.queue.running(t) as u64;
            }
            self.now = end;
            self.queue.release(tenant, memory, duration as f64);
            self.releases += 1;
            self.check();
            self.dispatch();
            Some(tenant)
        }

        fn complete(&mut self, events: usize) {
            for _ in 0..events {
                self.complete_next().unwrap();
            }
        }

        /// Caps, memory budgets and the slot count, at this instant.
        fn check(&self) {
            let mut total = 0;
            for (tenant, share) in self.queue.shares().iter().enumerate() {
                let running = self.queue.running(tenant);
                assert!(
                    running <= share.max_concurrency,
                    "tenant {tenant} runs {running} > cap {}",
                    share.max_concurrency
                );
                if let Some(budget) = share.memory_budget {
                    let in_use = self.queue.memory_in_use(tenant);
                    assert!(
                        in_use <= budget || running == 1,
                        "tenant {tenant} holds {in_use} bytes > budget {budget} in {running} tasks"
                    );
                }
                assert_eq!(self.queue.waiting(tenant), self.fifo[tenant].len());
                total += running;
            }
            assert!(
                total <= self.queue.slots(),
                "{total} tasks in {} slots",
                self.queue.slots()
            );
            assert_eq!(self.queue.free_slots(), self.queue.slots() - total);
            assert_eq!(self.in_flight.len(), total);
        }

        fn share_of(&self, tenant: usize, grants: &[usize]) -> f64 {
            grants.iter().filter(|&&t| t == tenant).count() as f64 / grants.len() as f64
        }
    }

    /// A tiny deterministic generator (xorshift64), so the tests need no seed handling.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn shares_are_validated() {
        let a = || TenantShare::new("a");
        assert_eq!(
            FairQueue::new(0, vec![a()]).unwrap_err(),
            FairError::NoSlots
        );
        assert_eq!(FairQueue::new(4, vec![]).unwrap_err(), FairError::NoTenant);
        assert_eq!(
            FairQueue::new(4, vec![a(), a()]).unwrap_err(),
            FairError::DuplicateTenant("a".into())
        );
        for weight in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                FairQueue::new(4, vec![a().with_weight(weight)]).unwrap_err(),
                FairError::BadWeight { .. }
            ));
        }
        assert!(matches!(
            FairQueue::new(4, vec![a().with_max_concurrency(0)]).unwrap_err(),
            FairError::ZeroConcurrency { .. }
        ));
        assert!(matches!(
            FairQueue::new(4, vec![a().with_max_concurrency(1).with_reserved(2)]).unwrap_err(),
            FairError::ReservedOverCap { .. }
        ));
        let over = vec![a().with_reserved(3), TenantShare::new("b").with_reserved(2)];
        assert_eq!(
            FairQueue::new(4, over).unwrap_err(),
            FairError::ReservationsExceedSlots {
                reserved: 5,
                slots: 4
            }
        );
        let queue = FairQueue::new(4, vec![a().with_reserved(4)]).unwrap();
        assert_eq!(
            queue.shares()[0].max_concurrency,
            4,
            "the cap is clamped to the slots"
        );
    }

    /// A tenant with a reservation waits at most one release behind a tenant that fills
    /// every slot, even when its virtual time is far ahead (it once ran a huge task).
    #[test]
    fn a_reservation_gets_the_next_released_slot() {
        let shares = vec![
            TenantShare::new("a"),
            TenantShare::new("b").with_reserved(1),
        ];
        let mut sim = Sim::new(4, shares);
        sim.submit(1, 1_000_000, 0);
        sim.dispatch();
        sim.complete(1);
        assert!(sim.queue.virtual_time(1) > 100_000.0);

        sim.backlog(0, 10_000, 10, 0);
        sim.dispatch();
        assert_eq!(sim.queue.running(0), 4);
        sim.submit(1, 10, 0);
        sim.dispatch();
        assert_eq!(sim.queue.running(1), 0, "no slot is free yet");
        let releases = sim.releases;
        sim.complete(1);
        assert_eq!(sim.releases - releases, 1);
        assert_eq!(sim.queue.running(1), 1, "b runs at the very next release");
        assert_eq!(sim.queue.running(0), 3);
    }

    /// Weights 3:1 with equal costs: a 3:1 split of the grants.
    #[test]
    fn weights_split_the_grants() {
        let shares = vec![
            TenantShare::new("a").with_weight(3.0),
            TenantShare::new("b").with_weight(1.0),
        ];
        let mut sim = Sim::new(4, shares);
        sim.keep_backlogged(0, 10, 0);
        sim.keep_backlogged(1, 10, 0);
        sim.dispatch();
        while sim.grants.len() < 10_000 {
            sim.complete(1);
        }
        let share = sim.share_of(0, &sim.grants[..10_000]);
        println!(
            "weights 3:1: a's share of 10,000 grants = {:.2}%",
            share * 100.0
        );
        assert!((share - 0.75).abs() <= 0.02, "a's share {share}");
    }

    /// Equal weights, a's tasks cost 10× b's: the slot time splits 50/50 (so b gets
    /// about ten times as many grants).
    #[test]
    fn costs_not_counts_are_shared() {
        let shares = vec![TenantShare::new("a"), TenantShare::new("b")];
        let mut sim = Sim::new(4, shares);
        sim.keep_backlogged(0, 100, 0);
        sim.keep_backlogged(1, 10, 0);
        sim.dispatch();
        while sim.now < 1_000_000 {
            sim.complete(1);
        }
        let share = sim.busy[0] as f64 / (sim.busy[0] + sim.busy[1]) as f64;
        let grants = sim.share_of(0, &sim.grants);
        println!(
            "costs 10:1: a's slot time = {:.2}%, a's grants = {:.2}% of {}",
            share * 100.0,
            grants * 100.0,
            sim.grants.len()
        );
        assert!((share - 0.5).abs() <= 0.05, "a's slot time share {share}");
        assert!(grants < 0.15, "a's share of the grants {grants}");
    }

    /// Under a random mixed load (arrivals, withdrawals, memory, oversized requests),
    /// after every event: caps, budgets and slots hold, reservations are served first, FIFO
    /// holds within a tenant, and no slot stays free while a request could run.
    #[test]
    fn caps_budgets_and_reservations_hold_at_every_event() {
        let shares = vec![
            TenantShare::new("a")
                .with_weight(2.0)
                .with_max_concurrency(3)
                .with_reserved(1)
                .with_memory_budget(300),
            TenantShare::new("b")
                .with_max_concurrency(2)
                .with_reserved(2),
            TenantShare::new("c")
                .with_weight(0.5)
                .with_memory_budget(1_000),
            TenantShare::new("d").with_weight(4.0).with_reserved(1),
        ];
        let mut sim = Sim::new(6, shares);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            match rng.below(10) {
                0..=2 => {
                    let tenant = rng.below(4) as usize;
                    for _ in 0..=rng.below(6) {
                        let duration = 1 + rng.below(50);
                        let memory = match rng.below(20) {
                            0 => 1_500,
                            _ => rng.below(200),
                        };
                        sim.submit(tenant, duration, memory);
                    }
                    sim.dispatch();
                }
                3 => {
                    let tenant = rng.below(4) as usize;
                    let waiting = sim.fifo[tenant].len() as u64;
                    if waiting > 0 {
                        sim.cancel(tenant, rng.below(waiting) as usize);
                        sim.dispatch();
                    }
                }
                _ => {
                    sim.complete_next();
                }
            }
        }
        println!(
            "random load: {} grants, peaks {:?}",
            sim.grants.len(),
            sim.peak
        );
        assert!(sim.grants.len() > 10_000);
        assert_eq!(sim.peak[1], 2, "b reaches its cap");
        assert!(sim.peak[0] <= 3);
    }

    /// A tenant back from a long idle period gets its fair share, not a burst of
    /// catch-up grants for the time it was away.
    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let shares = vec![TenantShare::new("a"), TenantShare::new("b")];
        let mut sim = Sim::new(4, shares);
        sim.keep_backlogged(0, 10, 0);
        sim.keep_backlogged(1, 10, 0);
        sim.dispatch();
        sim.complete(1_000);
        let together = sim.share_of(1, &sim.grants);

        sim.refill[1] = None;
        while sim.queue.running(1) + sim.queue.waiting(1) > 0 {
            sim.complete(1);
        }
        sim.complete(10_000);
        assert_eq!(sim.queue.running(0), 4, "a alone uses every slot meanwhile");

        let back = sim.grants.len();
        sim.keep_backlogged(1, 10, 0);
        sim.dispatch();
        while sim.grants.len() < back + 1_000 {
            sim.complete(1);
        }
        let first = sim.share_of(1, &sim.grants[back..back + 40]);
        let after = sim.share_of(1, &sim.grants[back..back + 1_000]);
        println!(
            "idle return: b's share before {:.2}%, over its first 40 grants back {:.2}%, \
             over 1,000 {:.2}%",
            together * 100.0,
            first * 100.0,
            after * 100.0
        );
        assert!(first <= 0.6, "b's burst on return: {first}");
        assert!(
            (after - 0.5).abs() <= 0.02,
            "b's share after return: {after}"
        );
    }

    /// Caps and reservations bind only under contention: with b idle, a takes every slot
    /// (b's reservation included) up to its cap.
    #[test]
    fn an_idle_tenants_share_goes_to_the_others() {
        let shares = vec![
            TenantShare::new("a"),
            TenantShare::new("b").with_weight(5.0).with_reserved(2),
        ];
        let mut sim = Sim::new(4, shares);
        sim.backlog(0, 1_000, 10, 0);
        sim.dispatch();
        for _ in 0..500 {
            assert_eq!(sim.queue.running(0), 4);
            sim.complete(1);
        }

        let shares = vec![
            TenantShare::new("a").with_max_concurrency(3),
            TenantShare::new("b").with_reserved(2),
        ];
        let mut sim = Sim::new(4, shares);
        sim.backlog(0, 1_000, 10, 0);
        sim.dispatch();
        for _ in 0..500 {
            assert_eq!(sim.queue.running(0), 3);
            assert_eq!(sim.queue.free_slots(), 1);
            sim.complete(1);
        }
        sim.submit(1, 10, 0);
        sim.dispatch();
        assert_eq!(sim.queue.running(1), 1, "b takes the free slot at once");
    }

    /// A memory budget for two tasks: a never runs more than two, b still gets the other
    /// slots; a request bigger than the whole budget runs alone once a runs nothing.
    #[test]
    fn memory_budgets_bound_a_tenant_not_the_others() {
        let shares = vec![
            TenantShare::new("a").with_memory_budget(200),
            TenantShare::new("b"),
        ];
        let mut sim = Sim::new(4, shares);
        sim.keep_backlogged(0, 10, 100);
        sim.keep_backlogged(1, 10, 100);
        sim.dispatch();
        for _ in 0..2_000 {
            assert!(sim.queue.running(0) <= 2);
            assert_eq!(sim.queue.free_slots(), 0, "b takes what a's budget leaves");
            sim.complete(1);
        }
        assert_eq!(sim.peak[0], 2);
        assert!(sim.peak[1] >= 2);

        let shares = vec![
            TenantShare::new("a").with_memory_budget(200),
            TenantShare::new("b"),
        ];
        let mut sim = Sim::new(4, shares);
        sim.submit(0, 10, 100);
        sim.submit(0, 20, 100);
        sim.submit(0, 10, 500);
        sim.submit(0, 10, 100);
        sim.dispatch();
        assert_eq!((sim.queue.running(0), sim.queue.waiting(0)), (2, 2));
        sim.complete(1);
        assert_eq!(
            sim.queue.running(0),
            1,
            "the big one waits for a to run nothing"
        );
        sim.complete(1);
        assert_eq!((sim.queue.running(0), sim.queue.memory_in_use(0)), (1, 500));
        sim.backlog(1, 3, 5, 100);
        sim.dispatch();
        assert_eq!(
            sim.queue.running(1),
            3,
            "b is not held back by a's big request"
        );
        assert_eq!(sim.queue.waiting(0), 1, "nothing runs beside the big one");
        while sim.queue.memory_in_use(0) == 500 {
            assert_eq!(sim.queue.running(0), 1);
            sim.complete(1);
        }
        assert_eq!((sim.queue.running(0), sim.queue.waiting(0)), (1, 0));
    }

    #[test]
    fn release_charges_cost_over_weight_and_ties_go_round_robin() {
        let shares = vec![
            TenantShare::new("a").with_weight(2.0),
            TenantShare::new("b"),
            TenantShare::new("c"),
        ];
        let mut queue = FairQueue::new(1, shares).unwrap();
        for tenant in [0, 1, 2] {
            queue.enqueue(tenant, 0);
            queue.enqueue(tenant, 0);
        }
        let mut order = Vec::new();
        for _ in 0..3 {
            let grant = queue.grant().unwrap();
            assert!(queue.grant().is_none(), "one slot");
            order.push(grant.tenant);
            queue.release(grant.tenant, 0, 0.0);
        }
        assert_eq!(order, [0, 1, 2], "equal virtual times: round robin");
        let grant = queue.grant().unwrap();
        queue.release(grant.tenant, 0, 10.0);
        assert_eq!(queue.virtual_time(0), 5.0);
        queue.release(0, 0, 1.0);
        assert_eq!(
            queue.free_slots(),
            1,
            "a release without a grant frees nothing"
        );
    }

    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    fn send_static<T: Send + 'static>(_: &T) {}
    fn send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn a_single_tenant_arbiter_is_a_semaphore() {
        let arbiter = SlotArbiter::single(3);
        send_static(&arbiter);
        send(&arbiter.acquire(0, 0));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(arbiter.acquire(0, 0).await);
        }
        send_static(&held[0]);
        assert_eq!((arbiter.free_slots(), arbiter.running(0)), (0, 3));
        let mut fourth = Box::pin(arbiter.acquire(0, 0));
        assert!(poll_once(&mut fourth).is_pending());
        assert!(poll_once(&mut fourth).is_pending());
        assert_eq!(arbiter.waiting(0), 1);
        drop(held.pop());
        let Poll::Ready(slot) = poll_once(&mut fourth) else {
            panic!("the fourth acquire waits after a slot was freed");
        };
        assert_eq!(
            (slot.tenant(), arbiter.running(0), arbiter.waiting(0)),
            (0, 3, 0)
        );
        drop(slot);
        drop(held);
        assert_eq!(arbiter.free_slots(), 3);
    }

    /// A lowered cap takes effect as tasks end; raising it back wakes a waiting request.
    #[tokio::test]
    async fn a_cap_shrinks_as_tasks_end_and_grows_back() {
        let arbiter = SlotArbiter::single(3);
        let mut held = vec![arbiter.acquire(0, 0).await, arbiter.acquire(0, 0).await];
        assert_eq!(arbiter.set_max_concurrency(0, 1), 1);
        assert_eq!(arbiter.max_concurrency(0), 1);
        assert_eq!(arbiter.running(0), 2, "no running task is interrupted");
        drop(held.pop());
        let mut next = Box::pin(arbiter.acquire(0, 0));
        assert!(poll_once(&mut next).is_pending(), "one runs, the cap is 1");
        assert_eq!(arbiter.set_max_concurrency(0, 9), 3, "clamped to the slots");
        let Poll::Ready(slot) = poll_once(&mut next) else {
            panic!("raising the cap lets the waiting request run");
        };
        assert_eq!(arbiter.running(0), 2);
        assert_eq!(arbiter.set_max_concurrency(0, 0), 1, "never below one");
        drop((slot, held));
        assert_eq!(arbiter.free_slots(), 3);
    }

    /// A pending acquire dropped before its grant withdraws its request.
    #[tokio::test]
    async fn a_dropped_pending_acquire_withdraws_its_request() {
        let shares = vec![TenantShare::new("a"), TenantShare::new("b")];
        let arbiter = SlotArbiter::new(2, shares).unwrap();
        let held = [arbiter.acquire(0, 0).await, arbiter.acquire(0, 0).await];
        let mut pending = Box::pin(arbiter.acquire(1, 0));
        assert!(poll_once(&mut pending).is_pending());
        assert_eq!(arbiter.waiting(1), 1);
        drop(pending);
        assert_eq!((arbiter.waiting(1), arbiter.running(1)), (0, 0));
        assert_eq!(
            (arbiter.running(0), arbiter.free_slots()),
            (2, 0),
            "held slots stay held"
        );
        drop(held);
        assert_eq!(arbiter.free_slots(), 2);
        let mut again = [
            Box::pin(arbiter.acquire(1, 0)),
            Box::pin(arbiter.acquire(1, 0)),
        ];
        assert!(again.iter_mut().all(|a| poll_once(a).is_ready()));
    }

    /// A slot granted to a future that is dropped before it looks is released at once.
    #[tokio::test]
    async fn a_slot_granted_to_a_dropped_acquire_is_released() {
        let shares = vec![TenantShare::new("a"), TenantShare::new("b")];
        let arbiter = SlotArbiter::new(2, shares).unwrap();
        let mut held = vec![arbiter.acquire(0, 0).await, arbiter.acquire(0, 0).await];
        let mut pending = Box::pin(arbiter.acquire(1, 0));
        assert!(poll_once(&mut pending).is_pending());
        drop(held.pop());
        assert_eq!(
            (arbiter.running(1), arbiter.waiting(1)),
            (1, 0),
            "granted, unobserved"
        );
        drop(pending);
        assert_eq!((arbiter.running(1), arbiter.free_slots()), (0, 1));
        let vtime = arbiter.inner.lock().queue.virtual_time(1);
        assert_eq!(vtime, 0.0, "an unused grant is charged nothing");
        drop(held);
        let mut again = [
            Box::pin(arbiter.acquire(1, 0)),
            Box::pin(arbiter.acquire(1, 0)),
        ];
        assert!(again.iter_mut().all(|a| poll_once(a).is_ready()));
    }

    /// A grant whose waiter vanished (its receiver dropped) is released by whoever
    /// hands it out.
    #[tokio::test]
    async fn a_grant_to_a_vanished_waiter_is_released() {
        let arbiter = SlotArbiter::single(1);
        let held = arbiter.acquire(0, 0).await;
        {
            let mut state = arbiter.inner.lock();
            let request = state.queue.enqueue(0, 0);
            let (sender, receiver) = oneshot::channel();
            drop(receiver);
            state.waiters.insert(request, sender);
        }
        drop(held);
        assert_eq!((arbiter.free_slots(), arbiter.waiting(0)), (1, 0));
        assert!(arbiter.inner.lock().waiters.is_empty());
    }

    #[tokio::test]
    async fn a_slot_charges_its_set_cost_over_its_weight() {
        let shares = vec![TenantShare::new("a").with_weight(2.0)];
        let arbiter = SlotArbiter::new(1, shares).unwrap();
        let mut slot = arbiter.acquire(0, 0).await;
        slot.set_cost(500.0);
        drop(slot);
        assert_eq!(arbiter.inner.lock().queue.virtual_time(0), 250.0);
        let slot = arbiter.acquire(0, 0).await;
        drop(slot);
        assert!(
            arbiter.inner.lock().queue.virtual_time(0) >= 250.0,
            "wall time, ≥ 0"
        );
    }

    /// Many tasks on several threads acquiring, holding across yields, and giving up
    /// half-way: caps and budgets hold, and afterwards every slot is free again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_acquires_and_cancellations_leak_nothing() {
        let shares = vec![
            TenantShare::new("a").with_max_concurrency(2),
            TenantShare::new("b").with_weight(2.0).with_reserved(1),
            TenantShare::new("c").with_memory_budget(100),
        ];
        let arbiter = SlotArbiter::new(4, shares).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64usize {
            let arbiter = arbiter.clone();
            tasks.spawn(async move {
                for round in 0..100usize {
                    let tenant = (i + round) % 3;
                    let memory = if tenant == 2 { 40 } else { 0 };
                    if (i * 7 + round) % 3 == 0 {
                        tokio::select! {
                            biased;
                            () = tokio::task::yield_now() => {}
                            slot = arbiter.acquire(tenant, memory) => drop(slot),
                        }
                    } else {
                        let slot = arbiter.acquire(tenant, memory).await;
                        assert!(arbiter.running(0) <= 2);
                        assert!(arbiter.running(2) <= 2, "c's budget fits two");
                        tokio::task::yield_now().await;
                        drop(slot);
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        assert_eq!(arbiter.free_slots(), 4);
        for tenant in 0..arbiter.tenants() {
            assert_eq!((arbiter.running(tenant), arbiter.waiting(tenant)), (0, 0));
        }
        assert!(arbiter.inner.lock().waiters.is_empty());
    }
}
