//! Adaptive concurrency in the worker (`--autoscale MAX,MIN`, `--concurrency auto`): once
//! a second the worker samples itself (tasks running, tasks waiting for a slot, messages
//! ready in its queues, the memory its running tasks may use) and the machine
//! (CPU, memory: [`crate::autoscale::machine`]), asks [`Autoscaler`] for the size, and
//! applies a change by moving its cap in the slot arbiter — the slots, the slot runners and
//! the sandbox pool are all sized for the maximum when the worker starts, so growing takes
//! effect at once and shrinking as running tasks end (none is interrupted). The consumer's
//! prefetch window follows the size where the broker can change it while consuming (the
//! embedded one; RabbitMQ keeps the window of the maximum, as Celery does).
//!
//! Remote control: `autoscale {max, min}` changes the bounds; `pool_grow`/`pool_shrink`
//! answer Celery's error while autoscaling; `stats` carries Celery's `autoscaler` section
//! ({max, min, current, qty}). The loop costs nothing per task: with autoscaling off
//! there is no loop at all.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::Shared;
use crate::autoscale::machine::MachineSampler;
use crate::autoscale::{AutoscalePolicy, Autoscaler, Change, Sample};
use crate::broker::PrefetchLimit;

/// How often the worker samples itself and the machine.
pub(super) const TICK: Duration = Duration::from_secs(1);
/// Messages ready in the broker counted as waiting, at most (a deep backlog says "grow",
/// its exact depth says nothing more).
const BACKLOG_COUNTED: u64 = 10_000;

/// The autoscaler of a worker and what it moves.
#[derive(Debug)]
pub(super) struct Scaling {
    scaler: Mutex<Autoscaler>,
    /// The most slots the worker was started with: the bounds may move within it.
    slots: usize,
    /// The origin of the autoscaler's clock.
    origin: Instant,
    /// The consumer's prefetch window, once it consumes (when its broker can change it).
    pub(super) prefetch: OnceLock<PrefetchLimit>,
}

impl Scaling {
    pub(super) fn new(policy: AutoscalePolicy) -> Self {
        Self {
            slots: policy.max,
            scaler: Mutex::new(Autoscaler::new(policy)),
            origin: Instant::now(),
            prefetch: OnceLock::new(),
        }
    }

    fn scaler(&self) -> MutexGuard<'_, Autoscaler> {
        // Nothing panics while it is held.
        self.scaler.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The size now.
    pub(super) fn current(&self) -> usize {
        self.scaler().current()
    }

    /// Celery's `stats()["autoscaler"]`: `{max, min, current, qty}`.
    pub(super) fn info(&self) -> Value {
        let scaler = self.scaler();
        json!({
            "max": scaler.policy().max,
            "min": scaler.policy().min,
            "current": scaler.current(),
            "qty": scaler.demand(),
            "cpu_share_per_slot": scaler.cpu_share(),
            "memory_budget": scaler.policy().memory_budget,
        })
    }
}

/// The prefetch window for `slots` slots (a fixed window set in the options wins).
pub(super) fn prefetch_for(shared: &Shared, slots: usize) -> usize {
    shared
        .options
        .prefetch
        .unwrap_or_else(|| slots.max(1) * shared.options.prefetch_multiplier.max(1))
}

/// Samples and resizes once a second while the worker runs (returns at once without
/// autoscaling).
pub(super) async fn run(shared: Arc<Shared>) {
    let Some(scaling) = &shared.scaling else {
        return;
    };
    let mut machine = MachineSampler::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let figures = machine.sample();
        let sample = Sample {
            busy: shared.running_tasks(),
            // Deliveries waiting for a slot, and messages ready in the broker (held
            // deliveries wait for a time, not a slot: not counted).
            waiting: shared.slots.waiting(shared.seat)
                + usize::try_from(backlog(&shared).await).unwrap_or(usize::MAX),
            memory_committed: shared.slots.memory_in_use(shared.seat),
            task_memory: shared.registry.sandbox().config().defaults.memory_bytes,
            cpu: figures.cpu,
            memory_available: figures.memory_available,
            completed: Some(shared.stats.settled.load(Ordering::Relaxed)),
        };
        let change = scaling.scaler().decide(scaling.origin.elapsed(), &sample);
        if let Some(change) = change {
            apply(&shared, scaling, change);
        }
    }
}

/// Messages ready in the queues consumed (at most [`BACKLOG_COUNTED`]); a queue whose
/// length cannot be read counts 0.
async fn backlog(shared: &Shared) -> u64 {
    let mut ready = 0u64;
    for queue in shared.control.queues(&shared.options.queues) {
        if let Ok(length) = shared.broker.queue_length(&queue).await {
            ready = ready.saturating_add(length);
        }
        if ready >= BACKLOG_COUNTED {
            return BACKLOG_COUNTED;
        }
    }
    ready
}

/// Moves the worker's slot cap, its prefetch window and its gauges to `change.to`.
fn apply(shared: &Shared, scaling: &Scaling, change: Change) {
    let slots = shared.slots.set_max_concurrency(shared.seat, change.to);
    if let Some(prefetch) = scaling.prefetch.get() {
        prefetch.set(prefetch_for(shared, slots));
    }
    super::observe::concurrency(shared);
    tracing::info!(
        tenant = shared.options.tenant_name(),
        from = change.from,
        to = slots,
        reason = ?change.reason,
        "autoscale: task slots changed"
    );
}

/// Celery's `autoscale` control command (`{"max": N, "min": M}`); `None` when the worker
/// does not autoscale (the caller answers Celery's error).
pub(super) fn set_bounds(shared: &Shared, arguments: &Map<String, Value>) -> Option<Value> {
    let scaling = shared.scaling.as_ref()?;
    let number = |name: &str| -> Result<Option<usize>, Value> {
        match arguments.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| error(format!("{name} must be a whole number"))),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| error(format!("{name} must be a whole number"))),
            Some(_) => Err(error(format!("{name} must be a whole number"))),
        }
    };
    let (max, min) = match (number("max"), number("min")) {
        (Ok(max), Ok(min)) => (max, min),
        (Err(reply), _) | (_, Err(reply)) => return Some(reply),
    };
    let mut scaler = scaling.scaler();
    let max = max.unwrap_or(scaler.policy().max);
    let min = min.unwrap_or(scaler.policy().min);
    if max == 0 || max > scaling.slots {
        return Some(error(format!(
            "cannot autoscale up to {max}: a wasmq worker runs at most the {} task slots \
             it started with (its sandbox pool is sized when it starts)",
            scaling.slots
        )));
    }
    let change = scaler.set_bounds(scaling.origin.elapsed(), max, min);
    let (max, min) = (scaler.policy().max, scaler.policy().min);
    drop(scaler);
    if let Some(change) = change {
        apply(shared, scaling, change);
    }
    tracing::info!(max, min, "autoscale bounds changed (remote control)");
    Some(json!({ "ok": format!("autoscale now max={max} min={min}") }))
}

fn error(message: String) -> Value {
    json!({ "error": message })
}
