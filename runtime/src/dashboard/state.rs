//! The dashboard's picture of the cluster, kept in memory as Flower keeps its own: every
//! Celery event updates it (workers from their heartbeats, tasks from `task-*` events),
//! inspect replies add what events do not carry (a worker's concurrency, the queues it
//! consumes, the tasks it runs now), and the poller adds queue lengths and dead letters.
//!
//! It is bounded: the latest [`State::new`]`(kept)` tasks, the last two minutes of
//! throughput and runtime, and workers gone for [`FORGET_OFFLINE_AFTER`]
//! seconds are dropped (Flower keeps a stopped worker listed forever).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::series::Series;
use crate::broker::DeadLetter;
use crate::protocol::events::Event;

/// A worker offline (or silent) this many seconds is no longer listed.
pub(super) const FORGET_OFFLINE_AFTER: f64 = 300.0;

/// Exception types of a failed task that mean a wasmq sandbox limit stopped it, and which
/// limit (`worker/decision.rs` maps each `LimitKind` to one of them). `TimeLimitExceeded`
/// is both the wall-time limit and running out of fuel; the fuel one's message says fuel.
const LIMIT_EXCEPTIONS: [(&str, &str); 4] = [
    ("TimeLimitExceeded", "time"),
    ("MemoryError", "memory"),
    ("RecursionError", "stack"),
    ("OutputLimitExceeded", "output"),
];

/// One worker, as its events and inspect replies describe it.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct WorkerView {
    /// The node name, `wasmq@host` or `celery@host`.
    hostname: String,
    /// `wasmq` or `py-celery`, from its worker events.
    sw_ident: String,
    /// Its version.
    sw_ver: String,
    /// Tasks running, from its latest heartbeat.
    active: u64,
    /// Tasks it processed since it started, from its latest heartbeat.
    processed: u64,
    /// Its host's 1, 5 and 15 minute load averages.
    loadavg: Vec<f64>,
    /// Seconds between its heartbeats (0: it sends none).
    freq: f64,
    /// When it was last heard of (events or an inspect reply), Unix seconds.
    last_seen: f64,
    /// It said `worker-offline`.
    offline: bool,
    /// Its task slots, from `inspect stats` (none until it answered one).
    concurrency: Option<u64>,
    /// The queues it consumes, from `inspect active_queues`.
    queues: Vec<String>,
    /// Task ids it runs now, from `inspect active` (events add and remove their own).
    inspected_running: Vec<Value>,
    /// Tasks that succeeded / failed on it, as the dashboard saw their events.
    succeeded: u64,
    /// See `succeeded`.
    failed: u64,
    /// Failures that were a sandbox limit, by limit (`fuel`, `time`, `memory`, `stack`,
    /// `output`).
    limit_hits: BTreeMap<String, u64>,
    /// The worker's own count of limit hits, from its latest `inspect stats` reply.
    #[serde(skip)]
    counted_hits: BTreeMap<String, u64>,
    /// Limit hits inferred from the task-failed events seen since the dashboard started.
    #[serde(skip)]
    inferred_hits: BTreeMap<String, u64>,
}

impl WorkerView {
    /// Shows, per limit, the larger of the worker's own count and what events showed.
    /// Each is exact as far as it goes — the count since the worker started as of its last
    /// stats reply (which may be a poll old), and the hits seen in events since the
    /// dashboard started — so the larger is the freshest and never counts a hit twice.
    fn merge_limit_hits(&mut self) {
        let mut hits = self.counted_hits.clone();
        for (limit, count) in &self.inferred_hits {
            let shown = hits.entry(limit.clone()).or_default();
            *shown = (*shown).max(*count);
        }
        hits.retain(|_, count| *count > 0);
        self.limit_hits = hits;
    }
}

