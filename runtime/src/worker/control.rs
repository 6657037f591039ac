//! Remote control: the worker's answers to Celery's `inspect` and `control` commands
//! (`celery/worker/control.py`), which its broker hands over as [`ControlRequest`]s.
//!
//! Commands are answered on a task of their own, never behind the task slots, so `inspect
//! ping` answers while every slot is busy. A command wasmq does not know yet is answered
//! with an error naming it (Celery answers unknown commands the same way), never dropped.
//!
//! Served: `ping`; `revoke` and `terminate` (the ids are remembered, running copies are
//! interrupted with `terminate`, an id no worker has started is stored REVOKED at once, as
//! Celery 5.6+ does, and the revocation is broadcast again on the broker's durable
//! revocations for workers that are down); `revoke_by_stamped_headers`; `active`; `revoked`; `registered`;
//! `active_queues`; `enable_events`, `disable_events` and `heartbeat` (see `events`).

use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::Shared;
use super::run::ActiveTask;
use crate::broker::{ControlRequest, Revocation};
use crate::protocol::ControlCommand;
use crate::protocol::control::{python_repr, python_set_repr};
use crate::results::{ResultMeta, TaskState};

/// Answers `requests` until the broker stops handing them over.
pub(super) async fn serve(shared: Arc<Shared>, mut requests: mpsc::Receiver<ControlRequest>) {
    while let Some(ControlRequest { command, reply }) = requests.recv().await {
        if command.method == "shutdown" {
            // As Celery's worker: a graceful shutdown (as on SIGTERM), and no reply.
            tracing::warn!("remote control: shutting down");
            shared.shutdown_requested.notify_one();
            continue;
        }
        let answer = answer(&shared, &command).await;
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }
}

/// Celery's `ok(value)` reply.
fn ok(value: impl Into<Value>) -> Value {
    json!({ "ok": value.into() })
}

/// Celery's `error(value)` reply.
fn error(value: impl Into<Value>) -> Value {
    json!({ "error": value.into() })
}

/// The reply to `command`.
async fn answer(shared: &Shared, command: &ControlCommand) -> Value {
    let arguments = &command.arguments;
    match command.method.as_str() {
        "ping" => ok("pong"),
        "revoke" => {
            let terminate = arguments
                .get("terminate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            revoke(shared, task_ids(arguments), terminate).await
        }
        "terminate" => revoke(shared, task_ids(arguments), true).await,
        "revoke_by_stamped_headers" => revoke_by_stamped_headers(shared, arguments),
        "active" => {
            let safe = arguments
                .get("safe")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Value::Array(
                shared
                    .running
                    .snapshot()
                    .iter()
                    .map(|task| task_info(shared, task, safe))
                    .collect(),
            )
        }
        "revoked" => json!(shared.revoked.ids()),
        "stats" => stats(shared),
        "registered" => {
            let mut names: Vec<String> = shared
                .registry
                .snapshot()
                .tasks()
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            names.sort();
            json!(names)
        }
        "enable_events" => ok(if shared.events.set_task_events(true) {
            "task events already enabled"
        } else {
            "task events enabled"
        }),
        "disable_events" => ok(if shared.events.set_task_events(false) {
            "task events disabled"
        } else {
            "task events already disabled"
        }),
        "heartbeat" => {
            shared.events.heartbeat_now(shared).await;
            Value::Null
        }
        "active_queues" => Value::Array(
            shared
                .options
                .queues
                .iter()
                .map(|queue| queue_info(queue))
                .collect(),
        ),
        other => error(format!(
            "wasmq does not answer the remote-control command {other:?} yet"
        )),
    }
}

/// Celery's `inspect stats` reply, with what Flower and celery-exporter read: `total`
/// (tasks started per name), `pool` (`max-concurrency`, one `processes` entry per slot:
/// every slot is this process), `broker` (never its credentials), `prefetch_count`,
/// `uptime`, `pid`.
fn stats(shared: &Shared) -> Value {
    let options = &shared.options;
    let slots = options.concurrency.max(1);
    let pid = std::process::id();
    let limits = shared.registry.sandbox().config().defaults;
    json!({
        "total": shared.stats.started_by_task(),
        "pid": pid,
        "clock": "0",
        "uptime": shared.started_at.elapsed().as_secs(),
        "pool": {
            "implementation": "wasmq:SandboxPool",
            "max-concurrency": slots,
            "processes": vec![pid; slots],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, limits.timeout.as_secs_f64()],
        },
        "broker": broker_info(&shared.broker.describe()),
        "prefetch_count": shared.prefetch(),
    })
}

