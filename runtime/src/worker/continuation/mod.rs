//! Continuing a workflow when a task ends — Celery's `_dispatch_callbacks_and_chain`,
//! `mark_as_failure` and `on_chord_part_return` (`celery-reference.md` §2.5).
//!
//! * **Success**, before the result is stored: each `embed.callbacks` signature is
//!   published with the result prepended (unless immutable), then the next chain step
//!   `embed.chain[-1]` with `embed.chain[:-1]` carried along. Their ids become the result's
//!   `children`. A callback or step that can never run (malformed, or a canvas kind wasmq
//!   does not run) turns the task's result into a FAILURE naming it — nothing is dropped.
//! * **Failure** (final, not a retry), after the result is stored: the same FAILURE is
//!   stored under every pre-assigned task id of the remaining chain, so whoever waits on the
//!   chain's end is answered; then each errback is published with `[failed_task_id]`
//!   (Celery's publish path; wasmq never calls errbacks in-process).
//!   A step that is a chord fails through its body; a step that is a chord header member
//!   reports its failure to that chord.
//! * **Chord member** (`embed.chord` set), after the result is stored: see [`chord`].
//!
//! Broker or backend outages are transient: the message is released and the task runs
//! again (pre-assigned ids and the chord counter's de-duplication keep that idempotent).
//!
//! **A tenant's follow-ups stay in its broker.** A tenant's worker declares only its own
//! queues; a follow-up for any other queue is published only into one that already exists
//! in the tenant's broker (`Declaring::Only`, [`crate::broker::Broker::publish_existing`]).
//! One naming a queue that does not exist (say another tenant's) is never released for
//! redelivery — it would fail the same way — and never dropped: the sender sees a FAILURE
//! `QueueNotFound` naming the follow-up, the queue and the tenant. Before the result is
//! stored (a callback, the next step) it is the task's own result, and the chain's remaining
//! steps get it as any failure; after (an errback, a chord body) it is stored under the
//! follow-up's pre-assigned id — a chord body's as Celery's `ChordError("Callback error:
//! …")`. Each is logged at error level with the task's id.

mod chord;
mod missing;

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};

use self::missing::{FollowUp, MissingQueue};
use super::Shared;
use crate::canvas::{CanvasError, Declaring, Dispatch, Kind, Signature};
use crate::protocol::TaskMessage;
use crate::protocol::trace::TRACESTATE;
use crate::results::{ChordPart, ExceptionInfo, ReplyTo, ResultMeta, TaskState};

/// On SUCCESS, publishes callbacks and the next chain step (before the result is stored).
/// Returns false when the message must be released (a transient error, already logged).
pub(super) async fn before_store(
    shared: &Shared,
    queue: &str,
    message: &TaskMessage,
    meta: &mut ResultMeta,
) -> bool {
    if meta.status != TaskState::Success {
        return true;
    }
    let embed = &message.embed;
    let callbacks = embed.callbacks.as_deref().unwrap_or_default();
    let chain = embed.chain.as_deref().unwrap_or_default();
    if callbacks.is_empty() && chain.is_empty() {
        return true;
    }
    match continue_success(shared, queue, message, meta).await {
        Ok(children) => {
            meta.children = children;
            true
        }
        Err((_, error)) if error.is_transient() => {
            tracing::warn!(task_id = %message.id, error = &error as &dyn std::error::Error, "cannot continue the workflow; releasing the message");
            false
        }
        Err((follow_up, error)) => {
            let exception = match &error {
                CanvasError::QueueNotFound {
                    task,
                    task_id,
                    queue,
                } => {
                    let missing = MissingQueue {
                        follow_up,
                        task,
                        task_id,
                        queue,
                    };
                    // Whoever waits on the follow-up itself is answered too.
                    match missing.fail(shared, message, &message.id).await {
                        Ok(exception) => exception,
                        Err(error) => {
                            tracing::warn!(task_id = %message.id, error = &error as &dyn std::error::Error, "cannot store the failure of a follow-up; releasing the message");
                            return false;
                        }
                    }
                }
                _ => {
                    tracing::error!(task_id = %message.id, error = &error as &dyn std::error::Error, "the workflow cannot continue");
                    unrunnable(&error)
                }
            };
            let mut failed = ResultMeta::failure(&message.id, &exception);
            failed.parent_id = meta.parent_id.take();
            failed.group_id = meta.group_id.take();
            failed.worker = meta.worker.take();
            *meta = failed;
            true
        }
    }
}

