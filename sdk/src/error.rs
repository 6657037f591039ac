//! How a task ends other than with a result: [`TaskError`], Celery's exceptions as values —
//! a failure (`raise Kind(*args)`), a retry request (`self.retry(…)`, with everything it can
//! change about the next attempt), a rejection (`Reject(reason, requeue)`), or arguments
//! that do not fit the task.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::bindings::wasmq::task::types as wit;

/// How a task ends other than with a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub(crate) kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    Failed(Failure),
    Retry(Box<Retry>),
    Reject { reason: String, requeue: bool },
    InvalidArguments(String),
}

/// A retry request and what it changes about the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Retry {
    pub(crate) countdown: Option<Duration>,
    pub(crate) reason: String,
    /// The failure once retries are spent.
    pub(crate) exc: Option<Failure>,
    /// The next attempt's positional arguments.
    pub(crate) args: Option<Vec<Value>>,
    /// The next attempt's keyword arguments.
    pub(crate) kwargs: Option<Map<String, Value>>,
    /// Retries this call allows.
    pub(crate) max_retries: Option<u32>,
    /// The next attempt expires this long after the retry is published.
    pub(crate) expires: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    kind: String,
    message: String,
    /// The exception's arguments as a JSON array, when not just `[message]`.
    args_json: Option<String>,
}

impl From<Failure> for wit::Failure {
    fn from(failure: Failure) -> Self {
        Self {
            kind: failure.kind,
            message: failure.message,
            args_json: failure.args_json,
        }
    }
}

/// The Python exception class of an I/O error kind (Python's `OSError` subclasses).
fn io_exception(kind: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind as K;
    match kind {
        K::NotFound => "FileNotFoundError",
        K::PermissionDenied => "PermissionError",
        K::AlreadyExists => "FileExistsError",
        K::NotADirectory => "NotADirectoryError",
        K::IsADirectory => "IsADirectoryError",
        K::ConnectionRefused => "ConnectionRefusedError",
        K::ConnectionReset => "ConnectionResetError",
        K::ConnectionAborted => "ConnectionAbortedError",
        K::BrokenPipe => "BrokenPipeError",
        K::TimedOut => "TimeoutError",
        K::Interrupted => "InterruptedError",
        _ => "OSError",
    }
}

/// `value` as a list of arguments: an array is the list, null none, anything else one.
fn argument_list(value: Value) -> Vec<Value> {
    match value {
        Value::Array(args) => args,
        Value::Null => Vec::new(),
        one => vec![one],
    }
}

