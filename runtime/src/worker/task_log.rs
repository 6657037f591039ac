//! What the worker logs about one task: the `task` span its processing runs in — so every
//! line emitted meanwhile, the guest's own included, carries the task's id, name, workflow
//! ids and trace — and the line saying how its run ended.
//!
//! **Trace context.** A message's `traceparent` header (W3C, where OpenTelemetry's Celery
//! instrumentation puts it) names the trace and the span that published it. The worker's
//! run is a new span of that trace, set as the message's [`TaskMessage::trace`] so that
//! every message published because of the run — a retry, the next chain step, callbacks,
//! errbacks, a chord body — names the run as its parent. A message without one, or with one
//! that does not parse, starts a new trace: the task runs either way.
//!
//! **Cost.** With logging off the span is disabled and its fields never formatted; the
//! trace context is three arrays, and the outcome line builds its text only when its level
//! is enabled.

use std::time::Duration;

use tracing::Level;

use crate::engine::{LimitKind, Outcome, redact};
use crate::protocol::trace::TRACEPARENT;
use crate::protocol::{TaskMessage, TraceContext};

/// Starts `message`'s run in the trace its `traceparent` names (or a new one), records it
/// as the message's trace, and returns the span to process it in.
///
/// The span is at error level so that it is there whenever anything of the worker is
/// logged, whatever the level filter: a warning of a failed task carries the task's
/// fields too.
pub(super) fn task_span(message: &mut TaskMessage) -> tracing::Span {
    let (run, parent) = match message.extra_headers.get(TRACEPARENT) {
        None => (TraceContext::start(), None),
        Some(header) => match TraceContext::from_header(header) {
            Ok(parent) => (parent.child(), Some(parent.span_id)),
            Err(error) => {
                tracing::debug!(
                    task_id = %message.id,
                    error = &error as &dyn std::error::Error,
                    "ignoring its traceparent header; starting a new trace"
                );
                (TraceContext::start(), None)
            }
        },
    };
    message.trace = Some(run);
    tracing::span!(
        Level::ERROR,
        "task",
        task_id = %message.id,
        task = %message.task,
        root_id = message.root_id.as_deref(),
        parent_id = message.parent_id.as_deref(),
        trace_id = %run.trace_id,
        span_id = %run.span_id,
        parent_span_id = parent.map(tracing::field::display),
    )
}

/// Logs how a run ended — `outcome` (`succeeded`, `failed`, `retry`, `rejected`,
/// `limit:time`…), `runtime_ms`, the `exception` a failure is stored as and the start of
/// the `result` — with a sentence for people: "task math.add[…] succeeded in 1.2ms". The
/// tenant's secrets are replaced (a task may return or fail with one).
pub(super) fn outcome(
    message: &TaskMessage,
    outcome: &Outcome,
    elapsed: Duration,
    secrets: &[String],
) {
    let (task, id) = (&message.task, &message.id);
    let runtime_ms = elapsed.as_micros() as f64 / 1000.0;
    match outcome {
        Outcome::Success(json) => {
            if !tracing::enabled!(Level::INFO) {
                return;
            }
            let json = redact(secrets, json);
            let shown: String = json.chars().take(200).collect();
            tracing::info!(
                outcome = "succeeded",
                runtime_ms,
                result = %shown,
                "task {task}[{id}] succeeded in {elapsed:?}"
            );
        }
        other => {
            if !tracing::enabled!(Level::WARN) {
                return;
            }
            let text = other.to_string();
            let text = redact(secrets, &text);
            tracing::warn!(
                outcome = other.kind_name(),
                runtime_ms,
                exception = exception(other),
                "task {task}[{id}] {text} (after {elapsed:?})"
            );
        }
    }
}

/// The exception class a run's end is stored as (`worker/decision.rs` decides it; this is
/// its name only, for the log).
fn exception(outcome: &Outcome) -> Option<&str> {
    Some(match outcome {
        Outcome::Success(_) => return None,
        Outcome::Failed(failure) => &failure.kind,
        Outcome::Retry { .. } => "Retry",
        Outcome::Rejected { .. } => "Reject",
        Outcome::InvalidArguments { .. } => "TypeError",
        Outcome::LimitExceeded(limit) => match limit.kind {
            LimitKind::WallTime | LimitKind::Fuel => "TimeLimitExceeded",
            LimitKind::Memory => "MemoryError",
            LimitKind::Stack => "RecursionError",
            LimitKind::Output => "OutputLimitExceeded",
        },
        Outcome::Trap { .. } => "WasmTrap",
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;

    const HEADER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn message(traceparent: Option<serde_json::Value>) -> TaskMessage {
        let mut message = TaskMessage::new("math.add", vec![json!(1), json!(2)], Map::new());
        if let Some(header) = traceparent {
            message.extra_headers.insert(TRACEPARENT.into(), header);
        }
        message
    }

    #[test]
    fn a_run_continues_the_trace_of_its_message() {
        let mut continued = message(Some(json!(HEADER)));
        drop(task_span(&mut continued));
        let parent: TraceContext = HEADER.parse().unwrap();
        let run = continued.trace.expect("a run has a trace");
        assert_eq!(run.trace_id, parent.trace_id);
        assert_ne!(run.span_id, parent.span_id);
        // Whatever the run publishes names the run as its parent.
        let published = continued.encode().headers[TRACEPARENT].clone();
        assert_eq!(published, json!(run.to_string()));
    }

    #[test]
    fn a_malformed_or_missing_traceparent_starts_a_new_trace() {
        let parent: TraceContext = HEADER.parse().unwrap();
        let mut traces = Vec::new();
        for header in [
            None,
            Some(json!("00-not-a-trace")),
            Some(json!(HEADER.to_uppercase())),
            Some(json!(42)),
        ] {
            let mut message = message(header);
            drop(task_span(&mut message));
            let run = message.trace.expect("a run always has a trace");
            assert_ne!(run.trace_id, parent.trace_id);
            assert!(!traces.contains(&run.trace_id), "a new trace each time");
            traces.push(run.trace_id);
        }
    }

    #[test]
    fn each_outcome_names_the_exception_it_is_stored_as() {
        use crate::engine::TaskFailure;
        let failed = Outcome::Failed(TaskFailure::new("ZeroDivisionError", "division by zero"));
        assert_eq!(exception(&failed), Some("ZeroDivisionError"));
        let invalid = Outcome::InvalidArguments {
            message: "x".into(),
        };
        assert_eq!(exception(&invalid), Some("TypeError"));
        assert_eq!(
            exception(&Outcome::Trap {
                message: "x".into()
            }),
            Some("WasmTrap")
        );
        assert_eq!(exception(&Outcome::Success("1".into())), None);
    }
}
