//! `wasmq chain`, `wasmq group` and `wasmq chord`: start a Celery canvas (a workflow of
//! tasks) from the shell.
//!
//! Each task is written `NAME[ARGS]`, where `ARGS` is the inside of a JSON array:
//! `math.add[2,2]`, `math.mul[10]`, `math.sum` (no arguments). A `!` after the name makes
//! the signature immutable (Celery's `.si()`): `math.add![5,5]` ignores its parent's result.

use std::time::Duration;

use serde_json::Value;

use super::args::seconds;
use super::endpoints::Endpoints;
use super::exit::{ExitStatus, Failure, print_ready};
use crate::canvas::{CanvasError, Signature, chain, chord, group};
use crate::client::Client;

/// Options shared by the canvas commands.
#[derive(Debug, clap::Args)]
pub(super) struct CanvasOptions {
    /// The queue every task goes to. Default: celery.
    #[arg(long, short = 'Q')]
    queue: Option<String>,
    /// Wait for the result and print it (a failure exits 1 with the error, a timeout 5).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    #[command(flatten)]
    endpoints: Endpoints,
}

impl CanvasOptions {
    fn client(&self) -> Result<Client, Failure> {
        let client = self.endpoints.client()?;
        Ok(match &self.queue {
            Some(queue) => client.with_default_queue(queue.clone()),
            None => client,
        })
    }

    fn timeout(&self) -> Result<Duration, Failure> {
        Ok(seconds("timeout", Some(self.timeout))?.unwrap_or_default())
    }
}

/// `wasmq chain`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: wasmq chain 'math.add[2,2]' 'math.add[4]' 'math.mul[10]' --wait  → 80"
)]
pub(super) struct ChainArgs {
    /// The steps, in order, each NAME[ARGS] (e.g. math.add[2,2]); each step's result is
    /// prepended to the next step's arguments unless written NAME![ARGS].
    #[arg(required = true, value_name = "STEP")]
    steps: Vec<String>,
    #[command(flatten)]
    options: CanvasOptions,
}

/// `wasmq group`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example: wasmq group 'math.add[1,2]' 'math.add[3,4]' --wait  → [3,7]")]
pub(super) struct GroupArgs {
    /// The members, each NAME[ARGS], run in parallel.
    #[arg(required = true, value_name = "TASK")]
    members: Vec<String>,
    #[command(flatten)]
    options: CanvasOptions,
}

/// `wasmq chord`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: wasmq chord --body math.sum 'math.add[1,1]' 'math.add[2,2]' --wait  → 6.0"
)]
pub(super) struct ChordArgs {
    /// The task that receives the list of header results, NAME[ARGS].
    #[arg(long, value_name = "TASK")]
    body: String,
    /// The header members, each NAME[ARGS], run in parallel.
    #[arg(required = true, value_name = "TASK")]
    members: Vec<String>,
    #[command(flatten)]
    options: CanvasOptions,
}

/// Parses `NAME[ARGS]` / `NAME![ARGS]` / `NAME`.
fn parse_task(text: &str) -> Result<Signature, Failure> {
    let bad = |why: &str| {
        Failure::bad_input(format!(
            "{text:?}: {why} (write NAME[ARGS], e.g. 'math.add[2,2]', or NAME![ARGS] for an immutable step)"
        ))
    };
    let (head, args) = match text.find('[') {
        Some(open) => {
            if !text.ends_with(']') {
                return Err(bad("the arguments must end with ]"));
            }
            let args: Value = serde_json::from_str(&text[open..])
                .map_err(|e| bad(&format!("arguments are not JSON: {e}")))?;
            let Value::Array(args) = args else {
                return Err(bad("the arguments must be a JSON array"));
            };
            (&text[..open], args)
        }
        None => (text, Vec::new()),
    };
    let (name, immutable) = match head.strip_suffix('!') {
        Some(name) => (name, true),
        None => (head, false),
    };
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(bad("a task name is missing or has spaces"));
    }
    let sig = Signature::new(name, args);
    Ok(if immutable { sig.immutable() } else { sig })
}

fn parse_all(texts: &[String]) -> Result<Vec<Signature>, Failure> {
    texts.iter().map(|t| parse_task(t)).collect()
}

/// A canvas that can never run is bad input (2); an unreachable broker or backend is
/// internal (70), as for `wasmq send`.
fn canvas_failure(error: CanvasError) -> Failure {
    if error.is_transient() {
        Failure::internal(error)
    } else {
        Failure::new(ExitStatus::BadInput, error)
    }
}

pub(super) async fn run_chain(args: ChainArgs) -> Result<(), Failure> {
    let steps = parse_all(&args.steps)?;
    let timeout = args.options.timeout()?;
    let client = args.options.client()?;
    let result = chain(steps).apply(&client).await.map_err(canvas_failure)?;
    if !args.options.wait {
        println!("{}", result.id);
        return Ok(());
    }
    print_ready("chain", result.get(timeout).await)
}

pub(super) async fn run_group(args: GroupArgs) -> Result<(), Failure> {
    let members = parse_all(&args.members)?;
    let timeout = args.options.timeout()?;
    let client = args.options.client()?;
    let result = group(members)
        .apply(&client)
        .await
        .map_err(canvas_failure)?;
    if !args.options.wait {
        for member in &result.results {
            println!("{}", member.id);
        }
        return Ok(());
    }
    match result.get(timeout).await {
        Ok(values) => {
            println!("{}", Value::Array(values));
            Ok(())
        }
        Err(error) => print_ready("group", Err(error)),
    }
}

pub(super) async fn run_chord(args: ChordArgs) -> Result<(), Failure> {
    let members = parse_all(&args.members)?;
    let body = parse_task(&args.body)?;
    let timeout = args.options.timeout()?;
    let client = args.options.client()?;
    let result = chord(members, body)
        .apply(&client)
        .await
        .map_err(canvas_failure)?;
    if !args.options.wait {
        println!("{}", result.id);
        return Ok(());
    }
    print_ready("chord", result.get(timeout).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_step_syntax() {
        let sig = parse_task("math.add[2,2]").unwrap();
        assert_eq!(
            (sig.task.as_str(), sig.args.clone(), sig.immutable),
            ("math.add", vec![json!(2), json!(2)], false)
        );
        let sig = parse_task("math.add![5, 5]").unwrap();
        assert!(sig.immutable);
        assert_eq!(sig.args, vec![json!(5), json!(5)]);
        let sig = parse_task("math.sum").unwrap();
        assert!(sig.args.is_empty());
        assert!(parse_task("math.add[2,").is_err());
        assert!(parse_task("[1]").is_err());
    }
}
