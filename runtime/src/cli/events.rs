//! `wasmq events`: print Celery events as they happen — worker heartbeats and, from workers
//! with task events on, every task's progress — on either broker (RabbitMQ's `celeryev`
//! exchange, the embedded broker's `events` table). The default output reads as `celery
//! events --dump`'s; `--json` prints one event object a line.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::endpoints::{Endpoints, connect_broker};
use super::exit::Failure;
use crate::config::RawConfig;
use crate::protocol::events::Event;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub(super) struct EventsArgs {
    /// One JSON object a line instead of `celery events --dump`'s text.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<usize>,
    /// Stop after this long, e.g. 30s. Default: run until interrupted.
    #[arg(long)]
    timeout: Option<String>,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// Prints events until `--limit`, `--timeout` or Ctrl-C.
pub(super) async fn run(args: EventsArgs) -> Result<(), Failure> {
    let timeout = args
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| Failure::bad_input(format!("--timeout: {e}")))?;
    let config = args.endpoints.resolve(RawConfig::default())?;
    let broker = connect_broker(&config)?;
    let Some(mut messages) = broker
        .events()
        .await
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot listen for events: {e:#}")))?
    else {
        return Err(Failure::bad_input(format!(
            "{} carries no events",
            broker.describe()
        )));
    };
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut names = TaskNames::default();
    let mut printed = 0_usize;
    loop {
        let next = async {
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, messages.recv())
                    .await
                    .ok()
                    .flatten(),
                None => messages.recv().await,
            }
        };
        let message = tokio::select! {
            message = next => message,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(message) = message else {
            return Ok(());
        };
        for event in message.events() {
            if args.json {
                println!("{}", Value::Object(event.fields().clone()));
            } else {
                println!("{}", names.dump(&event));
            }
            printed += 1;
            if args.limit.is_some_and(|limit| printed >= limit) {
                return Ok(());
            }
        }
    }
}

/// Task names by id, learnt from `task-received`, as Celery's dumper remembers them.
#[derive(Default)]
struct TaskNames(HashMap<String, String>);

impl TaskNames {
    /// One line for `event`, as `celery events --dump` prints it:
    /// `wasmq@box [2026-12-01 09:00:00.123456] task succeeded: math.add(<id>) args=(2, 3)
    /// kwargs={} result=5, runtime=0.0001`.
    fn dump(&mut self, event: &Event) -> String {
        let mut fields: Map<String, Value> = event.fields().clone();
        let mut take = |key: &str| fields.remove(key).unwrap_or(Value::Null);
        let kind = text(&take("type"));
        let hostname = text(&take("hostname"));
        let timestamp = take("timestamp").as_f64().unwrap_or(0.0);
        let when = chrono::DateTime::from_timestamp_micros((timestamp * 1e6) as i64)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
            .unwrap_or_default();
        let shown_kind = match kind.as_str() {
            "worker-online" => "started".to_owned(),
            "worker-offline" => "shutdown".to_owned(),
            "worker-heartbeat" => "heartbeat".to_owned(),
            other => other.replace('-', " "),
        };
        let task = if kind.starts_with("task-") {
            let uuid = text(&take("uuid"));
            if kind == "task-received" || kind == "task-sent" {
                let line = format!(
                    "{}({uuid}) args={} kwargs={}",
                    text(&take("name")),
                    text(&take("args")),
                    text(&take("kwargs"))
                );
                self.0.insert(uuid, line.clone());
                Some(line)
            } else {
                Some(self.0.get(&uuid).cloned().unwrap_or_default())
            }
        } else {
            None
        };
        let listed: Vec<String> = fields
            .iter()
            .map(|(key, value)| format!("{key}={}", text(value)))
            .collect();
        let sep = if listed.is_empty() { "" } else { ":" };
        match task {
            Some(task) => format!(
                "{hostname} [{when}] {shown_kind}{sep} {task} {}",
                listed.join(", ")
            ),
            None => format!(
                "{hostname} [{when}] {shown_kind}{sep} {}",
                listed.join(", ")
            ),
        }
    }
}

/// A field as the dumper prints it: strings bare, everything else as JSON.
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "None".to_owned(),
        other => other.to_string(),
    }
}
