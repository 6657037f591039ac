//! The worker: consume → decode → admit → run in the sandbox → decide once → store the
//! result and continue the workflow → settle.
//!
//! * this file — the [`Worker`]: slot runners, dispatching one delivery through the steps
//!   below, graceful shutdown;
//! * [`admit`] — may a message run now (poison, revoked, expired, eta, rate limit)?
//! * [`run`] — the sandbox call for one message, and the tasks running now;
//! * [`decision`] — every way a delivery ends: the result to store and the settlement;
//! * [`settle`] — carrying a decision out: store, continue, publish, then ack;
//! * [`continuation`] — the workflow after a task: callbacks, chain, chord, errbacks;
//! * [`revoked`] — revoked task ids and stamps, and listening for revocations;
//! * `control` — answers to remote control (Celery's `inspect` and `control`);
//! * `events` — Celery events: heartbeats always, task events when switched on;
//! * `observe` — the observation points that feed events, metrics and hooks;
//! * `hooks` — the embedder's callbacks ([`Hooks`]: Celery's signals);
//! * `control_plane` — the thread where remote control and heartbeats run, never behind a
//!   busy slot;
//! * `held` — deliveries held before they run (an eta, a rate-limit turn);
//! * `overrides` — rate and time limits set at runtime by remote control;
//! * [`status`] — counters, consumption changes, the status file;
//! * [`options`] — [`WorkerOptions`].
//!
//! At most `concurrency` tasks run at once (one slot runner per slot); at most
//! `concurrency × prefetch_multiplier` messages are held unsettled. Acks are late: a message
//! is settled only after its result is stored, so a worker that dies mid-task loses
//! nothing. Guests yield to the executor at every epoch tick, so CPU-bound tasks never stall
//! consumption, result storing or each other.
//!
//! Shutdown is graceful: when the `shutdown` future completes the worker stops taking
//! messages, gives back the ones it prefetched, and lets running tasks finish for up to
//! `shutdown_timeout`; tasks still running then are interrupted and their messages released
//! for redelivery.
//!
//! The worker sees its broker and result backend only through their traits ([`Broker`],
//! [`Consumer`](crate::broker::Consumer), [`ResultBackend`]); its unit tests use fakes.

