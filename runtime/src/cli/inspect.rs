//! `wasmq inspect <method>` and `wasmq control <method>`: Celery's remote control from the
//! shell, as `celery inspect` and `celery control` do it. The command is broadcast to every
//! worker on the broker (Celery's or wasmq's), or to the `--destination` nodes, and the
//! replies that arrive within `--timeout` are printed, `-> node: OK` and the reply, then
//! `N nodes online.`; with `--json`, one JSON object `{node: reply}`. No reply at all ends
//! with exit status 69, as Celery's CLI does (a liveness probe's `inspect ping` relies on
//! it). Both brokers carry remote control (RabbitMQ through Celery's pidbox exchanges, the
//! embedded file through its control tables); a broker that carries none is refused with
//! exit status 2.
//!
//! Positional arguments become the command's arguments in the order Celery's CLI takes
//! them, e.g. `control rate_limit math.add 2/s`, `control time_limit math.sleep 0.5 1`,
//! `control add_consumer q2`, `inspect query_task ID…`.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::endpoints::{Endpoints, connect_broker};
use super::exit::{ExitStatus, Failure};
use crate::broker::{BrokerError, ControlBroadcast, ControlReply};
use crate::config::RawConfig;
use crate::protocol::ControlCommand;

/// Flags of `wasmq inspect` and `wasmq control`.
#[derive(Debug, clap::Args)]
pub(super) struct RemoteArgs {
    /// The command, e.g. ping, stats, active, registered (inspect); rate_limit,
    /// time_limit, add_consumer, cancel_consumer, pool_grow, shutdown (control).
    method: String,
    /// The command's arguments, in the order `celery inspect|control` takes them.
    arguments: Vec<String>,
    /// Only these nodes (comma-separated, e.g. wasmq@host); replies are awaited until every
    /// one has answered or the timeout passes.
    #[arg(short = 'd', long)]
    destination: Option<String>,
    /// How long to wait for replies, in seconds.
    #[arg(short = 't', long, default_value_t = 1.0)]
    timeout: f64,
    /// Print the replies as one JSON object {node: reply}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// Whether the command was given as `inspect` or `control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `wasmq inspect`.
    Inspect,
    /// `wasmq control`.
    Control,
}

/// Broadcasts the command and prints the replies.
pub(super) async fn run(kind: Kind, args: RemoteArgs) -> Result<(), Failure> {
    let timeout = super::args::seconds("timeout", Some(args.timeout))?.unwrap_or_default();
    let arguments = arguments(kind, &args.method, &args.arguments)?;
    let destination: Option<Vec<String>> = args.destination.as_deref().map(|nodes| {
        nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect()
    });
    let config = args.endpoints.resolve(RawConfig::default())?;
    let broker = connect_broker(&config)?;
    let limit = destination.as_ref().map(Vec::len).filter(|n| *n > 0);
    let broadcast = ControlBroadcast {
        command: ControlCommand::new(args.method.clone(), arguments, destination),
        reply: true,
        timeout: timeout.max(Duration::from_millis(1)),
        limit,
    };
    let replies = broker
        .broadcast_control(&broadcast)
        .await
        .map_err(|e| broadcast_failure(&args.method, e))?;
    if replies.is_empty() {
        return Err(Failure::new(
            ExitStatus::Unavailable,
            anyhow::anyhow!("No nodes replied within time constraint"),
        ));
    }
    if args.json {
        let all: Map<String, Value> = replies
            .into_iter()
            .map(|ControlReply { node, reply }| (node, reply))
            .collect();
        println!("{}", Value::Object(all));
        return Ok(());
    }
    for ControlReply { node, reply } in &replies {
        print_reply(node, reply);
    }
    let n = replies.len();
    println!("\n{n} {} online.", if n == 1 { "node" } else { "nodes" });
    Ok(())
}

/// Why `method` could not be sent: a broker without remote control is the user's choice to
/// change (exit 2), anything else a failure of the broker.
fn broadcast_failure(method: &str, error: BrokerError) -> Failure {
    match error {
        BrokerError::NoRemoteControl(broker) => Failure::bad_input(format!(
            "remote control is not available: {broker} carries none \
             (the embedded sqlite:// and RabbitMQ amqp:// brokers do)"
        )),
        e => Failure::internal(anyhow::anyhow!("cannot send {method}: {e:#}")),
    }
}

