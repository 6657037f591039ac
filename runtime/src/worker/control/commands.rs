//! What remote control changes in the worker (`celery/worker/control.py`'s control
//! commands), with Celery's reply strings: revocations, rate and time limits per task,
//! the queues consumed, and the number of task slots.
//!
//! The slot count moves within what the worker started with: its sandbox pool is sized
//! for that many instances when the process starts, so `pool_shrink` lowers the worker's
//! cap (running tasks finish; none is interrupted) and `pool_grow` raises it again up to
//! the starting concurrency, never beyond — that is an error reply naming the limit.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::super::Shared;
use super::super::overrides::TimeLimits;
use super::{error, ok, text};
use crate::broker::Revocation;
use crate::policy::RateLimit;
use crate::protocol::control::{python_repr, python_set_repr};
use crate::results::{ResultMeta, TaskState};

/// The ids of a `revoke`: one id or a list.
pub(super) fn task_ids(arguments: &Map<String, Value>) -> Vec<String> {
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

/// How long a worker that is not running a task waits, after a `terminate` revoke, before
/// it stores REVOKED for it: the worker running it answers first, with "terminated".
const TERMINATE_GRACE: Duration = Duration::from_secs(1);

/// Celery's `_revoke`: remembers the ids, interrupts running copies when `terminate`, and
/// stores REVOKED for every id that is not running here and has no state yet (PENDING or
/// RETRY); a task another worker started keeps its state.
///
/// One departure from Celery: a revoke is broadcast to every worker, and without
/// `track_started` a task running on another worker still reads PENDING here. Celery's
/// workers then store REVOKED "revoked" at once, racing the running worker's "terminated"
/// (a client's `get()` sees whichever comes first). After a `terminate` revoke, a worker
/// that is not running the task waits [`TERMINATE_GRACE`] and stores REVOKED only if the
/// task still has no result; a plain revoke is marked at once, as Celery does.
pub(super) async fn revoke(shared: &Arc<Shared>, ids: Vec<String>, terminate: bool) -> Value {
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
    let elsewhere: Vec<String> = ids
        .iter()
        .filter(|id| !shared.running.is_running(id))
        .cloned()
        .collect();
    if terminate {
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            tokio::time::sleep(TERMINATE_GRACE).await;
            for id in &elsewhere {
                mark_revoked_unless_started(&shared, id).await;
            }
        });
    } else {
        for id in &elsewhere {
            mark_revoked_unless_started(shared, id).await;
        }
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
pub(super) fn revoke_by_stamped_headers(shared: &Shared, arguments: &Map<String, Value>) -> Value {
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

/// Celery's `rate_limit`: `{"task_name", "rate_limit"}`; a rate of `0`, an empty string
/// or null disables the task's rate limit.
pub(super) fn rate_limit(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let rate = match arguments.get("rate_limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => None,
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "0" => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let parsed = match rate.as_deref().map(RateLimit::parse).transpose() {
        Ok(parsed) => parsed,
        Err(why) => {
            return error(format!(
                "Invalid rate limit string: ValueError({})",
                python_repr(&Value::from(why))
            ));
        }
    };
    let Some(task) = known_task(shared, arguments) else {
        tracing::error!(task = ?text(arguments, "task_name"), "rate limit attempt for an unknown task");
        return error("unknown task");
    };
    shared.control.overrides.set_rate_limit(task, parsed);
    match rate {
        None => {
            tracing::info!(task, "rate limits disabled (remote control)");
            ok("rate limit disabled successfully")
        }
        Some(rate) => {
            tracing::info!(task, %rate, "new rate limit (remote control)");
            ok("new rate limit set successfully")
        }
    }
}

/// Celery's `time_limit`: `{"task_name", "soft", "hard"}` in seconds (null: none; for the
/// hard limit, the task's own), used from the task's next run on.
pub(super) fn time_limit(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let seconds = |name: &str| -> Result<Option<std::time::Duration>, Value> {
        let value = match arguments.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        match value {
            Some(0.0) => Ok(None),
            Some(v) => std::time::Duration::try_from_secs_f64(v)
                .map(Some)
                .map_err(|_| error(format!("{name} must be a non-negative number of seconds"))),
            None => Err(error(format!("{name} must be a number of seconds"))),
        }
    };
    let limits = match (seconds("soft"), seconds("hard")) {
        (Ok(soft), Ok(hard)) => TimeLimits { soft, hard },
        (Err(reply), _) | (_, Err(reply)) => return reply,
    };
    let Some(task) = known_task(shared, arguments) else {
        tracing::error!(task = ?text(arguments, "task_name"), "time limit attempt for an unknown task");
        return error("unknown task");
    };
    shared.control.overrides.set_time_limits(task, limits);
    tracing::info!(task, soft = ?limits.soft, hard = ?limits.hard,
        "new time limits (remote control)");
    ok("time limits set successfully")
}

/// The `task_name` argument when it names a task this worker serves.
fn known_task<'a>(shared: &Shared, arguments: &'a Map<String, Value>) -> Option<&'a str> {
    text(arguments, "task_name").filter(|task| shared.registry.lookup(task).is_some())
}

/// Celery's `add_consumer`: starts consuming `queue` (declared as the worker declares its
/// queues; `exchange`, `routing_key` and the other arguments are not used).
pub(super) fn add_consumer(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let Some(queue) = text(arguments, "queue").map(str::trim) else {
        return error("add_consumer needs a queue");
    };
    if let Err(why) = check_queue_name(queue) {
        return error(why);
    }
    let Some(subscriptions) = shared.control.subscriptions.get() else {
        return error("this worker's consumer cannot change its queues");
    };
    if subscriptions.add(queue) {
        tracing::info!(queue, "consuming a new queue (remote control)");
        ok(format!("add consumer {queue}"))
    } else {
        ok(format!("already consuming from {queue}"))
    }
}

/// Celery's `cancel_consumer`: stops consuming `queue`.
pub(super) fn cancel_consumer(shared: &Shared, arguments: &Map<String, Value>) -> Value {
    let Some(queue) = text(arguments, "queue") else {
        return error("cancel_consumer needs a queue");
    };
    let Some(subscriptions) = shared.control.subscriptions.get() else {
        return error("this worker's consumer cannot change its queues");
    };
    if subscriptions.cancel(queue) {
        tracing::info!(queue, "no longer consuming a queue (remote control)");
    }
    // Celery answers the same whether it consumed the queue or not.
    ok(format!("no longer consuming from {queue}"))
}

/// Why a queue name cannot be consumed (RabbitMQ refuses `amq.` names and names longer
/// than 255 bytes; an empty name is the server's own naming).
fn check_queue_name(queue: &str) -> Result<(), String> {
    if queue.is_empty() {
        Err("add_consumer needs a queue".to_owned())
    } else if queue.len() > 255 {
        Err(format!(
            "queue name too long ({} bytes, at most 255)",
            queue.len()
        ))
    } else if queue.starts_with("amq.") {
        Err(format!(
            "queue names starting with amq. are reserved: {queue}"
        ))
    } else {
        Ok(())
    }
}

/// Celery's `pool_grow` / `pool_shrink` (`{"n": count}`, 1 by default): moves the
/// worker's slot cap by `n`, within 1 and the concurrency it started with.
pub(super) fn pool_resize(shared: &Shared, arguments: &Map<String, Value>, grow: bool) -> Value {
    let n = match arguments.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match n.as_u64().or_else(|| {
            // A whole float (`1.0`) counts too.
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => return error("n must be a non-negative whole number"),
        },
        Some(Value::String(s)) => match s.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => return error("n must be a non-negative whole number"),
        },
        Some(_) => return error("n must be a non-negative whole number"),
    };
    let started = shared.options.concurrency.max(1);
    let now = shared.slots.max_concurrency(shared.seat);
    let wanted = if grow {
        now.saturating_add(n)
    } else {
        now.saturating_sub(n)
    };
    if grow && wanted > started {
        return error(format!(
            "cannot grow the pool to {wanted}: a wasmq worker runs at most the {started} \
             task slots it started with (its sandbox pool is sized when it starts)"
        ));
    }
    if !grow && wanted < 1 {
        return error(format!(
            "cannot shrink the pool to {wanted}: a wasmq worker keeps at least one task slot"
        ));
    }
    let cap = shared.slots.set_max_concurrency(shared.seat, wanted);
    super::super::observe::concurrency(shared);
    tracing::info!(slots = cap, "task slots changed (remote control)");
    ok(if grow {
        "pool will grow"
    } else {
        "pool will shrink"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_rabbitmq_refuses_are_refused_first() {
        assert!(check_queue_name("q2").is_ok());
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("amq.gen-x").is_err());
        assert!(check_queue_name(&"q".repeat(256)).is_err());
    }
}
