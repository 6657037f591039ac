//! `wasmq dead-letters`: list the messages a work queue set aside, newest first, with the
//! reason each was dead-lettered (a table, or JSON lines with `--json`).

use serde_json::Value;

use super::endpoints::Endpoints;
use super::exit::Failure;

#[derive(Debug, clap::Args)]
pub(super) struct DeadLettersArgs {
    /// The work queue whose dead letters to show.
    #[arg(long, short = 'Q', default_value = "celery")]
    queue: String,
    /// How many to show, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// Prints the queue's dead letters.
pub(super) async fn run(args: DeadLettersArgs) -> Result<(), Failure> {
    let broker = crate::broker::connect(args.endpoints.broker_flag())
        .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    let letters = broker
        .dead_letters(&args.queue, args.limit)
        .await
        .map_err(Failure::internal)?;
    for letter in &letters {
        if args.json {
            println!("{}", serde_json::to_string(letter).unwrap_or_default());
        } else {
            let task = letter
                .envelope
                .headers
                .get("task")
                .and_then(Value::as_str)
                .unwrap_or("?");
            println!(
                "{}  {}  {}  deliveries={}  {}",
                letter.queue,
                letter.task_id.as_deref().unwrap_or("(no id)"),
                task,
                letter.delivery_count,
                letter.reason
            );
        }
    }
    Ok(())
}
