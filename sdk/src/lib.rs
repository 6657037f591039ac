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
//! `#[task(fuel = N, memory = "64MiB", time_limit = "2s", soft_time_limit = "1s")]` declares
//! default limits (`timeout` is another name for `time_limit`), which the worker may lower
//! but never raise beyond its own ceiling; `#[task(ignore_result = true)]` stores no result
//! unless the message asks for one, as Celery's task attributes do.
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
//! `Option<T>` parameter may be left out, and an `Option<Option<T>>` one tells a left-out
//! argument (`None`) from an explicit `None` (`Some(None)`). `#[args] rest: Vec<Value>`
//! takes the extra positional arguments (Python's `*args`; the parameters after it are
//! keyword-only) and a last `#[kwargs] extra: Map<String, Value>` the extra keywords
//! (`**kwargs`). A wrong count, an unknown keyword or a value of the wrong type ends the
//! task with a `TypeError` failure naming the task, the parameter and the expected type —
//! the function is not called.
//!
//! A task returns `T`, or `Result<T, E>` where `E: Into<TaskError>`.
//! [`TaskError::retry`] asks the worker to run the task again later, with new arguments,
//! a delay, an expiry or its own retry limit if it says so; [`TaskError::reject`]
//! dead-letters the message and [`TaskError::requeue`] puts it back in its queue. The
//! [`TaskContext`] says what Celery's `self.request` says: ids, retries, eta, time limits,
//! priority, redelivery, custom headers and message properties.
//!
//! # Files, connections and variables
//!
//! A task reaches nothing outside its memory unless the worker grants it, call by call:
//! a host folder at a guest path, outbound TCP connections to listed addresses, and named
//! variables. Everything else fails as it would on a locked-down machine: the operation
//! returns an `io::Error` (`PermissionDenied`, `NotFound`…), which [`TaskError::io`] turns
//! into the matching Python exception.
//!
//! Granted **folders** need nothing from the SDK: `std::fs` works on `wasm32-wasip2`, with
//! paths under the guest path the folder was granted at (`..`, symlinks and absolute
//! host paths never lead out of it; a read-only folder refuses every change):
//!
//! ```no_run
//! use wasmq_sdk::{task, TaskError};
//!
//! /// Counts the lines of a file in the granted folder `/data`.
//! #[task]
//! fn count_lines(name: String) -> Result<usize, TaskError> {
//!     let path = format!("/data/{name}");
//!     let text = std::fs::read_to_string(&path)
//!         .map_err(|e| TaskError::io(format!("cannot read {path}"), &e))?;
//!     Ok(text.lines().count())
//! }
//! # wasmq_sdk::export_tasks!(count_lines);
//! ```
//!
//! Granted **connections** need nothing either: `std::net::TcpStream` works through
//! `wasi:sockets`. The worker allows connections to the addresses its rules name
//! (`10.0.0.5:6379`, `0.0.0.0/0:443`…); binding, listening and UDP are always refused, and
//! host names resolve only when name lookups are granted too:
//!
//! ```no_run
//! use std::io::{BufRead, BufReader, Write};
//! use wasmq_sdk::{task, TaskError};
//!
//! /// Sends one line to a granted service and returns its one-line answer.
//! #[task]
//! fn ask(addr: String, line: String) -> Result<String, TaskError> {
//!     let fail = |e: std::io::Error| TaskError::io(format!("cannot talk to {addr}"), &e);
//!     let mut stream = std::net::TcpStream::connect(addr.as_str()).map_err(fail)?;
//!     stream.write_all(format!("{line}\n").as_bytes()).map_err(fail)?;
//!     let mut answer = String::new();
//!     BufReader::new(stream).read_line(&mut answer).map_err(fail)?;
//!     Ok(answer.trim_end().to_owned())
//! }
//! # wasmq_sdk::export_tasks!(ask);
//! ```
//!
//! Granted **variables** are read with [`config::get`]; they are never in the environment.

mod args;
pub mod config;
mod context;
mod error;

pub use context::{Level, MessageProperties, TaskContext};
pub use error::TaskError;
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

use bindings::wasmq::task::types as wit;

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

    use super::args::{complete_retry, signature};
    use super::error::ErrorKind;
    use super::{TaskContext, TaskError, wit};

    pub use super::args::Args;
    pub use wit_bindgen;

    /// Everything the host needs to know about one task, built by `#[task]`.
    pub struct TaskDef {
        /// Full task name.
        pub name: &'static str,
        /// Doc comment.
        pub doc: &'static str,
        /// Named parameter names in order (without the context and the catch-alls).
        pub params: &'static [&'static str],
        /// How many of `params` may be given positionally: all of them, or those before
        /// the `*args` catch-all (the rest are keyword-only).
        pub positional: usize,
        /// The parameter taking the extra positional arguments (`*args`), if any.
        pub var_args: Option<&'static str>,
        /// The parameter taking the extra keyword arguments (`**kwargs`), if any.
        pub var_kwargs: Option<&'static str>,
        /// Default fuel budget.
        pub fuel: Option<u64>,
        /// Default memory cap.
        pub memory_bytes: Option<u64>,
        /// Default hard time limit.
        pub timeout_ms: Option<u64>,
        /// Default soft time limit.
        pub soft_timeout_ms: Option<u64>,
        /// Store no result unless the message asks for one.
        pub ignore_result: bool,
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
                params: signature(t),
                limits: wit::Limits {
                    fuel: t.fuel,
                    memory_bytes: t.memory_bytes,
                    timeout_ms: t.timeout_ms,
                    soft_timeout_ms: t.soft_timeout_ms,
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
                ignore_result: t.ignore_result,
            })
            .collect()
    }

    /// `run` for a plugin's task list: finds the task, binds arguments, calls it, and
    /// completes a retry request's new arguments from this call's.
    // The return type is the generated `plugin.run` binding's; it is returned once per call.
    #[allow(clippy::result_large_err)]
    pub fn run(
        tasks: &'static [TaskDef],
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
        let ctx = TaskContext::new(invocation);
        (def.call)(&ctx, args).map_err(|mut error| {
            if let ErrorKind::Retry(retry) = &mut error.kind {
                complete_retry(def, args_json, kwargs_json, retry);
            }
            error.into()
        })
    }
}
