//! Hooks: Rust callbacks for people who embed wasmq as a library, called at the worker's
//! observation points (`observe.rs`, the same points that feed Celery events and metrics) —
//! the counterpart of Celery's signals (`task_prerun`, `task_postrun`, `task_failure`,
//! `task_retry`, `worker_ready`, `worker_shutdown`).
//!
//! ```
//! use wasmq::worker::{Hooks, WorkerOptions};
//!
//! let hooks = Hooks::new()
//!     .before_task(|task| println!("{} {} starts ({} bytes)", task.name, task.id, task.args_size))
//!     .after_task(|task| println!("{} {} ended {:?} in {:?}", task.name, task.id, task.state, task.runtime))
//!     .on_failure(|task| eprintln!("{} failed: {:?}", task.id, task.exception));
//! let options = WorkerOptions { hooks, ..WorkerOptions::default() };
//! ```
//!
//! A hook runs on the worker's executor, inline, at its point: it must be quick and must
//! not block (hand slow work to a channel or a spawned task). A hook that panics is caught
//! and logged; the task, the other hooks and the worker carry on. With no hook registered
//! each point costs one `Option` check: nothing is built, locked or allocated.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::results::{ResultMeta, TaskState};

/// A task about to run in its sandbox (Celery's `task_prerun`).
#[derive(Debug)]
#[non_exhaustive]
pub struct TaskStarting<'a> {
    /// The task id.
    pub id: &'a str,
    /// The task name, e.g. `math.add`.
    pub name: &'a str,
    /// The tenant whose task it is (none: the worker's one implicit tenant).
    pub tenant: Option<&'a str>,
    /// The queue it was taken from.
    pub queue: &'a str,
    /// The size in bytes of the message body as sent: its arguments, keyword arguments and
    /// workflow (`[args, kwargs, embed]`).
    pub args_size: usize,
    /// The retries before this run (0 on the first run).
    pub retries: u32,
}

/// A task's outcome, once it is stored (or deliberately not, `ignore_result`) and before
/// its message is acknowledged (Celery's `task_postrun`, `task_failure`, `task_retry`).
#[derive(Debug)]
#[non_exhaustive]
pub struct TaskEnded<'a> {
    /// The task id.
    pub id: &'a str,
    /// The task name.
    pub name: &'a str,
    /// The tenant whose task it is (none: the worker's one implicit tenant).
    pub tenant: Option<&'a str>,
    /// The queue it was taken from.
    pub queue: &'a str,
    /// The size in bytes of the message body as sent (see [`TaskStarting::args_size`]).
    pub args_size: usize,
    /// The retries before this run.
    pub retries: u32,
    /// The state stored: `SUCCESS`, `FAILURE`, `RETRY`, `REVOKED`, …
    pub state: &'a TaskState,
    /// The exception's type when it failed or retries (`ZeroDivisionError`,
    /// `TimeLimitExceeded`, `Retry`, …).
    pub exception: Option<&'a str>,
    /// The stored result: the task's return value, or Celery's exception dict.
    pub result: &'a Value,
    /// How long its sandbox call took; none when it never ran (revoked, expired, unknown
    /// task, refused grants).
    pub runtime: Option<Duration>,
}

/// A task went through its sandbox call (it had a `before_task`), which took this long
/// (none: the call could not start, e.g. its grants were refused).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ran(pub(super) Option<Duration>);

/// The worker itself (`worker_ready`, `worker_shutdown`).
#[derive(Debug)]
#[non_exhaustive]
pub struct WorkerInfo<'a> {
    /// The worker's node name, e.g. `wasmq@host`.
    pub node: &'a str,
    /// Its tenant (none: the one implicit tenant).
    pub tenant: Option<&'a str>,
    /// The queues it consumes.
    pub queues: &'a [String],
    /// Tasks it may run at once now.
    pub concurrency: usize,
}

