//! What the worker reports to Celery's `inspect` (`celery/worker/control.py`'s inspect
//! commands), in the shapes Celery's own worker gives them, so Flower, celery-exporter and
//! `celery inspect` read a wasmq worker as they read a Celery one.

use std::sync::atomic::Ordering;

use serde_json::{Map, Value, json};

use super::super::Shared;
use super::super::held::HeldTask;
use super::super::run::ActiveTask;
use super::{error, text};
use crate::broker::Revocation;
use crate::engine::Limits;
use crate::policy::RateLimit;
use crate::protocol::control::python_repr;
use crate::protocol::format_time;

/// `inspect active`: the running tasks.
pub(super) fn active(shared: &Shared, safe: bool) -> Value {
    let running = shared.running.snapshot();
    Value::Array(
        running
            .iter()
            .map(|task| task_info(shared, task, safe))
            .collect(),
    )
}

/// `inspect reserved`: deliveries received and held before they run (an eta less than a
/// second away, a rate-limit turn).
pub(super) fn reserved(shared: &Shared, safe: bool) -> Value {
    let held = shared.control.held.snapshot();
    Value::Array(
        held.iter()
            .map(|held| task_info(shared, &held.task, safe))
            .collect(),
    )
}

/// `inspect scheduled`: held deliveries waiting for their eta, as
/// `{"eta", "priority", "request"}`.
pub(super) fn scheduled(shared: &Shared, safe: bool) -> Value {
    let held = shared.control.held.snapshot();
    Value::Array(
        held.iter()
            .filter_map(|HeldTask { task, eta }| {
                eta.map(|eta| {
                    json!({
                        "eta": format_time(&eta),
                        "priority": task.priority.unwrap_or(0),
                        "request": task_info(shared, task, safe),
                    })
                })
            })
            .collect(),
    )
}

/// `inspect query_task`: `{id: [state, info]}` for the given ids this worker holds
/// (`active` when running, `reserved` when held).
pub(super) fn query_task(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let ids: Vec<&str> = match arguments.get("ids") {
        Some(Value::String(id)) => vec![id.as_str()],
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_str).collect(),
        _ => return error("query_task needs ids"),
    };
    let mut found = Map::new();
    for task in shared.running.snapshot() {
        if ids.contains(&task.id.as_str()) {
            found.insert(
                task.id.clone(),
                json!(["active", task_info(shared, &task, false)]),
            );
        }
    }
    for held in shared.control.held.snapshot() {
        if ids.contains(&held.task.id.as_str()) && !found.contains_key(&held.task.id) {
            found.insert(
                held.task.id.clone(),
                json!(["reserved", task_info(shared, &held.task, false)]),
            );
        }
    }
    Value::Object(found)
}

/// `inspect registered`: the task names, sorted, each followed by the `taskinfoitems`
/// that have a value (Celery's default items: `exchange`, `routing_key`, `rate_limit`;
/// wasmq knows a task's rate limit), e.g. `math.add [rate_limit=2/s]`.
pub(super) fn registered(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let items: Vec<&str> = arguments
        .get("taskinfoitems")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .filter(|items: &Vec<&str>| !items.is_empty())
        .unwrap_or_else(|| vec!["exchange", "routing_key", "rate_limit"]);
    let mut names: Vec<String> = shared
        .registry
        .snapshot()
        .tasks()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    let described = names.into_iter().map(|name| {
        let rate = items
            .contains(&"rate_limit")
            .then(|| rate_limit_of(shared, &name))
            .flatten();
        match rate {
            Some(rate) => format!("{name} [rate_limit={}]", rate_text(rate)),
            None => name,
        }
    });
    json!(described.collect::<Vec<_>>())
}

/// The rate limit `task` runs under now: set by remote control, else its policy's.
fn rate_limit_of(shared: &Shared, task: &str) -> Option<RateLimit> {
    if let Some(set) = shared.control.overrides.rate_limit(task) {
        return set;
    }
    let plugin = shared.registry.lookup(task)?;
    shared
        .options
        .task_policies
        .resolve(
            &shared.options.retry,
            plugin.task(task).map(|t| &t.policy),
            task,
        )
        .rate_limit
}

