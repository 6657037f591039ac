//! Running one admitted task: the sandbox call built from the message (arguments, the
//! workflow ids, the time limits the message may lower, what the task can read about its
//! message), registered among the running tasks so shutdown and `revoke --terminate` can
//! interrupt it, with `update_state` reports stored as they come.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Shared;
use super::decision::Interruption;
use crate::broker::Delivery;
use crate::engine::{
    CallError, CallReport, CallRequest, CancelToken, LimitOverrides, MessageInfo,
    MessageProperties, Outcome, Plugin, StateListener,
};
use crate::protocol::{TaskMessage, format_time, unwrap_kombu_values};
use crate::results::{ReplyTo, ResultMeta};

/// A finished sandbox call and whether something interrupted it.
pub(super) struct Ran {
    /// The call's report, or why it could not run.
    pub(super) call: Result<CallReport, CallError>,
    /// Shutdown or a revoke that interrupted it.
    pub(super) interruption: Interruption,
}

/// Fills in what `message` leaves to the task's declarations: whether its result is
/// stored (Celery: the message's explicit `ignore_result`, else the task's attribute). A
/// retry of the message then carries the value in force, as Celery's does.
pub(super) fn apply_declarations(message: &mut TaskMessage, plugin: &Plugin) {
    if message.ignore_result.is_none() {
        message.ignore_result = plugin
            .task(&message.task)
            .map(|info| info.ignore_result)
            .filter(|ignore| *ignore);
    }
}

/// Runs `message` (delivered as `delivery`) on `plugin` in a fresh sandbox, answering rpc
/// state updates to `reply`.
pub(super) async fn run(
    shared: &Arc<Shared>,
    delivery: &Delivery,
    message: &TaskMessage,
    plugin: &Plugin,
    reply: Option<ReplyTo>,
) -> Ran {
    let cancel = CancelToken::new();
    let run = shared.running.start(&message.id, cancel.clone());
    if shared.revoked.get(&message.id).is_some_and(|r| r.terminate) {
        // Revoked with terminate while it waited: the listener may have missed it.
        cancel.cancel();
    }
    let request = call_request(shared, delivery, message, plugin, cancel.clone());
    let started = Instant::now();
    let listener = state_listener(shared, reply);
    let call = shared
        .registry
        .sandbox()
        .call_with_listener(plugin, request, Some(listener))
        .await;
    shared.running.finish(run);
    match &call {
        Ok(report) => log_outcome(message, &report.outcome, started.elapsed()),
        Err(error) => {
            tracing::warn!(task = %message.task, id = %message.id, error = error as &dyn std::error::Error, "the task could not run");
        }
    }
    Ran {
        call,
        interruption: Interruption {
            shutdown: shared.aborting.load(Ordering::SeqCst),
            terminated: cancel.is_cancelled(),
        },
    }
}

/// Seconds as a message carries them (`timelimit`), as a duration.
fn seconds(value: Option<f64>) -> Option<Duration> {
    value.and_then(|t| Duration::try_from_secs_f64(t).ok())
}

/// What the task can read about `message` (Celery's `self.request`).
fn message_info(delivery: &Delivery, message: &TaskMessage) -> MessageInfo {
    let p = &delivery.envelope.properties;
    MessageInfo {
        eta: message.eta.as_ref().map(format_time),
        expires: message.expires.as_ref().map(format_time),
        time_limit: seconds(message.time_limit),
        soft_time_limit: seconds(message.soft_time_limit),
        redelivered: delivery.redelivered(),
        headers: message.custom_headers(),
        properties: MessageProperties {
            content_type: p.content_type.clone(),
            content_encoding: p.content_encoding.clone(),
            correlation_id: p.correlation_id.clone(),
            reply_to: p.reply_to.clone(),
            delivery_mode: p.delivery_mode,
            priority: p.priority,
            expiration: p.expiration.clone(),
            message_id: p.message_id.clone(),
            timestamp: p.timestamp,
            message_type: p.message_type.clone(),
            app_id: p.app_id.clone(),
        },
    }
}

/// The sandbox call for `message`.
fn call_request(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    plugin: &Plugin,
    cancel: CancelToken,
) -> CallRequest {
    let declared = plugin.task(&message.task);
    CallRequest {
        task: message.task.clone(),
        id: message.id.clone(),
        args_json: Value::Array(
            message
                .args
                .iter()
                .cloned()
                .map(unwrap_kombu_values)
                .collect(),
        )
        .to_string(),
        kwargs_json: unwrap_kombu_values(Value::Object(message.kwargs.clone())).to_string(),
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
                    let task_default = declared
                        .and_then(|info| info.limits.timeout)
                        .unwrap_or(shared.registry.sandbox().config().defaults.timeout);
                    t.min(task_default)
                }),
            ..LimitOverrides::default()
        },
        // The message's soft limit, else the task's declared one (Celery:
        // `soft_time_limit or task.soft_time_limit`).
        soft_timeout: message
            .soft_time_limit
            .filter(|t| *t > 0.0)
            .and_then(|t| Duration::try_from_secs_f64(t).ok())
            .or_else(|| declared.and_then(|info| info.soft_timeout)),
        message: message_info(delivery, message),
        cancel: Some(cancel),
    }
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
                tracing::warn!(error = &error as &dyn std::error::Error, task_id = %meta.task_id, "cannot store a custom state");
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

/// The tasks running now, each with its cancel token: shutdown interrupts them all when its
/// timeout passes, `revoke --terminate` the ones with a revoked id.
#[derive(Default)]
pub(super) struct RunningTasks {
    /// By run number (a task id may run twice at once when a message is redelivered).
    runs: Mutex<HashMap<u64, (String, CancelToken)>>,
    /// The next run number.
    next: AtomicU64,
}

impl RunningTasks {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (String, CancelToken)>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a run of `task_id`; returns its run number.
    fn start(&self, task_id: &str, cancel: CancelToken) -> u64 {
        let run = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(run, (task_id.to_owned(), cancel));
        run
    }

    /// Forgets a finished run.
    fn finish(&self, run: u64) {
        self.lock().remove(&run);
    }

    /// How many tasks are running.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Interrupts every run of `task_id`; true when one was running.
    pub(super) fn cancel(&self, task_id: &str) -> bool {
        let runs = self.lock();
        let mut found = false;
        for (id, token) in runs.values() {
            if id == task_id {
                token.cancel();
                found = true;
            }
        }
        found
    }

    /// Interrupts every running task.
    pub(super) fn cancel_all(&self) {
        for (_, token) in self.lock().values() {
            token.cancel();
        }
    }
}
