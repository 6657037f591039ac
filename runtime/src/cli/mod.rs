//! The command-line edge: parse, run, print one readable line on failure, exit with a
//! documented code. `anyhow` is used here and in the benchmark harness (`crate::bench`), the
//! other edge, and nowhere else.
//!
//! This file is the command table (the clap `Command` enum) and the dispatch. Each command
//! lives in a file named for it (`wasmq dead-letters` in `dead_letters.rs`; `chain`, `group`
//! and `chord` in `workflow.rs`); what several share is in `args.rs` (engine flags, seconds
//! flags), `endpoints.rs` (broker and result backend from flags and the config file) and
//! `exit.rs` (exit statuses, `Failure`, printing a task's result).
//!
//! Exit codes (see [`ExitStatus`]): 0 success, 1 task failed, 2 bad input, 3 limit exceeded,
//! 4 bad plugin, 5 timed out waiting for a result, 69 no worker answered remote control
//! (`inspect`, `control`), 70 internal error.

mod args;
mod beat;
mod bench;
mod call;
mod chaos;
mod dashboard;
mod dead_letters;
mod demo;
mod deploy;
mod endpoints;
mod events;
mod exit;
mod inspect;
mod keys;
mod logging;
mod metrics;
mod plugin_build;
mod plugin_source;
mod plugins;
mod process;
mod result;
mod revoke;
mod send;
mod send_bulk;
mod status;
mod tenants;
mod worker;
mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use exit::ExitStatus;
use exit::Failure;
pub use logging::LogFormat;

/// wasmq: a task queue whose tasks are sandboxed WebAssembly components, Celery-compatible.
#[derive(Debug, Parser)]
#[command(name = "wasmq", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines (on stderr) are written: `text` for people, `json` for a log pipeline
    /// (one object a line, with the task's id, name, workflow and trace ids on every line
    /// its run emits).
    #[arg(long, global = true, value_enum, env = "WASMQ_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The commands, each run by the file named for it.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a short demonstration: a worker on a fresh embedded broker runs real tasks and
    /// every hostile one, and a table shows how each ended.
    Demo(demo::DemoArgs),
    /// Run a worker: consume tasks, run them in sandboxes, store results.
    Worker(Box<worker::WorkerArgs>),
    /// Send periodic tasks from a schedule file (Celery's beat). Run as many as you like:
    /// they elect one leader and never send a run twice. --list shows each entry's next and
    /// last run.
    Beat(beat::BeatArgs),
    /// Send a task (prints its id, or its result with --wait).
    Send(send::SendArgs),
    /// Revoke tasks: workers will not run them (their result becomes REVOKED); with
    /// --terminate a running one is interrupted.
    Revoke(revoke::RevokeArgs),
    /// Show a task's result (or wait for it with --wait).
    Result(result::ResultArgs),
    /// Send a chain: each step's result is prepended to the next step's arguments. Steps
    /// are NAME[ARGS], e.g. 'math.add[2,2]'; NAME![ARGS] is immutable. Prints the last
    /// step's id, or its result with --wait.
    Chain(workflow::ChainArgs),
    /// Send a group: members (NAME[ARGS]) run in parallel. Prints each member's id, or the
    /// list of results with --wait.
    Group(workflow::GroupArgs),
    /// Send a chord: a group whose results, as one list, go to --body. Prints the body's
    /// id, or its result with --wait. Needs the sqlite or redis result backend.
    Chord(workflow::ChordArgs),
    /// Ask workers (wasmq's and Celery's) for information, as `celery inspect` does:
    /// ping, stats, active, reserved, scheduled, registered, active_queues, revoked,
    /// query_task ID…, conf, clock, report; on RabbitMQ or the embedded broker. Exit 69 when
    /// no worker replies in time.
    Inspect(inspect::RemoteArgs),
    /// Change running workers (wasmq's and Celery's), as `celery control` does:
    /// rate_limit TASK RATE, time_limit TASK SOFT HARD, add_consumer QUEUE,
    /// cancel_consumer QUEUE, pool_grow N, pool_shrink N, revoke ID…, shutdown; on RabbitMQ
    /// or the embedded broker. Exit 69 when no worker replies in time.
    Control(inspect::RemoteArgs),
    /// Report whether a worker is running and consuming (exit 0) or not (exit 1), from the
    /// status file it writes.
    Status(status::StatusArgs),
    /// Print Celery events as they happen: worker heartbeats, and each task's progress
    /// from workers with task events on (`worker -E`, or switched on by Flower).
    Events(events::EventsArgs),
    /// List dead-lettered messages with the reason each was set aside.
    DeadLetters(dead_letters::DeadLettersArgs),
    /// Serve a web dashboard: workers (wasmq's and Celery's), queues, the latest tasks,
    /// dead letters and live charts, from events and inspect replies.
    Dashboard(dashboard::DashboardArgs),
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
    /// Inject faults into real runs on this machine — workers SIGKILLed mid-drain, processes
    /// racing on one SQLite file under kill -9 — and print what was lost, wrong or run
    /// twice (exit 1 if anything was lost or wrong).
    Chaos(chaos::ChaosArgs),
    /// Build (from Python), inspect, list, export, sign and verify plugins.
    Plugins {
        #[command(subcommand)]
        command: plugins::PluginsCommand,
    },
    /// Generate and show Ed25519 keys that sign plugins and releases.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Publish a signed release of plugins to every worker following the plugin store (the
    /// next epoch; with --canary, to a share of workflows only).
    Deploy(deploy::DeployArgs),
    /// Make the latest release's canary the stable version everywhere (a new epoch).
    Promote(deploy::PublishArgs),
    /// Serve an earlier epoch's plugins again (a new epoch).
    Rollback(deploy::RollbackArgs),
    /// List a tenant's releases, oldest first.
    Releases(deploy::StoreArgs),
    /// Show which epoch each node serves, and any node that failed to apply one.
    Fleet(deploy::StoreArgs),
}

