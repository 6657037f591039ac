//! The command-line edge: parse, run, print one readable line on failure, exit with a
//! documented code. `anyhow` is used here and nowhere else.
//!
//! Exit codes (see [`ExitStatus`]): 0 success, 1 task failed, 2 bad input, 3 limit exceeded,
//! 4 bad plugin, 5 timed out waiting for a result, 70 internal error.

mod bench;
mod bench_amqp;
mod call;
mod canvas;
mod demo;
mod plugins;
mod queue;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::engine::{AllocatorKind, PluginError, Sandbox, SandboxConfig};

/// wasmq: a task queue whose tasks are sandboxed WebAssembly components, Celery-compatible.
#[derive(Debug, Parser)]
#[command(name = "wasmq", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a short demonstration: a worker on a fresh embedded broker runs real tasks and
    /// every hostile one, and a table shows how each ended.
    Demo(demo::DemoArgs),
    /// Run a worker: consume tasks, run them in sandboxes, store results.
    Worker(queue::WorkerArgs),
    /// Send a task (prints its id, or its result with --wait).
    Send(queue::SendArgs),
    /// Revoke tasks: workers will not run them (their result becomes REVOKED); with
    /// --terminate a running one is interrupted.
    Revoke(queue::RevokeArgs),
    /// Show a task's result (or wait for it with --wait).
    Result(queue::ResultArgs),
    /// Send a chain: each step's result is prepended to the next step's arguments. Steps
    /// are NAME[ARGS], e.g. 'math.add[2,2]'; NAME![ARGS] is immutable. Prints the last
    /// step's id, or its result with --wait.
    Chain(canvas::ChainArgs),
    /// Send a group: members (NAME[ARGS]) run in parallel. Prints each member's id, or the
    /// list of results with --wait.
    Group(canvas::GroupArgs),
    /// Send a chord: a group whose results, as one list, go to --body. Prints the body's
    /// id, or its result with --wait. Needs the sqlite or redis result backend.
    Chord(canvas::ChordArgs),
    /// Report whether a worker is running and consuming (exit 0) or not (exit 1), from the
    /// status file it writes.
    Status(queue::StatusArgs),
    /// List dead-lettered messages with the reason each was set aside.
    DeadLetters(queue::DeadLettersArgs),
    /// Run one task of a plugin in a fresh sandbox and print its JSON result.
    ///
    /// Exit codes: 0 success, 1 the task failed (or trapped, or asked for a retry or
    /// rejection), 2 bad input (arguments that are not JSON or do not fit the task, unknown
    /// task), 3 a limit was exceeded, 4 the plugin file is unusable, 70 internal error.
    Call(call::CallArgs),
    /// Measure throughput and latency (prints a markdown table).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Inspect, list and export plugins.
    Plugins {
        #[command(subcommand)]
        command: plugins::PluginsCommand,
    },
}

/// Options shared by every command that loads plugins.
#[derive(Debug, Clone, clap::Args)]
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
    fn sandbox_config(&self, pool_size: u32) -> SandboxConfig {
        let mut config = SandboxConfig {
            allocator: match self.allocator {
                AllocatorArg::Pooling => AllocatorKind::Pooling,
                AllocatorArg::OnDemand => AllocatorKind::OnDemand,
            },
            pool_size,
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
    /// 1: the task failed, trapped, was revoked, asked for a retry or rejected its message.
    TaskFailed = 1,
    /// 2: bad input: arguments that are not JSON or do not fit the task, an unknown task,
    /// bad flags or configuration.
    BadInput = 2,
    /// 3: the sandbox stopped the task at a limit (fuel, memory, time, stack, output).
    LimitExceeded = 3,
    /// 4: the plugin file is unreadable, not a component, or not a wasmq plugin.
    BadPlugin = 4,
    /// 5: no result arrived within the timeout.
    Timeout = 5,
    /// 70: an internal error (EX_SOFTWARE), e.g. the broker cannot be reached.
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

    fn bad_input(message: impl std::fmt::Display) -> Self {
        Self::new(ExitStatus::BadInput, anyhow::anyhow!("{message}"))
    }

    fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::new(ExitStatus::Internal, error)
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
    let default_log = match &cli.command {
        Command::Worker(_) => "info",
        Command::Demo(_) | Command::Bench { .. } => "off",
        _ => "warn,wasmq::guest=info",
    };
    init_tracing(default_log);
    match run(cli) {
        Ok(()) => ExitStatus::Success.into(),
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            failure.status.into()
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<(), Failure> {
    let multi_threaded = matches!(
        cli.command,
        Command::Worker(_) | Command::Demo(_) | Command::Bench { .. }
    );
    let runtime = if multi_threaded {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .map_err(|e| Failure::internal(anyhow::anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Worker(args) => queue::worker(args).await,
            Command::Send(args) => queue::send(args).await,
            Command::Result(args) => queue::result(args).await,
            Command::Revoke(args) => queue::revoke(args).await,
            Command::Chain(args) => canvas::run_chain(args).await,
            Command::Group(args) => canvas::run_group(args).await,
            Command::Chord(args) => canvas::run_chord(args).await,
            Command::DeadLetters(args) => queue::dead_letters(args).await,
            Command::Status(args) => queue::status(args).await,
            Command::Call(args) => call::call(args).await,
            Command::Plugins { command } => plugins::run(command).await,
            Command::Bench { command } => bench::run(command).await,
        }
    })
}

fn sandbox(engine: &EngineArgs, pool_size: u32) -> Result<Sandbox, Failure> {
    Sandbox::new(engine.sandbox_config(pool_size)).map_err(Failure::internal)
}
