//! Chords, as Celery's `on_chord_part_return` and `chord_error_from_stack` run them: each
//! header member reports its part to the backend's counter; the part that completes the
//! chord publishes the body with the header's results, or fails it.
//!
//! * **Results**: a list in header order — or, when the header held groups and its sender
//!   saved its shape (Celery's `GroupResult.save()`), nested lists of that shape, as Celery's
//!   `join` builds them.
//! * **A failed member** fails the body with `ChordError("Dependency <id> raised <exc>")`.
//!   A body that is a group fails member by member with the header's own exception, as
//!   Celery 5.7 does (so a client waiting on one member gets that exception).
//! * **A failed body** answers everything after it: its errbacks run with its id, and the
//!   failure reaches the steps chained after it (its `chain` option, where a chord in a
//!   chain keeps the rest of the workflow).
//! * A backend without chords (rpc) fails the body with `NotImplementedError` instead of
//!   leaving its waiter hanging.
//! * A body that cannot be published fails with `ChordError("Callback error: …")`, as
//!   Celery's does — for a tenant's body naming a queue its broker lacks, `Callback error:
//!   QueueNotFound: the chord body <task> names queue '<queue>', which does not exist in
//!   tenant <id>'s broker`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use super::{FollowUp, MissingQueue, Shared, fail_chain, publish_errbacks, source_text, store};
use crate::canvas::{CanvasError, Dispatch, Kind, Signature, option_list};
use crate::protocol::TaskMessage;
use crate::results::{ChordPart, ChordResults, ExceptionInfo, ResultError, ResultMeta, TaskState};

/// Reports a header member to the chord counter; the part that completes the chord
/// publishes the body (or fails it).
pub(super) async fn report_part(
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
    let chord_error = |text: String| ExceptionInfo::new("ChordError", "celery.exceptions", text);
    let body = match Signature::from_value(body) {
        Ok(body) => body,
        Err(error) => {
            let failure = Failure::of(chord_error(error.to_string()));
            return fail_body(shared, dispatch, message, body_id, None, &failure).await;
        }
    };
    if part.group_id.is_empty() {
        let text = format!("chord header member {} has no group id", part.task_id);
        let failure = Failure::of(chord_error(text));
        return fail_body(shared, dispatch, message, body_id, Some(&body), &failure).await;
    }
    let results = match shared.backend.chord_part_return(&part).await {
        Ok(None) => return Ok(()),
        Ok(Some(results)) => results,
        Err(error @ ResultError::ChordsUnsupported(_)) => {
            let failure = Failure::of(ExceptionInfo::new(
                "NotImplementedError",
                "builtins",
                error.to_string(),
            ));
            return fail_body(shared, dispatch, message, body_id, Some(&body), &failure).await;
        }
        Err(error) => return Err(error.into()),
    };
    if let Some((tid, _, result)) = results
        .members
        .iter()
        .find(|(_, state, _)| matches!(state, TaskState::Failure | TaskState::Revoked))
    {
        let failure = Failure {
            error: chord_error(format!("Dependency {tid} raised {}", python_repr(result))),
            cause: serde_json::from_value(result.clone()).ok(),
        };
        return fail_body(shared, dispatch, message, body_id, Some(&body), &failure).await;
    }
    let values = header_values(shared, results).await?;
    // The chord is consumed: if the body cannot be published now it never will be, so
    // its waiter gets the error instead.
    if let Err(error) = dispatch.apply(&body, Some(&values), Vec::new()).await {
        let text = match &error {
            // A queue the tenant's broker lacks: the body's waiter reads which and why.
            CanvasError::QueueNotFound {
                task,
                task_id,
                queue,
            } => {
                let missing = MissingQueue {
                    follow_up: FollowUp::ChordBody,
                    task,
                    task_id,
                    queue,
                };
                let tenant = shared.options.tenant_name();
                let text = missing.text(tenant);
                tracing::error!(task_id = %message.id, tenant, group = ?message.group, follow_up_id = %task_id, %queue, "a follow-up cannot be published: {text}");
                format!("Callback error: QueueNotFound: {text}")
            }
            _ => {
                tracing::error!(
                    task_id = %message.id,
                    error = &error as &dyn std::error::Error,
                    "cannot publish a chord body"
                );
                format!("Callback error: {error}: {}", source_text(&error))
            }
        };
        let failure = Failure::of(chord_error(text));
        return fail_body(shared, dispatch, message, body_id, Some(&body), &failure).await;
    }
    Ok(())
}

/// Why a chord body fails: the `ChordError` stored for the body, and the header member's
/// own exception behind it, which a group body's members get instead.
struct Failure {
    error: ExceptionInfo,
    cause: Option<ExceptionInfo>,
}