mod admit;
mod builtins;
mod continuation;
mod control;
mod control_plane;
pub mod decision;
mod events;
mod held;
mod hooks;
mod observe;
mod options;
mod overrides;
pub mod revoked;
mod run;
mod scaling;
mod settle;
mod status;
mod task_log;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Consumer, Delivery};
use crate::engine::Plugin;
use crate::fair::{Slot, SlotArbiter};
use crate::policy::TaskPolicy;
use crate::protocol::TaskMessage;
use crate::registry::Registry;
use crate::results::{ResultBackend, ResultMeta};
use admit::{Admission, RateTurns};
pub use hooks::{Hooks, TaskEnded, TaskStarting, WorkerInfo};
pub use options::{GrantsFor, TenantOptions, WorkerOptions, default_node_name};
use revoked::RevokedSet;
use run::RunningTasks;
pub use status::WorkerStats;

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker failed to start a consumer.
    #[error("cannot consume from the broker")]
    Broker(#[from] BrokerError),
    /// The control plane's thread could not be started.
    #[error("cannot start the control plane's thread")]
    ControlPlane(#[source] std::io::Error),
}

/// What the worker shares with each task it runs.
struct Shared {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Arc<Registry>,
    options: WorkerOptions,
    stats: Arc<WorkerStats>,
    /// Running tasks with their cancel tokens, to interrupt them when shutdown times out or
    /// when they are revoked with terminate.
    running: RunningTasks,
    /// Set when running tasks were interrupted by shutdown: their messages are released.
    aborting: AtomicBool,
    /// Task slots, shared fairly with the other tenants of this process when there are
    /// some; a task waiting for its eta or its rate-limit turn gives its slot back
    /// meanwhile.
    slots: SlotArbiter,
    /// This worker's tenant among the arbiter's (0 when it serves the only one).
    seat: usize,
    /// Revoked task ids.
    revoked: RevokedSet,
    /// Rate-limit turns per task name.
    rate_turns: RateTurns,
    /// Work done outside the slot runners: deliveries that wait before running (eta, rate
    /// limit) and results being stored; shutdown waits for them too.
    detached: TaskTracker,
    /// When the worker was made (its uptime, for remote control).
    started_at: std::time::Instant,
    /// Asked to shut down from inside (remote control's `shutdown`), as if the `shutdown`
    /// future of [`Worker::run`] had completed.
    shutdown_requested: tokio::sync::Notify,
    /// What remote control reads and changes: held deliveries, runtime overrides, the
    /// consumer's queues, the clock.
    control: control::ControlState,
    /// Whether it consumes now (the broker connection is up), for its status.
    consuming: AtomicBool,
    /// Set once it has stopped, for its status.
    stopped: AtomicBool,
    /// Celery events about the worker and its tasks.
    events: events::Events,
    /// The autoscaler, when the worker sizes itself (`options.autoscale`).
    scaling: Option<scaling::Scaling>,
}

impl Shared {
    /// The prefetch window now: for the slots in use when autoscaling.
    fn prefetch(&self) -> usize {
        let slots = self
            .scaling
            .as_ref()
            .map_or(self.options.max_concurrency(), scaling::Scaling::current);
        scaling::prefetch_for(self, slots)
    }

    /// Waits for a task slot for a task limited to `memory` bytes (charged to the tenant's
    /// memory budget while it runs).
    async fn slot(&self, memory: u64) -> Slot {
        self.slots.acquire(self.seat, memory).await
    }

    /// Tasks of this worker running now.
    fn running_tasks(&self) -> usize {
        self.slots.running(self.seat)
    }
}

/// A worker, ready to run.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// A worker consuming from `broker`, storing into `backend`, running `registry`'s tasks
    /// in `options.concurrency` slots of its own.
    pub fn new(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Arc<Registry>,
        options: WorkerOptions,
    ) -> Self {
        let slots = match &options.autoscale {
            // Slots for the maximum; the autoscaler moves the cap. A memory budget is
            // enforced by the arbiter whatever the size.
            Some(policy) => {
                let max = policy.max.max(1);
                let mut share = crate::fair::TenantShare::new("default").with_max_concurrency(max);
                if let Some(budget) = policy.memory_budget {
                    share = share.with_memory_budget(budget);
                }
                SlotArbiter::new(max, vec![share]).unwrap_or_else(|_| SlotArbiter::single(max))
            }
            None => SlotArbiter::single(options.concurrency.max(1)),
        };
        Self::sharing(broker, backend, registry, options, slots, 0)
    }

    /// A worker for tenant `seat` of `slots`, which it shares with the workers of the other
    /// tenants of this process: it runs at most `options.concurrency` tasks at once (the
    /// tenant's cap), when the arbiter gives it slots.
    pub fn sharing(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Arc<Registry>,
        options: WorkerOptions,
        slots: SlotArbiter,
        seat: usize,
    ) -> Self {
        let prefetch = options.prefetch.unwrap_or_else(|| {
            options.max_concurrency().max(1) * options.prefetch_multiplier.max(1)
        });
        let scaling = options.autoscale.clone().map(|policy| {
            slots.set_max_concurrency(seat, policy.min);
            scaling::Scaling::new(policy)
        });
        let events =
            events::Events::new(&options.node_name, options.task_events, options.heartbeat);
        Self {
            shared: Arc::new(Shared {
                slots,
                seat,
                revoked: RevokedSet::open(options.state_file.clone()),
                rate_turns: RateTurns::new(prefetch),
                broker,
                backend,
                registry,
                options,
                stats: Arc::new(WorkerStats::default()),
                running: RunningTasks::default(),
                aborting: AtomicBool::new(false),
                detached: TaskTracker::new(),
                started_at: std::time::Instant::now(),
                shutdown_requested: tokio::sync::Notify::new(),
                control: control::ControlState::default(),
                consuming: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                events,
                scaling,
            }),
        }
    }

    /// The worker's counters (live while it runs).
    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// A live view of the worker's status, for a process that reports several workers (one
    /// per tenant) in one status file.
    pub fn status_view(&self) -> StatusView {
        StatusView(Arc::clone(&self.shared))
    }

    /// Runs until `shutdown` completes (or remote control asks it to stop), then shuts down
    /// gracefully.
    ///
    /// # Errors
    /// [`WorkerError::Broker`] when consuming cannot start.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Arc<WorkerStats>, WorkerError> {
        let shared = self.shared;
        let options = &shared.options;
        // Autoscaling: consume with the window of the maximum (a broker that cannot move
        // it keeps that, as Celery does), then narrow it to the size now where it can.
        let window = scaling::prefetch_for(&shared, options.max_concurrency());
        let consumer = shared.broker.consume(&options.queues, window).await?;
        if let Some(scaling) = &shared.scaling
            && let Some(limit) = consumer.prefetch_limit()
        {
            limit.set(shared.prefetch());
            let _ = scaling.prefetch.set(limit);
        }
        tracing::info!(
            node = %options.node_name,
            tenant = options.tenant_name(),
            broker = %shared.broker.describe(),
            results = %shared.backend.describe(),
            queues = %options.queues.join(","),
            concurrency = shared.slots.max_concurrency(shared.seat),
            autoscale = ?options.autoscale.as_ref().map(|p| (p.max, p.min)),
            tasks = shared.registry.snapshot().tasks().len(),
            "worker ready: consuming"
        );
        if let Some(subscriptions) = consumer.subscriptions() {
            let _ = shared.control.subscriptions.set(subscriptions);
        }
        let consuming = consumer
            .consuming()
            .unwrap_or_else(|| tokio::sync::watch::channel(true).1);
        let status = tokio::spawn(status::report(Arc::clone(&shared), consuming).in_current_span());
        let plane = control_plane::ControlPlane::start().map_err(WorkerError::ControlPlane)?;
        // Worker events are timed on the control plane but sent from this runtime: the
        // events connection is shared and must not die with the control plane.
        shared
            .events
            .bind_runtime(tokio::runtime::Handle::current());
        let heartbeats = plane.spawn(events::beat(Arc::clone(&shared)).in_current_span());
        let event_publisher = tokio::spawn(events::publish(Arc::clone(&shared)).in_current_span());
        let sampler = tokio::spawn(observe::sample(Arc::clone(&shared)).in_current_span());
        let scaler = tokio::spawn(scaling::run(Arc::clone(&shared)).in_current_span());
        let revocations = shared.broker.revocations(&options.node_name).await?;
        let listener =
            tokio::spawn(revoked::listen(Arc::clone(&shared), revocations).in_current_span());
        // Listened for on the control plane, so the mailbox's connection is driven there.
        let (listening, mailbox_ready) = tokio::sync::oneshot::channel::<()>();
        let control = {
            let shared = Arc::clone(&shared);
            let main = tokio::runtime::Handle::current();
            plane.spawn(
                async move {
                    let requests = shared
                        .broker
                        .control_requests(&shared.options.node_name)
                        .await;
                    let _ = listening.send(());
                    match requests {
                        Ok(Some(requests)) => {
                            control::serve(Arc::clone(&shared), requests, main).await;
                        }
                        Ok(None) => {}
                        Err(error) => tracing::error!(
                            error = &error as &dyn std::error::Error,
                            "remote control: cannot listen for commands"
                        ),
                    }
                }
                .in_current_span(),
            )
        };
        // As before the control plane: once `run` consumes, commands reach the mailbox.
        let _ = mailbox_ready.await;
        if let Some(set) = options.hooks.active() {
            set.worker_ready(&worker_info(&shared));
        }
        // One runner per slot takes a delivery and processes it itself, so a short task
        // costs no spawn and no hand-off between tasks; a message that must wait (eta, rate
        // limit) is detached into its own task so its runner carries on.
        let consumer = Arc::new(tokio::sync::Mutex::new(consumer));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut runners = JoinSet::new();
        // Autoscaling: a runner per slot of the maximum; those beyond the size wait for a
        // slot with the delivery they took, which the autoscaler counts as demand.
        for _ in 0..options.max_concurrency().max(1) {
            runners.spawn(
                run_slot(Arc::clone(&shared), Arc::clone(&consumer), stopped.clone())
                    .in_current_span(),
            );
        }
        let mut purge = tokio::time::interval(Duration::from_secs(600));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = shared.shutdown_requested.notified() => {
                    tracing::info!("shutdown asked for by remote control");
                    break;
                }
                _ = purge.tick() => purge_expired(&shared).await,
            }
        }

        let _ = stop.send(true);
        tracing::info!(
            tenant = options.tenant_name(),
            running = shared.running_tasks(),
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
                running = shared.running.len(),
                "shutdown timeout: interrupting running tasks; their messages will be redelivered"
            );
            shared.aborting.store(true, Ordering::SeqCst);
            shared.running.cancel_all();
            while runners.join_next().await.is_some() {}
            shared.detached.wait().await;
        }
        consumer.flush_acks().await;
        drop(consumer);
        heartbeats.abort();
        shared.events.flush(event_publisher).await;
        shared.events.offline(&shared).await;
        sampler.abort();
        scaler.abort();
        status.abort();
        listener.abort();
        control.abort();
        plane.stop();
        shared.stopped.store(true, Ordering::SeqCst);
        shared.consuming.store(false, Ordering::SeqCst);
        observe::stopped(&shared);
        if let Some(path) = &shared.options.status_file {
            status::write(path, &shared, false, "stopped");
        }
        tracing::info!(tenant = options.tenant_name(), "worker stopped");
        if let Some(set) = options.hooks.active() {
            set.worker_shutdown(&worker_info(&shared));
        }
        Ok(Arc::clone(&shared.stats))
    }
}