/// Parses the process arguments, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match &cli.command {
        // lapin warns of every message RabbitMQ returns, body and all; a tenant's worker
        // publishes follow-ups and rpc replies `mandatory` and logs a returned one itself.
        Command::Worker(_) => "info,lapin::returned_messages=error",
        // A beat's log is what it sent and who leads.
        Command::Beat(_) => "info",
        Command::Demo(_) | Command::Bench { .. } | Command::Chaos(_) => "off",
        // lapin logs every passive declare of a queue that does not exist (yet) as an error.
        Command::Dashboard(_) => "warn,lapin::channel=off",
        _ => "warn,wasmq::guest=info",
    };
    logging::init(cli.log_format, default_log);
    match run(cli) {
        Ok(()) => ExitStatus::Success.into(),
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            failure.status.into()
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let multi_threaded = matches!(
        cli.command,
        Command::Worker(_) | Command::Demo(_) | Command::Bench { .. } | Command::Chaos(_)
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
            Command::Worker(args) => worker::run(*args).await,
            Command::Beat(args) => beat::run(args).await,
            Command::Send(args) => send::run(args).await,
            Command::Result(args) => result::run(args).await,
            Command::Revoke(args) => revoke::run(args).await,
            Command::Chain(args) => workflow::run_chain(args).await,
            Command::Group(args) => workflow::run_group(args).await,
            Command::Chord(args) => workflow::run_chord(args).await,
            Command::DeadLetters(args) => dead_letters::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Events(args) => events::run(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Inspect(args) => inspect::run(inspect::Kind::Inspect, args).await,
            Command::Control(args) => inspect::run(inspect::Kind::Control, args).await,
            Command::Call(args) => call::call(args).await,
            Command::Plugins { command } => plugins::run(command).await,
            Command::Bench { command } => bench::run(command).await,
            Command::Chaos(args) => chaos::run(args).await,
            Command::Keys { command } => keys::run(command),
            Command::Deploy(args) => deploy::deploy(args).await,
            Command::Promote(args) => deploy::promote(args).await,
            Command::Rollback(args) => deploy::rollback(args).await,
            Command::Releases(args) => deploy::releases(args).await,
            Command::Fleet(args) => deploy::fleet(args).await,
        }
    })
}
