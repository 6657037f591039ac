//! Write wasmq tasks as plain Rust functions.
//!
//! A plugin is a `cdylib` crate compiled for `wasm32-wasip2`. Each task is an ordinary
//! function whose parameters and return value are serde types; `#[task]` generates the glue
//! that decodes Celery-style positional and keyword arguments and encodes the result as
//! JSON, and [`export_tasks!`] lists the plugin's tasks once:
//!
//! ```no_run
//! use wasmq_sdk::{task, TaskContext, TaskError};
//!
//! /// Adds two numbers.
//! #[task]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! /// Divides, failing cleanly on zero.
//! #[task(name = "proj.tasks.div")]
//! fn div(ctx: &TaskContext, a: f64, b: f64) -> Result<f64, TaskError> {
//!     ctx.info(&format!("dividing {a} by {b}"));
//!     if b == 0.0 {
//!         return Err(TaskError::failed("ZeroDivisionError", "division by zero"));
//!     }
//!     Ok(a / b)
//! }
//!
//! wasmq_sdk::export_tasks!(add, div);
//! ```
//!
//! The default task name is `<crate>.<function>` (`math.add` for `add` in crate `math`);
//! `#[task(name = "...")]` overrides it, so Celery task names can be served as they are.
//! `#[task(fuel = N, memory = "64MiB", timeout = "2s")]` declares default limits, which the
//! worker may lower but never raise beyond its own ceiling.
//!
//! Retry and rate-limit defaults follow Celery's task attributes; the worker's per-task
//! configuration overrides them:
//!
//! ```ignore
//! #[task(
//!     autoretry_for = ["ConnectionError"], // these failures are retried automatically
//!     max_retries = 5,                     // then MaxRetriesExceededError
//!     retry_backoff = "1s",                // 1 s, 2 s, 4 s, … (factor × 2^retries)
//!     retry_backoff_max = "1m",            // capped
//!     retry_jitter = true,                 // uniformly random in [0, backoff]
//!     default_retry_delay = "30s",         // for retries that give no countdown
//!     rate_limit = "10/s",                 // at most 10 runs per second per worker
//! )]
//! fn fetch(url: String) -> Result<String, TaskError> { /* … */ }
//! ```
//!
//! Arguments bind the way Python binds them: positional first, then by keyword; an
//! `Option<T>` parameter may be left out. A wrong count, an unknown keyword or a value of the
//! wrong type ends the task with a `TypeError` failure naming the task, the parameter and the
//! expected type — the function is not called.
//!
//! A task returns `T`, or `Result<T, E>` where `E: Into<TaskError>`.
//! [`TaskError::retry`] asks the worker to run the task again later; [`TaskError::reject`]
//! dead-letters the message.
//!
//! Longer than 400 lines for one idea, the guest's API: the types a task author sees and
//! the support code `#[task]` expands to, which must agree with each other.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

pub use serde;
pub use serde_json;
pub use wasmq_sdk_macros::task;

// Lets generated code name `::wasmq_sdk` from inside this crate too.
extern crate self as wasmq_sdk;

/// The bindings generated from `wit/task.wit` (world `task-plugin`). Not a stable API: use
/// [`task`], [`export_tasks!`] and the types at the crate root instead.
#[doc(hidden)]
pub mod bindings {
    #![allow(missing_docs, unreachable_pub, unsafe_code, clippy::all)]
    wit_bindgen::generate!({
        path: "../wit",
        world: "task-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_task_plugin",
        default_bindings_module: "::wasmq_sdk::bindings",
        runtime_path: "::wasmq_sdk::__private::wit_bindgen::rt",
    });
}

use bindings::wasmq::task::{host, types as wit};

/// Severity of a log record sent to the worker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the task recovered from.
    Warn,
    /// Something failed.
    Error,
}

impl From<Level> for wit::LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => Self::Trace,
            Level::Debug => Self::Debug,
            Level::Info => Self::Info,
            Level::Warn => Self::Warn,
            Level::Error => Self::Error,
        }
    }
}

/// What a task knows about the call it serves (Celery's `self.request`), and its channel to
/// the worker: logging, progress reports and the soft time limit.
#[derive(Debug, Clone)]
pub struct TaskContext {
    invocation: wit::Invocation,
}