/// A live view of a worker's status (see [`Worker::status_view`]).
#[derive(Clone)]
pub struct StatusView(Arc<Shared>);

impl StatusView {
    /// The status as the worker's status file writes it: node, tenant, state, consuming,
    /// queues, broker, and the counts of running, queued (held, not running) and finished
    /// messages with the outcome counters.
    pub fn snapshot(&self) -> serde_json::Value {
        let consuming = self.0.consuming.load(Ordering::Relaxed);
        let state = if self.0.stopped.load(Ordering::Relaxed) {
            "stopped"
        } else if consuming {
            "consuming"
        } else {
            "reconnecting"
        };
        status::snapshot(&self.0, consuming, state)
    }
}

/// Writes `status` (JSON) to `path` atomically, as a worker writes its status file.
pub fn write_status_file(path: &std::path::Path, status: &serde_json::Value) {
    status::write_json(path, status);
}

/// The worker as its `worker_ready`/`worker_shutdown` hooks see it.
fn worker_info(shared: &Shared) -> WorkerInfo<'_> {
    WorkerInfo {
        node: &shared.options.node_name,
        tenant: shared.options.tenant.as_ref().map(|t| t.name.as_str()),
        queues: &shared.options.queues,
        concurrency: shared.slots.max_concurrency(shared.seat),
    }
}

