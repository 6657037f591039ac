//! The worker: consume → decode → admit → look up → run in the sandbox → decide once →
//! store the result → settle.
//!
//! At most `concurrency` tasks run at once (a semaphore); at most `concurrency ×
//! prefetch_multiplier` messages are held unsettled. Acks are late: a message is settled
//! only after its result is stored, so a worker that dies mid-task loses nothing. Guests
//! yield to the executor at every epoch tick, so CPU-bound tasks never stall consumption,
//! result storing or each other.
//!
//! Shutdown is graceful: when the `shutdown` future completes the worker stops taking
//! messages, gives back the ones it prefetched, and lets running tasks finish for up to
//! `shutdown_timeout`; tasks still running then are interrupted and their messages released
//! for redelivery.

mod canvas;
pub mod outcome;
pub mod registry;
pub mod revoked;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, BrokerError, Delivery, Revocation};
use crate::engine::{
    CallError, CallRequest, CancelToken, LimitOverrides, Outcome, Plugin, StateListener,
};
use crate::policy::{RateLimit, RetryPolicy, TaskAnnotations, TaskPolicy};
use crate::protocol::TaskMessage;
use crate::results::{ReplyTo, ResultBackend, ResultMeta};
use outcome::{Decision, Settlement};
use registry::Registry;
use revoked::RevokedSet;

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queues to consume. Default: `["celery"]`.
    pub queues: Vec<String>,
    /// Tasks run at once. Default: the number of CPUs.
    pub concurrency: usize,
    /// Messages held per running slot (prefetch = concurrency × this). Default: 64 — wasm
    /// tasks are short, acks are batched up to half the prefetch, and a deep prefetch hides
    /// the broker's round trip (the AMQP drain bench: 10.8k tasks/s at 16, 17k at 64, 20k
    /// at 256). Lower it for long tasks so messages are not held back from other workers
    /// (Celery advises 1 for long tasks).
    pub prefetch_multiplier: usize,
    /// How long running tasks may finish after shutdown begins. Default: 30 s.
    pub shutdown_timeout: Duration,
    /// Retry behaviour for tasks that neither declare nor are configured otherwise.
    pub retry: RetryPolicy,
    /// Per-task retry and rate-limit policy (Celery's `task_annotations`), over what
    /// plugins declare.
    pub task_policies: TaskAnnotations,
    /// Deliveries of one message before it is dead-lettered as poison (a message whose
    /// worker keeps dying). Default: 10.
    pub max_deliveries: u32,
    /// Where revoked task ids are remembered across restarts (Celery's `--statedb`).
    /// Default: none (the embedded broker remembers them itself).
    pub state_file: Option<std::path::PathBuf>,
    /// Store a STARTED state before running each task. Default: false (as Celery).
    pub track_started: bool,
    /// This worker's name, e.g. `wasmq@host`.
    pub node_name: String,
    /// Where to write the worker's status (JSON, rewritten every second and whenever
    /// consumption starts or stops), read by `wasmq status`. Default: none.
    pub status_file: Option<std::path::PathBuf>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queues: vec!["celery".into()],
            concurrency: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            prefetch_multiplier: 64,
            shutdown_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            task_policies: TaskAnnotations::default(),
            max_deliveries: 10,
            state_file: None,
            track_started: false,
            node_name: default_node_name(),
            status_file: None,
        }
    }
}

/// `wasmq@<hostname>`.
pub fn default_node_name() -> String {
    format!("wasmq@{}", gethostname::gethostname().to_string_lossy())
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker failed to start a consumer.
    #[error("cannot consume from the broker")]
    Broker(#[from] BrokerError),
}

/// Counters of what a worker did.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Messages taken from the broker.
    pub received: AtomicU64,
    /// Tasks that succeeded.
    pub succeeded: AtomicU64,
    /// Tasks that ended as FAILURE (including limits and traps).
    pub failed: AtomicU64,
    /// Tasks sent back for a retry.
    pub retried: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Messages released for redelivery (shutdown, storage errors).
    pub released: AtomicU64,
    /// Revoked tasks not run (or interrupted).
    pub revoked: AtomicU64,
    /// Messages handed back to the broker to wait (eta not due, rate limit).
    pub deferred: AtomicU64,
}

