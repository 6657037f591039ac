//! Running one admitted task: the sandbox call built from the message (arguments, the
//! workflow ids, the time limits the message may lower), registered among the running tasks
//! so shutdown and `revoke --terminate` can interrupt it, with `update_state` reports stored
//! as they come.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Shared;
use super::decision::Interruption;
use crate::engine::{
    CallError, CallReport, CallRequest, CancelToken, LimitOverrides, Outcome, Plugin, StateListener,
};
use crate::protocol::{TaskMessage, unwrap_kombu_values};
use crate::results::{ReplyTo, ResultMeta};

/// A finished sandbox call and whether something interrupted it.
pub(super) struct Ran {
    /// The call's report, or why it could not run.
    pub(super) call: Result<CallReport, CallError>,
    /// Shutdown or a revoke that interrupted it.
    pub(super) interruption: Interruption,
}

/// Runs `message` on `plugin` in a fresh sandbox, answering rpc state updates to `reply`.
pub(super) async fn run(
    shared: &Arc<Shared>,
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
    let request = call_request(shared, message, plugin, cancel.clone());
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

/// The sandbox call for `message`.
fn call_request(
    shared: &Shared,
    message: &TaskMessage,
    plugin: &Plugin,
    cancel: CancelToken,
) -> CallRequest {
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