/// `-> node: OK` (or `ERROR`) and the reply indented, as Celery's CLI prints it.
fn print_reply(node: &str, reply: &Value) {
    let (status, shown) = match reply {
        Value::Object(map) if map.len() == 1 && map.contains_key("error") => {
            ("ERROR", map["error"].clone())
        }
        Value::Object(map) if map.len() == 1 && map.contains_key("ok") => ("OK", map["ok"].clone()),
        other => ("OK", other.clone()),
    };
    println!("-> {node}: {status}");
    let text = match &shown {
        Value::String(text) => text.clone(),
        Value::Array(items) if items.is_empty() => "- empty -".to_owned(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    for line in text.lines() {
        println!("        {line}");
    }
}

/// The command's arguments from the positional ones, by the names Celery's commands take.
fn arguments(kind: Kind, method: &str, given: &[String]) -> Result<Map<String, Value>, Failure> {
    let text = |i: usize| given.get(i).map(|v| Value::from(v.as_str()));
    let number = |i: usize, name: &str| -> Result<Value, Failure> {
        match given.get(i) {
            None => Ok(Value::Null),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| Failure::bad_input(format!("{method}: {name} must be a number"))),
        }
    };
    let need = |n: usize, usage: &str| {
        if given.len() < n {
            Err(Failure::bad_input(format!("usage: {method} {usage}")))
        } else {
            Ok(())
        }
    };
    let arguments = match (kind, method) {
        (Kind::Inspect, "registered") => json!({"taskinfoitems": given}),
        (Kind::Inspect, "query_task") => {
            need(1, "TASK_ID…")?;
            json!({"ids": given})
        }
        (Kind::Control, "rate_limit") => {
            need(2, "TASK_NAME RATE_LIMIT (e.g. 2/s; 0 disables it)")?;
            json!({"task_name": text(0), "rate_limit": text(1)})
        }
        (Kind::Control, "time_limit") => {
            need(1, "TASK_NAME [SOFT_SECS] [HARD_SECS]")?;
            json!({"task_name": text(0), "soft": number(1, "soft")?, "hard": number(2, "hard")?})
        }
        (Kind::Control, "add_consumer") => {
            need(1, "QUEUE [EXCHANGE] [EXCHANGE_TYPE] [ROUTING_KEY]")?;
            json!({"queue": text(0), "exchange": text(1), "exchange_type": text(2),
                "routing_key": text(3)})
        }
        (Kind::Control, "cancel_consumer") => {
            need(1, "QUEUE")?;
            json!({"queue": text(0)})
        }
        (Kind::Control, "pool_grow" | "pool_shrink") => {
            let n = match given.first() {
                None => 1,
                Some(n) => n.parse::<u64>().map_err(|_| {
                    Failure::bad_input(format!("{method}: n must be a whole number"))
                })?,
            };
            json!({ "n": n })
        }
        (Kind::Control, "autoscale") => {
            need(2, "MAX MIN")?;
            json!({"max": number(0, "max")?, "min": number(1, "min")?})
        }
        (Kind::Control, "revoke") => {
            need(1, "TASK_ID…")?;
            json!({"task_id": given, "terminate": false, "signal": "SIGTERM"})
        }
        (Kind::Control, "terminate") => {
            need(2, "SIGNAL TASK_ID…")?;
            json!({"signal": text(0), "task_id": &given[1..]})
        }
        (_, _) if given.is_empty() => json!({}),
        (_, _) => {
            return Err(Failure::bad_input(format!(
                "{method} takes no arguments here (got {})",
                given.join(" ")
            )));
        }
    };
    Ok(arguments.as_object().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kind: Kind, method: &str, given: &[&str]) -> Value {
        let given: Vec<String> = given.iter().map(|s| (*s).to_owned()).collect();
        Value::Object(arguments(kind, method, &given).unwrap())
    }

    #[test]
    fn positional_arguments_are_named_as_celerys_cli_names_them() {
        assert_eq!(args(Kind::Inspect, "ping", &[]), json!({}));
        assert_eq!(
            args(Kind::Inspect, "registered", &[]),
            json!({"taskinfoitems": []})
        );
        assert_eq!(
            args(Kind::Control, "rate_limit", &["math.add", "2/s"]),
            json!({"task_name": "math.add", "rate_limit": "2/s"})
        );
        assert_eq!(
            args(Kind::Control, "time_limit", &["math.sleep", "0.5", "1"]),
            json!({"task_name": "math.sleep", "soft": 0.5, "hard": 1.0})
        );
        assert_eq!(args(Kind::Control, "pool_grow", &[]), json!({"n": 1}));
        assert_eq!(args(Kind::Control, "pool_shrink", &["2"]), json!({"n": 2}));
        assert_eq!(args(Kind::Control, "add_consumer", &["q2"])["queue"], "q2");
        let bad = |kind, method: &str, given: &[&str]| {
            let given: Vec<String> = given.iter().map(|s| (*s).to_owned()).collect();
            arguments(kind, method, &given).is_err()
        };
        assert!(bad(Kind::Control, "rate_limit", &["math.add"]));
        assert!(bad(Kind::Control, "time_limit", &["math.sleep", "soon"]));
        assert!(bad(Kind::Inspect, "ping", &["extra"]));
    }

    #[test]
    fn a_broker_without_remote_control_is_bad_input_and_says_which_brokers_have_it() {
        let refused = broadcast_failure(
            "ping",
            BrokerError::NoRemoteControl("memory://nowhere".into()),
        );
        assert_eq!(refused.status, ExitStatus::BadInput);
        let shown = refused.error.to_string();
        assert!(
            shown.contains("memory://nowhere carries none") && shown.contains("sqlite://"),
            "{shown}"
        );
        let failed = broadcast_failure("ping", BrokerError::Closed);
        assert_eq!(failed.status, ExitStatus::Internal);
        assert!(failed.error.to_string().starts_with("cannot send ping"));
    }
}