/// The longest a worker holds a message in memory before its eta or its rate-limit turn;
/// longer waits go back to the broker as delayed messages.
const HOLD_AT_MOST: Duration = Duration::from_secs(1);

/// What the worker shares with each task it runs.
struct Shared {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Arc<Registry>,
    options: WorkerOptions,
    stats: Arc<WorkerStats>,
    /// Running tasks (by run number): their task ids and cancel tokens, to interrupt them
    /// when shutdown times out or when they are revoked with terminate.
    running: Mutex<HashMap<u64, (String, CancelToken)>>,
    next_run: AtomicU64,
    /// Set when running tasks were interrupted by shutdown: their messages are released.
    aborting: std::sync::atomic::AtomicBool,
    /// Task slots (`concurrency` permits); a task waiting for its eta or its rate-limit
    /// turn gives its slot back meanwhile.
    slots: Arc<Semaphore>,
    /// Revoked task ids.
    revoked: RevokedSet,
    /// Per task name: when its rate limit next lets one run.
    rate_turns: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Messages held waiting for a rate-limit turn (bounded by half the prefetch).
    rate_waiting: std::sync::atomic::AtomicUsize,
    /// Work done outside the slot runners: deliveries that wait before running (eta, rate
    /// limit) and results being stored; shutdown waits for them too.
    detached: TaskTracker,
}

/// A worker, ready to run.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// A worker consuming from `broker`, storing into `backend`, running `registry`'s tasks.
    pub fn new(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Arc<Registry>,
        options: WorkerOptions,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let revoked = RevokedSet::open(options.state_file.clone());
        Self {
            shared: Arc::new(Shared {
                slots,
                revoked,
                rate_turns: Mutex::new(HashMap::new()),
                rate_waiting: std::sync::atomic::AtomicUsize::new(0),
                broker,
                backend,
                registry,
                options,
                stats: Arc::new(WorkerStats::default()),
                running: Mutex::new(HashMap::new()),
                next_run: AtomicU64::new(0),
                aborting: std::sync::atomic::AtomicBool::new(false),
                detached: TaskTracker::new(),
            }),
        }
    }

    /// The worker's counters (live while it runs).
    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Runs until `shutdown` completes, then shuts down gracefully.
    ///
    /// # Errors
    /// [`WorkerError::Broker`] when consuming cannot start.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Arc<WorkerStats>, WorkerError> {
        let shared = self.shared;
        let options = &shared.options;
        let prefetch = options.concurrency.max(1) * options.prefetch_multiplier.max(1);
        let consumer = shared.broker.consume(&options.queues, prefetch).await?;
        tracing::info!(
            node = %options.node_name,
            broker = %shared.broker.describe(),
            results = %shared.backend.describe(),
            queues = %options.queues.join(","),
            concurrency = options.concurrency,
            tasks = shared.registry.snapshot().tasks().len(),
            "worker ready: consuming"
        );
        let consuming = consumer
            .consuming()
            .unwrap_or_else(|| tokio::sync::watch::channel(true).1);
        let status = tokio::spawn(report_status(Arc::clone(&shared), consuming));
        let revocations = shared.broker.revocations(&options.node_name).await?;
        let listener = tokio::spawn(listen_for_revocations(Arc::clone(&shared), revocations));
        // One runner per slot takes a delivery and processes it itself, so a short task
        // costs no spawn and no hand-off between tasks; a message that must wait (eta, rate
        // limit) is detached into its own task so its runner carries on.
        let consumer = Arc::new(tokio::sync::Mutex::new(consumer));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut runners = JoinSet::new();
        for _ in 0..options.concurrency.max(1) {
            runners.spawn(run_slots(
                Arc::clone(&shared),
                Arc::clone(&consumer),
                stopped.clone(),
            ));
        }
        let mut purge = tokio::time::interval(Duration::from_secs(600));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = purge.tick() => purge_expired(&shared).await,
            }
        }

        let _ = stop.send(true);
        tracing::info!(
            running = shared.options.concurrency.max(1) - shared.slots.available_permits(),
            "shutting down: no new tasks; waiting for running ones"
        );
        let mut consumer = consumer.lock().await;
        consumer.close().await;
        shared.detached.close();
        let drained = tokio::time::timeout(options.shutdown_timeout, async {
            while runners.join_next().await.is_some() {}
            shared.detached.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                running = shared
                    .running
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len(),
                "shutdown timeout: interrupting running tasks; their messages will be redelivered"
            );
            shared.aborting.store(true, Ordering::SeqCst);
            for (_, token) in shared
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
            {
                token.cancel();
            }
            while runners.join_next().await.is_some() {}
            shared.detached.wait().await;
        }
        consumer.flush_acks().await;
        drop(consumer);
        status.abort();
        listener.abort();
        if let Some(path) = &shared.options.status_file {
            write_status(path, &shared, false, "stopped");
        }
        tracing::info!("worker stopped");
        Ok(Arc::clone(&shared.stats))
    }
}