async fn purge_expired(shared: &Shared) {
    match shared.backend.purge_expired().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(purged = n, "removed expired results"),
        Err(error) => tracing::warn!(
            error = &error as &dyn std::error::Error,
            "cannot purge expired results"
        ),
    }
}

/// A slot runner: takes a delivery, then a task slot, and processes it; until `stopped`.
/// An idle runner holds no slot, so a task waiting out its eta or rate limit can take one
/// back when it is due.
async fn run_slot(
    shared: Arc<Shared>,
    consumer: Arc<tokio::sync::Mutex<Box<dyn Consumer>>>,
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
                dispatch(&shared, delivery, &mut stopped).await;
            }
            Err(error) => {
                tracing::error!(
                    error = &error as &dyn std::error::Error,
                    "cannot receive from the broker; retrying in 1s"
                );
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Decodes a delivery, looks its task up, takes a task slot for it (its tenant's turn, and
/// its memory limit charged to the tenant's budget), and processes it on this runner — or in
/// a detached task when it will wait before running (a near eta, a rate limit), so the
/// runner is not blocked meanwhile. A delivery still waiting for a slot when the worker
/// stops is given back.
async fn dispatch(
    shared: &Arc<Shared>,
    delivery: Delivery,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
) {
    let mut message = match TaskMessage::decode(&delivery.envelope) {
        Ok(message) => message,
        Err(error) => {
            tracing::error!(task_id = ?error.task_id, queue = %delivery.queue, "malformed message: {error}");
            settle::finish(shared, delivery, None, decision::undecodable(&error)).await;
            return;
        }
    };
    observe::received(shared, &message, &delivery.queue);
    let span = task_log::task_span(&mut message);
    // Looked up once here: the registry's plugin for the task (a release's canary or not,
    // by the workflow's root, so a workflow runs one version) and its resolved policy.
    let task = shared
        .registry
        .lookup_for(&message.task, workflow_root(&message))
        .map(|plugin| {
            let mut policy = shared.options.task_policies.resolve(
                &shared.options.retry,
                plugin.task(&message.task).map(|t| &t.policy),
                &message.task,
            );
            // A rate limit set by remote control (`rate_limit`) wins.
            shared.control.overrides.apply(&message.task, &mut policy);
            (plugin, policy)
        });
    let memory = task.as_ref().map_or(0, |(plugin, _)| {
        run::memory_limit(shared, plugin, &message.task)
    });
    let slot = tokio::select! {
        biased;
        slot = shared.slot(memory) => slot,
        () = async { drop(stopped.wait_for(|stop| *stop).await) } => {
            // Shutting down before a slot freed: give the message back.
            settle::release(shared, delivery).await;
            return;
        }
    };
    let waits = message.eta.is_some_and(|eta| eta > Utc::now())
        || task
            .as_ref()
            .is_some_and(|(_, policy)| policy.rate_limit.is_some());
    if waits {
        let shared_ = Arc::clone(shared);
        shared.detached.spawn(
            async move {
                drop(process(&shared_, delivery, message, task, slot, memory).await);
            }
            .instrument(span),
        );
    } else {
        drop(
            process(shared, delivery, message, task, slot, memory)
                .instrument(span)
                .await,
        );
    }
}

/// Takes one decoded delivery through admission, the sandbox and its decision, up to its
/// settlement; gives back the task slot it ran in. `task` is the plugin serving it and its
/// policy, none when the task is not registered; `memory` its memory limit, which its slot
/// charges to the tenant's budget.
async fn process(
    shared: &Arc<Shared>,
    delivery: Delivery,
    mut message: TaskMessage,
    task: Option<(Plugin, TaskPolicy)>,
    mut slot: Slot,
    memory: u64,
) -> Slot {
    let arrival = admit::on_arrival(
        &delivery,
        &message,
        shared.options.max_deliveries,
        &shared.revoked,
        Utc::now(),
    );
    match arrival {
        Admission::Refuse(decision) => {
            settle::finish(shared, delivery, Some(&message), *decision).await;
            return slot;
        }
        Admission::RunAfter(wait) if !wait.is_zero() => {
            let _held = shared.control.held.hold(&message, &delivery, message.eta);
            slot = hold(shared, slot, wait, memory).await;
        }
        Admission::RunAfter(_) => {}
    }
    // Celery's built-ins (`celery.starmap`, `celery.map`) run the task they name.
    let builtin = if task.is_none() {
        builtins::MapCall::parse(&message)
    } else {
        None
    };
    if let Some(Err(reason)) = &builtin {
        tracing::error!(task = %message.task, id = %message.id, "{reason}");
        let ran = builtins::MapCall::refused(shared, reason.clone());
        let decision =
            decision::after_run(&message, &ran.call, ran.interruption, &shared.options.retry);
        settle::finish(shared, delivery, Some(&message), decision).await;
        return slot;
    }
    let served = match &builtin {
        Some(Ok(call)) => shared
            .registry
            .lookup_for(&call.task.task, workflow_root(&message))
            .map(|plugin| {
                let policy = shared.options.task_policies.resolve(
                    &shared.options.retry,
                    None,
                    &message.task,
                );
                (plugin, policy)
            }),
        _ => task,
    };
    let Some((plugin, policy)) = served else {
        let unknown = match &builtin {
            Some(Ok(call)) => call.task.task.clone(),
            _ => message.task.clone(),
        };
        tracing::error!(task = %unknown, id = %message.id, "received an unregistered task");
        let mut named = message.clone();
        named.task = unknown;
        let decision = decision::not_registered(&named);
        settle::finish(shared, delivery, Some(&message), decision).await;
        return slot;
    };
    run::apply_declarations(&mut message, &plugin);
    if let Some(rate) = policy.rate_limit {
        match shared.rate_turns.take(&message.task, rate) {
            Admission::RunAfter(wait) if wait.is_zero() => {}
            Admission::RunAfter(wait) => {
                let _waiting = shared.rate_turns.waiting();
                let _held = shared.control.held.hold(&message, &delivery, None);
                slot = hold(shared, slot, wait, memory).await;
            }
            Admission::Refuse(decision) => {
                tracing::debug!(task = %message.task, id = %message.id, "rate limited; deferring");
                settle::finish(shared, delivery, Some(&message), *decision).await;
                return slot;
            }
        }
    }
    let reply = settle::reply_of(&message);
    if shared.options.track_started {
        let mut started = ResultMeta::custom(
            &message.id,
            "STARTED",
            serde_json::json!({"pid": std::process::id(), "hostname": shared.options.node_name}),
        );
        started.parent_id.clone_from(&message.parent_id);
        settle::store(shared, &started, reply.as_ref()).await;
    }
    observe::started(shared, &message, &delivery);
    let ran = match &builtin {
        Some(Ok(call)) => call.run(shared, &delivery, &message, &plugin, reply).await,
        _ => run::run(shared, &delivery, &message, &plugin, reply).await,
    };
    if let Ok(report) = &ran.call {
        observe::ran(shared, &message, &delivery.queue, report);
    }
    let decision = decision::after_run(&message, &ran.call, ran.interruption, &policy.retry);
    let ran = Some(hooks::Ran(
        ran.call.as_ref().ok().map(|report| report.elapsed),
    ));
    if settle::settles_locally(&message, &decision) {
        settle::finish_ran(shared, delivery, Some(&message), decision, ran).await;
    } else {
        // Storing the result (a Redis round trip, a confirmed rpc reply) and any canvas or
        // retry publishing wait on the network: do it beside the slot, not in it, so the
        // next task starts at once. The ack still waits for the store (late acks), and the
        // broker delivers no more than the prefetch unsettled, which bounds these.
        let shared_ = Arc::clone(shared);
        shared.detached.spawn(
            async move {
                settle::finish_ran(&shared_, delivery, Some(&message), decision, ran).await;
            }
            .in_current_span(),
        );
    }
    slot
}

/// Waits `wait` without holding a task slot, then takes a slot again.
async fn hold(shared: &Shared, slot: Slot, wait: Duration, memory: u64) -> Slot {
    drop(slot);
    tokio::time::sleep(wait).await;
    shared.slot(memory).await
}

/// The workflow a message belongs to, for a release's canary: its `root_id`, or its own id
/// when it started none.
fn workflow_root(message: &TaskMessage) -> &str {
    message.root_id.as_deref().unwrap_or(&message.id)
}