/// A rate limit as Celery writes one: `2/s`, `10/m`, `1/h` (or a fraction per hour).
pub(super) fn rate_text(rate: RateLimit) -> String {
    let per_second = 1.0 / rate.interval.as_secs_f64();
    let trim = |n: f64| {
        let text = format!("{n:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    };
    if per_second >= 1.0 {
        format!("{}/s", trim(per_second))
    } else if per_second * 60.0 >= 1.0 {
        format!("{}/m", trim(per_second * 60.0))
    } else {
        format!("{}/h", trim(per_second * 3600.0))
    }
}

/// `inspect active_queues`: the queues consumed now (they change with `add_consumer` and
/// `cancel_consumer`).
pub(super) fn active_queues(shared: &Shared) -> Value {
    Value::Array(
        shared
            .control
            .queues(&shared.options.queues)
            .iter()
            .map(|queue| queue_info(queue))
            .collect(),
    )
}

/// `inspect stats`, with what Flower and celery-exporter read: `total` (tasks started per
/// name), `pool` (`max-concurrency` now, one `processes` entry per slot: every slot is this
/// process), `broker` (never its credentials), `prefetch_count`, `uptime`, `pid`, `clock`,
/// `rusage` (from `/proc` on Linux), and a `wasmq` section: limits, the queues consumed,
/// the plugins served and their release epoch, and the counters.
pub(super) fn stats(shared: &Shared) -> Value {
    let slots = shared.slots.max_concurrency(shared.seat);
    let pid = std::process::id();
    let config = shared.registry.sandbox().config();
    let snapshot = shared.registry.snapshot();
    let counters = &shared.stats;
    let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let mut stats = json!({
        "total": counters.started_by_task(),
        "pid": pid,
        "clock": shared.control.clock.load(Ordering::Relaxed).to_string(),
        "uptime": shared.started_at.elapsed().as_secs(),
        "pool": {
            "implementation": "wasmq:SandboxPool",
            "max-concurrency": slots,
            "processes": vec![pid; slots],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, config.defaults.timeout.as_secs_f64()],
        },
        "broker": broker_info(&shared.broker.describe()),
        "prefetch_count": shared.prefetch(),
        "rusage": super::rusage::rusage(),
        "wasmq": {
            "version": env!("CARGO_PKG_VERSION"),
            "tenant": shared.options.tenant_name(),
            "concurrency": shared.options.concurrency,
            "limits": {"defaults": limits(&config.defaults), "ceiling": limits(&config.ceiling)},
            "consuming": shared.control.queues(&shared.options.queues),
            "plugins": {"epoch": snapshot.epoch(), "served": snapshot.plugins()},
            "running": shared.running.len(),
            "held": shared.control.held.snapshot().len(),
            "revoked": shared.revoked.len(),
            "counters": {
                "received": count(&counters.received),
                "succeeded": count(&counters.succeeded),
                "failed": count(&counters.failed),
                "retried": count(&counters.retried),
                "dead_lettered": count(&counters.dead_lettered),
                "released": count(&counters.released),
                "revoked": count(&counters.revoked),
                "deferred": count(&counters.deferred),
            },
            "limit_hits": counters.limit_hits(),
        },
    });
    // Celery's `autoscaler` section, only when it autoscales (as Celery).
    if let Some(scaling) = &shared.scaling {
        stats["autoscaler"] = scaling.info();
    }
    stats
}

/// Sandbox limits as JSON.
fn limits(limits: &Limits) -> Value {
    json!({
        "fuel": limits.fuel,
        "memory_bytes": limits.memory_bytes,
        "timeout_s": limits.timeout.as_secs_f64(),
    })
}

/// `inspect conf`: the worker's settings under Celery's names where one exists, never a
/// credential (the broker and backend are shown as their descriptions, which hold none).
pub(super) fn conf(shared: &Shared) -> Value {
    let options = &shared.options;
    json!({
        "broker_url": shared.broker.describe(),
        "result_backend": shared.backend.describe(),
        "worker_concurrency": options.concurrency,
        "worker_prefetch_multiplier": options.prefetch_multiplier,
        "worker_hostname": options.node_name,
        "task_acks_late": true,
        "task_track_started": options.track_started,
        "task_queues": shared.control.queues(&options.queues),
        "worker_state_db": options.state_file,
        "wasmq_max_deliveries": options.max_deliveries,
        "wasmq_shutdown_timeout_s": options.shutdown_timeout.as_secs_f64(),
        "wasmq_tenant": options.tenant_name(),
    })
}

/// `inspect report`'s text (Celery: `app.bugreport()`).
pub(super) fn report(shared: &Shared) -> String {
    format!(
        "software -> wasmq:{} (Celery protocol 2)\nplatform -> system:{} arch:{}\n\
         node -> {}\nbroker -> {}\nresults -> {}\nqueues -> {}\nconcurrency -> {} \
         (wasmq:SandboxPool)\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        shared.options.node_name,
        shared.broker.describe(),
        shared.backend.describe(),
        shared.control.queues(&shared.options.queues).join(", "),
        shared.slots.max_concurrency(shared.seat),
    )
}

/// `hello` (Celery's mingle, sent by a Celery worker as it starts): takes the revocations
/// it sends, and answers ours as `{"revoked": {id: time as a float}, "clock": N}`; null to
/// our own node.
pub(super) fn hello(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    if text(arguments, "from_node") == Some(shared.options.node_name.as_str()) {
        return Value::Null;
    }
    if let Some(Value::Object(theirs)) = arguments.get("revoked") {
        for (id, at) in theirs {
            let at_ms = at.as_f64().map_or_else(
                || chrono::Utc::now().timestamp_millis(),
                |s| (s * 1000.0) as i64,
            );
            shared.revoked.insert(Revocation {
                task_id: id.clone(),
                terminate: false,
                revoked_at_ms: at_ms,
            });
        }
    }
    let mut ours = Map::new();
    for id in shared.revoked.ids() {
        let at_ms = shared
            .revoked
            .get(&id)
            .map_or(0, |revocation| revocation.revoked_at_ms);
        // Floats: Celery's LimitedSet refuses integers.
        let at =
            serde_json::Number::from_f64(at_ms as f64 / 1000.0).map_or(Value::Null, Value::Number);
        ours.insert(id, at);
    }
    json!({"revoked": ours, "clock": shared.control.clock.load(Ordering::Relaxed)})
}

/// kombu's `Connection.info()` of the broker, from its description (which holds no
/// credentials): `amqp://host:port/vhost` or `sqlite://path`.
fn broker_info(described: &str) -> Value {
    let (transport, rest) = described.split_once("://").unwrap_or(("", described));
    if transport == "sqlite" {
        // A file, not a server: its path is where the broker is.
        return json!({
            "transport": transport,
            "hostname": "localhost",
            "port": null,
            "virtual_host": rest,
            "ssl": false,
            "uri_prefix": null,
            "insist": false,
            "login_method": null,
            "userid": null,
        });
    }
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (hostname, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().ok()),
        None => (authority, None),
    };
    json!({
        "transport": transport,
        "hostname": hostname,
        "port": port,
        "virtual_host": vhost.replace("%2f", "/").replace("%2F", "/"),
        "ssl": transport == "amqps",
        "uri_prefix": null,
        "insist": false,
        "login_method": null,
        "userid": null,
    })
}

