//! The command-line edge: parse, run, print one readable line on failure, exit with a
//! documented code. `anyhow` is used here and nowhere else.
//!
//! Exit codes (see [`ExitStatus`]): 0 success, 1 task failed, 2 bad input, 3 limit exceeded,
//! 4 bad plugin, 70 internal error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::engine::{
    AllocatorKind, CacheStatus, CallError, CallRequest, LimitOverrides, Outcome, Plugin,
    PluginError, Sandbox, SandboxConfig, format_bytes, format_duration, parse_bytes,
    parse_duration,
};

/// wasmq: run WebAssembly tasks in sandboxes, Celery-style.
#[derive(Debug, Parser)]
#[command(name = "wasmq", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one task of a plugin in a fresh sandbox and print its JSON result.
    ///
    /// Exit codes: 0 success, 1 the task failed (or trapped, or asked for a retry or
    /// rejection), 2 bad input (arguments, unknown task), 3 a limit was exceeded,
    /// 4 the plugin file is unusable, 70 internal error.
    Call(CallArgs),
    /// Inspect plugin files.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// List the tasks a plugin offers, with their parameters, default limits and docs.
    Inspect {
        /// The plugin file (a wasm32-wasip2 component).
        plugin: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
}

#[derive(Debug, clap::Args)]
struct CallArgs {
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

/// Options shared by every command that loads plugins.
#[derive(Debug, clap::Args)]
struct EngineArgs {
    /// Directory of cached precompiled plugins. Default: ~/.cache/wasmq/artifacts.
    #[arg(long, env = "WASMQ_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile plugins every time instead of using the artifact cache.
    #[arg(long)]
    no_cache: bool,
    /// Instance allocator: pooling (fast; falls back to on-demand when the pool cannot be
    /// reserved) or on-demand.
    #[arg(long, value_enum, default_value_t = AllocatorArg::Pooling)]
    allocator: AllocatorArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AllocatorArg {
    Pooling,
    OnDemand,
}

impl EngineArgs {
    fn sandbox_config(&self) -> SandboxConfig {
        let mut config = SandboxConfig {
            allocator: match self.allocator {
                AllocatorArg::Pooling => AllocatorKind::Pooling,
                AllocatorArg::OnDemand => AllocatorKind::OnDemand,
            },
            // The CLI runs one call at a time.
            pool_size: 4,
            ..SandboxConfig::default()
        };
        if self.no_cache {
            config.cache_dir = None;
        } else if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        config
    }
}

/// The process exit statuses of the `wasmq` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: the command did what was asked.
    Success = 0,
    /// 1: the task failed, trapped, asked for a retry or rejected its message.
    TaskFailed = 1,
    /// 2: bad input: arguments that are not JSON, an unknown task, bad flags.
    BadInput = 2,
    /// 3: the sandbox stopped the task at a limit (fuel, memory, time, stack, output).
    LimitExceeded = 3,
    /// 4: the plugin file is unreadable, not a component, or not a wasmq plugin.
    BadPlugin = 4,
    /// 70: an internal error (EX_SOFTWARE).
    Internal = 70,
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(status as u8)
    }
}

/// A failure that ends the command: one line for the user and an exit status.
#[derive(Debug)]
struct Failure {
    status: ExitStatus,
    error: anyhow::Error,
}

impl Failure {
    fn new(status: ExitStatus, error: impl Into<anyhow::Error>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }
}

impl From<PluginError> for Failure {
    fn from(error: PluginError) -> Self {
        let status = match error {
            PluginError::Read { .. } => ExitStatus::BadInput,
            _ => ExitStatus::BadPlugin,
        };
        Failure::new(status, error)
    }
}

/// Parses the process arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitStatus::Success.into(),
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            failure.status.into()
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wasmq::guest=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(|e| Failure::new(ExitStatus::Internal, e))?;
    runtime.block_on(async {
        match cli.command {
            Command::Call(args) => call(args).await,
            Command::Plugins {
                command: PluginsCommand::Inspect { plugin, engine },
            } => inspect(&plugin, &engine).await,
        }
    })
}

fn sandbox(engine: &EngineArgs) -> Result<Sandbox, Failure> {
    Sandbox::new(engine.sandbox_config()).map_err(|e| Failure::new(ExitStatus::Internal, e))
}

async fn call(args: CallArgs) -> Result<(), Failure> {
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

    let sandbox = sandbox(&args.engine)?;
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
    })?;
    if args.verbose {
        eprintln!(
            "{}: {} in {} (fuel used {} of {}; {})",
            args.task,
            report.outcome.kind_name(),
            format_duration(round_micros(report.elapsed)),
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

async fn inspect(path: &std::path::Path, engine: &EngineArgs) -> Result<(), Failure> {
    let sandbox = sandbox(engine)?;
    let plugin = sandbox.load_plugin(path).await?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    print!("{}", describe_plugin(&plugin, path, size));
    Ok(())
}

/// The text `wasmq plugins inspect` prints.
fn describe_plugin(plugin: &Plugin, path: &std::path::Path, size: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: plugin {} ({}, sha256 {}, {})",
        path.display(),
        plugin.name(),
        format_bytes(size),
        &plugin.content_hash()[..16],
        match plugin.cache_status() {
            CacheStatus::Hit => "loaded from the artifact cache",
            CacheStatus::Compiled => "compiled",
        }
    );
    for task in plugin.tasks() {
        let _ = writeln!(out, "\n  {}({})", task.name, task.params.join(", "));
        let mut limits = Vec::new();
        if let Some(fuel) = task.limits.fuel {
            limits.push(format!("fuel {fuel}"));
        }
        if let Some(memory) = task.limits.memory_bytes {
            limits.push(format!("memory {}", format_bytes(memory)));
        }
        if let Some(timeout) = task.limits.timeout {
            limits.push(format!("timeout {}", format_duration(timeout)));
        }
        if !limits.is_empty() {
            let _ = writeln!(out, "      default limits: {}", limits.join(", "));
        }
        for line in task.doc.lines() {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}