impl Failure {
    fn of(error: ExceptionInfo) -> Self {
        Self { error, cause: None }
    }
}

/// The value the body is called with: the header's results in order, nested as the
/// header's saved shape says when it held groups.
async fn header_values(shared: &Shared, results: ChordResults) -> Result<Value, CanvasError> {
    let Some(shape) = results.saved_group else {
        return Ok(Value::Array(
            results.members.into_iter().map(|(_, _, v)| v).collect(),
        ));
    };
    let parts: HashMap<String, Value> = results
        .members
        .into_iter()
        .map(|(id, _, value)| (id, value))
        .collect();
    match shape.get(1) {
        Some(Value::Array(members)) => {
            let mut values = Vec::with_capacity(members.len());
            for member in members {
                values.push(nested_value(shared, &parts, member).await?);
            }
            Ok(Value::Array(values))
        }
        _ => Ok(Value::Array(Vec::new())),
    }
}

type Joined<'a> = Pin<Box<dyn Future<Output = Result<Value, CanvasError>> + Send + 'a>>;

/// One member of a saved group shape (`as_tuple()`): `[[id, parent], null]` is a task,
/// whose value is its reported part or, failing that, its stored result; `[[gid, parent],
/// [members…]]` a group, whose value is the list of its members'.
fn nested_value<'a>(
    shared: &'a Shared,
    parts: &'a HashMap<String, Value>,
    member: &'a Value,
) -> Joined<'a> {
    Box::pin(async move {
        if let Some(Value::Array(members)) = member.get(1) {
            let mut values = Vec::with_capacity(members.len());
            for member in members {
                values.push(nested_value(shared, parts, member).await?);
            }
            return Ok(Value::Array(values));
        }
        let id = member
            .get(0)
            .and_then(|pair| pair.get(0))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(value) = parts.get(id) {
            return Ok(value.clone());
        }
        Ok(shared
            .backend
            .get(id)
            .await?
            .map_or(Value::Null, |meta| meta.result))
    })
}

/// Fails the chord body (or, for a group body, each of its members), publishes its errbacks
/// and fails what is chained after it.
async fn fail_body(
    shared: &Shared,
    dispatch: &Dispatch<'_>,
    message: &TaskMessage,
    body_id: Option<String>,
    body: Option<&Signature>,
    failure: &Failure,
) -> Result<(), CanvasError> {
    tracing::warn!(group = ?message.group, body = ?body_id, "chord failed: {}", failure.error);
    let stored = |id: &str, exception: &ExceptionInfo| {
        let mut meta = ResultMeta::failure(id, exception);
        meta.group_id.clone_from(&message.group);
        meta
    };
    match body.map(Signature::kind) {
        Some(Ok(Kind::Group(members))) => {
            // Celery 5.7: each member fails with the header member's own exception and
            // calls its own errbacks and the group's; then the group itself fails.
            let body = body.expect("a group body");
            let exception = failure.cause.as_ref().unwrap_or(&failure.error);
            let group_errbacks = option_list(&body.options, "link_error");
            for member in &members {
                let Some(id) = member.result_id() else {
                    continue;
                };
                store(shared, message, &stored(&id, exception)).await?;
                let mut errbacks = option_list(&member.options, "link_error");
                for errback in &group_errbacks {
                    if !errbacks.contains(errback) {
                        errbacks.push(errback.clone());
                    }
                }
                publish_errbacks(shared, message, dispatch, errbacks.iter(), &id).await?;
            }
            if let Some(id) = body.task_id() {
                store(shared, message, &stored(id, exception)).await?;
            }
        }
        _ => {
            let ids = body.map_or_else(
                || body_id.clone().into_iter().collect(),
                Signature::task_ids,
            );
            for id in &ids {
                store(shared, message, &stored(id, &failure.error)).await?;
            }
            if let (Some(body), Some(id)) = (body, body_id.or_else(|| ids.last().cloned())) {
                let errbacks = option_list(&body.options, "link_error");
                publish_errbacks(shared, message, dispatch, errbacks.iter(), &id).await?;
            }
        }
    }
    if let Some(body) = body {
        let after = option_list(&body.options, "chain");
        if !after.is_empty() {
            let chained = ResultMeta::failure("", &failure.error);
            fail_chain(shared, dispatch, message, &after, &chained).await?;
        }
    }
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
    use serde_json::json;

    use super::*;

    #[test]
    fn chord_errors_quote_the_exception_as_python_does() {
        let exc = json!({"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"], "exc_module": "builtins"});
        assert_eq!(python_repr(&exc), "ZeroDivisionError('division by zero')");
        let two = json!({"exc_type": "ValueError", "exc_message": ["it's bad", 42], "exc_module": "builtins"});
        assert_eq!(python_repr(&two), r"ValueError('it\'s bad', 42)");
    }
}