/// Logs when consumption starts and stops (a broker reconnect), and keeps the status file
/// current, so readiness reflects actual consumption.
async fn report_status(shared: Arc<Shared>, mut consuming: tokio::sync::watch::Receiver<bool>) {
    let mut last = *consuming.borrow();
    let mut consumed_before = last;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let now = *consuming.borrow();
        if now != last {
            if now && consumed_before {
                tracing::info!("consuming again after reconnecting to the broker");
            } else if !now {
                tracing::warn!("not consuming: the broker connection is down; reconnecting");
            }
            consumed_before |= now;
            last = now;
        }
        if let Some(path) = &shared.options.status_file {
            write_status(
                path,
                &shared,
                now,
                if now { "consuming" } else { "reconnecting" },
            );
        }
        tokio::select! {
            changed = consuming.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Writes the status file atomically (temporary file, then rename).
fn write_status(path: &std::path::Path, shared: &Shared, consuming: bool, state: &str) {
    let stats = &shared.stats;
    let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let status = serde_json::json!({
        "node": shared.options.node_name,
        "pid": std::process::id(),
        "state": state,
        "consuming": consuming,
        "queues": shared.options.queues,
        "broker": shared.broker.describe(),
        "updated": crate::protocol::format_time(&Utc::now()),
        "received": load(&stats.received),
        "succeeded": load(&stats.succeeded),
        "failed": load(&stats.failed),
        "retried": load(&stats.retried),
        "dead_lettered": load(&stats.dead_lettered),
        "revoked": load(&stats.revoked),
        "deferred": load(&stats.deferred),
    });
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, status.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        tracing::warn!(%error, path = %path.display(), "cannot write the status file");
    }
}

async fn purge_expired(shared: &Shared) {
    match shared.backend.purge_expired().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(purged = n, "removed expired results"),
        Err(error) => tracing::warn!(%error, "cannot purge expired results"),
    }
}

/// Remembers revocations as they arrive and interrupts running tasks revoked with
/// `terminate`.
async fn listen_for_revocations(
    shared: Arc<Shared>,
    mut revocations: tokio::sync::mpsc::Receiver<Revocation>,
) {
    while let Some(revocation) = revocations.recv().await {
        let task_id = revocation.task_id.clone();
        let terminate = revocation.terminate;
        if shared.revoked.insert(revocation) {
            tracing::info!(task_id = %task_id, terminate, "task revoked");
        }
        if terminate {
            for (id, token) in shared
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
            {
                if *id == task_id {
                    tracing::warn!(task_id = %task_id, "terminating the running task (revoked)");
                    token.cancel();
                }
            }
        }
    }
}

/// Waits `wait` without holding a task slot, then takes a slot again.
async fn hold(shared: &Shared, slot: OwnedSemaphorePermit, wait: Duration) -> OwnedSemaphorePermit {
    drop(slot);
    tokio::time::sleep(wait).await;
    Arc::clone(&shared.slots)
        .acquire_owned()
        .await
        .expect("the semaphore is never closed")
}

/// What a rate limit says about running a task now.
enum RateTurn {
    /// Run after this wait (possibly zero); the turn is taken.
    After(Duration),
    /// Too long to hold in memory: hand the message back to the broker for this long.
    Defer(Duration),
}

