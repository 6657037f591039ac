//! The worker's Celery events (see [`crate::protocol::events`]): what Flower, `celery
//! events`, celery-exporter and `wasmq events` see of it.
//!
//! * **Worker events** are always sent, as Celery's worker sends them without `-E`:
//!   `worker-online` at start, `worker-heartbeat` every `heartbeat` interval (2 s by
//!   default; a monitor counts a worker alive for two intervals after its last one), and
//!   `worker-offline` when it stops. `--without-heartbeat` turns them off.
//! * **Task events** (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`,
//!   `-revoked`, `-rejected`) only while switched on: by `--task-events` (`-E`) or by the
//!   `enable_events` remote-control command, which Flower broadcasts every few seconds.
//!   Off, each hook costs one relaxed atomic load.
//!
//! Events never slow tasks down: a hook only builds the event and hands it to a bounded
//! buffer; one publisher task sends the buffer in batches (at most [`BATCH`] events or
//! every [`FLUSH_EVERY`], one `task.multi` message each). When the buffer is full — the
//! broker is down, or slower than the drain — events are dropped and counted
//! ([`Events::dropped`]), never waited for. Heartbeats are sent by their own task, so a
//! full buffer or busy slots never make a live worker look dead.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use super::Shared;
use crate::protocol::TaskMessage;
use crate::protocol::events::{
    EncodedEvent, Event, EventMessage, Stamp, TaskId, TaskReceived, TaskSucceeded, args_repr,
    exception_of_result, kwargs_repr, result_repr, utc_offset_hours, worker_fields,
};
use crate::protocol::format_time;
use crate::results::{ResultMeta, TaskState};

/// Most events in one published batch (Celery's buffer limit is 24; wasmq drains faster,
/// and a receiver takes a list of any length).
const BATCH: usize = 256;

/// Longest a task event waits in the buffer before it is published.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Task events buffered before new ones are dropped.
const BUFFER: usize = 8192;

/// A worker's event dispatcher.
pub(super) struct Events {
    /// The node the events come from.
    node: String,
    /// Lamport clock, advanced by every event.
    clock: AtomicU64,
    /// Whether task events are switched on.
    task_events: AtomicBool,
    /// Heartbeat interval; none: no worker events at all.
    heartbeat: Option<Duration>,
    /// The worker's process id.
    pid: u32,
    /// Hours west of UTC, refreshed with each heartbeat (it moves at a DST change).
    utcoffset: AtomicI64,
    /// Task events waiting to be published.
    buffer: mpsc::Sender<EncodedEvent>,
    /// The other end of `buffer`, taken by the publisher when the worker starts.
    pending: Mutex<Option<mpsc::Receiver<EncodedEvent>>>,
    /// Wakes the publisher before its flush interval once a full batch waits, so it is not
    /// woken by every event.
    batch_ready: Notify,
    /// Tells the publisher the worker stops: publish what waits, then end.
    closing: Notify,
    /// Task events dropped because the buffer was full.
    dropped: AtomicU64,
    /// The worker's runtime, where worker events are published: the broker's events
    /// connection is opened by whoever publishes first, and must belong to a runtime that
    /// lives as long as the broker (not the control plane, which stops with the worker).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Events {
    /// A dispatcher for `node`, with task events on when `task_events`, and worker events
    /// every `heartbeat` (none: never).
    pub(super) fn new(node: &str, task_events: bool, heartbeat: Option<Duration>) -> Self {
        let (buffer, pending) = mpsc::channel(BUFFER);
        Self {
            node: node.to_owned(),
            clock: AtomicU64::new(0),
            task_events: AtomicBool::new(task_events),
            heartbeat,
            pid: std::process::id(),
            utcoffset: AtomicI64::new(utc_offset_hours()),
            buffer,
            pending: Mutex::new(Some(pending)),
            batch_ready: Notify::new(),
            closing: Notify::new(),
            dropped: AtomicU64::new(0),
            runtime: std::sync::OnceLock::new(),
        }
    }

    /// Whether task events are on.
    pub(super) fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Switches task events on or off; returns whether they were on.
    pub(super) fn set_task_events(&self, on: bool) -> bool {
        let was = self.task_events.swap(on, Ordering::Relaxed);
        if was != on {
            tracing::info!(node = %self.node, on, "task events switched");
        }
        was
    }

