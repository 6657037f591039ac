//! `wasmq send`: publish one task from the shell and print its id, or with `--wait` its
//! result (a failure exits 1, a timeout 5); with `--bulk`, publish one task per line of
//! standard input (see [`super::send_bulk`]).

use serde_json::{Map, Value};

use super::args::seconds;
use super::endpoints::Endpoints;
use super::exit::{Failure, print_ready};
use crate::client::SendOptions;

#[derive(Debug, clap::Args)]
pub(super) struct SendArgs {
    /// The task name, e.g. math.add. With --bulk, the task of lines that name none.
    #[arg(required_unless_present = "bulk")]
    task: Option<String>,
    /// Positional arguments as a JSON array, e.g. '[2, 3]'. Default: [].
    #[arg(value_name = "ARGS_JSON", conflicts_with = "bulk")]
    args: Option<String>,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    /// The queue. Default: the task's route in the config file's [routes], else celery.
    #[arg(long, short = 'Q')]
    queue: Option<String>,
    /// Run no earlier than SECS seconds from now.
    #[arg(long, value_name = "SECS")]
    countdown: Option<f64>,
    /// Expire (REVOKED, not run) if not started within SECS seconds.
    #[arg(long, value_name = "SECS")]
    expires: Option<f64>,
    /// Message priority 0-255 (higher first).
    #[arg(long)]
    priority: Option<u8>,
    /// Hard time limit in seconds.
    #[arg(long, value_name = "SECS")]
    time_limit: Option<f64>,
    /// Soft time limit in seconds.
    #[arg(long, value_name = "SECS")]
    soft_time_limit: Option<f64>,
    /// Use this task id.
    #[arg(long, conflicts_with = "bulk")]
    id: Option<String>,
    /// Wait for the result and print it (a failure exits non-zero with the error).
    #[arg(long, conflicts_with = "bulk")]
    wait: bool,
    /// Send one task per line of standard input (JSON lines: an args array for TASK, or a
    /// Celery signature {"task", "args", "kwargs", "options"}), with up to --window
    /// publishes awaiting the broker's confirmation; prints each id once confirmed. The
    /// flags above are every line's defaults.
    #[arg(long)]
    bulk: bool,
    /// With --bulk: how many publishes may await their confirmation at once.
    #[arg(long, default_value_t = crate::client::DEFAULT_CONFIRM_WINDOW, requires = "bulk")]
    window: usize,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// Sends the task; prints its id, or with `--wait` its result.
pub(super) async fn run(args: SendArgs) -> Result<(), Failure> {
    let defaults = SendOptions {
        task_id: args.id.clone(),
        countdown: seconds("countdown", args.countdown)?,
        expires: seconds("expires", args.expires)?,
        queue: args.queue.clone(),
        priority: args.priority,
        time_limit: seconds("time-limit", args.time_limit)?,
        soft_time_limit: seconds("soft-time-limit", args.soft_time_limit)?,
        ..SendOptions::default()
    };
    let keywords = keywords(&args.kwargs)?;
    if args.bulk {
        let client = args.endpoints.client()?;
        let lines = tokio::io::BufReader::new(tokio::io::stdin());
        let defaults = super::send_bulk::Defaults {
            task: args.task,
            kwargs: keywords,
            options: defaults,
        };
        return super::send_bulk::run(&client, lines, defaults, args.window).await;
    }
    let task = args.task.unwrap_or_default();
    let positional: Value = serde_json::from_str(args.args.as_deref().unwrap_or("[]"))
        .map_err(|e| Failure::bad_input(format!("ARGS_JSON is not JSON: {e}")))?;
    let Value::Array(positional) = positional else {
        return Err(Failure::bad_input(
            "ARGS_JSON must be a JSON array, e.g. '[2, 3]'",
        ));
    };
    let client = args.endpoints.client()?;
    let timeout = seconds("timeout", Some(args.timeout))?.unwrap_or_default();
    let result = client
        .send_task(&task, positional, keywords, defaults)
        .await
        .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
    if !args.wait {
        println!("{}", result.id);
        return Ok(());
    }
    print_ready(&task, result.get(timeout).await)
}

/// `--kwargs`: a JSON object.
fn keywords(text: &str) -> Result<Map<String, Value>, Failure> {
    let keywords: Value = serde_json::from_str(text)
        .map_err(|e| Failure::bad_input(format!("--kwargs is not JSON: {e}")))?;
    let Value::Object(keywords) = keywords else {
        return Err(Failure::bad_input(
            "--kwargs must be a JSON object, e.g. '{\"b\": 3}'",
        ));
    };
    Ok(keywords)
}
