//! How a worker behaves: the options a worker is built with, each with its default.

use std::time::Duration;

use std::sync::Arc;

use crate::autoscale::AutoscalePolicy;
use crate::engine::{Grants, TenantLimits};
use crate::policy::{RetryPolicy, TaskAnnotations};
use crate::routes::TaskRoutes;

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queues to consume. Default: `["celery"]`.
    pub queues: Vec<String>,
    /// Tasks run at once. Default: the number of CPUs. With [`autoscale`](Self::autoscale),
    /// the autoscaler's bounds are used instead.
    pub concurrency: usize,
    /// Messages held per running slot (prefetch = concurrency × this). Default: 64 — wasm
    /// tasks are short, acks are batched up to half the prefetch, and a deep prefetch hides
    /// the broker's round trip (the AMQP drain bench: 10.8k tasks/s at 16, 17k at 64, 20k
    /// at 256). Lower it for long tasks so messages are not held back from other workers
    /// (Celery advises 1 for long tasks).
    pub prefetch_multiplier: usize,
    /// How long running tasks may finish after shutdown begins. Default: 30 s.
    pub shutdown_timeout: Duration,
    /// Retry behaviour for tasks that neither declare nor are configured otherwise.
    pub retry: RetryPolicy,
    /// Per-task retry and rate-limit policy (Celery's `task_annotations`), over what
    /// plugins declare.
    pub task_policies: TaskAnnotations,
    /// Deliveries of one message before it is dead-lettered as poison (a message whose
    /// worker keeps dying). Default: 10.
    pub max_deliveries: u32,
    /// Where revoked task ids are remembered across restarts (Celery's `--statedb`).
    /// Default: none (the embedded broker remembers them itself).
    pub state_file: Option<std::path::PathBuf>,
    /// Store a STARTED state before running each task. Default: false (as Celery).
    pub track_started: bool,
    /// This worker's name, e.g. `wasmq@host`.
    pub node_name: String,
    /// Where the tasks this worker publishes to continue a workflow (a chain's next step, a
    /// chord body, callbacks) go when their signature names no queue (Celery's
    /// `task_routes`, applied by whoever publishes). Unrouted tasks go to the queue of the
    /// message that published them.
    pub routes: TaskRoutes,
    /// Where to write the worker's status (JSON, rewritten every second and whenever
    /// consumption starts or stops), read by `wasmq status`. Default: none.
    pub status_file: Option<std::path::PathBuf>,
    /// Messages held unsettled, when not `concurrency × prefetch_multiplier` (a tenant's
    /// own small window). Default: none.
    pub prefetch: Option<usize>,
    /// Send task events (Celery's `-E`, `worker_send_task_events`); remote control's
    /// `enable_events`/`disable_events` switch them while the worker runs. Default: false.
    pub task_events: bool,
    /// How often the worker sends a `worker-heartbeat` event (it also sends
    /// `worker-online` and `worker-offline`); none: no worker events at all (Celery's
    /// `--without-heartbeat`). Default: 2 s.
    pub heartbeat: Option<Duration>,
    /// The process's Prometheus metrics, when it serves them (`--metrics`); every tenant's
    /// worker reports into the same one. Default: none.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The tenant this worker serves, when the process serves several. Default: none (the
    /// one implicit tenant).
    pub tenant: Option<TenantOptions>,
    /// Callbacks for an embedding program: before and after each task, on failures and
    /// retries, when the worker is ready and when it has stopped (Celery's signals).
    /// Default: none.
    pub hooks: super::Hooks,
    /// Size the task slots to the load between a minimum and a maximum (Celery's
    /// `--autoscale MAX,MIN`, see [`crate::autoscale`]); the slots, slot runners and
    /// prefetch window are made for the maximum. Default: none (`concurrency` slots).
    pub autoscale: Option<AutoscalePolicy>,
}

impl WorkerOptions {
    /// The most tasks it may run at once: the autoscaler's maximum, else `concurrency`.
    pub fn max_concurrency(&self) -> usize {
        self.autoscale
            .as_ref()
            .map_or(self.concurrency, |policy| policy.max)
    }

    /// The tenant's name, or `-` for the implicit one (for logs).
    pub fn tenant_name(&self) -> &str {
        self.tenant.as_ref().map_or("-", |t| t.name.as_str())
    }
}

/// What a worker serving one tenant of several needs to know of it.
#[derive(Debug, Clone)]
pub struct TenantOptions {
    /// The tenant's id.
    pub name: String,
    /// Its layer of limits and its ceiling.
    pub limits: Option<TenantLimits>,
    /// What each of its tasks may reach.
    pub grants: GrantsFor,
}

/// What a task may reach, by task name (the tenant's grants).
#[derive(Clone)]
pub struct GrantsFor(Arc<dyn Fn(&str) -> Grants + Send + Sync>);

impl GrantsFor {
    /// Grants given by `grants` for each task name.
    pub fn new(grants: impl Fn(&str) -> Grants + Send + Sync + 'static) -> Self {
        Self(Arc::new(grants))
    }

    /// What `task` may reach.
    pub fn of(&self, task: &str) -> Grants {
        (self.0)(task)
    }
}

impl std::fmt::Debug for GrantsFor {
    // Grants carry secrets: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantsFor(…)")
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queues: vec!["celery".into()],
            concurrency: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            prefetch_multiplier: 64,
            shutdown_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            task_policies: TaskAnnotations::default(),
            max_deliveries: 10,
            state_file: None,
            track_started: false,
            node_name: default_node_name(),
            routes: TaskRoutes::default(),
            status_file: None,
            prefetch: None,
            tenant: None,
            task_events: false,
            heartbeat: Some(Duration::from_secs(2)),
            metrics: None,
            hooks: super::Hooks::default(),
            autoscale: None,
        }
    }
}

/// `wasmq@<hostname>`.
pub fn default_node_name() -> String {
    format!("wasmq@{}", gethostname::gethostname().to_string_lossy())
}
