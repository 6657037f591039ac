//! How one task call ended, classified once.
//!
//! Every way a call can end — a result, a failure the task reported, a retry or reject
//! request, a limit the sandbox enforced, or a trap — becomes exactly one [`Outcome`] here, in
//! [`classify_error`] for calls that did not return normally. The rest of wasmq (CLI exit
//! codes, later result states and acks) matches on `Outcome` and never looks at wasmtime
//! errors again.
//!
//! Longer than 400 lines for one idea, classifying a call's end: the errors the task
//! returned (`task-error`, decoded here) and the ones the sandbox raised, with the tests
//! that pin both.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use wasmtime::Trap;

use super::bindings::types as wit;
use super::limits::Limits;
use crate::units::{format_bytes, format_duration};

/// The end of one task call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The task returned; the value is its JSON result.
    Success(String),
    /// The task reported a failure (Celery's `exc_type` / `exc_message`).
    Failed(TaskFailure),
    /// The task asked to be run again later (Celery's `self.retry(…)`).
    Retry {
        /// The delay it asked for, if any.
        countdown: Option<Duration>,
        /// Why.
        reason: String,
        /// The failure to end with once retries are spent (Celery's `retry(exc=…)`).
        exc: Option<TaskFailure>,
        /// The next attempt's positional arguments (`retry(args=…)`); none: the same.
        args: Option<Vec<Value>>,
        /// The next attempt's keyword arguments (`retry(kwargs=…)`); none: the same.
        kwargs: Option<Map<String, Value>>,
        /// How many retries this request allows (`retry(max_retries=…)`); none: the
        /// task's policy.
        max_retries: Option<u32>,
        /// The next attempt expires this long after the retry is published
        /// (`retry(expires=…)`); none: the message's own expiry carries over.
        expires: Option<Duration>,
    },
    /// The arguments did not fit the task's parameters; the task was not called.
    InvalidArguments {
        /// What does not fit, naming the task, the parameter and the expected type.
        message: String,
    },
    /// The task rejected its message (Celery's `Reject`).
    Rejected {
        /// Why.
        reason: String,
        /// False: it must not run again. True: it goes back to its queue to be delivered
        /// again (`Reject(requeue=True)`).
        requeue: bool,
    },
    /// The sandbox stopped the task at one of its limits.
    LimitExceeded(LimitExceeded),
    /// The guest trapped: a panic, an out-of-bounds access, an `unreachable`…
    Trap {
        /// What happened, with the guest's panic message when there was one.
        message: String,
    },
}

/// An exception a task raised: its class and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The class: a Python builtin name (`ZeroDivisionError`), or a dotted path
    /// (`proj.tasks.QuotaError`) whose last part is the class and the rest its module.
    pub kind: String,
    /// The explanation.
    pub message: String,
    /// The exception's arguments (Python's `exc.args`), when they are not just `[message]`.
    pub args: Option<Vec<serde_json::Value>>,
}

impl TaskFailure {
    /// A failure of `kind` whose one argument is `message`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            args: None,
        }
    }
}

impl Outcome {
    /// True for [`Outcome::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success(_))
    }

    /// A short lowercase name of the outcome's kind: `success`, `failed`, `retry`,
    /// `rejected`, `invalid-arguments`, `limit:fuel`, `limit:memory`, `limit:time`, `limit:stack`, `limit:output`,
    /// `trap`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "success",
            Outcome::Failed(_) => "failed",
            Outcome::Retry { .. } => "retry",
            Outcome::Rejected { .. } => "rejected",
            Outcome::InvalidArguments { .. } => "invalid-arguments",
            Outcome::LimitExceeded(limit) => match limit.kind {
                LimitKind::Fuel => "limit:fuel",
                LimitKind::Memory => "limit:memory",
                LimitKind::WallTime => "limit:time",
                LimitKind::Stack => "limit:stack",
                LimitKind::Output => "limit:output",
            },
            Outcome::Trap { .. } => "trap",
        }
    }
}