impl TaskContext {
    /// The task id.
    pub fn id(&self) -> &str {
        &self.invocation.id
    }

    /// The name this task was called by.
    pub fn task_name(&self) -> &str {
        &self.invocation.task
    }

    /// How many times this task was retried before this attempt (0 on the first attempt).
    pub fn retries(&self) -> u32 {
        self.invocation.retries
    }

    /// The id of the first task in this task's workflow, if any.
    pub fn root_id(&self) -> Option<&str> {
        self.invocation.root_id.as_deref()
    }

    /// The id of the task that sent this one, if any.
    pub fn parent_id(&self) -> Option<&str> {
        self.invocation.parent_id.as_deref()
    }

    /// The id of the group this task belongs to, if any.
    pub fn group_id(&self) -> Option<&str> {
        self.invocation.group_id.as_deref()
    }

    /// Writes a log record to the worker's log, tagged with this task's id.
    pub fn log(&self, level: Level, message: &str) {
        host::log(level.into(), message);
    }

    /// Logs at info level.
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    /// Reports a custom state with metadata (Celery's `update_state(state=..., meta=...)`),
    /// e.g. `ctx.update_state("PROGRESS", &json!({"done": 3, "total": 10}))`.
    pub fn update_state<M: Serialize + ?Sized>(&self, state: &str, meta: &M) {
        let meta = serde_json::to_string(meta).unwrap_or_else(|_| "null".to_owned());
        host::update_state(state, &meta);
    }

    /// Time left before the soft time limit, if the task has one.
    pub fn soft_time_left(&self) -> Option<Duration> {
        host::soft_time_left_ms().map(Duration::from_millis)
    }

    /// True once the soft time limit has passed: a cooperative task stops cleanly now,
    /// before the hard limit interrupts it.
    pub fn should_stop(&self) -> bool {
        self.soft_time_left().is_some_and(|left| left.is_zero())
    }
}