/// The exception stored when a workflow can never continue.
fn unrunnable(error: &CanvasError) -> ExceptionInfo {
    let kind = match error {
        CanvasError::Malformed(_) => "ValueError",
        _ => "NotImplementedError",
    };
    ExceptionInfo::new(kind, "builtins", format!("{error}: {}", source_text(error)))
}

pub(super) fn source_text(error: &CanvasError) -> String {
    match error {
        CanvasError::Backend(inner) => inner.to_string(),
        CanvasError::Broker(inner) => inner.to_string(),
        _ => String::new(),
    }
}

/// Publishes the callbacks, then the next chain step; an error says which of them failed.
async fn continue_success(
    shared: &Shared,
    queue: &str,
    message: &TaskMessage,
    meta: &ResultMeta,
) -> Result<Vec<Value>, (FollowUp, CanvasError)> {
    let as_callback = |error| (FollowUp::Callback, error);
    let as_step = |error| (FollowUp::ChainStep, error);
    let embed = &message.embed;
    let callbacks = embed
        .callbacks
        .iter()
        .flatten()
        .map(Signature::from_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(as_callback)?;
    let chain = embed.chain.as_deref().unwrap_or_default();
    let next = chain
        .last()
        .map(Signature::from_value)
        .transpose()
        .map_err(as_step)?;
    // Check everything before publishing anything.
    for callback in &callbacks {
        callback.validate().map_err(as_callback)?;
    }
    if let Some(next) = &next {
        next.validate().map_err(as_step)?;
    }
    let mut callbacks = callbacks;
    for callback in &mut callbacks {
        callback.freeze().map_err(as_callback)?;
    }
    let next = next
        .map(|mut next| next.freeze().map(|()| next))
        .transpose()
        .map_err(as_step)?;
    let rest = || chain[..chain.len().saturating_sub(1)].to_vec();
    let dispatch = dispatch(shared, message, queue);
    // A tenant's follow-ups all go out or none does: every queue is looked for first (an
    // implicit tenant may declare any queue, and skips this and its copy of the chain).
    let result = Some(&meta.result);
    if matches!(dispatch.declaring, Declaring::Only(_)) {
        for callback in &callbacks {
            let checked = dispatch.check(callback, result, Vec::new()).await;
            checked.map_err(as_callback)?;
        }
        if let Some(next) = &next {
            dispatch
                .check(next, result, rest())
                .await
                .map_err(as_step)?;
        }
    }
    let mut children = Vec::new();
    for callback in &callbacks {
        let applied = dispatch.apply(callback, result, Vec::new()).await;
        applied.map_err(as_callback)?;
        children.extend(child_tuple(callback));
    }
    if let Some(next) = next {
        dispatch
            .apply(&next, result, rest())
            .await
            .map_err(as_step)?;
        children.extend(child_tuple(&next));
    }
    Ok(children)
}

/// Publishes on behalf of `message` (the workflow's parent of what it publishes, in its
/// run's trace), which came from `queue`: unrouted tasks go back to that queue. A tenant's worker declares only
/// its own queues; any other must exist in its broker.
fn dispatch<'a>(shared: &'a Shared, message: &TaskMessage, queue: &str) -> Dispatch<'a> {
    let declaring = match &shared.options.tenant {
        Some(_) => Declaring::Only(&shared.options.queues),
        None => Declaring::Any,
    };
    Dispatch {
        broker: shared.broker.as_ref(),
        backend: shared.backend.as_ref(),
        routes: &shared.options.routes,
        queue: queue.to_owned(),
        declaring,
        root_id: Some(
            message
                .root_id
                .clone()
                .unwrap_or_else(|| message.id.clone()),
        ),
        parent_id: Some(message.id.clone()),
        reply_to: message.reply_to.clone(),
        origin: message.origin.clone(),
        // The run's trace (set when its processing started), and the state that came with
        // the trace.
        trace: message.trace.map(|trace| {
            let state = message.extra_headers.get(TRACESTATE).cloned();
            (trace, state)
        }),
    }
}