/// kombu's `Connection.info()` of the broker, from its description (which holds no
/// credentials): `amqp://host:port/vhost` or `sqlite://path`.
fn broker_info(described: &str) -> Value {
    let (transport, rest) = described.split_once("://").unwrap_or(("", described));
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

/// The ids of a `revoke`: one id or a list.
fn task_ids(arguments: &Map<String, Value>) -> Vec<String> {
    let mut ids = match arguments.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    ids.dedup();
    ids
}

/// Celery's `_revoke`: remembers the ids, interrupts running copies when `terminate`, and
/// stores REVOKED for every id that is not running here and has no state yet (PENDING or
/// RETRY); a task another worker started keeps its state.
async fn revoke(shared: &Shared, ids: Vec<String>, terminate: bool) -> Value {
    for id in &ids {
        let revocation = Revocation::now(id.clone(), terminate);
        if shared.revoked.insert(revocation.clone()) {
            tracing::info!(task_id = %id, terminate, "task revoked (remote control)");
        }
        // Remote control is transient: broadcast it again on the broker's durable
        // revocations, so workers that are down now still refuse the task when they start.
        if let Err(error) = shared.broker.revoke(&revocation).await {
            tracing::warn!(task_id = %id, error = &error as &dyn std::error::Error,
                "cannot keep a remote-control revocation for workers that are down");
        }
    }
    for id in ids.iter().filter(|id| !shared.running.is_running(id)) {
        mark_revoked_unless_started(shared, id).await;
    }
    if terminate {
        let terminated: Vec<&str> = ids
            .iter()
            .filter(|id| shared.running.cancel(id))
            .map(String::as_str)
            .collect();
        for id in &terminated {
            tracing::warn!(task_id = %id, "terminating the running task (revoked)");
        }
        return if terminated.is_empty() {
            ok("terminate: tasks unknown")
        } else {
            ok(format!("terminate: {}", terminated.join(", ")))
        };
    }
    ok(format!(
        "tasks {} flagged as revoked",
        python_set_repr(ids.iter().map(String::as_str))
    ))
}

/// Stores REVOKED for `task_id` unless it already has a result or another worker has
/// started it (its state is then left to that worker).
async fn mark_revoked_unless_started(shared: &Shared, task_id: &str) {
    let state = match shared.backend.get(task_id).await {
        Ok(meta) => meta.map_or(TaskState::Pending, |meta| meta.status),
        Err(error) => {
            tracing::warn!(
                task_id,
                error = &error as &dyn std::error::Error,
                "cannot read the state of a revoked task"
            );
            return;
        }
    };
    let waiting = matches!(state, TaskState::Pending | TaskState::Retry)
        || matches!(&state, TaskState::Custom(name) if name == "RECEIVED" || name == "REJECTED");
    if !waiting {
        return;
    }
    if let Err(error) = shared
        .backend
        .store(&ResultMeta::revoked(task_id, "revoked"), None)
        .await
    {
        tracing::warn!(
            task_id,
            error = &error as &dyn std::error::Error,
            "cannot store a revoked task's state"
        );
    }
}

/// Celery's `revoke_by_stamped_headers`: tasks carrying any of these stamps are not run
/// (and interrupted with `terminate`). `headers` is `{header: value or [values]}`, or a
/// list of `"header=value"`.
fn revoke_by_stamped_headers(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let headers: Map<String, Value> = match arguments.get("headers") {
        Some(Value::Object(headers)) => headers.clone(),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|pair| pair.split_once('='))
            .map(|(header, value)| (header.to_owned(), Value::from(value)))
            .collect(),
        _ => return error("revoke_by_stamped_headers needs headers"),
    };
    shared.revoked.revoke_stamps(&headers);
    let shown = python_repr(&Value::Object(headers));
    tracing::info!(headers = %shown, "stamped headers revoked (remote control)");
    let terminate = arguments
        .get("terminate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !terminate {
        return ok(format!(
            "headers {shown} flagged as revoked, but not terminated"
        ));
    }
    let terminated = shared.running.cancel_stamped(&shared.revoked);
    if terminated.is_empty() {
        return ok(format!("headers {shown} were not terminated"));
    }
    let mut by_header: Map<String, Value> = Map::new();
    for (header, value) in terminated {
        let entry = by_header
            .entry(header)
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry
            && !values.contains(&value)
        {
            values.push(value);
        }
    }
    ok(format!(
        "headers {} revoked",
        python_repr(&Value::Object(by_header))
    ))
}

/// A running task as Celery's `Request.info()` describes it; with `safe`, the arguments
/// as their `repr()` (what Flower asks for).
fn task_info(shared: &Shared, task: &ActiveTask, safe: bool) -> Value {
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
