//! Remote control: the worker's answers to Celery's `inspect` and `control` commands
//! (`celery/worker/control.py`), which its broker hands over as [`ControlRequest`]s.
//!
//! Commands are answered on a task of their own, never behind the task slots, so `inspect
//! ping` answers while every slot is busy. A command wasmq does not know, or one whose
//! arguments do not fit, is answered with an error naming it (Celery answers unknown
//! commands the same way), never dropped and never fatal to the worker.
//!
//! * this file — serving requests, and which method goes where;
//! * [`inspect`] — what the worker reports: `ping`, `stats`, `active`, `reserved`,
//!   `scheduled`, `query_task`, `revoked`, `registered`, `active_queues`, `conf`, `clock`,
//!   `report`, `hello`;
//! * [`commands`] — what changes the worker: `revoke`, `terminate`,
//!   `revoke_by_stamped_headers`, `rate_limit`, `time_limit`, `add_consumer`,
//!   `cancel_consumer`, `pool_grow`, `pool_shrink`, `autoscale`, `pool_restart`
//!   (and `shutdown`, handled here: it has no reply).
//!
//! `enable_events`, `disable_events` (Flower sends it every few seconds) and `heartbeat`
//! switch and send Celery events (see `super::events`).

mod commands;
mod inspect;
mod rusage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::Shared;
use super::held::HeldDeliveries;
use super::overrides::Overrides;
use crate::broker::{ControlRequest, Subscriptions};
use crate::protocol::ControlCommand;

/// What remote control reads and changes beside the worker's own state.
#[derive(Debug, Default)]
pub(super) struct ControlState {
    /// Deliveries held before they run (`reserved`, `scheduled`).
    pub(super) held: HeldDeliveries,
    /// Rate and time limits set at runtime.
    pub(super) overrides: Overrides,
    /// The consumer's queues, once it consumes (`add_consumer`, `cancel_consumer`).
    pub(super) subscriptions: OnceLock<Subscriptions>,
    /// The worker's logical clock: one tick per command answered.
    pub(super) clock: AtomicU64,
}

impl ControlState {
    /// The queues consumed now: the consumer's, else the configured ones.
    pub(super) fn queues(&self, configured: &[String]) -> Vec<String> {
        self.subscriptions
            .get()
            .map_or_else(|| configured.to_vec(), Subscriptions::current)
    }
}

/// Answers `requests` until the broker stops handing them over. It runs on the control
/// plane; a command that talks to the broker or the result backend (`revoke`,
/// `terminate`) is answered on the worker's runtime `main`, so the connections it may open
/// belong to the runtime that outlives the control plane.
pub(super) async fn serve(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<ControlRequest>,
    main: tokio::runtime::Handle,
) {
    while let Some(ControlRequest { command, reply }) = requests.recv().await {
        shared.control.clock.fetch_add(1, Ordering::Relaxed);
        if command.method == "shutdown" {
            // As Celery's worker: a graceful shutdown (as on SIGTERM), and no reply.
            tracing::warn!("remote control: shutting down");
            shared.shutdown_requested.notify_one();
            continue;
        }
        let answer = if matches!(command.method.as_str(), "revoke" | "terminate") {
            let shared = Arc::clone(&shared);
            main.spawn(async move { answer(&shared, &command).await })
                .await
                .unwrap_or_else(|e| error(format!("the command failed: {e}")))
        } else {
            answer(&shared, &command).await
        };
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }
}

/// Celery's `ok(value)` reply.
fn ok(value: impl Into<Value>) -> Value {
    json!({ "ok": value.into() })
}

/// Celery's `error(value)` reply (`nok`).
fn error(value: impl Into<Value>) -> Value {
    json!({ "error": value.into() })
}

/// The reply to a command that does not fit wasmq (`memdump` and the like).
fn unsupported(method: &str) -> Value {
    error(format!("{method} is not supported by wasmq"))
}

/// The reply to `command`.
async fn answer(shared: &Arc<Shared>, command: &ControlCommand) -> Value {
    let arguments = &command.arguments;
    match command.method.as_str() {
        "ping" => ok("pong"),
        "stats" => inspect::stats(shared),
        "active" => inspect::active(shared, flag(arguments, "safe")),
        "reserved" => inspect::reserved(shared, flag(arguments, "safe")),
        "scheduled" => inspect::scheduled(shared, flag(arguments, "safe")),
        "query_task" => inspect::query_task(shared, arguments),
        "revoked" => json!(shared.revoked.ids()),
        "registered" => inspect::registered(shared, arguments),
        "active_queues" => inspect::active_queues(shared),
        "conf" => inspect::conf(shared),
        "clock" => json!({"clock": shared.control.clock.load(Ordering::Relaxed)}),
        "report" => ok(inspect::report(shared)),
        "hello" => inspect::hello(shared, arguments),
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
        "revoke" => {
            let terminate = flag(arguments, "terminate");
            commands::revoke(shared, commands::task_ids(arguments), terminate).await
        }
        "terminate" => commands::revoke(shared, commands::task_ids(arguments), true).await,
        "revoke_by_stamped_headers" => commands::revoke_by_stamped_headers(shared, arguments),
        "rate_limit" => commands::rate_limit(shared, arguments),
        "time_limit" => commands::time_limit(shared, arguments),
        "add_consumer" => commands::add_consumer(shared, arguments),
        "cancel_consumer" => commands::cancel_consumer(shared, arguments),
        method @ ("pool_grow" | "pool_shrink") if shared.scaling.is_some() => error(format!(
            "{method} is not supported with autoscale. Adjust autoscale range instead."
        )),
        "pool_grow" => commands::pool_resize(shared, arguments, true),
        "pool_shrink" => commands::pool_resize(shared, arguments, false),
        // Celery's reply when the worker does not autoscale.
        "autoscale" => super::scaling::set_bounds(shared, arguments)
            .unwrap_or_else(|| error("ValueError('Autoscale not enabled')")),
        // Plugins are reloaded as their folder or release changes; there is no pool of
        // processes to restart. Celery's reply when restarts are not enabled.
        "pool_restart" => error("ValueError('Pool restarts not enabled')"),
        method @ ("memsample" | "memdump" | "objgraph" | "dump_tasks") => unsupported(method),
        other => error(format!("KeyError('{}')", other.replace('\'', "\\'"))),
    }
}

/// A boolean argument (absent or not a boolean: false).
fn flag(arguments: &Map<String, Value>, name: &str) -> bool {
    arguments
        .get(name)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A text argument.
fn text<'a>(arguments: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    arguments.get(name).and_then(Value::as_str)
}
