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
//! * **Chord member** (`embed.chord` set), after the result is stored: the backend counts
//!   the part; the part that completes the chord publishes the body with the list of header
//!   results, or, if a member failed, stores the body's FAILURE as
//!   `ChordError("Dependency <id> raised <exc>")`. A backend without chords (rpc) fails the
//!   body with `NotImplementedError` instead of leaving its waiter hanging.
//!
//! Broker or backend outages are transient: the message is released and the task runs
//! again (pre-assigned ids and the chord counter's de-duplication keep that idempotent).

use serde_json::{Value, json};

use super::Shared;
use crate::canvas::{CanvasError, Dispatch, Signature, option_list};
use crate::protocol::TaskMessage;
use crate::results::{ChordPart, ExceptionInfo, ReplyTo, ResultError, ResultMeta, TaskState};

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
        Err(error) if error.is_transient() => {
            tracing::warn!(task_id = %message.id, error = &error as &dyn std::error::Error, "cannot continue the workflow; releasing the message");
            false
        }
        Err(error) => {
            tracing::error!(task_id = %message.id, error = &error as &dyn std::error::Error, "the workflow cannot continue");
            let exception = unrunnable(&error);
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

fn source_text(error: &CanvasError) -> String {
    match error {
        CanvasError::Backend(inner) => inner.to_string(),
        CanvasError::Broker(inner) => inner.to_string(),
        _ => String::new(),
    }
}

async fn continue_success(
    shared: &Shared,
    queue: &str,
    message: &TaskMessage,
    meta: &ResultMeta,
) -> Result<Vec<Value>, CanvasError> {
    let embed = &message.embed;
    let callbacks = embed
        .callbacks
        .iter()
        .flatten()
        .map(Signature::from_value)
        .collect::<Result<Vec<_>, _>>()?;
    let chain = embed.chain.as_deref().unwrap_or_default();
    let next = chain.last().map(Signature::from_value).transpose()?;
    // Check everything before publishing anything.
    for sig in callbacks.iter().chain(next.as_ref()) {
        sig.validate()?;
    }
    let dispatch = dispatch(shared, message, queue);
    let mut children = Vec::new();
    for callback in &callbacks {
        let mut callback = callback.clone();
        callback.freeze()?;
        dispatch
            .apply(&callback, Some(&meta.result), Vec::new())
            .await?;
        children.extend(child_tuple(&callback));
    }
    if let Some(mut next) = next {
        next.freeze()?;
        let rest = chain[..chain.len() - 1].to_vec();
        dispatch.apply(&next, Some(&meta.result), rest).await?;
        children.extend(child_tuple(&next));
    }
    Ok(children)
}

/// Publishes on behalf of `message` (the workflow's parent of what it publishes), which
/// came from `queue`: unrouted tasks go back to that queue.
fn dispatch<'a>(shared: &'a Shared, message: &TaskMessage, queue: &str) -> Dispatch<'a> {
    Dispatch {
        broker: shared.broker.as_ref(),
        backend: shared.backend.as_ref(),
        routes: &shared.options.routes,
        queue: queue.to_owned(),
        root_id: Some(
            message
                .root_id
                .clone()
                .unwrap_or_else(|| message.id.clone()),
        ),
        parent_id: Some(message.id.clone()),
        reply_to: message.reply_to.clone(),
        origin: message.origin.clone(),
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
        // In the order the steps would have run, so the chain's end is answered last.
        for step in message.embed.chain.iter().flatten().rev() {
            let Ok(step) = Signature::from_value(step) else {
                continue;
            };
            for id in step.task_ids() {
                let mut copy = meta.clone();
                copy.task_id.clone_from(&id);
                copy.children.clear();
                copy.group_id = step
                    .options
                    .get("group_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                store(shared, message, &copy).await?;
            }
            // A chain that was a chord header member reports from its last step.
            if let Some(body) = step.options.get("chord").filter(|c| !c.is_null()) {
                let part = ChordPart {
                    group_id: string_option(&step, "group_id").unwrap_or_default(),
                    index: step.options.get("group_index").and_then(Value::as_u64),
                    task_id: step.task_id().unwrap_or_default().to_owned(),
                    state: meta.status.clone(),
                    result: meta.result.clone(),
                };
                chord_part(shared, &dispatch, message, body, part).await?;
            }
        }
    }
    if let Some(body) = &message.embed.chord {
        let part = ChordPart {
            group_id: message.group.clone().unwrap_or_default(),
            index: message.group_index,
            task_id: message.id.clone(),
            state: meta.status.clone(),
            result: meta.result.clone(),
        };
        chord_part(shared, &dispatch, message, body, part).await?;
    }
    if meta.status == TaskState::Failure {
        let errbacks = message.embed.errbacks.iter().flatten();
        publish_errbacks(&dispatch, errbacks, &message.id).await?;
    }
    Ok(())
}

