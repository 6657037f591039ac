//! What the worker tells its observers about each task, from one set of hooks: Celery
//! events (`events`, when switched on), Prometheus metrics (when the process serves
//! them, [`crate::metrics`]) and the embedder's callbacks (`hooks`, when registered). Each
//! hook is cheap when its observer is off: an atomic load for events, an `Option` check for
//! metrics and for callbacks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::Shared;
use super::hooks::{self, Ran, TaskEnded, TaskStarting};
use crate::broker::Delivery;
use crate::engine::{CallReport, Outcome};
use crate::metrics::{Metrics, TaskEnd};
use crate::protocol::TaskMessage;
use crate::results::{ResultMeta, TaskState};

/// How often the worker's gauges (queue lengths, active tasks, plugins) are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

fn metrics(shared: &Shared) -> Option<&Metrics> {
    shared.options.metrics.as_deref()
}

/// A message of `message.task` was taken from `queue`.
pub(super) fn received(shared: &Shared, message: &TaskMessage, queue: &str) {
    shared.events.task_received(message, queue);
    if let Some(metrics) = metrics(shared) {
        metrics.task_received(&message.task, queue);
    }
}

/// The task, delivered as `delivery`, is about to run in its sandbox.
pub(super) fn started(shared: &Shared, message: &TaskMessage, delivery: &Delivery) {
    let queue = delivery.queue.as_str();
    shared.events.task_started(&message.id);
    if let Some(set) = shared.options.hooks.active() {
        set.before_task(&TaskStarting {
            id: &message.id,
            name: &message.task,
            tenant: shared.options.tenant.as_ref().map(|t| t.name.as_str()),
            queue,
            args_size: delivery.envelope.body.len(),
            retries: message.retries,
        });
    }
    if let Some(metrics) = metrics(shared) {
        metrics.task_started(&message.task, queue);
    }
}

/// The task's sandbox call ended as `report` says.
pub(super) fn ran(shared: &Shared, message: &TaskMessage, queue: &str, report: &CallReport) {
    if let Outcome::LimitExceeded(limit) = &report.outcome {
        shared.stats.count_limit_hit(limit.kind);
    }
    if let Some(metrics) = metrics(shared) {
        let limit = match &report.outcome {
            Outcome::LimitExceeded(limit) => Some(limit.kind.name()),
            _ => None,
        };
        metrics.task_ran(
            &message.task,
            queue,
            report.elapsed.as_secs_f64(),
            report.outcome.is_success(),
            report.fuel_used,
            limit,
        );
    }
}

/// The task's outcome `meta` is stored (or deliberately not) and its message, delivered as
/// `delivery`, about to be settled; `message` is none when it could not be decoded, `ran`
/// says whether it went through its sandbox call.
pub(super) fn finished(
    shared: &Shared,
    message: Option<&TaskMessage>,
    delivery: &Delivery,
    meta: &ResultMeta,
    ran: Option<Ran>,
) {
    let queue = delivery.queue.as_str();
    shared.events.task_finished(meta, ran.and_then(|ran| ran.0));
    if let (Some(set), Some(message)) = (shared.options.hooks.active(), message) {
        let task = TaskEnded {
            id: &message.id,
            name: &message.task,
            tenant: shared.options.tenant.as_ref().map(|t| t.name.as_str()),
            queue,
            args_size: delivery.envelope.body.len(),
            retries: message.retries,
            state: &meta.status,
            exception: hooks::exception_of(meta),
            result: &meta.result,
            runtime: ran.and_then(|ran| ran.0),
        };
        set.finished(&task, ran.is_some());
    }
    if let Some(metrics) = metrics(shared) {
        let exception = meta
            .result
            .get("exc_type")
            .and_then(Value::as_str)
            .unwrap_or("Exception");
        let end = match &meta.status {
            TaskState::Success => TaskEnd::Succeeded,
            TaskState::Retry => TaskEnd::Retried,
            TaskState::Revoked => TaskEnd::Revoked,
            _ if exception == "Reject" => TaskEnd::Rejected,
            _ => TaskEnd::Failed(exception),
        };
        let name = message.map_or("unknown", |m| m.task.as_str());
        metrics.task_finished(shared.options.tenant_name(), name, queue, end);
    }
}

/// A message of `queue` is dead-lettered for `reason`.
pub(super) fn dead_lettered(shared: &Shared, queue: &str, reason: &str) {
    if let Some(metrics) = metrics(shared) {
        let kind = [
            ("malformed message", "malformed"),
            ("unknown task", "unknown_task"),
            ("invalid arguments", "invalid_arguments"),
            ("rejected by the task", "rejected"),
            ("poison message", "poison"),
        ]
        .iter()
        .find(|(prefix, _)| reason.starts_with(prefix))
        .map_or("other", |(_, kind)| kind);
        metrics.dead_lettered(queue, kind);
    }
}

/// Samples the worker's gauges every few seconds while it runs (nothing without metrics).
pub(super) async fn sample(shared: Arc<Shared>) {
    let Some(metrics) = metrics(&shared) else {
        return;
    };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        gauges(&shared, metrics, true);
        for queue in &shared.options.queues {
            if let Ok(length) = shared.broker.queue_length(queue).await {
                metrics.set_queue_length(queue, length);
            }
        }
    }
}

/// Sets the gauges that say what the worker does now (`up`: it runs).
pub(super) fn gauges(shared: &Shared, metrics: &Metrics, up: bool) {
    let consuming = shared.consuming.load(Ordering::Relaxed);
    metrics.set_worker(up, up && consuming, shared.running_tasks());
    let snapshot = shared.registry.snapshot();
    metrics.set_plugins(snapshot.plugins().len(), snapshot.broken().len());
    metrics.set_events_dropped(shared.events.dropped());
    concurrency(shared);
}

/// The worker's task slots changed (or are sampled): its gauges follow.
pub(super) fn concurrency(shared: &Shared) {
    if let Some(metrics) = metrics(shared) {
        metrics.set_concurrency(
            shared.options.tenant_name(),
            shared.slots.max_concurrency(shared.seat),
            shared.options.max_concurrency(),
        );
    }
}

/// The worker stopped: its gauges say so.
pub(super) fn stopped(shared: &Shared) {
    if let Some(metrics) = metrics(shared) {
        gauges(shared, metrics, false);
    }
}
