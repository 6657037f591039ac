//! Prometheus metrics of a worker process, served by `wasmq worker --metrics ADDR` (see
//! [`http`]).
//!
//! The `celery_*` metrics have the names, labels and histogram buckets of celery-exporter
//! (danihodovic/celery-exporter), so its published Grafana dashboard and alerts work on a
//! wasmq fleet unchanged: task counters by `name`, `hostname` (the host part of the node
//! name) and `queue_name` (`exception` too for failures), `celery_task_runtime`,
//! `celery_worker_up`, `celery_worker_tasks_active` and `celery_queue_length`. (Its
//! fleet-wide `celery_active_{worker,process}_count` gauges are left out: one worker cannot
//! count the fleet, and promtool rejects gauges named `_count`.) Where celery-exporter derives them from events, a wasmq
//! worker counts them itself, whether task events are on or not.
//!
//! The `wasmq_*` metrics say what only a sandbox can: fuel used per task, sandbox limits hit
//! by kind, dead letters by reason, task outcomes per tenant, events dropped, whether the
//! worker consumes, and the plugins it serves.
//!
//! Only this module knows prometheus-client; the worker calls plain methods.

pub mod http;

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// celery-exporter's `celery_task_runtime` buckets (prometheus_client's defaults), seconds.
const RUNTIME_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets of `wasmq_task_fuel_used`: 10^4 to 10^12 units (about 1 µs to 100 s of guest CPU).
const FUEL_BUCKETS: [f64; 9] = [1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    name: String,
    hostname: String,
    queue_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedLabels {
    name: String,
    hostname: String,
    exception: String,
    queue_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    hostname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    name: String,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    queue_name: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantTaskLabels {
    tenant: String,
    name: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    hostname: String,
    tenant: String,
}

fn runtime_histogram() -> Histogram {
    Histogram::new(RUNTIME_BUCKETS)
}

fn fuel_histogram() -> Histogram {
    Histogram::new(FUEL_BUCKETS)
}

/// How a task ended, for the outcome counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd<'a> {
    /// SUCCESS.
    Succeeded,
    /// FAILURE, with the exception's type name.
    Failed(&'a str),
    /// Sent back for a retry.
    Retried,
    /// REVOKED (revoked, terminated or expired).
    Revoked,
    /// The task rejected its message.
    Rejected,
}

impl TaskEnd<'_> {
    fn state(self) -> &'static str {
        match self {
            TaskEnd::Succeeded => "SUCCESS",
            TaskEnd::Failed(_) => "FAILURE",
            TaskEnd::Retried => "RETRY",
            TaskEnd::Revoked => "REVOKED",
            TaskEnd::Rejected => "REJECTED",
        }
    }
}