fn string_option(sig: &Signature, key: &str) -> Option<String> {
    sig.options
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Publishes errbacks with `[failed_id]` prepended (unless immutable). A malformed errback
/// is logged and skipped: the failure it would report is already stored.
async fn publish_errbacks(
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
            Ok(sig) => match dispatch.apply(&sig, Some(&id), Vec::new()).await {
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

/// Reports a header member to the chord counter; the part that completes the chord
/// publishes the body (or stores its failure).
async fn chord_part(
    shared: &Shared,
    dispatch: &Dispatch<'_>,
    message: &TaskMessage,
    body: &Value,
    part: ChordPart,
) -> Result<(), CanvasError> {
    let body_id = body
        .get("options")
        .and_then(|o| o.get("task_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let body = match Signature::from_value(body) {
        Ok(body) => body,
        Err(error) => {
            let exception =
                ExceptionInfo::new("ChordError", "celery.exceptions", error.to_string());
            return fail_body(shared, dispatch, message, body_id, None, &exception).await;
        }
    };
    if part.group_id.is_empty() {
        let exception = ExceptionInfo::new(
            "ChordError",
            "celery.exceptions",
            format!("chord header member {} has no group id", part.task_id),
        );
        return fail_body(shared, dispatch, message, body_id, Some(&body), &exception).await;
    }
    let results = match shared.backend.chord_part_return(&part).await {
        Ok(None) => return Ok(()),
        Ok(Some(results)) => results,
        Err(error @ ResultError::ChordsUnsupported(_)) => {
            let exception =
                ExceptionInfo::new("NotImplementedError", "builtins", error.to_string());
            return fail_body(shared, dispatch, message, body_id, Some(&body), &exception).await;
        }
        Err(error) => return Err(error.into()),
    };
    if let Some((tid, _, result)) = results
        .members
        .iter()
        .find(|(_, state, _)| matches!(state, TaskState::Failure | TaskState::Revoked))
    {
        let exception = ExceptionInfo::new(
            "ChordError",
            "celery.exceptions",
            format!("Dependency {tid} raised {}", python_repr(result)),
        );
        return fail_body(shared, dispatch, message, body_id, Some(&body), &exception).await;
    }
    let values = Value::Array(results.members.into_iter().map(|(_, _, v)| v).collect());
    // The chord is consumed: if the body cannot be published now it never will be, so
    // its waiter gets the error instead.
    if let Err(error) = dispatch.apply(&body, Some(&values), Vec::new()).await {
        tracing::error!(
            error = &error as &dyn std::error::Error,
            "cannot publish a chord body"
        );
        let exception = ExceptionInfo::new(
            "ChordError",
            "celery.exceptions",
            format!("Callback error: {error}: {}", source_text(&error)),
        );
        return fail_body(shared, dispatch, message, body_id, Some(&body), &exception).await;
    }
    Ok(())
}

/// Stores the chord body's FAILURE (under every id the body pre-assigned) and publishes
/// the body's errbacks.
async fn fail_body(
    shared: &Shared,
    dispatch: &Dispatch<'_>,
    message: &TaskMessage,
    body_id: Option<String>,
    body: Option<&Signature>,
    exception: &ExceptionInfo,
) -> Result<(), CanvasError> {
    tracing::warn!(group = ?message.group, body = ?body_id, "chord failed: {exception}");
    let ids = body.map_or_else(
        || body_id.clone().into_iter().collect(),
        Signature::task_ids,
    );
    for id in &ids {
        let mut meta = ResultMeta::failure(id, exception);
        meta.group_id.clone_from(&message.group);
        store(shared, message, &meta).await?;
    }
    if let (Some(body), Some(id)) = (body, body_id.or_else(|| ids.last().cloned())) {
        let errbacks = option_list(&body.options, "link_error");
        publish_errbacks(dispatch, errbacks.iter(), &id).await?;
    }
    Ok(())
}

/// Stores a meta for another task of the workflow; rpc results go to this message's
/// sender under that task's id.
async fn store(
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

/// Python's `repr()` of an encoded exception, e.g. `ZeroDivisionError('division by zero')`
/// (what Celery's `ChordError` message quotes); a non-exception value as JSON.
fn python_repr(result: &Value) -> String {
    let Ok(exception) = serde_json::from_value::<ExceptionInfo>(result.clone()) else {
        return result.to_string();
    };
    let args: Vec<String> = exception
        .exc_message
        .iter()
        .map(|arg| match arg {
            Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            other => other.to_string(),
        })
        .collect();
    format!("{}({})", exception.exc_type, args.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_errors_quote_the_exception_as_python_does() {
        let exc = json!({"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"], "exc_module": "builtins"});
        assert_eq!(python_repr(&exc), "ZeroDivisionError('division by zero')");
        let two = json!({"exc_type": "ValueError", "exc_message": ["it's bad", 42], "exc_module": "builtins"});
        assert_eq!(python_repr(&two), r"ValueError('it\'s bad', 42)");
    }
}
