//! Running one admitted task: the sandbox call built from the message (arguments, the
//! workflow ids, the time limits the message may lower, what the task can read about its
//! message), registered among the running tasks so shutdown and `revoke --terminate` can
//! interrupt it, with `update_state` reports stored as they come.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::Instrument;

use super::Shared;
use super::decision::Interruption;
use super::overrides::hard_limit;
use crate::broker::Delivery;
use crate::engine::{
    CallError, CallReport, CallRequest, CancelToken, LimitOverrides, Limits, MessageInfo,
    MessageProperties, Plugin, StateListener,
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
    let run = shared.running.start(message, delivery, cancel.clone());
    shared.stats.count_start(&message.task);
    if shared.revoked.get(&message.id).is_some_and(|r| r.terminate) {
        // Revoked with terminate while it waited: the listener may have missed it.
        cancel.cancel();
    }
    let request = call_request(shared, delivery, message, plugin, cancel.clone());
    let secrets = request.grants.secrets.clone();
    let started = Instant::now();
    let listener = state_listener(shared, reply);
    let call = shared
        .registry
        .sandbox()
        .call_with_listener(plugin, request, Some(listener))
        .await;
    shared.running.finish(run);
    match &call {
        Ok(report) => {
            super::task_log::outcome(message, &report.outcome, started.elapsed(), &secrets)
        }
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
    let set = shared.control.overrides.time_limits(&message.task);
    let requested = seconds(message.time_limit.filter(|t| *t > 0.0));
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
            // A message may shorten the task's time limit, never lengthen it: the limit set
            // by remote control (`time_limit`), else the task's declared default (else its
            // tenant's, else the worker's) bounds what a sender can ask for, and the sandbox
            // clamps everything to the ceiling.
            timeout: (set.is_some_and(|set| set.hard.is_some()) || requested.is_some()).then(
                || {
                    hard_limit(
                        set.and_then(|set| set.hard),
                        declared_timeout(shared, declared),
                        requested,
                    )
                },
            ),
            ..LimitOverrides::default()
        },
        // The message's soft limit, else the one remote control set, else the task's
        // declared one (Celery: `soft_time_limit or task.soft_time_limit`).
        soft_timeout: seconds(message.soft_time_limit.filter(|t| *t > 0.0)).or_else(|| {
            set.map_or_else(
                || declared.and_then(|info| info.soft_timeout),
                |set| set.soft,
            )
        }),
        message: message_info(delivery, message),
        cancel: Some(cancel),
        grants: shared
            .options
            .tenant
            .as_ref()
            .map(|tenant| tenant.grants.of(&message.task))
            .unwrap_or_default(),
        tenant_limits: shared.options.tenant.as_ref().and_then(|t| t.limits),
    }
}

/// The wall-clock limit `declared` runs under when nothing lowers it: its declaration,
/// else its tenant's default, else the worker's.
fn declared_timeout(shared: &Shared, declared: Option<&crate::engine::TaskInfo>) -> Duration {
    declared
        .and_then(|info| info.limits.timeout)
        .or_else(|| {
            shared
                .options
                .tenant
                .as_ref()
                .and_then(|t| t.limits)
                .and_then(|l| l.defaults.timeout)
        })
        .unwrap_or(shared.registry.sandbox().config().defaults.timeout)
}

/// The memory limit a task of `plugin` named `task` will run under (the plugin's
/// declaration, the tenant's and the worker's defaults, clamped by the ceilings): what its
/// slot charges to the tenant's memory budget. 0 when the task cannot run.
pub(super) fn memory_limit(shared: &Shared, plugin: &Plugin, task: &str) -> u64 {
    // The same layers `Sandbox::limits_for` resolves, without building a request per task
    // (a message cannot change the memory limit).
    let config = shared.registry.sandbox().config();
    plugin.task(task).map_or(0, |info| {
        Limits::for_call(
            LimitOverrides::default(),
            info.limits,
            shared
                .options
                .tenant
                .as_ref()
                .and_then(|t| t.limits.as_ref()),
            config.defaults,
            config.ceiling,
        )
        .memory_bytes
    })
}

/// Stores `update_state` reports as custom states.
fn state_listener(shared: &Arc<Shared>, reply: Option<ReplyTo>) -> StateListener {
    let backend = Arc::clone(&shared.backend);
    Arc::new(move |update| {
        let backend = Arc::clone(&backend);
        let reply = reply.clone();
        let meta = ResultMeta::custom(&update.task_id, &update.state, update.meta);
        tokio::spawn(
            async move {
            if let Err(error) = backend.store(&meta, reply.as_ref()).await {
                tracing::warn!(error = &error as &dyn std::error::Error, task_id = %meta.task_id, "cannot store a custom state");
            }
            }
            .in_current_span(),
        );
    })
}