/// One task, merged from its events.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct TaskView {
    uuid: String,
    name: Option<String>,
    /// Celery's state name: PENDING (sent), RECEIVED, STARTED, SUCCESS, FAILURE, RETRY,
    /// REVOKED, REJECTED.
    state: String,
    args: Option<String>,
    kwargs: Option<String>,
    /// The result's Python repr.
    result: Option<String>,
    /// The exception's repr: `ZeroDivisionError('division by zero')`.
    exception: Option<String>,
    /// Seconds the task ran.
    runtime: Option<f64>,
    /// The worker (or client, for PENDING) that sent its latest event.
    hostname: Option<String>,
    queue: Option<String>,
    retries: Option<u64>,
    received: Option<f64>,
    started: Option<f64>,
    /// When its latest event happened, Unix seconds.
    timestamp: f64,
}

impl TaskView {
    /// Whether `text` is part of its id, name, state, worker, arguments, result or error
    /// (the page's search box).
    fn matches(&self, text: &str) -> bool {
        let fields = [
            Some(&self.uuid),
            self.name.as_ref(),
            Some(&self.state),
            self.hostname.as_ref(),
            self.args.as_ref(),
            self.kwargs.as_ref(),
            self.result.as_ref(),
            self.exception.as_ref(),
        ];
        fields
            .into_iter()
            .flatten()
            .any(|field| field.contains(text))
    }
}

/// A queue the dashboard shows, with what the poller last read.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct QueueView {
    name: String,
    /// Messages waiting (none: not read yet, or the broker could not say).
    length: Option<u64>,
    /// Dead letters (at most the poller's limit), when read.
    dead: Option<usize>,
    /// Workers consuming it, from `inspect active_queues`.
    consumers: Vec<String>,
}

/// The whole picture.
#[derive(Debug, Default)]
pub(super) struct State {
    workers: BTreeMap<String, WorkerView>,
    tasks: HashMap<String, TaskView>,
    /// Task ids, oldest first, for eviction.
    order: VecDeque<String>,
    kept: usize,
    series: Series,
    /// Queues named by flags, workers and events.
    queue_names: BTreeSet<String>,
    lengths: HashMap<String, u64>,
    dead_counts: HashMap<String, usize>,
    dead_letters: Vec<DeadLetter>,
    events_seen: u64,
    /// What went wrong last, by source (`events`, `queues`, `inspect`…).
    errors: BTreeMap<String, String>,
}

impl State {
    /// An empty picture keeping the latest `kept` tasks, showing `queues` always.
    pub(super) fn new(kept: usize, queues: &[String]) -> Self {
        Self {
            kept: kept.max(1),
            queue_names: queues.iter().cloned().collect(),
            ..Self::default()
        }
    }

    /// The queues to poll.
    pub(super) fn queue_names(&self) -> Vec<String> {
        self.queue_names.iter().cloned().collect()
    }

    /// Shows `queue` from now on.
    pub(super) fn add_queue(&mut self, queue: &str) {
        if !queue.is_empty() && !self.queue_names.contains(queue) {
            self.queue_names.insert(queue.to_owned());
        }
    }

    /// Records the length of `queue`.
    pub(super) fn set_length(&mut self, queue: &str, length: u64) {
        self.lengths.insert(queue.to_owned(), length);
    }

    /// Records `letters`, the newest dead letters of `queue` (a look up to the limit).
    pub(super) fn set_dead_letters(&mut self, queue: &str, letters: Vec<DeadLetter>) {
        self.dead_counts.insert(queue.to_owned(), letters.len());
        self.dead_letters.retain(|letter| letter.queue != queue);
        self.dead_letters.extend(letters);
        self.dead_letters
            .sort_by_key(|letter| std::cmp::Reverse(letter.dead_at_ms));
        self.dead_letters.truncate(50);
    }

    /// Records (or clears, with `None`) what went wrong last reading `source`.
    pub(super) fn set_error(&mut self, source: &str, error: Option<String>) {
        match error {
            Some(error) => self.errors.insert(source.to_owned(), error),
            None => self.errors.remove(source),
        };
    }