/// `AsyncResult.as_tuple()` of a published signature: `[[id, null], null]`.
fn child_tuple(sig: &Signature) -> Option<Value> {
    sig.result_id().map(|id| json!([[id, null], null]))
}

/// After the result is stored: chord accounting, and on a final failure the chain's
/// remaining ids and the errbacks. Returns false when the message must be released.
pub(super) async fn after_store(
    shared: &Shared,
    queue: &str,
    message: &TaskMessage,
    meta: &ResultMeta,
) -> bool {
    let outcome = after_store_inner(shared, queue, message, meta).await;
    match outcome {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(task_id = %message.id, error = &error as &dyn std::error::Error, "cannot continue the workflow; releasing the message");
            false
        }
    }
}

async fn after_store_inner(
    shared: &Shared,
    queue: &str,
    message: &TaskMessage,
    meta: &ResultMeta,
) -> Result<(), CanvasError> {
    let failed = matches!(meta.status, TaskState::Failure | TaskState::Revoked);
    if !failed && meta.status != TaskState::Success {
        return Ok(());
    }
    let dispatch = dispatch(shared, message, queue);
    if failed {
        let steps = message.embed.chain.as_deref().unwrap_or_default();
        fail_chain(shared, &dispatch, message, steps, meta).await?;
    }
    if let Some(body) = &message.embed.chord {
        let part = ChordPart {
            group_id: message.group.clone().unwrap_or_default(),
            index: message.group_index,
            task_id: message.id.clone(),
            state: meta.status.clone(),
            result: meta.result.clone(),
        };
        chord::report_part(shared, &dispatch, message, body, part).await?;
    }
    if meta.status == TaskState::Failure {
        let errbacks = message.embed.errbacks.iter().flatten();
        publish_errbacks(shared, message, &dispatch, errbacks, &message.id).await?;
    }
    Ok(())
}

type Continued<'a> = Pin<Box<dyn Future<Output = Result<(), CanvasError>> + Send + 'a>>;

/// Celery's `_fail_chain`: a failure reaches every step that would have run after the
/// failed task — `steps` as a message carries them, last first — so whoever waits on the
/// chain's end (or any step) is answered. Each task of a step gets `failure` stored under
/// its id; a chord step fails through its body (whose result is the step's); a task that is
/// a chord header member reports the failure to its chord.
pub(super) fn fail_chain<'a>(
    shared: &'a Shared,
    dispatch: &'a Dispatch<'a>,
    message: &'a TaskMessage,
    steps: &'a [Value],
    failure: &'a ResultMeta,
) -> Continued<'a> {
    Box::pin(async move {
        // In the order the steps would have run, so the chain's end is answered last.
        for step in steps.iter().rev() {
            let Ok(step) = Signature::from_value(step) else {
                continue;
            };
            for task in failed_tasks(step) {
                let mut copy = failure.clone();
                copy.task_id.clone_from(&task.id);
                copy.children.clear();
                copy.group_id.clone_from(&task.group_id);
                store(shared, message, &copy).await?;
                if let Some(body) = &task.chord {
                    let part = ChordPart {
                        group_id: task.group_id.clone().unwrap_or_default(),
                        index: task.group_index,
                        task_id: task.id.clone(),
                        state: failure.status.clone(),
                        result: failure.result.clone(),
                    };
                    chord::report_part(shared, dispatch, message, body, part).await?;
                }
            }
        }
        Ok(())
    })
}