/// Takes the next turn of `task`'s rate limit if it comes soon enough to wait for it in
/// memory, without holding more than half the prefetch waiting.
fn rate_turn(shared: &Shared, task: &str, rate: RateLimit) -> RateTurn {
    let now = tokio::time::Instant::now();
    let mut turns = shared
        .rate_turns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let next = turns.get(task).copied().unwrap_or(now).max(now);
    let wait = next - now;
    let options = &shared.options;
    let hold_limit = (options.concurrency.max(1) * options.prefetch_multiplier.max(1) / 2).max(1);
    if wait.is_zero()
        || (wait <= HOLD_AT_MOST && shared.rate_waiting.load(Ordering::Relaxed) < hold_limit)
    {
        turns.insert(task.to_owned(), next + rate.interval);
        RateTurn::After(wait)
    } else {
        RateTurn::Defer(wait.max(HOLD_AT_MOST))
    }
}

/// Hands a delivery back to the broker to be delivered again after `wait` (a new message,
/// so nothing is held unacknowledged meanwhile).
async fn defer(shared: &Shared, delivery: Delivery, wait: Duration) {
    shared.stats.deferred.fetch_add(1, Ordering::Relaxed);
    let republished = shared
        .broker
        .publish(&delivery.queue, &delivery.envelope, Some(wait))
        .await;
    match republished {
        Ok(()) => settle(shared, delivery, &Settlement::Ack).await,
        Err(error) => {
            tracing::warn!(%error, "cannot delay a message; releasing it");
            release(shared, delivery).await;
        }
    }
}