    /// Task events dropped so far (the buffer was full).
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The common fields of the next event: the clock advances.
    fn stamp(&self) -> Stamp<'_> {
        Stamp {
            hostname: &self.node,
            timestamp: chrono::Utc::now().timestamp_micros() as f64 / 1e6,
            utcoffset: self.utcoffset.load(Ordering::Relaxed),
            pid: self.pid,
            clock: self.clock.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Stamps `event` with the common fields.
    fn stamped(&self, mut event: Event) -> Event {
        let stamp = self.stamp();
        event.stamp(stamp.hostname, stamp.timestamp, stamp.pid, stamp.clock);
        event
    }

    /// Encodes a task event and buffers it for the publisher, or counts it dropped.
    fn emit<T: serde::Serialize>(&self, kind: &'static str, fields: &T) {
        let event = EncodedEvent::new(kind, fields, &self.stamp());
        match self.buffer.try_send(event) {
            Ok(()) => {
                if self.buffer.max_capacity() - self.buffer.capacity() >= BATCH {
                    self.batch_ready.notify_one();
                }
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `task-received`: a message of this task was taken from `queue`.
    pub(super) fn task_received(&self, message: &TaskMessage, queue: &str) {
        if !self.task_events() {
            return;
        }
        self.emit(
            "task-received",
            &TaskReceived {
                uuid: &message.id,
                name: &message.task,
                args: args_repr(&message.args),
                kwargs: kwargs_repr(&message.kwargs),
                root_id: message.root_id.as_deref(),
                parent_id: message.parent_id.as_deref(),
                retries: message.retries,
                eta: message.eta.as_ref().map(format_time),
                expires: message.expires.as_ref().map(format_time),
                // What celery-exporter labels queue_name (Celery sends it with task-sent).
                queue,
                exchange: "",
                routing_key: queue,
            },
        );
    }

    /// `task-started`: the task is about to run in its sandbox.
    pub(super) fn task_started(&self, task_id: &str) {
        if !self.task_events() {
            return;
        }
        self.emit("task-started", &TaskId { uuid: task_id });
    }

    /// The terminal event of a task whose outcome `meta` was settled: `task-succeeded`,
    /// `-failed`, `-retried`, `-revoked`, or `-rejected` (the task rejected its message),
    /// with how long its sandbox call took (`runtime`; none when it never ran).
    pub(super) fn task_finished(&self, meta: &ResultMeta, runtime: Option<Duration>) {
        if !self.task_events() {
            return;
        }
        let runtime = runtime.map(|r| r.as_secs_f64());
        let uuid = meta.task_id.as_str();
        let traceback = || meta.traceback.clone().unwrap_or_default();
        match &meta.status {
            TaskState::Success => self.emit(
                "task-succeeded",
                &TaskSucceeded {
                    uuid,
                    result: result_repr(&meta.result),
                    runtime: runtime.unwrap_or(0.0),
                },
            ),
            TaskState::Retry => self.emit(
                "task-retried",
                &json!({
                    "uuid": uuid,
                    "exception": exception_of_result(&meta.result),
                    "traceback": traceback(),
                }),
            ),
            TaskState::Revoked => {
                let reason = reason_of(&meta.result);
                self.emit(
                    "task-revoked",
                    &json!({
                        "uuid": uuid,
                        "terminated": reason == "terminated",
                        "signum": (reason == "terminated").then_some(15),
                        "expired": reason == "expired",
                    }),
                );
            }
            _ if meta.result.get("exc_type").and_then(Value::as_str) == Some("Reject") => {
                self.emit("task-rejected", &json!({ "uuid": uuid, "requeue": false }));
            }
            _ => self.emit(
                "task-failed",
                &json!({
                    "uuid": uuid,
                    "exception": exception_of_result(&meta.result),
                    "traceback": traceback(),
                    "runtime": runtime,
                }),
            ),
        }
    }

    /// A worker event (`worker-online`, `-heartbeat`, `-offline`) now.
    fn worker_event(&self, shared: &Shared, kind: &str, freq: f64) -> EventMessage {
        let stats = &shared.stats;
        let processed = stats.succeeded.load(Ordering::Relaxed)
            + stats.failed.load(Ordering::Relaxed)
            + stats.retried.load(Ordering::Relaxed)
            + stats.revoked.load(Ordering::Relaxed);
        let fields = worker_fields(freq, shared.running_tasks(), processed);
        EventMessage::single(self.stamped(Event::new(kind, fields)))
    }

    /// Publishes worker events on `runtime` from now on (see the field).
    pub(super) fn bind_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
    }

    /// Sends a worker event at once (not through the buffer), from the worker's runtime.
    async fn send_worker_event(&self, shared: &Shared, kind: &str, freq: f64) {
        let message = self.worker_event(shared, kind, freq);
        let broker = Arc::clone(&shared.broker);
        let publish = async move { broker.publish_events(&message).await };
        let sent = match self.runtime.get() {
            Some(runtime) => match runtime.spawn(publish).await {
                Ok(sent) => sent,
                Err(_) => return,
            },
            None => publish.await,
        };
        if let Err(error) = sent {
            tracing::debug!(
                error = &error as &dyn std::error::Error,
                kind,
                "cannot send a worker event"
            );
        }
    }

    /// `heartbeat` from remote control: a heartbeat now, with `freq` 5 as Celery's.
    pub(super) async fn heartbeat_now(&self, shared: &Shared) {
        if self.heartbeat.is_some() {
            self.send_worker_event(shared, "worker-heartbeat", 5.0)
                .await;
        }
    }

    /// When the worker stops: has `publisher` (the [`publish`] task) send every buffered
    /// task event at once and waits for it to end, up to a second (then it is aborted).
    pub(super) async fn flush(&self, mut publisher: tokio::task::JoinHandle<()>) {
        self.closing.notify_one();
        if tokio::time::timeout(Duration::from_secs(1), &mut publisher)
            .await
            .is_err()
        {
            tracing::debug!("task events still buffered after 1 s; dropping them");
            publisher.abort();
        }
    }

    /// `worker-offline`, when the worker stops.
    pub(super) async fn offline(&self, shared: &Shared) {
        if let Some(freq) = self.heartbeat {
            let sent = tokio::time::timeout(
                Duration::from_secs(2),
                self.send_worker_event(shared, "worker-offline", freq.as_secs_f64()),
            )
            .await;
            if sent.is_err() {
                tracing::debug!("worker-offline not sent within 2 s");
            }
        }
    }
}

/// Sends `worker-online`, then a heartbeat every interval, until aborted (the worker
/// sends `worker-offline` itself when it stops).
pub(super) async fn beat(shared: Arc<Shared>) {
    let events = &shared.events;
    let Some(every) = events.heartbeat else {
        return;
    };
    let freq = every.as_secs_f64();
    events
        .send_worker_event(&shared, "worker-online", freq)
        .await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        events
            .utcoffset
            .store(utc_offset_hours(), Ordering::Relaxed);
        events
            .send_worker_event(&shared, "worker-heartbeat", freq)
            .await;
    }
}

/// Publishes buffered task events in batches until the worker stops ([`Events::flush`]),
/// the buffer closes, or the task is aborted.
pub(super) async fn publish(shared: Arc<Shared>) {
    let Some(mut pending) = shared
        .events
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    let events = &shared.events;
    let mut waiting = Vec::with_capacity(BATCH);
    let mut failures = 0_u64;
    let mut closing = false;
    while !closing {
        // Parked only while no event waits; then the first event of a batch waits at most
        // the flush interval, and the publisher wakes once per full batch, not per event.
        tokio::select! {
            received = pending.recv_many(&mut waiting, BATCH) => if received == 0 {
                return;
            },
            () = events.closing.notified() => closing = true,
        }
        if !closing && waiting.len() < BATCH {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = events.batch_ready.notified() => {}
                () = events.closing.notified() => closing = true,
            }
        }
        while let Ok(event) = pending.try_recv() {
            waiting.push(event);
        }
        while !waiting.is_empty() {
            let rest = waiting.split_off(waiting.len().min(BATCH));
            let batch = std::mem::replace(&mut waiting, rest);
            let count = batch.len() as u64;
            let message = EventMessage::encoded(&events.node, batch);
            if let Err(error) = shared.broker.publish_events(&message).await {
                events.dropped.fetch_add(count, Ordering::Relaxed);
                failures += 1;
                // One line when events start failing, then one per hundred failed batches.
                if failures % 100 == 1 {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        dropped = events.dropped(),
                        "cannot publish task events; dropping them"
                    );
                }
            } else {
                failures = 0;
            }
        }
    }
}

/// The reason a REVOKED result gives (`TaskRevokedError('expired')` → `expired`).
fn reason_of(result: &Value) -> String {
    match result.get("exc_message") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => items
            .first()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}