/// A task a failure reaches: its id, group and chord.
struct FailedTask {
    id: String,
    group_id: Option<String>,
    group_index: Option<u64>,
    chord: Option<Value>,
}

/// The tasks of `step` that a failure before it reaches: every task of a chain or group; a
/// chord's body only (its header never runs).
fn failed_tasks(step: Signature) -> Vec<FailedTask> {
    match step.kind() {
        Ok(Kind::Task) => step
            .task_id()
            .map(|id| FailedTask {
                id: id.to_owned(),
                group_id: string_option(&step, "group_id"),
                group_index: step.options.get("group_index").and_then(Value::as_u64),
                chord: step.options.get("chord").filter(|c| !c.is_null()).cloned(),
            })
            .into_iter()
            .collect(),
        Ok(Kind::Chain(items) | Kind::Group(items)) => {
            items.into_iter().flat_map(failed_tasks).collect()
        }
        Ok(Kind::Chord { body, .. }) => failed_tasks(*body),
        Err(_) => Vec::new(),
    }
}

fn string_option(sig: &Signature, key: &str) -> Option<String> {
    sig.options
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Publishes errbacks with `[failed_id]` prepended (unless immutable), on behalf of
/// `message`. A malformed errback is logged and skipped: the failure it would report is
/// already stored. One naming a queue its tenant's broker lacks gets that failure stored
/// under its own id.
pub(super) async fn publish_errbacks(
    shared: &Shared,
    message: &TaskMessage,
    dispatch: &Dispatch<'_>,
    errbacks: impl Iterator<Item = &Value>,
    failed_id: &str,
) -> Result<(), CanvasError> {
    let id = Value::String(failed_id.to_owned());
    for errback in errbacks {
        let sig = Signature::from_value(errback).and_then(|mut sig| {
            sig.validate()?;
            sig.freeze()?;
            Ok(sig)
        });
        match sig {
            Ok(sig) => match check_and_apply(dispatch, &sig, &id).await {
                Err(CanvasError::QueueNotFound {
                    task,
                    task_id,
                    queue,
                }) => {
                    let missing = MissingQueue {
                        follow_up: FollowUp::Errback,
                        task: &task,
                        task_id: &task_id,
                        queue: &queue,
                    };
                    missing.fail(shared, message, failed_id).await?;
                }
                Err(error) if !error.is_transient() => {
                    tracing::error!(task_id = %failed_id, error = &error as &dyn std::error::Error, "an errback cannot run");
                }
                other => other?,
            },
            Err(error) => {
                tracing::error!(task_id = %failed_id, error = &error as &dyn std::error::Error, "an errback cannot run")
            }
        }
    }
    Ok(())
}

/// Publishes `errback` with `failed_id`, all of it or none (see [`Dispatch::check`]).
async fn check_and_apply(
    dispatch: &Dispatch<'_>,
    errback: &Signature,
    failed_id: &Value,
) -> Result<(), CanvasError> {
    dispatch.check(errback, Some(failed_id), Vec::new()).await?;
    dispatch.apply(errback, Some(failed_id), Vec::new()).await
}

/// Stores a meta for another task of the workflow; rpc results go to this message's
/// sender under that task's id.
pub(super) async fn store(
    shared: &Shared,
    message: &TaskMessage,
    meta: &ResultMeta,
) -> Result<(), CanvasError> {
    let reply = message
        .reply_to
        .as_ref()
        .filter(|q| !q.is_empty())
        .map(|queue| ReplyTo {
            queue: queue.clone(),
            correlation_id: meta.task_id.clone(),
        });
    shared.backend.store(meta, reply.as_ref()).await?;
    Ok(())
}