/// A task running now, as remote control reports it (Celery's `Request.info()`).
#[derive(Debug, Clone)]
pub(super) struct ActiveTask {
    /// The task id.
    pub(super) id: String,
    /// The task name.
    pub(super) name: String,
    /// Its positional arguments.
    pub(super) args: Vec<Value>,
    /// Its keyword arguments.
    pub(super) kwargs: serde_json::Map<String, Value>,
    /// When it started (Unix seconds).
    pub(super) started_at: f64,
    /// The queue it came from.
    pub(super) queue: String,
    /// Its message priority.
    pub(super) priority: Option<u8>,
    /// Whether its message was delivered before.
    pub(super) redelivered: bool,
}

impl ActiveTask {
    /// What `run` registers for `message`, delivered as `delivery`.
    pub(super) fn of(message: &TaskMessage, delivery: &Delivery) -> Self {
        Self {
            id: message.id.clone(),
            name: message.task.clone(),
            args: message.args.clone(),
            kwargs: message.kwargs.clone(),
            started_at: chrono::Utc::now().timestamp_micros() as f64 / 1e6,
            queue: delivery.queue.clone(),
            priority: message.priority,
            redelivered: delivery.redelivered(),
        }
    }
}

/// One run: the task and the token that interrupts it, with the message's stamps (for
/// `revoke_by_stamped_headers` with terminate).
struct Run {
    task: ActiveTask,
    cancel: CancelToken,
    stamped_headers: Vec<Value>,
    stamps: serde_json::Map<String, Value>,
}

/// The tasks running now, each with its cancel token: shutdown interrupts them all when its
/// timeout passes, `revoke --terminate` the ones with a revoked id or stamp; remote control
/// lists them (`inspect active`).
#[derive(Default)]
pub(super) struct RunningTasks {
    /// By run number (a task id may run twice at once when a message is redelivered).
    runs: Mutex<HashMap<u64, Run>>,
    /// The next run number.
    next: AtomicU64,
}

impl RunningTasks {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Run>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a run of `message`; returns its run number.
    fn start(&self, message: &TaskMessage, delivery: &Delivery, cancel: CancelToken) -> u64 {
        let run = self.next.fetch_add(1, Ordering::Relaxed);
        let header = |name: &str| message.extra_headers.get(name);
        let entry = Run {
            task: ActiveTask::of(message, delivery),
            cancel,
            stamped_headers: header("stamped_headers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            stamps: header("stamps")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        };
        self.lock().insert(run, entry);
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

    /// The running tasks, in the order they started.
    pub(super) fn snapshot(&self) -> Vec<ActiveTask> {
        let runs = self.lock();
        let mut numbered: Vec<(&u64, &Run)> = runs.iter().collect();
        numbered.sort_by_key(|(number, _)| **number);
        numbered
            .into_iter()
            .map(|(_, run)| run.task.clone())
            .collect()
    }

    /// Whether `task_id` is running here.
    pub(super) fn is_running(&self, task_id: &str) -> bool {
        self.lock().values().any(|run| run.task.id == task_id)
    }

    /// Interrupts every run of `task_id`; true when one was running.
    pub(super) fn cancel(&self, task_id: &str) -> bool {
        let runs = self.lock();
        let mut found = false;
        for run in runs.values().filter(|run| run.task.id == task_id) {
            run.cancel.cancel();
            found = true;
        }
        found
    }

    /// Interrupts every run whose message carries a stamp `revoked` says is revoked;
    /// returns the stamps that matched, as `(header, value)`.
    pub(super) fn cancel_stamped(
        &self,
        revoked: &super::revoked::RevokedSet,
    ) -> Vec<(String, Value)> {
        let runs = self.lock();
        let mut matched = Vec::new();
        for run in runs.values() {
            if let Some(stamp) = revoked.revoking_stamp(&run.stamped_headers, &run.stamps) {
                run.cancel.cancel();
                matched.push(stamp);
            }
        }
        matched
    }

    /// Interrupts every running task.
    pub(super) fn cancel_all(&self) {
        for run in self.lock().values() {
            run.cancel.cancel();
        }
    }
}