type TaskStartHook = Arc<dyn Fn(&TaskStarting<'_>) + Send + Sync>;
type TaskEndHook = Arc<dyn Fn(&TaskEnded<'_>) + Send + Sync>;
type WorkerHook = Arc<dyn Fn(&WorkerInfo<'_>) + Send + Sync>;

/// The callbacks registered on a worker ([`WorkerOptions::hooks`](super::WorkerOptions)),
/// built with its methods; several of one kind run in the order registered. Cloning is
/// cheap (an `Arc`), and tenants' workers may share one set.
#[derive(Clone, Default)]
pub struct Hooks(Option<Arc<HookSet>>);

/// The registered callbacks, by kind.
#[derive(Clone, Default)]
pub(super) struct HookSet {
    before_task: Vec<TaskStartHook>,
    after_task: Vec<TaskEndHook>,
    on_failure: Vec<TaskEndHook>,
    on_retry: Vec<TaskEndHook>,
    worker_ready: Vec<WorkerHook>,
    worker_shutdown: Vec<WorkerHook>,
}

impl Hooks {
    /// No hooks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no hook is registered.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn set(&mut self) -> &mut HookSet {
        Arc::make_mut(self.0.get_or_insert_with(Arc::default))
    }

    /// Calls `hook` before each task runs in its sandbox.
    #[must_use]
    pub fn before_task(mut self, hook: impl Fn(&TaskStarting<'_>) + Send + Sync + 'static) -> Self {
        self.set().before_task.push(Arc::new(hook));
        self
    }

    /// Calls `hook` once the outcome of a task that ran is stored, whatever the outcome
    /// (it pairs with [`before_task`](Self::before_task); a task interrupted by shutdown is
    /// released to run again, and gets no `after_task` here). A result that must be stored
    /// or published is handled beside the task slot, so the next task may have started
    /// by then; with results off (`ignore_result`) it runs before the slot is given back.
    #[must_use]
    pub fn after_task(mut self, hook: impl Fn(&TaskEnded<'_>) + Send + Sync + 'static) -> Self {
        self.set().after_task.push(Arc::new(hook));
        self
    }

    /// Calls `hook` when a FAILURE is stored for a task, whether it ran (an exception, a
    /// limit, invalid arguments) or not (an unknown task: then `runtime` is none).
    #[must_use]
    pub fn on_failure(mut self, hook: impl Fn(&TaskEnded<'_>) + Send + Sync + 'static) -> Self {
        self.set().on_failure.push(Arc::new(hook));
        self
    }

    /// Calls `hook` when a task asked to be retried (its RETRY state is stored and the next
    /// attempt is about to be published).
    #[must_use]
    pub fn on_retry(mut self, hook: impl Fn(&TaskEnded<'_>) + Send + Sync + 'static) -> Self {
        self.set().on_retry.push(Arc::new(hook));
        self
    }

    /// Calls `hook` once the worker consumes, before it runs its first task.
    #[must_use]
    pub fn worker_ready(mut self, hook: impl Fn(&WorkerInfo<'_>) + Send + Sync + 'static) -> Self {
        self.set().worker_ready.push(Arc::new(hook));
        self
    }

    /// Calls `hook` once the worker has stopped: its tasks have finished or were released.
    #[must_use]
    pub fn worker_shutdown(
        mut self,
        hook: impl Fn(&WorkerInfo<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.set().worker_shutdown.push(Arc::new(hook));
        self
    }

    /// The registered hooks; none when there are none (the hot path's only check).
    pub(super) fn active(&self) -> Option<&HookSet> {
        self.0.as_deref()
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(set) = self.active() else {
            return f.write_str("Hooks(none)");
        };
        f.debug_struct("Hooks")
            .field("before_task", &set.before_task.len())
            .field("after_task", &set.after_task.len())
            .field("on_failure", &set.on_failure.len())
            .field("on_retry", &set.on_retry.len())
            .field("worker_ready", &set.worker_ready.len())
            .field("worker_shutdown", &set.worker_shutdown.len())
            .finish()
    }
}

impl HookSet {
    pub(super) fn before_task(&self, task: &TaskStarting<'_>) {
        each("before_task", &self.before_task, |hook| hook(task));
    }

    /// `ran`: the task ran in its sandbox (it had a `before_task`).
    pub(super) fn finished(&self, task: &TaskEnded<'_>, ran: bool) {
        if ran {
            each("after_task", &self.after_task, |hook| hook(task));
        }
        match task.state {
            TaskState::Failure => each("on_failure", &self.on_failure, |hook| hook(task)),
            TaskState::Retry => each("on_retry", &self.on_retry, |hook| hook(task)),
            _ => {}
        }
    }

    pub(super) fn worker_ready(&self, worker: &WorkerInfo<'_>) {
        each("worker_ready", &self.worker_ready, |hook| hook(worker));
    }

    pub(super) fn worker_shutdown(&self, worker: &WorkerInfo<'_>) {
        each("worker_shutdown", &self.worker_shutdown, |hook| {
            hook(worker)
        });
    }
}

/// The exception type a stored meta carries, if any.
pub(super) fn exception_of(meta: &ResultMeta) -> Option<&str> {
    meta.result.get("exc_type").and_then(Value::as_str)
}

/// Runs `call` on each of `hooks`, containing panics: a panicking hook is logged and the
/// next one runs.
fn each<H: ?Sized>(kind: &'static str, hooks: &[Arc<H>], call: impl Fn(&H)) {
    for hook in hooks {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| call(hook))) {
            let why = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a panic");
            tracing::error!(
                hook = kind,
                panic = why,
                "a worker hook panicked; the task and the worker carry on"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn end<'a>(state: &'a TaskState, result: &'a Value) -> TaskEnded<'a> {
        TaskEnded {
            id: "id-1",
            name: "math.div",
            tenant: None,
            queue: "celery",
            args_size: 10,
            retries: 0,
            state,
            exception: None,
            result,
            runtime: Some(Duration::from_millis(3)),
        }
    }

    #[test]
    fn no_hook_is_no_set() {
        assert!(Hooks::new().active().is_none());
        assert!(Hooks::default().is_empty());
        assert!(!Hooks::new().on_retry(|_| {}).is_empty());
    }

    #[test]
    fn a_panicking_hook_is_contained_and_the_next_one_runs() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (Arc::clone(&seen), Arc::clone(&seen));
        let hooks = Hooks::new()
            .on_failure(|_| panic!("boom"))
            .on_failure(move |task| a.lock().unwrap().push(format!("failure {}", task.id)))
            .after_task(move |task| b.lock().unwrap().push(format!("after {}", task.id)));
        let set = hooks.active().unwrap();
        let result = Value::Null;
        set.finished(&end(&TaskState::Failure, &result), true);
        set.finished(&end(&TaskState::Failure, &result), false);
        assert_eq!(
            *seen.lock().unwrap(),
            ["after id-1", "failure id-1", "failure id-1"],
            "after_task only for a task that ran; on_failure for both"
        );
    }

    #[test]
    fn kinds_fire_on_their_states_only() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (Arc::clone(&seen), Arc::clone(&seen));
        let hooks = Hooks::new()
            .on_failure(move |_| a.lock().unwrap().push("failure"))
            .on_retry(move |_| b.lock().unwrap().push("retry"));
        let set = hooks.active().unwrap();
        let result = Value::Null;
        for state in [TaskState::Success, TaskState::Revoked, TaskState::Retry] {
            set.finished(&end(&state, &result), true);
        }
        assert_eq!(*seen.lock().unwrap(), ["retry"]);
    }
}
