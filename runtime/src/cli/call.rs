//! `wasmq call`: one task of one plugin file, in a fresh sandbox, from the command line.

use std::path::PathBuf;
use std::time::Duration;

use super::args::{EngineArgs, sandbox};
use super::exit::{ExitStatus, Failure};
use crate::engine::{CallError, CallRequest, LimitOverrides, Outcome};
use crate::units::{format_duration, parse_bytes, parse_duration};

#[derive(Debug, clap::Args)]
pub(super) struct CallArgs {
    /// The plugin file (a wasm32-wasip2 component), e.g. plugins/math.wasm.
    plugin: PathBuf,
    /// The task's full name, e.g. math.add.
    task: String,
    /// Positional arguments as a JSON array, e.g. '[2, 3]'.
    #[arg(default_value = "[]")]
    args: String,
    /// Keyword arguments as a JSON object, e.g. '{"b": 3}'.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    /// CPU budget in fuel units (about one per wasm instruction). Default: the plugin's
    /// default for the task, else 10000000000 (about one second of guest CPU).
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory cap, e.g. 16MiB. Default: the plugin's default, else 128MiB.
    #[arg(long, value_parser = parse_bytes)]
    memory: Option<u64>,
    /// Wall-clock limit, e.g. 2s or 500ms. Default: the plugin's default, else 30s.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// The task id the task sees. Default: a generated one.
    #[arg(long)]
    id: Option<String>,
    /// Print how the call went (outcome kind, limits, fuel used, time) on stderr.
    #[arg(long, short)]
    verbose: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

pub(super) async fn call(args: CallArgs) -> Result<(), Failure> {
    // Validate the arguments before paying for a compile.
    let bad_input = |what: &str, e: serde_json::Error| {
        Failure::new(ExitStatus::BadInput, anyhow::anyhow!("{what}: {e}"))
    };
    let positional: serde_json::Value =
        serde_json::from_str(&args.args).map_err(|e| bad_input("ARGS_JSON is not JSON", e))?;
    if !positional.is_array() {
        return Err(Failure::new(
            ExitStatus::BadInput,
            anyhow::anyhow!("ARGS_JSON must be a JSON array, e.g. '[2, 3]'"),
        ));
    }
    let keywords: serde_json::Value =
        serde_json::from_str(&args.kwargs).map_err(|e| bad_input("--kwargs is not JSON", e))?;
    if !keywords.is_object() {
        return Err(Failure::new(
            ExitStatus::BadInput,
            anyhow::anyhow!("--kwargs must be a JSON object, e.g. '{{\"b\": 3}}'"),
        ));
    }

    let sandbox = sandbox(&args.engine, 4)?;
    let plugin = sandbox.load_plugin(&args.plugin).await?;
    let mut request = CallRequest::new(&args.task, args.args);
    request.kwargs_json = args.kwargs;
    if let Some(id) = args.id {
        request.id = id;
    }
    request.limits = LimitOverrides {
        fuel: args.fuel,
        memory_bytes: args.memory,
        timeout: args.timeout,
    };
    let report = sandbox.call(&plugin, request).await.map_err(|e| match e {
        CallError::UnknownTask { .. } => Failure::new(ExitStatus::BadInput, e),
        CallError::Unavailable(_) => Failure::new(ExitStatus::Internal, e),
        // `wasmq call` grants nothing, so this cannot happen; were it to, it is input.
        CallError::Grant(_) => Failure::new(ExitStatus::BadInput, e),
    })?;
    if args.verbose {
        eprintln!(
            "{}: {} in {} ({} of CPU; fuel used {} of {}; {})",
            args.task,
            report.outcome.kind_name(),
            format_duration(round_micros(report.elapsed)),
            format_duration(round_micros(report.cpu_time)),
            report.fuel_used,
            report.limits.fuel,
            report.limits
        );
    }
    let status = match &report.outcome {
        Outcome::Success(json) => {
            println!("{json}");
            return Ok(());
        }
        Outcome::LimitExceeded(_) => ExitStatus::LimitExceeded,
        Outcome::InvalidArguments { .. } => ExitStatus::BadInput,
        Outcome::Failed { .. }
        | Outcome::Retry { .. }
        | Outcome::Rejected { .. }
        | Outcome::Trap { .. } => ExitStatus::TaskFailed,
    };
    Err(Failure::new(
        status,
        anyhow::anyhow!("{} {}", args.task, report.outcome),
    ))
}

fn round_micros(duration: Duration) -> Duration {
    Duration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}