/// Describes the outcome as the end of a sentence whose subject is the task:
/// `ran out of fuel (budget 100000000)`, `failed: ZeroDivisionError: division by zero`.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Success(json) => write!(f, "succeeded: {json}"),
            Outcome::Failed(TaskFailure { kind, message, .. }) => {
                write!(f, "failed: {kind}: {message}")
            }
            Outcome::Retry {
                countdown, reason, ..
            } => match countdown {
                Some(c) => write!(
                    f,
                    "asked to be retried in {}: {reason}",
                    format_duration(*c)
                ),
                None => write!(f, "asked to be retried: {reason}"),
            },
            Outcome::Rejected {
                reason,
                requeue: false,
            } => write!(f, "rejected its message: {reason}"),
            Outcome::Rejected {
                reason,
                requeue: true,
            } => write!(f, "requeued its message: {reason}"),
            Outcome::InvalidArguments { message } => {
                write!(f, "was called with invalid arguments: {message}")
            }
            Outcome::LimitExceeded(limit) => write!(f, "{}", limit.message),
            Outcome::Trap { message } => write!(f, "trapped: {message}"),
        }
    }
}

/// The outcome of a task that ended with an error of its own (the WIT `task-error`).
pub(crate) fn task_error_outcome(error: wit::TaskError) -> Outcome {
    match error {
        wit::TaskError::Failed(failure) => Outcome::Failed(task_failure(failure)),
        wit::TaskError::Retry(retry) => retry_outcome(retry),
        wit::TaskError::Reject(rejection) => Outcome::Rejected {
            reason: rejection.reason,
            requeue: rejection.requeue,
        },
        wit::TaskError::InvalidArguments(message) => Outcome::InvalidArguments { message },
    }
}

/// A retry request. New arguments that are not a JSON array (keywords: an object) would
/// make a message no worker can run, so the task fails now with an `EncodeError` instead.
fn retry_outcome(retry: wit::RetryRequest) -> Outcome {
    let args = match retry
        .args_json
        .as_deref()
        .map(serde_json::from_str::<Value>)
    {
        None => None,
        Some(Ok(Value::Array(args))) => Some(args),
        Some(_) => {
            return Outcome::Failed(TaskFailure::new(
                "EncodeError",
                "the retry's positional arguments are not a JSON array",
            ));
        }
    };
    let kwargs = match retry
        .kwargs_json
        .as_deref()
        .map(serde_json::from_str::<Value>)
    {
        None => None,
        Some(Ok(Value::Object(kwargs))) => Some(kwargs),
        Some(_) => {
            return Outcome::Failed(TaskFailure::new(
                "EncodeError",
                "the retry's keyword arguments are not a JSON object",
            ));
        }
    };
    Outcome::Retry {
        countdown: retry.countdown_ms.map(Duration::from_millis),
        reason: retry.reason,
        exc: retry.exc.map(task_failure),
        args,
        kwargs,
        max_retries: retry.max_retries,
        expires: retry.expires_ms.map(Duration::from_millis),
    }
}

/// A guest's failure record. Arguments that are not a JSON array are kept as the one
/// argument they are, so nothing the guest said is lost.
fn task_failure(failure: wit::Failure) -> TaskFailure {
    let args = failure
        .args_json
        .map(|json| match serde_json::from_str(&json) {
            Ok(Value::Array(args)) => args,
            Ok(other) => vec![other],
            Err(_) => vec![Value::String(json)],
        });
    TaskFailure {
        kind: failure.kind,
        message: failure.message,
        args,
    }
}

/// Which limit the sandbox enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The fuel (CPU) budget ran out.
    Fuel,
    /// The task tried to grow its memory past its cap.
    Memory,
    /// The wall-clock limit passed (or the call was cancelled).
    WallTime,
    /// The wasm call stack overflowed.
    Stack,
    /// The task wrote too much to stdout/stderr, returned too large a result, or passed too
    /// much data to a host call.
    Output,
}