    fn worker(&mut self, hostname: &str) -> &mut WorkerView {
        self.workers
            .entry(hostname.to_owned())
            .or_insert_with(|| WorkerView {
                hostname: hostname.to_owned(),
                ..WorkerView::default()
            })
    }

    /// Applies one event.
    pub(super) fn apply(&mut self, event: &Event) {
        self.events_seen += 1;
        let fields = event.fields();
        let hostname = text(fields, "hostname").unwrap_or_default();
        let timestamp = fields
            .get("timestamp")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let kind = event.kind();
        if kind.starts_with("worker-") {
            self.apply_worker(kind, &hostname, timestamp, fields);
        } else if kind.starts_with("task-") {
            if kind != "task-sent" && !hostname.is_empty() {
                let worker = self.worker(&hostname);
                worker.last_seen = worker.last_seen.max(timestamp);
            }
            self.apply_task(kind, &hostname, timestamp, fields);
        }
    }

    fn apply_worker(&mut self, kind: &str, hostname: &str, at: f64, fields: &Map<String, Value>) {
        if hostname.is_empty() {
            return;
        }
        let worker = self.worker(hostname);
        worker.last_seen = worker.last_seen.max(at);
        worker.offline = kind == "worker-offline";
        if let Some(ident) = text(fields, "sw_ident") {
            worker.sw_ident = ident;
        }
        if let Some(version) = text(fields, "sw_ver") {
            worker.sw_ver = version;
        }
        if let Some(freq) = fields.get("freq").and_then(Value::as_f64) {
            worker.freq = freq;
        }
        if let Some(active) = fields.get("active").and_then(Value::as_u64) {
            worker.active = active;
        }
        if let Some(processed) = fields.get("processed").and_then(Value::as_u64) {
            worker.processed = processed;
        }
        if let Some(load) = fields.get("loadavg").and_then(Value::as_array) {
            worker.loadavg = load.iter().filter_map(Value::as_f64).collect();
        }
    }

    fn apply_task(&mut self, kind: &str, hostname: &str, at: f64, fields: &Map<String, Value>) {
        let Some(uuid) = text(fields, "uuid") else {
            return;
        };
        let state = match kind {
            "task-sent" => "PENDING",
            "task-received" => "RECEIVED",
            "task-started" => "STARTED",
            "task-succeeded" => "SUCCESS",
            "task-failed" => "FAILURE",
            "task-retried" => "RETRY",
            "task-revoked" => "REVOKED",
            "task-rejected" => "REJECTED",
            _ => return,
        };
        if !self.tasks.contains_key(&uuid) {
            self.order.push_back(uuid.clone());
            while self.order.len() > self.kept {
                if let Some(old) = self.order.pop_front() {
                    self.tasks.remove(&old);
                }
            }
        }
        let task = self.tasks.entry(uuid.clone()).or_insert_with(|| TaskView {
            uuid,
            ..TaskView::default()
        });
        // Events of one task may arrive out of order (batches, two brokers' clocks): an
        // ended task is not taken back to RECEIVED or STARTED by an older event.
        let ended = matches!(
            task.state.as_str(),
            "SUCCESS" | "FAILURE" | "REVOKED" | "REJECTED"
        );
        let progress = matches!(state, "PENDING" | "RECEIVED" | "STARTED");
        if !(ended && progress && at <= task.timestamp) {
            task.state = state.to_owned();
            task.timestamp = task.timestamp.max(at);
        }
        if !hostname.is_empty() && state != "PENDING" {
            task.hostname = Some(hostname.to_owned());
        }
        let set = |slot: &mut Option<String>, key: &str| {
            if let Some(value) = text(fields, key) {
                *slot = Some(value);
            }
        };
        set(&mut task.name, "name");
        set(&mut task.args, "args");
        set(&mut task.kwargs, "kwargs");
        set(&mut task.result, "result");
        set(&mut task.exception, "exception");
        set(&mut task.queue, "queue");
        if let Some(retries) = fields.get("retries").and_then(Value::as_u64) {
            task.retries = Some(retries);
        }
        match state {
            "RECEIVED" => task.received = Some(at),
            "STARTED" => task.started = Some(at),
            _ => {}
        }
        let runtime = fields.get("runtime").and_then(Value::as_f64);
        if runtime.is_some() {
            task.runtime = runtime;
        }
        let queue = task.queue.clone();
        let exception = task.exception.clone();
        if let Some(queue) = queue {
            self.add_queue(&queue);
        }
        if state == "SUCCESS" || state == "FAILURE" {
            self.series.count(state == "SUCCESS", at, runtime);
            if !hostname.is_empty() {
                let worker = self.worker(hostname);
                if state == "SUCCESS" {
                    worker.succeeded += 1;
                } else {
                    worker.failed += 1;
                    let known_other = !worker.sw_ident.is_empty() && worker.sw_ident != "wasmq";
                    if let Some(limit) = exception.as_deref().and_then(limit_of)
                        && !known_other
                    {
                        *worker.inferred_hits.entry(limit.to_owned()).or_default() += 1;
                        worker.merge_limit_hits();
                    }
                }
            }
        }
    }