/// A task as Celery's `Request.info()` describes it; with `safe`, the arguments as their
/// `repr()` (what Flower asks for). `time_start` is none for a task not started yet.
pub(super) fn task_info(shared: &Shared, task: &ActiveTask, safe: bool) -> Value {
    let (args, kwargs) = if safe {
        (
            Value::from(python_repr(&Value::Array(task.args.clone()))),
            Value::from(python_repr(&Value::Object(task.kwargs.clone()))),
        )
    } else {
        (
            Value::Array(task.args.clone()),
            Value::Object(task.kwargs.clone()),
        )
    };
    json!({
        "id": task.id,
        "name": task.name,
        "args": args,
        "kwargs": kwargs,
        "type": task.name,
        "hostname": shared.options.node_name,
        "time_start": task.started_at,
        // Acks are late: a message is acknowledged once its result is stored.
        "acknowledged": false,
        "delivery_info": {
            "exchange": "",
            "routing_key": task.queue,
            "priority": task.priority,
            "redelivered": task.redelivered,
        },
        "worker_pid": std::process::id(),
    })
}

/// A consumed queue as kombu's `Queue.as_dict(recurse=True)` describes it (wasmq declares
/// a durable queue bound to a durable direct exchange of the same name, as Celery does).
fn queue_info(queue: &str) -> Value {
    json!({
        "name": queue,
        "exchange": {
            "name": queue, "type": "direct", "arguments": null, "durable": true,
            "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false,
        },
        "routing_key": queue,
        "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null,
        "message_ttl": null, "max_length": null, "max_length_bytes": null,
        "max_priority": null,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limits_are_written_as_celery_writes_them() {
        let rate = |text: &str| rate_text(RateLimit::parse(text).unwrap());
        assert_eq!(rate("2/s"), "2/s");
        assert_eq!(rate("100"), "100/s");
        assert_eq!(rate("10/m"), "10/m");
        assert_eq!(rate("1/h"), "1/h");
        assert_eq!(
            rate_text(RateLimit {
                interval: Duration::from_millis(400)
            }),
            "2.5/s"
        );
    }

    #[test]
    fn broker_info_holds_no_credentials() {
        let info = broker_info("amqp://127.0.0.1:5672/%2f");
        assert_eq!(info["hostname"], "127.0.0.1");
        assert_eq!(info["port"], 5672);
        assert_eq!(info["virtual_host"], "/");
        assert_eq!(info["userid"], Value::Null);
        let file = broker_info("sqlite://.wasmq/wasmq.db");
        assert_eq!(file["transport"], "sqlite");
        assert_eq!(file["hostname"], "localhost");
        assert_eq!(file["virtual_host"], ".wasmq/wasmq.db");
    }
}