impl LimitKind {
    /// Every kind, in the order of [`LimitKind::index`].
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Fuel,
        LimitKind::Memory,
        LimitKind::WallTime,
        LimitKind::Stack,
        LimitKind::Output,
    ];

    /// Its short name in metrics, `inspect stats` and the dashboard: `fuel`, `memory`,
    /// `time`, `stack`, `output`.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Fuel => "fuel",
            LimitKind::Memory => "memory",
            LimitKind::WallTime => "time",
            LimitKind::Stack => "stack",
            LimitKind::Output => "output",
        }
    }

    /// Its position in [`LimitKind::ALL`], for counters kept in an array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A limit hit, with a message that names the limit and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    /// Which limit.
    pub kind: LimitKind,
    /// E.g. `ran out of fuel (budget 100000000)`.
    pub message: String,
}

impl LimitExceeded {
    pub(crate) fn new(kind: LimitKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The interruption raised by the epoch callback when a call's wall-clock deadline passes.
#[derive(Debug, thiserror::Error)]
#[error("wall-clock deadline passed")]
pub(crate) struct DeadlineExceeded;

/// The interruption raised by the epoch callback when a call has used its CPU budget
/// under CPU-time metering.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget used up ({used:?} of CPU time)")]
pub(crate) struct CpuBudgetExceeded {
    /// The CPU time the call had used when it was stopped.
    pub(crate) used: Duration,
}

/// The interruption raised when a call is cancelled from outside (revoke --terminate).
#[derive(Debug, thiserror::Error)]
#[error("the call was cancelled")]
pub(crate) struct Cancelled;

/// Raised by a host function when the guest passes it more data than allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostcallLimit(pub(crate) String);

/// What the call state observed, needed to classify an error precisely.
pub(crate) struct Observations<'a> {
    /// The limits the call ran under.
    pub(crate) limits: &'a Limits,
    /// Set when the resource limiter denied a memory growth.
    pub(crate) memory_denied: bool,
    /// The captured stderr, where a Rust guest prints its panic message.
    pub(crate) stderr: &'a [u8],
    /// The cap of each captured output stream.
    pub(crate) output_cap: usize,
    /// True when stdout or stderr reached its cap (further writes fail).
    pub(crate) output_full: bool,
    /// The most bytes a guest may move to the host at once (results, host-call arguments).
    pub(crate) max_result_bytes: usize,
    /// The wasm stack limit the engine enforces.
    pub(crate) max_wasm_stack: usize,
}

/// wasmtime's message when a guest writes past a `MemoryOutputPipe`'s capacity.
const PIPE_FULL: &str = "write beyond capacity of MemoryOutputPipe";
/// wasmtime's message (its error type is private) when a guest moves more data to the host
/// than the store's hostcall fuel allows; results count too. Pinned by the `big_result` test.
const HOSTCALL_FUEL: &str = "fuel allocated for hostcalls has been exhausted";

/// Classifies a call that did not return normally.
pub(crate) fn classify_error(error: &wasmtime::Error, seen: &Observations<'_>) -> Outcome {
    let limit = |kind, message: String| Outcome::LimitExceeded(LimitExceeded::new(kind, message));
    if error.is::<DeadlineExceeded>() {
        return limit(
            LimitKind::WallTime,
            format!(
                "exceeded its time limit ({})",
                format_duration(seen.limits.timeout)
            ),
        );
    }
    if error.is::<CpuBudgetExceeded>() {
        return limit(
            LimitKind::Fuel,
            format!(
                "ran out of CPU time (budget {} of CPU = {} fuel)",
                format_duration(super::cpu::cpu_time_for_fuel(seen.limits.fuel)),
                seen.limits.fuel
            ),
        );
    }
    if error.is::<Cancelled>() {
        return limit(LimitKind::WallTime, "was terminated (revoked)".to_owned());
    }
    if let Some(HostcallLimit(message)) = error.downcast_ref::<HostcallLimit>() {
        return limit(LimitKind::Output, message.clone());
    }
    if error
        .chain()
        .any(|cause| cause.to_string().contains(HOSTCALL_FUEL))
    {
        return limit(
            LimitKind::Output,
            format!(
                "passed more than {} to the host at once (the result size limit)",
                format_bytes(seen.max_result_bytes as u64)
            ),
        );
    }
    // A full pipe makes further writes fail; a Rust guest then panics on `print!`.
    if seen.output_full
        || error
            .chain()
            .any(|cause| cause.to_string().contains(PIPE_FULL))
    {
        return limit(
            LimitKind::Output,
            format!(
                "wrote more than {} to stdout or stderr",
                format_bytes(seen.output_cap as u64)
            ),
        );
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => limit(
            LimitKind::Fuel,
            format!("ran out of fuel (budget {})", seen.limits.fuel),
        ),
        Some(Trap::StackOverflow) => limit(
            LimitKind::Stack,
            format!(
                "overflowed its stack (wasm stack limit {})",
                format_bytes(seen.max_wasm_stack as u64)
            ),
        ),
        // A Rust guest whose allocation was refused aborts (`unreachable`); any trap after a
        // refused growth is the memory limit.
        Some(_) | None if seen.memory_denied => limit(
            LimitKind::Memory,
            format!(
                "exceeded its memory limit ({})",
                format_bytes(seen.limits.memory_bytes)
            ),
        ),
        Some(trap) => {
            let mut message = trap.to_string();
            if let Some(panic) = panic_message(seen.stderr) {
                message = format!("{panic} ({message})");
            }
            Outcome::Trap { message }
        }
        None => Outcome::Trap {
            message: format!("{error:#}"),
        },
    }
}

/// Extracts `panicked at src/lib.rs:3:5: boom` from a Rust guest's stderr.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.find("panicked at ")?;
    let rest = &text[start..];
    let mut lines = rest.lines();
    let location = lines.next()?.trim_end_matches(':');
    let message: Vec<&str> = lines
        .take_while(|line| !line.starts_with("note: "))
        .collect();
    let message = message.join(" ");
    Some(if message.is_empty() {
        location.to_owned()
    } else {
        format!("{location}: {}", message.trim())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_retry_request_carries_what_it_changes_and_bad_arguments_fail_now() {
        let request = |args: Option<&str>, kwargs: Option<&str>| wit::RetryRequest {
            countdown_ms: Some(100),
            reason: "again".into(),
            exc: None,
            args_json: args.map(str::to_owned),
            kwargs_json: kwargs.map(str::to_owned),
            max_retries: Some(5),
            expires_ms: Some(60_000),
        };
        assert_eq!(
            task_error_outcome(wit::TaskError::Retry(request(
                Some("[2, 3]"),
                Some(r#"{"label": "kept"}"#)
            ))),
            Outcome::Retry {
                countdown: Some(Duration::from_millis(100)),
                reason: "again".into(),
                exc: None,
                args: Some(vec![json!(2), json!(3)]),
                kwargs: Some(json!({"label": "kept"}).as_object().unwrap().clone()),
                max_retries: Some(5),
                expires: Some(Duration::from_secs(60)),
            }
        );
        for (args, kwargs) in [(Some("{}"), None), (None, Some("[1]")), (Some("[1"), None)] {
            let outcome = task_error_outcome(wit::TaskError::Retry(request(args, kwargs)));
            assert!(
                matches!(&outcome, Outcome::Failed(f) if f.kind == "EncodeError"),
                "{args:?} {kwargs:?}: {outcome:?}"
            );
        }
        assert_eq!(
            task_error_outcome(wit::TaskError::Reject(wit::Rejection {
                reason: "not yet".into(),
                requeue: true
            }))
            .to_string(),
            "requeued its message: not yet"
        );
    }

    #[test]
    fn panic_messages_are_extracted() {
        let stderr = b"\nthread '<unnamed>' panicked at src/lib.rs:61:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicked at src/lib.rs:61:5: boom")
        );
        assert_eq!(panic_message(b"nothing here"), None);
    }
}