/// How a task ends other than with a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ErrorKind {
    Failed(Failure),
    Retry {
        countdown: Option<Duration>,
        reason: String,
        /// The failure once retries are spent.
        exc: Option<Failure>,
    },
    Reject(String),
    InvalidArguments(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
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
            Ok(serde_json::Value::Array(args)) => args,
            Ok(serde_json::Value::Null) => Vec::new(),
            Ok(one) => vec![one],
            Err(e) => vec![serde_json::Value::String(format!(
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
                args_json: Some(serde_json::Value::Array(args).to_string()),
            }),
        }
    }

    /// Asks the worker to run the task again later (same id, `retries + 1`), after the
    /// worker's retry policy delay; chain [`TaskError::after`] to choose the delay and
    /// [`TaskError::or_fail_with`] to choose the failure once retries are spent.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retry {
                countdown: None,
                reason: reason.into(),
                exc: None,
            },
        }
    }

    /// Sets the delay of a retry request; no effect on other errors.
    #[must_use]
    pub fn after(mut self, countdown: Duration) -> Self {
        if let ErrorKind::Retry { countdown: c, .. } = &mut self.kind {
            *c = Some(countdown);
        }
        self
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
    pub fn or_fail_with(mut self, failure: TaskError) -> Self {
        if let (ErrorKind::Retry { exc, .. }, ErrorKind::Failed(failure)) =
            (&mut self.kind, failure.kind)
        {
            *exc = Some(failure);
        }
        self
    }

    /// The message must never be run again: the worker dead-letters it with this reason.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Reject(reason.into()),
        }
    }

    /// The arguments do not fit the task (reported as a `TypeError`, as Python raises).
    fn invalid_arguments(message: String) -> Self {
        Self {
            kind: ErrorKind::InvalidArguments(message),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Failed(Failure { kind, message, .. }) => write!(f, "{kind}: {message}"),
            ErrorKind::Retry {
                countdown, reason, ..
            } => match countdown {
                Some(c) => write!(f, "retry in {c:?}: {reason}"),
                None => write!(f, "retry: {reason}"),
            },
            ErrorKind::Reject(reason) => write!(f, "rejected: {reason}"),
            ErrorKind::InvalidArguments(message) => write!(f, "TypeError: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<TaskError> for wit::TaskError {
    fn from(error: TaskError) -> Self {
        match error.kind {
            ErrorKind::Failed(failure) => Self::Failed(failure.into()),
            ErrorKind::Retry {
                countdown,
                reason,
                exc,
            } => Self::Retry(wit::RetryRequest {
                countdown_ms: countdown.map(|c| u64::try_from(c.as_millis()).unwrap_or(u64::MAX)),
                reason,
                exc: exc.map(Into::into),
            }),
            ErrorKind::Reject(reason) => Self::Reject(reason),
            ErrorKind::InvalidArguments(message) => Self::InvalidArguments(message),
        }
    }
}

/// JSON text a task has already encoded, returned as the result without being copied or
/// re-encoded. Useful for large results or results produced by another serializer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(String);

impl RawJson {
    /// Wraps `json` after checking that it is one valid JSON value.
    ///
    /// # Errors
    /// A `ValueError` failure when `json` is not valid JSON.
    pub fn new(json: String) -> Result<Self, TaskError> {
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .map_err(|e| TaskError::failed("ValueError", format!("not valid JSON: {e}")))?;
        Ok(Self(json))
    }

    /// Wraps `json` without checking it, for results too large to scan twice. The host
    /// still checks every result: invalid JSON ends the task as an `EncodeError` failure.
    pub fn unchecked(json: String) -> Self {
        Self(json)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lists a plugin's tasks and exports them to the host. Call it once per plugin, with the
/// names of the `#[task]` functions:
///
/// ```no_run
/// # use wasmq_sdk::task;
/// # #[task] fn add(a: i64, b: i64) -> i64 { a + b }
/// # #[task] fn mul(a: i64, b: i64) -> i64 { a * b }
/// # #[task] fn fib(n: u32) -> u64 { if n < 2 { n.into() } else { fib(n - 1) + fib(n - 2) } }
/// wasmq_sdk::export_tasks!(add, mul, fib);
/// ```
#[macro_export]
macro_rules! export_tasks {
    ($($task:path),+ $(,)?) => {
        #[doc(hidden)]
        pub struct __WasmqPlugin;

        const _: () = {
            const __WASMQ_TASKS: &[$crate::__private::TaskDef] =
                &[$(<$task as $crate::__private::Task>::DEF),+];

            impl $crate::bindings::exports::wasmq::task::plugin::Guest for __WasmqPlugin {
                fn describe() -> ::std::vec::Vec<$crate::bindings::wasmq::task::types::TaskInfo> {
                    $crate::__private::describe(__WASMQ_TASKS)
                }

                fn run(
                    invocation: $crate::bindings::wasmq::task::types::Invocation,
                    args_json: ::std::string::String,
                    kwargs_json: ::std::string::String,
                ) -> ::core::result::Result<
                    ::std::string::String,
                    $crate::bindings::wasmq::task::types::TaskError,
                > {
                    $crate::__private::run(__WASMQ_TASKS, invocation, &args_json, &kwargs_json)
                }
            }
        };

        $crate::bindings::__export_task_plugin!(__WasmqPlugin with_types_in $crate::bindings);
    };
}

/// Support code for the macros. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::{Map, Value};

    use super::{TaskContext, TaskError, wit};

    pub use wit_bindgen;

    /// Everything the host needs to know about one task, built by `#[task]`.
    pub struct TaskDef {
        /// Full task name.
        pub name: &'static str,
        /// Doc comment.
        pub doc: &'static str,
        /// Parameter names in positional order (without the context).
        pub params: &'static [&'static str],
        /// Default fuel budget.
        pub fuel: Option<u64>,
        /// Default memory cap.
        pub memory_bytes: Option<u64>,
        /// Default hard time limit.
        pub timeout_ms: Option<u64>,
        /// Default retry and rate-limit policy.
        pub policy: PolicyDef,
        /// Decodes arguments, calls the function, encodes the result.
        pub call: fn(&TaskContext, Args) -> Result<String, TaskError>,
    }

    /// A task's default retry and rate-limit policy, built by `#[task]` (see the WIT
    /// `task-policy` record for each field's meaning).
    #[derive(Default)]
    pub struct PolicyDef {
        /// Failure kinds retried automatically.
        pub autoretry_for: &'static [&'static str],
        /// Retries before `MaxRetriesExceededError`.
        pub max_retries: Option<u32>,
        /// Retry delay when none is given, in ms.
        pub default_retry_delay_ms: Option<u64>,
        /// Exponential backoff factor for automatic retries, in ms.
        pub retry_backoff_ms: Option<u64>,
        /// Backoff cap, in ms.
        pub retry_backoff_max_ms: Option<u64>,
        /// Full jitter on the backoff.
        pub retry_jitter: Option<bool>,
        /// Runs per worker, e.g. `"10/s"`.
        pub rate_limit: Option<&'static str>,
    }

    /// Implemented by the hidden struct `#[task]` puts beside each task function.
    pub trait Task {
        /// The task's descriptor.
        const DEF: TaskDef;
    }

    /// Celery-style arguments being bound to a task's parameters.
    pub struct Args {
        task: &'static str,
        params: &'static [&'static str],
        positional: Vec<Value>,
        keywords: Map<String, Value>,
    }

    impl Args {
        pub(crate) fn parse(
            def: &TaskDef,
            args_json: &str,
            kwargs_json: &str,
        ) -> Result<Self, TaskError> {
            let task = def.name;
            let positional: Vec<Value> = serde_json::from_str(args_json).map_err(|e| {
                TaskError::invalid_arguments(format!(
                    "{task}: positional arguments must be a JSON array: {e}"
                ))
            })?;
            let keywords: Map<String, Value> = serde_json::from_str(kwargs_json).map_err(|e| {
                TaskError::invalid_arguments(format!(
                    "{task}: keyword arguments must be a JSON object: {e}"
                ))
            })?;
            let params = def.params;
            if positional.len() > params.len() {
                return Err(TaskError::invalid_arguments(format!(
                    "{task} takes {} positional argument{} ({}) but {} were given",
                    params.len(),
                    if params.len() == 1 { "" } else { "s" },
                    params.join(", "),
                    positional.len()
                )));
            }
            for key in keywords.keys() {
                match params.iter().position(|p| p == key) {
                    None => {
                        return Err(TaskError::invalid_arguments(format!(
                            "{task} got an unexpected keyword argument `{key}` (parameters: {})",
                            params.join(", ")
                        )));
                    }
                    Some(i) if i < positional.len() => {
                        return Err(TaskError::invalid_arguments(format!(
                            "{task} got multiple values for argument `{key}`"
                        )));
                    }
                    Some(_) => {}
                }
            }
            Ok(Self {
                task,
                params,
                positional,
                keywords,
            })
        }

        /// Takes parameter `index` (named `name`, of Rust type `ty`) from the positional
        /// arguments or the keywords.
        pub fn take<T: DeserializeOwned>(
            &mut self,
            index: usize,
            name: &str,
            ty: &str,
        ) -> Result<T, TaskError> {
            let value = match self.positional.get_mut(index) {
                Some(slot) => Some(slot.take()),
                None => self.keywords.remove(name),
            };
            let task = self.task;
            match value {
                Some(value) => serde_json::from_value(value).map_err(|e| {
                    TaskError::invalid_arguments(format!(
                        "{task}: argument `{name}` must be {ty}: {e}"
                    ))
                }),
                // A missing argument is fine only for types that accept null (Option<T>, ()).
                None => serde_json::from_value(Value::Null).map_err(|_| {
                    TaskError::invalid_arguments(format!(
                        "{task} missing required argument `{name}` ({ty}); parameters: {}",
                        self.params.join(", ")
                    ))
                }),
            }
        }

        /// Called after every parameter was taken; nothing is left over by construction
        /// (parse checked counts and keyword names), kept as the one place to add checks.
        pub fn finish(self) -> Result<(), TaskError> {
            Ok(())
        }
    }

    /// A task's return value, encoded as the JSON result.
    pub trait Output {
        /// Encodes the value.
        fn into_json(self) -> Result<String, TaskError>;
    }

    impl<T: Serialize> Output for T {
        fn into_json(self) -> Result<String, TaskError> {
            serde_json::to_string(&self).map_err(|e| {
                TaskError::failed(
                    "EncodeError",
                    format!("the result cannot be encoded as JSON: {e}"),
                )
            })
        }
    }

    impl Output for super::RawJson {
        fn into_json(self) -> Result<String, TaskError> {
            Ok(self.0)
        }
    }

    /// `describe` for a plugin's task list.
    pub fn describe(tasks: &[TaskDef]) -> Vec<wit::TaskInfo> {
        tasks
            .iter()
            .map(|t| wit::TaskInfo {
                name: t.name.to_owned(),
                doc: t.doc.to_owned(),
                params: t.params.iter().map(|p| (*p).to_owned()).collect(),
                limits: wit::Limits {
                    fuel: t.fuel,
                    memory_bytes: t.memory_bytes,
                    timeout_ms: t.timeout_ms,
                },
                policy: wit::TaskPolicy {
                    autoretry_for: t
                        .policy
                        .autoretry_for
                        .iter()
                        .map(|k| (*k).to_owned())
                        .collect(),
                    max_retries: t.policy.max_retries,
                    default_retry_delay_ms: t.policy.default_retry_delay_ms,
                    retry_backoff_ms: t.policy.retry_backoff_ms,
                    retry_backoff_max_ms: t.policy.retry_backoff_max_ms,
                    retry_jitter: t.policy.retry_jitter,
                    rate_limit: t.policy.rate_limit.map(str::to_owned),
                },
            })
            .collect()
    }

    /// `run` for a plugin's task list: finds the task, binds arguments, calls it.
    pub fn run(
        tasks: &[TaskDef],
        invocation: wit::Invocation,
        args_json: &str,
        kwargs_json: &str,
    ) -> Result<String, wit::TaskError> {
        let Some(def) = tasks.iter().find(|t| t.name == invocation.task) else {
            return Err(TaskError::failed(
                "NotRegistered",
                format!("this plugin has no task named {}", invocation.task),
            )
            .into());
        };
        let args = Args::parse(def, args_json, kwargs_json)?;
        let ctx = TaskContext { invocation };
        (def.call)(&ctx, args).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::__private::{Args, TaskDef};
    use super::{TaskContext, TaskError};

    fn never(_: &TaskContext, _: Args) -> Result<String, TaskError> {
        unreachable!("binding tests never call the task")
    }

    const DEF: TaskDef = TaskDef {
        name: "t.greet",
        doc: "",
        params: &["name", "times", "suffix"],
        fuel: None,
        memory_bytes: None,
        timeout_ms: None,
        policy: super::__private::PolicyDef {
            autoretry_for: &[],
            max_retries: None,
            default_retry_delay_ms: None,
            retry_backoff_ms: None,
            retry_backoff_max_ms: None,
            retry_jitter: None,
            rate_limit: None,
        },
        call: never,
    };

    fn bind(args: &str, kwargs: &str) -> Result<(String, u32, Option<String>), TaskError> {
        let mut args = Args::parse(&DEF, args, kwargs)?;
        let bound = (
            args.take(0, "name", "String")?,
            args.take(1, "times", "u32")?,
            args.take(2, "suffix", "Option<String>")?,
        );
        args.finish()?;
        Ok(bound)
    }

    #[test]
    fn positional_keyword_and_optional_parameters_bind() {
        assert_eq!(
            bind(r#"["a", 2, "!"]"#, "{}"),
            Ok(("a".into(), 2, Some("!".into())))
        );
        assert_eq!(
            bind(r#"["a"]"#, r#"{"times": 3}"#),
            Ok(("a".into(), 3, None))
        );
        assert_eq!(
            bind("[]", r#"{"suffix": "?", "name": "b", "times": 1}"#),
            Ok(("b".into(), 1, Some("?".into())))
        );
    }

    #[test]
    fn binding_errors_name_task_parameter_and_type() {
        let err = |args, kwargs| bind(args, kwargs).unwrap_err().to_string();
        assert_eq!(
            err(r#"["a", -1]"#, "{}"),
            "TypeError: t.greet: argument `times` must be u32: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            err(r#"["a"]"#, "{}"),
            "TypeError: t.greet missing required argument `times` (u32); parameters: name, times, suffix"
        );
        assert_eq!(
            err(r#"["a", 1, "x", 4]"#, "{}"),
            "TypeError: t.greet takes 3 positional arguments (name, times, suffix) but 4 were given"
        );
    }
}