    /// Applies `node`'s reply to `inspect stats`, `active_queues` or `active`, received at
    /// `now`.
    pub(super) fn apply_inspect(&mut self, method: &str, node: &str, reply: &Value, now: f64) {
        let worker = self.worker(node);
        worker.last_seen = worker.last_seen.max(now);
        match method {
            "stats" => {
                worker.concurrency = reply
                    .pointer("/pool/max-concurrency")
                    .and_then(Value::as_u64);
                // A wasmq worker counts its own limit hits since it started, events on or
                // off.
                if let Some(hits) = reply
                    .pointer("/wasmq/limit_hits")
                    .and_then(Value::as_object)
                {
                    worker.counted_hits = hits
                        .iter()
                        .filter_map(|(limit, count)| Some((limit.clone(), count.as_u64()?)))
                        .collect();
                    worker.merge_limit_hits();
                }
            }
            "active_queues" => {
                worker.queues = reply
                    .as_array()
                    .map(|queues| {
                        queues
                            .iter()
                            .filter_map(|q| q.get("name").and_then(Value::as_str))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                for queue in worker.queues.clone() {
                    self.add_queue(&queue);
                }
            }
            "active" => {
                worker.inspected_running = reply.as_array().cloned().unwrap_or_default();
            }
            _ => {}
        }
    }

    /// Drops workers gone for [`FORGET_OFFLINE_AFTER`] and chart seconds out of the window.
    pub(super) fn prune(&mut self, now: f64) {
        self.workers
            .retain(|_, worker| now - worker.last_seen < FORGET_OFFLINE_AFTER);
        self.series.prune(now);
    }

    /// The picture as `/api/state` serves it, at `now` (Unix seconds), with the newest
    /// `tasks` tasks.
    pub(super) fn snapshot(&self, now: f64, tasks: usize, search: Option<&str>) -> Value {
        let mut newest: Vec<&TaskView> = self
            .tasks
            .values()
            .filter(|task| search.is_none_or(|text| task.matches(text)))
            .collect();
        newest.sort_by(|a, b| b.timestamp.total_cmp(&a.timestamp));
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for task in self.tasks.values() {
            *counts.entry(task.state.as_str()).or_default() += 1;
        }
        let workers: Vec<Value> = self
            .workers
            .values()
            .map(|worker| self.worker_json(worker, now))
            .collect();
        let queues: Vec<QueueView> = self
            .queue_names
            .iter()
            .map(|name| QueueView {
                name: name.clone(),
                length: self.lengths.get(name).copied(),
                dead: self.dead_counts.get(name).copied(),
                consumers: self.consumers(name),
            })
            .collect();
        let dead_letters: Vec<Value> = self
            .dead_letters
            .iter()
            .map(|letter| {
                json!({
                    "queue": letter.queue,
                    "task_id": letter.task_id,
                    "task": letter.envelope.headers.get("task").and_then(Value::as_str),
                    "reason": letter.reason,
                    "deliveries": letter.delivery_count,
                    "dead_at": letter.dead_at_ms as f64 / 1000.0,
                })
            })
            .collect();
        json!({
            "now": now,
            "events_seen": self.events_seen,
            "workers": workers,
            "queues": queues,
            "tasks": newest.into_iter().take(tasks).collect::<Vec<_>>(),
            "task_counts": counts,
            "tasks_kept": self.tasks.len(),
            "dead_letters": dead_letters,
            "series": self.series.to_json(now),
            "errors": self.errors,
        })
    }

    /// The listed workers that consume `queue`: by their `active_queues` reply, or (where
    /// there is no remote control) because they received one of its kept tasks.
    fn consumers(&self, queue: &str) -> Vec<String> {
        let mut names: BTreeSet<&str> = self
            .workers
            .values()
            .filter(|w| w.queues.iter().any(|q| q == queue))
            .map(|w| w.hostname.as_str())
            .collect();
        for task in self.tasks.values() {
            if task.queue.as_deref() == Some(queue)
                && let Some(host) = task.hostname.as_deref()
                && self.workers.contains_key(host)
            {
                names.insert(host);
            }
        }
        names.into_iter().map(str::to_owned).collect()
    }

    fn worker_json(&self, worker: &WorkerView, now: f64) -> Value {
        // Celery's rule (`heartbeat_expires`): alive while the last heartbeat is younger than
        // twice its interval; a worker without heartbeats counts as alive for a minute after
        // it was last heard of (an inspect reply, a task event).
        let window = if worker.freq > 0.0 {
            2.0 * worker.freq
        } else {
            60.0
        };
        let online = !worker.offline && now - worker.last_seen <= window.max(2.0);
        let mut running: Vec<Value> = self
            .tasks
            .values()
            .filter(|t| {
                t.state == "STARTED" && t.hostname.as_deref() == Some(worker.hostname.as_str())
            })
            .map(|t| json!({"id": t.uuid, "name": t.name, "args": t.args, "started": t.started}))
            .collect();
        for task in &worker.inspected_running {
            let Some(id) = task.get("id").and_then(Value::as_str) else {
                continue;
            };
            let known = self.tasks.get(id);
            let ended = known.is_some_and(|t| t.state != "STARTED" && t.state != "RECEIVED");
            let listed = running.iter().any(|r| r["id"] == id);
            if !ended && !listed {
                running.push(json!({
                    "id": id,
                    "name": task.get("name"),
                    "args": task.get("args").map(|a| match a {
                        Value::String(s) => Value::from(s.clone()),
                        other => Value::from(other.to_string()),
                    }),
                    "started": task.get("time_start"),
                }));
            }
        }
        let mut view = serde_json::to_value(worker).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut view {
            map.remove("inspected_running");
            map.insert("online".into(), online.into());
            map.insert("running".into(), Value::Array(running));
            map.insert(
                "limit_hits_total".into(),
                worker.limit_hits.values().sum::<u64>().into(),
            );
        }
        view
    }
}

/// Which sandbox limit a failed task's exception (`TimeLimitExceeded('… fuel …')`) means,
/// if any.
fn limit_of(exception: &str) -> Option<&'static str> {
    let kind = exception.split('(').next().unwrap_or_default();
    let limit = LIMIT_EXCEPTIONS
        .iter()
        .find(|(name, _)| *name == kind)
        .map(|(_, limit)| *limit)?;
    if limit == "time" && exception.contains("fuel") {
        return Some("fuel");
    }
    Some(limit)
}

fn text(fields: &Map<String, Value>, key: &str) -> Option<String> {
    match fields.get(key)? {
        Value::String(text) => Some(text.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