/// A slot runner: takes a delivery, then a task slot, and processes it; until `stopped`.
/// An idle runner holds no slot, so a task waiting out its eta or rate limit can take one
/// back when it is due.
async fn run_slots(
    shared: Arc<Shared>,
    consumer: Arc<tokio::sync::Mutex<Box<dyn crate::broker::Consumer>>>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stopped.borrow() {
            return;
        }
        let delivery = {
            let mut consumer = tokio::select! {
                biased;
                _ = stopped.changed() => return,
                consumer = consumer.lock() => consumer,
            };
            tokio::select! {
                biased;
                _ = stopped.changed() => return,
                delivery = consumer.next() => delivery,
            }
        };
        match delivery {
            Ok(delivery) => {
                shared.stats.received.fetch_add(1, Ordering::Relaxed);
                let slot = tokio::select! {
                    biased;
                    slot = Arc::clone(&shared.slots).acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = async { drop(stopped.wait_for(|stop| *stop).await) } => {
                        // Shutting down before a slot freed: give the message back.
                        release(&shared, delivery).await;
                        return;
                    }
                };
                dispatch(&shared, delivery, slot).await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot receive from the broker; retrying in 1s");
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Decodes a delivery and processes it on this runner, or in a detached task when it will
/// wait before running (a near eta, a rate limit), so the runner is not blocked meanwhile.
async fn dispatch(shared: &Arc<Shared>, delivery: Delivery, slot: OwnedSemaphorePermit) {
    let message = match TaskMessage::decode(&delivery.envelope) {
        Ok(message) => message,
        Err(error) => {
            tracing::error!(task_id = ?error.task_id, queue = %delivery.queue, "malformed message: {error}");
            let decision = outcome::undecodable(&error);
            finish(shared, delivery, None, decision).await;
            return;
        }
    };
    // Looked up once here: the registry's plugin for the task and its resolved policy.
    let task = shared.registry.lookup(&message.task).map(|plugin| {
        let policy = shared.options.task_policies.resolve(
            &shared.options.retry,
            plugin.task(&message.task).map(|t| &t.policy),
            &message.task,
        );
        (plugin, policy)
    });
    let waits = message.eta.is_some_and(|eta| eta > Utc::now())
        || task
            .as_ref()
            .is_some_and(|(_, policy)| policy.rate_limit.is_some());
    if waits {
        let shared_ = Arc::clone(shared);
        shared.detached.spawn(async move {
            drop(process(&shared_, delivery, message, task, slot).await);
        });
    } else {
        drop(process(shared, delivery, message, task, slot).await);
    }
}

/// Handles one decoded delivery up to its settlement; gives back the task slot it ran in.
/// `task` is the plugin serving it and its policy, none when the task is not registered.
async fn process(
    shared: &Arc<Shared>,
    delivery: Delivery,
    message: TaskMessage,
    task: Option<(Plugin, TaskPolicy)>,
    mut slot: OwnedSemaphorePermit,
) -> OwnedSemaphorePermit {
    if delivery.delivery_count > shared.options.max_deliveries {
        tracing::error!(task = %message.task, id = %message.id, deliveries = delivery.delivery_count,
            "poison message: delivered too many times without finishing; dead-lettering it");
        let decision = outcome::poison(
            &message,
            delivery.delivery_count,
            shared.options.max_deliveries,
        );
        finish(shared, delivery, Some(&message), decision).await;
        return slot;
    }
    if shared.revoked.get(&message.id).is_some() {
        tracing::info!(task = %message.task, id = %message.id, "revoked; not run");
        shared.stats.revoked.fetch_add(1, Ordering::Relaxed);
        finish(
            shared,
            delivery,
            Some(&message),
            outcome::revoked(&message, "revoked"),
        )
        .await;
        return slot;
    }
    let now = Utc::now();
    if message.expires.is_some_and(|expires| expires <= now) {
        tracing::info!(task = %message.task, id = %message.id, "expired; not run");
        finish(shared, delivery, Some(&message), outcome::expired(&message)).await;
        return slot;
    }
    if let Some(eta) = message.eta
        && let Ok(wait) = (eta - now).to_std()
        && !wait.is_zero()
    {
        if wait > HOLD_AT_MOST {
            // Not due yet: hand it back to the broker as a delayed message instead of
            // holding it unacknowledged (Celery's ETA problem with RabbitMQ's
            // consumer_timeout). The broker may deliver it up to a second early; the
            // remainder is held here.
            defer(shared, delivery, wait).await;
            return slot;
        }
        slot = hold(shared, slot, wait).await;
    }
    let Some((plugin, policy)) = task else {
        tracing::error!(task = %message.task, id = %message.id, "received an unregistered task");
        finish(
            shared,
            delivery,
            Some(&message),
            outcome::not_registered(&message),
        )
        .await;
        return slot;
    };
    if let Some(rate) = policy.rate_limit {
        match rate_turn(shared, &message.task, rate) {
            RateTurn::After(wait) if wait.is_zero() => {}
            RateTurn::After(wait) => {
                shared.rate_waiting.fetch_add(1, Ordering::Relaxed);
                slot = hold(shared, slot, wait).await;
                shared.rate_waiting.fetch_sub(1, Ordering::Relaxed);
            }
            RateTurn::Defer(wait) => {
                tracing::debug!(task = %message.task, id = %message.id, ?wait, "rate limited; deferring");
                defer(shared, delivery, wait).await;
                return slot;
            }
        }
    }
    let reply = reply_of(&message);
    if shared.options.track_started {
        let mut started = ResultMeta::custom(
            &message.id,
            "STARTED",
            serde_json::json!({"pid": std::process::id(), "hostname": shared.options.node_name}),
        );
        started.parent_id.clone_from(&message.parent_id);
        store(shared, &started, reply.as_ref()).await;
    }

    let run = shared.next_run.fetch_add(1, Ordering::Relaxed);
    let cancel = CancelToken::new();
    shared
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(run, (message.id.clone(), cancel.clone()));
    if shared.revoked.get(&message.id).is_some_and(|r| r.terminate) {
        // Revoked with terminate while it waited: the listener may have missed it.
        cancel.cancel();
    }
    let request = CallRequest {
        task: message.task.clone(),
        id: message.id.clone(),
        args_json: Value::Array(
            message
                .args
                .iter()
                .cloned()
                .map(crate::protocol::unwrap_kombu_values)
                .collect(),
        )
        .to_string(),
        kwargs_json: crate::protocol::unwrap_kombu_values(Value::Object(message.kwargs.clone()))
            .to_string(),
        retries: message.retries,
        root_id: message.root_id.clone(),
        parent_id: message.parent_id.clone(),
        group_id: message.group.clone(),
        limits: LimitOverrides {
            // A message may shorten the task's time limit, never lengthen it: the task's
            // declared default (else the worker's) bounds what a sender can ask for, and the
            // sandbox clamps everything to the ceiling.
            timeout: message
                .time_limit
                .filter(|t| *t > 0.0)
                .and_then(|t| Duration::try_from_secs_f64(t).ok())
                .map(|t| {
                    let task_default = plugin
                        .task(&message.task)
                        .and_then(|info| info.limits.timeout)
                        .unwrap_or(shared.registry.sandbox().config().defaults.timeout);
                    t.min(task_default)
                }),
            ..LimitOverrides::default()
        },
        soft_timeout: message
            .soft_time_limit
            .filter(|t| *t > 0.0)
            .and_then(|t| Duration::try_from_secs_f64(t).ok()),
        cancel: Some(cancel.clone()),
    };
    let started = Instant::now();
    let listener = state_listener(shared, reply.clone());
    let result = shared
        .registry
        .sandbox()
        .call_with_listener(&plugin, request, Some(listener))
        .await;
    shared
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&run);
    let report = match result {
        Ok(report) => report,
        Err(CallError::UnknownTask { .. }) => {
            finish(
                shared,
                delivery,
                Some(&message),
                outcome::not_registered(&message),
            )
            .await;
            return slot;
        }
        Err(error @ CallError::Unavailable(_)) => {
            tracing::warn!(task = %message.task, id = %message.id, %error, "releasing the message for later");
            release(shared, delivery).await;
            return slot;
        }
    };
    if shared.aborting.load(Ordering::SeqCst) && !report.outcome.is_success() {
        release(shared, delivery).await;
        return slot;
    }
    log_outcome(&message, &report.outcome, started.elapsed());
    let decision = if cancel.is_cancelled() && !report.outcome.is_success() {
        // Only revoke --terminate cancels outside shutdown.
        shared.stats.revoked.fetch_add(1, Ordering::Relaxed);
        outcome::revoked(&message, "terminated")
    } else {
        outcome::decide(&message, &report.outcome, &report.limits, &policy.retry)
    };
    if settles_locally(&message, &decision) {
        finish(shared, delivery, Some(&message), decision).await;
    } else {
        // Storing the result (a Redis round trip, a confirmed rpc reply) and any canvas or
        // retry publishing wait on the network: do it beside the slot, not in it, so the
        // next task starts at once. The ack still waits for the store (late acks), and the
        // broker delivers no more than the prefetch unsettled, which bounds these.
        let shared_ = Arc::clone(shared);
        shared.detached.spawn(async move {
            finish(&shared_, delivery, Some(&message), decision).await;
        });
    }
    slot
}

/// True when settling `message` as `decision` says needs no network round trip: no result
/// to store, nothing to publish, only an ack (which the broker batches).
fn settles_locally(message: &TaskMessage, decision: &Decision) -> bool {
    let embed = &message.embed;
    message.ignore_result
        && matches!(decision.settlement, Settlement::Ack)
        && embed.callbacks.as_ref().is_none_or(Vec::is_empty)
        && embed.errbacks.as_ref().is_none_or(Vec::is_empty)
        && embed.chain.as_ref().is_none_or(Vec::is_empty)
        && embed.chord.is_none()
}

/// Where an rpc result goes: the message's `reply_to`, correlated by its `correlation_id`
/// (or the task id).
fn reply_of(message: &TaskMessage) -> Option<ReplyTo> {
    message
        .reply_to
        .as_ref()
        .filter(|q| !q.is_empty())
        .map(|queue| ReplyTo {
            queue: queue.clone(),
            correlation_id: message
                .correlation_id
                .clone()
                .unwrap_or_else(|| message.id.clone()),
        })
}

/// [`reply_of`] for a message that could not be decoded.
fn reply_of_envelope(envelope: &crate::protocol::Envelope) -> Option<ReplyTo> {
    let id = envelope.headers.get("id").and_then(Value::as_str);
    let properties = &envelope.properties;
    let queue = properties.reply_to.as_ref().filter(|q| !q.is_empty())?;
    Some(ReplyTo {
        queue: queue.clone(),
        correlation_id: properties
            .correlation_id
            .clone()
            .or_else(|| id.map(str::to_owned))?,
    })
}

/// Stores `update_state` reports as custom states.
fn state_listener(shared: &Arc<Shared>, reply: Option<ReplyTo>) -> StateListener {
    let backend = Arc::clone(&shared.backend);
    Arc::new(move |update| {
        let backend = Arc::clone(&backend);
        let reply = reply.clone();
        let meta = ResultMeta::custom(&update.task_id, &update.state, update.meta);
        tokio::spawn(async move {
            if let Err(error) = backend.store(&meta, reply.as_ref()).await {
                tracing::warn!(%error, task_id = %meta.task_id, "cannot store a custom state");
            }
        });
    })
}

fn log_outcome(message: &TaskMessage, outcome: &Outcome, elapsed: Duration) {
    let (task, id) = (&message.task, &message.id);
    match outcome {
        Outcome::Success(json) => {
            let shown: String = json.chars().take(200).collect();
            tracing::info!("task {task}[{id}] succeeded in {elapsed:?}: {shown}");
        }
        other => tracing::warn!("task {task}[{id}] {other} (after {elapsed:?})"),
    }
}

/// Stores the decision's meta (unless the message asked not to), then settles. If the
/// result cannot be stored the message is released, not acked: it will run again.
async fn finish(
    shared: &Arc<Shared>,
    delivery: Delivery,
    message: Option<&TaskMessage>,
    decision: Decision,
) {
    let ignore_result = message.is_some_and(|m| m.ignore_result);
    if let Some(mut meta) = decision.meta {
        if let Some(message) = message {
            meta.parent_id.clone_from(&message.parent_id);
            meta.group_id.clone_from(&message.group);
        }
        meta.worker = Some(shared.options.node_name.clone());
        // Canvas: callbacks and the next chain step go out before the result is stored.
        if let Some(message) = message
            && !canvas::before_store(shared, &delivery.queue, message, &mut meta).await
        {
            release(shared, delivery).await;
            return;
        }
        let keep = !ignore_result || !matches!(decision.settlement, Settlement::Ack);
        // An undecodable message still says where its sender listens.
        let reply = message.map_or_else(|| reply_of_envelope(&delivery.envelope), reply_of);
        if keep && !store(shared, &meta, reply.as_ref()).await {
            release(shared, delivery).await;
            return;
        }
        // Canvas: chord counting, and a failure's chain and errbacks, after it is stored.
        if let Some(message) = message
            && !canvas::after_store(shared, &delivery.queue, message, &meta).await
        {
            release(shared, delivery).await;
            return;
        }
        match meta.status {
            crate::results::TaskState::Success => {
                shared.stats.succeeded.fetch_add(1, Ordering::Relaxed)
            }
            crate::results::TaskState::Retry => {
                shared.stats.retried.fetch_add(1, Ordering::Relaxed)
            }
            _ => shared.stats.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
    if let (Settlement::RetryLater { delay }, Some(message)) = (&decision.settlement, message) {
        let mut next = message.clone();
        next.retries += 1;
        next.eta = chrono::Duration::from_std(*delay)
            .ok()
            .map(|d| Utc::now() + d);
        next.parent_id = Some(message.id.clone());
        let queue = delivery.queue.clone();
        if let Err(error) = shared
            .broker
            .publish(&queue, &next.encode(), Some(*delay))
            .await
        {
            tracing::warn!(%error, "cannot publish the retry; releasing the message");
            release(shared, delivery).await;
            return;
        }
    }
    settle(shared, delivery, &decision.settlement).await;
}

async fn store(shared: &Shared, meta: &ResultMeta, reply: Option<&ReplyTo>) -> bool {
    match shared.backend.store(meta, reply).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, task_id = %meta.task_id, "cannot store the result; the message will be redelivered");
            false
        }
    }
}

async fn settle(shared: &Shared, delivery: Delivery, settlement: &Settlement) {
    let result = match settlement {
        Settlement::Ack | Settlement::RetryLater { .. } => delivery.ack().await,
        Settlement::DeadLetter { reason } => {
            shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            delivery.dead_letter(reason).await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "cannot settle a message; it will be redelivered");
    }
}

async fn release(shared: &Shared, delivery: Delivery) {
    shared.stats.released.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = delivery.release().await {
        tracing::warn!(%error, "cannot release a message; it returns when its lease expires");
    }
}