impl TaskError {
    /// The task failed with an exception of class `kind` and the one argument `message`
    /// (Celery's `exc_type` and `exc_message`). Name a Python builtin alone (`ValueError`,
    /// `KeyError`) and any other class by its dotted path (`proj.tasks.QuotaError`): a
    /// Python client then raises that very class, which its `except` clauses catch.
    pub fn failed(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Failed(Failure {
                kind: kind.into(),
                message: message.into(),
                args_json: None,
            }),
        }
    }

    /// The task failed with an I/O error, as Python raises it: the class follows the
    /// error's kind (`FileNotFoundError`, `PermissionError`, `ConnectionRefusedError`,
    /// `TimeoutError`…, else `OSError`) and the message is `context: error`, so it names
    /// what was tried and what the system said:
    ///
    /// ```no_run
    /// # use wasmq_sdk::TaskError;
    /// let path = "/data/input.txt";
    /// let text = std::fs::read_to_string(path)
    ///     .map_err(|e| TaskError::io(format!("cannot read {path}"), &e));
    /// ```
    pub fn io(context: impl fmt::Display, error: &std::io::Error) -> Self {
        Self::failed(io_exception(error.kind()), format!("{context}: {error}"))
    }

    /// The task failed with an exception of class `kind` built with these arguments
    /// (Python's `raise Kind(*args)`; Celery stores them as `exc_message`), for exceptions
    /// whose arguments are not one message:
    ///
    /// ```no_run
    /// # use wasmq_sdk::TaskError;
    /// let error = TaskError::raised("proj.tasks.QuotaError", ("over quota", 120, 100));
    /// ```
    pub fn raised<A: Serialize>(kind: impl Into<String>, args: A) -> Self {
        let args = match serde_json::to_value(args) {
            Ok(value) => argument_list(value),
            Err(e) => vec![Value::String(format!(
                "the exception's arguments cannot be encoded: {e}"
            ))],
        };
        let message = args
            .iter()
            .map(|arg| arg.as_str().map_or_else(|| arg.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            kind: ErrorKind::Failed(Failure {
                kind: kind.into(),
                message,
                args_json: Some(Value::Array(args).to_string()),
            }),
        }
    }

    /// Asks the worker to run the task again later (same id, `retries + 1`; Celery's
    /// `raise self.retry(…)`), after the worker's retry policy delay. Chain the builders to
    /// say more: [`after`](TaskError::after) (`countdown=`),
    /// [`or_fail_with`](TaskError::or_fail_with) (`exc=`), [`args`](TaskError::args) and
    /// [`kwargs`](TaskError::kwargs) (`args=`, `kwargs=`),
    /// [`max_retries`](TaskError::max_retries) and [`expires`](TaskError::expires).
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retry(Box::new(Retry {
                reason: reason.into(),
                ..Retry::default()
            })),
        }
    }

    /// Applies `change` to a retry request; no effect on other errors.
    fn retry_with(mut self, change: impl FnOnce(&mut Retry)) -> Self {
        if let ErrorKind::Retry(retry) = &mut self.kind {
            change(retry);
        }
        self
    }

    /// Sets the delay of a retry request; no effect on other errors.
    #[must_use]
    pub fn after(self, countdown: Duration) -> Self {
        self.retry_with(|retry| retry.countdown = Some(countdown))
    }

    /// The failure a retry request ends with once the task's retries are spent (Celery's
    /// `self.retry(exc=exc)`) instead of `MaxRetriesExceededError`; no effect on other
    /// errors, or when `failure` is not a failure.
    ///
    /// ```no_run
    /// # use wasmq_sdk::TaskError;
    /// let error = TaskError::retry("the service is down")
    ///     .or_fail_with(TaskError::failed("ConnectionError", "the service is down"));
    /// ```
    #[must_use]
    pub fn or_fail_with(self, failure: TaskError) -> Self {
        match failure.kind {
            ErrorKind::Failed(failure) => self.retry_with(|retry| retry.exc = Some(failure)),
            _ => self,
        }
    }

    /// The next attempt runs with these positional arguments (Celery's
    /// `self.retry(args=…)`): a tuple, an array or a `Vec` of serde values. As in Celery,
    /// this attempt's keyword arguments are kept, except those naming a parameter the new
    /// positional arguments now fill. No effect on other errors; arguments that cannot be
    /// encoded turn the request into an `EncodeError` failure.
    ///
    /// ```no_run
    /// # use wasmq_sdk::TaskError;
    /// # let (page, token) = (1, String::new());
    /// let error = TaskError::retry("next page").args((page + 1, token));
    /// ```
    #[must_use]
    pub fn args<A: Serialize>(self, args: A) -> Self {
        if !matches!(self.kind, ErrorKind::Retry(_)) {
            return self;
        }
        match serde_json::to_value(args) {
            Ok(value) => self.retry_with(|retry| retry.args = Some(argument_list(value))),
            Err(e) => Self::failed(
                "EncodeError",
                format!("the retry's arguments cannot be encoded: {e}"),
            ),
        }
    }

    /// The next attempt runs with these keyword arguments (Celery's
    /// `self.retry(kwargs=…)`): a map or a struct that serializes as one. As in Celery, a
    /// keyword naming a parameter this attempt received positionally replaces that
    /// positional argument, and this attempt's other keywords are dropped. No effect on
    /// other errors; keywords that are not a JSON object turn the request into an
    /// `EncodeError` failure.
    #[must_use]
    pub fn kwargs<K: Serialize>(self, kwargs: K) -> Self {
        if !matches!(self.kind, ErrorKind::Retry(_)) {
            return self;
        }
        match serde_json::to_value(kwargs) {
            Ok(Value::Object(kwargs)) => self.retry_with(|retry| retry.kwargs = Some(kwargs)),
            Ok(other) => Self::failed(
                "EncodeError",
                format!("the retry's keyword arguments must be a map, not {other}"),
            ),
            Err(e) => Self::failed(
                "EncodeError",
                format!("the retry's keyword arguments cannot be encoded: {e}"),
            ),
        }
    }

    /// How many retries this request allows (Celery's `self.retry(max_retries=…)`),
    /// instead of the task's policy: once the task has been retried that often, it ends
    /// with the [`or_fail_with`](TaskError::or_fail_with) failure, else
    /// `MaxRetriesExceededError`. No effect on other errors.
    #[must_use]
    pub fn max_retries(self, max_retries: u32) -> Self {
        self.retry_with(|retry| retry.max_retries = Some(max_retries))
    }

    /// The next attempt expires this long after the retry is published (Celery's
    /// `self.retry(expires=…)`): if it has not started by then it ends REVOKED. Without
    /// it the message's own expiry carries over. No effect on other errors.
    #[must_use]
    pub fn expires(self, expires: Duration) -> Self {
        self.retry_with(|retry| retry.expires = Some(expires))
    }

    /// The message must never be run again (Celery's `Reject(reason, requeue=False)`): the
    /// worker stores a `Reject` failure and dead-letters the message.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Reject {
                reason: reason.into(),
                requeue: false,
            },
        }
    }

    /// The message goes back to its queue to be delivered again (Celery's
    /// `Reject(reason, requeue=True)`), to this worker or another, with
    /// [`TaskContext::redelivered`](crate::TaskContext::redelivered) set; nothing is
    /// stored meanwhile. The worker's poison protection counts these deliveries: a message
    /// requeued on every delivery ends as a `WorkerLostError` failure once it has been
    /// delivered `max_deliveries` times.
    pub fn requeue(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Reject {
                reason: reason.into(),
                requeue: true,
            },
        }
    }

    /// The arguments do not fit the task (reported as a `TypeError`, as Python raises).
    pub(crate) fn invalid_arguments(message: String) -> Self {
        Self {
            kind: ErrorKind::InvalidArguments(message),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Failed(Failure { kind, message, .. }) => write!(f, "{kind}: {message}"),
            ErrorKind::Retry(retry) => match retry.countdown {
                Some(c) => write!(f, "retry in {c:?}: {}", retry.reason),
                None => write!(f, "retry: {}", retry.reason),
            },
            ErrorKind::Reject {
                reason,
                requeue: false,
            } => write!(f, "rejected: {reason}"),
            ErrorKind::Reject {
                reason,
                requeue: true,
            } => write!(f, "requeued: {reason}"),
            ErrorKind::InvalidArguments(message) => write!(f, "TypeError: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<TaskError> for wit::TaskError {
    fn from(error: TaskError) -> Self {
        match error.kind {
            ErrorKind::Failed(failure) => Self::Failed(failure.into()),
            ErrorKind::Retry(retry) => {
                let retry = *retry;
                Self::Retry(wit::RetryRequest {
                    countdown_ms: retry.countdown.map(millis),
                    reason: retry.reason,
                    exc: retry.exc.map(Into::into),
                    args_json: retry.args.map(|args| Value::Array(args).to_string()),
                    kwargs_json: retry.kwargs.map(|kwargs| Value::Object(kwargs).to_string()),
                    max_retries: retry.max_retries,
                    expires_ms: retry.expires.map(millis),
                })
            }
            ErrorKind::Reject { reason, requeue } => {
                Self::Reject(wit::Rejection { reason, requeue })
            }
            ErrorKind::InvalidArguments(message) => Self::InvalidArguments(message),
        }
    }
}