/// The metrics of one worker process (every tenant's worker in it reports here).
pub struct Metrics {
    registry: Registry,
    hostname: String,
    received: Family<TaskLabels, Counter>,
    started: Family<TaskLabels, Counter>,
    succeeded: Family<TaskLabels, Counter>,
    failed: Family<FailedLabels, Counter>,
    retried: Family<TaskLabels, Counter>,
    revoked: Family<TaskLabels, Counter>,
    rejected: Family<TaskLabels, Counter>,
    runtime: Family<TaskLabels, Histogram, fn() -> Histogram>,
    worker_up: Family<HostLabels, Gauge>,
    tasks_active: Family<HostLabels, Gauge>,
    queue_length: Family<QueueLabels, Gauge>,
    fuel_used: Family<NameLabels, Histogram, fn() -> Histogram>,
    limits_exceeded: Family<LimitLabels, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    tenant_tasks: Family<TenantTaskLabels, Counter>,
    events_dropped: Counter<u64, AtomicU64>,
    consuming: Gauge<i64, AtomicI64>,
    plugins_served: Gauge<i64, AtomicI64>,
    plugins_refused: Gauge<i64, AtomicI64>,
    concurrency: Family<SlotLabels, Gauge>,
    concurrency_max: Family<SlotLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of worker node `node` (`wasmq@box`: the `hostname` label is `box`, as
    /// celery-exporter labels it).
    pub fn new(node: &str) -> Self {
        let hostname = node
            .split_once('@')
            .map_or(node, |(_, host)| host)
            .to_owned();
        let mut metrics = Self {
            registry: Registry::default(),
            hostname,
            received: Family::default(),
            started: Family::default(),
            succeeded: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            revoked: Family::default(),
            rejected: Family::default(),
            runtime: Family::new_with_constructor(runtime_histogram),
            worker_up: Family::default(),
            tasks_active: Family::default(),
            queue_length: Family::default(),
            fuel_used: Family::new_with_constructor(fuel_histogram),
            limits_exceeded: Family::default(),
            dead_lettered: Family::default(),
            tenant_tasks: Family::default(),
            events_dropped: Counter::default(),
            consuming: Gauge::default(),
            plugins_served: Gauge::default(),
            plugins_refused: Gauge::default(),
            concurrency: Family::default(),
            concurrency_max: Family::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "celery_task_received",
            "Tasks received by the worker",
            self.received.clone(),
        );
        r.register(
            "celery_task_started",
            "Tasks started in a sandbox",
            self.started.clone(),
        );
        r.register(
            "celery_task_succeeded",
            "Tasks that succeeded",
            self.succeeded.clone(),
        );
        r.register(
            "celery_task_failed",
            "Tasks that failed, by exception",
            self.failed.clone(),
        );
        r.register(
            "celery_task_retried",
            "Tasks sent back for a retry",
            self.retried.clone(),
        );
        r.register(
            "celery_task_revoked",
            "Tasks revoked, terminated or expired",
            self.revoked.clone(),
        );
        r.register(
            "celery_task_rejected",
            "Tasks that rejected their message",
            self.rejected.clone(),
        );
        r.register(
            "celery_task_runtime",
            "Run time of succeeded tasks, in seconds",
            self.runtime.clone(),
        );
        r.register(
            "celery_worker_up",
            "1 while the worker runs",
            self.worker_up.clone(),
        );
        r.register(
            "celery_worker_tasks_active",
            "Tasks running now",
            self.tasks_active.clone(),
        );
        r.register(
            "celery_queue_length",
            "Messages waiting in each consumed queue",
            self.queue_length.clone(),
        );
        r.register(
            "wasmq_task_fuel_used",
            "Fuel each finished run used: guest instructions, roughly, under fuel metering; \
             its CPU time at 10^10 per second under CPU-time metering (the default)",
            self.fuel_used.clone(),
        );
        r.register(
            "wasmq_sandbox_limit_exceeded",
            "Runs stopped by a sandbox limit: fuel, memory, time, stack or output",
            self.limits_exceeded.clone(),
        );
        r.register(
            "wasmq_dead_lettered",
            "Messages dead-lettered, by the exception that set them aside",
            self.dead_lettered.clone(),
        );
        r.register(
            "wasmq_tenant_tasks",
            "Tasks finished per tenant, by state",
            self.tenant_tasks.clone(),
        );
        r.register(
            "wasmq_events_dropped",
            "Task events dropped because the event buffer was full or the broker refused them",
            self.events_dropped.clone(),
        );
        r.register(
            "wasmq_consuming",
            "1 while every worker of the process consumes from its broker",
            self.consuming.clone(),
        );
        r.register(
            "wasmq_plugins_served",
            "Plugins the worker serves",
            self.plugins_served.clone(),
        );
        r.register(
            "wasmq_worker_concurrency",
            "Task slots the worker may use now (moved by the autoscaler and pool_grow/shrink)",
            self.concurrency.clone(),
        );
        r.register(
            "wasmq_worker_concurrency_max",
            "Task slots the worker was started with (the autoscaler's maximum)",
            self.concurrency_max.clone(),
        );
        r.register(
            "wasmq_plugins_refused",
            "Plugin files or releases refused (bad signature, broken file…)",
            self.plugins_refused.clone(),
        );
    }

    fn task(&self, name: &str, queue: &str) -> TaskLabels {
        TaskLabels {
            name: name.to_owned(),
            hostname: self.hostname.clone(),
            queue_name: queue.to_owned(),
        }
    }

    /// A message of task `name` was taken from `queue`.
    pub fn task_received(&self, name: &str, queue: &str) {
        self.received.get_or_create(&self.task(name, queue)).inc();
    }

    /// Task `name` from `queue` starts in its sandbox.
    pub fn task_started(&self, name: &str, queue: &str) {
        self.started.get_or_create(&self.task(name, queue)).inc();
    }

    /// A run of task `name` ended after `seconds`, having used `fuel`; `limit` names the
    /// sandbox limit that stopped it, if one did (`fuel`, `memory`, `time`, `stack`,
    /// `output`).
    pub fn task_ran(
        &self,
        name: &str,
        queue: &str,
        seconds: f64,
        succeeded: bool,
        fuel: u64,
        limit: Option<&str>,
    ) {
        if succeeded {
            self.runtime
                .get_or_create(&self.task(name, queue))
                .observe(seconds);
        }
        self.fuel_used
            .get_or_create(&NameLabels {
                name: name.to_owned(),
            })
            .observe(fuel as f64);
        if let Some(limit) = limit {
            self.limits_exceeded
                .get_or_create(&LimitLabels {
                    name: name.to_owned(),
                    limit: limit.to_owned(),
                })
                .inc();
        }
    }

    /// Task `name` from `queue` of `tenant` ended as `end`.
    pub fn task_finished(&self, tenant: &str, name: &str, queue: &str, end: TaskEnd<'_>) {
        let labels = self.task(name, queue);
        match end {
            TaskEnd::Succeeded => self.succeeded.get_or_create(&labels).inc(),
            TaskEnd::Retried => self.retried.get_or_create(&labels).inc(),
            TaskEnd::Revoked => self.revoked.get_or_create(&labels).inc(),
            TaskEnd::Rejected => self.rejected.get_or_create(&labels).inc(),
            TaskEnd::Failed(exception) => self
                .failed
                .get_or_create(&FailedLabels {
                    name: labels.name,
                    hostname: labels.hostname,
                    exception: exception.to_owned(),
                    queue_name: labels.queue_name,
                })
                .inc(),
        };
        self.tenant_tasks
            .get_or_create(&TenantTaskLabels {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                state: end.state().to_owned(),
            })
            .inc();
    }

    /// A message of `queue` was dead-lettered because of `reason` (the exception type).
    pub fn dead_lettered(&self, queue: &str, reason: &str) {
        self.dead_lettered
            .get_or_create(&DeadLetterLabels {
                queue_name: queue.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The worker's state now: whether it runs and consumes, and the tasks running.
    pub fn set_worker(&self, up: bool, consuming: bool, active: usize) {
        let host = HostLabels {
            hostname: self.hostname.clone(),
        };
        self.worker_up.get_or_create(&host).set(i64::from(up));
        self.tasks_active.get_or_create(&host).set(active as i64);
        self.consuming.set(i64::from(consuming));
    }

    /// The task slots `tenant`'s worker may use now, and the most it was started with.
    pub fn set_concurrency(&self, tenant: &str, now: usize, max: usize) {
        let labels = SlotLabels {
            hostname: self.hostname.clone(),
            tenant: tenant.to_owned(),
        };
        self.concurrency
            .get_or_create(&labels)
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        self.concurrency_max
            .get_or_create(&labels)
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Plugins served and refused now.
    pub fn set_plugins(&self, served: usize, refused: usize) {
        self.plugins_served.set(served as i64);
        self.plugins_refused.set(refused as i64);
    }

    /// Messages waiting in `queue` now.
    pub fn set_queue_length(&self, queue: &str, length: u64) {
        self.queue_length
            .get_or_create(&QueueLabels {
                queue_name: queue.to_owned(),
            })
            .set(i64::try_from(length).unwrap_or(i64::MAX));
    }

    /// Task events dropped so far (a running total; the counter follows it).
    pub fn set_events_dropped(&self, total: u64) {
        let counted = self.events_dropped.get();
        if total > counted {
            self.events_dropped.inc_by(total - counted);
        }
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_exporter_names_labels_and_buckets() {
        let metrics = Metrics::new("wasmq@box");
        metrics.task_received("math.add", "celery");
        metrics.task_started("math.add", "celery");
        metrics.task_ran("math.add", "celery", 0.002, true, 12_345, None);
        metrics.task_finished("-", "math.add", "celery", TaskEnd::Succeeded);
        metrics.task_ran("math.div", "celery", 0.001, false, 10, None);
        metrics.task_finished(
            "-",
            "math.div",
            "celery",
            TaskEnd::Failed("ZeroDivisionError"),
        );
        metrics.task_ran("hostile.spin", "celery", 1.0, false, 10, Some("fuel"));
        metrics.set_worker(true, true, 0);
        metrics.set_queue_length("celery", 7);
        let text = metrics.encode();
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        };
        has(r#"celery_task_received_total{name="math.add",hostname="box",queue_name="celery"} 1"#);
        has(r#"celery_task_succeeded_total{name="math.add",hostname="box",queue_name="celery"} 1"#);
        has(
            r#"celery_task_failed_total{name="math.div",hostname="box",exception="ZeroDivisionError",queue_name="celery"} 1"#,
        );
        has(
            r#"celery_task_runtime_bucket{le="0.005",name="math.add",hostname="box",queue_name="celery"} 1"#,
        );
        has(r#"celery_worker_up{hostname="box"} 1"#);
        has(r#"celery_queue_length{queue_name="celery"} 7"#);
        has(r#"wasmq_sandbox_limit_exceeded_total{name="hostile.spin",limit="fuel"} 1"#);
        has(r#"wasmq_tenant_tasks_total{tenant="-",name="math.add",state="SUCCESS"} 1"#);
        assert!(text.ends_with("# EOF\n"));
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("celery_task_runtime_bucket{"))
            .count();
        assert_eq!(buckets, RUNTIME_BUCKETS.len() + 1, "{text}");
    }
}
