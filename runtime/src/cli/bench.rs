//! `wasmq bench`: the flags of each benchmark and how its errors end the command. The
//! measurements themselves are the library's harness, `crate::bench`.

use super::args::EngineArgs;
use super::exit::{ExitStatus, Failure};
use crate::bench::{NotLocal, amqp, embedded, scale, soak};
use crate::engine::PluginError;
use crate::worker::WorkerOptions;

/// The default broker of the RabbitMQ benchmarks, as lapin spells it.
const LOCAL_RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Instance slots of the sandbox of the RabbitMQ benchmarks' in-process workers.
const AMQP_POOL_SIZE: u32 = 32;

#[derive(Debug, clap::Subcommand)]
pub(super) enum BenchCommand {
    /// The embedded (SQLite) broker and result backend, worker in-process.
    Embedded(EmbeddedArgs),
    /// RabbitMQ: wasmq side by side with the raw AMQP ceiling and Python Celery.
    Amqp(AmqpArgs),
    /// RabbitMQ: the worker's resident memory idle, under load and across many tasks.
    Soak(SoakArgs),
    /// RabbitMQ: drain throughput with 1, 2 and 4 worker processes.
    Scale(ScaleArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct EmbeddedArgs {
    /// Tasks to publish and drain.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Sequential round trips for the latency percentiles.
    #[arg(long, default_value_t = 1_000)]
    round_trips: usize,
    /// Worker concurrency. Default: the number of CPUs.
    #[arg(long, short = 'c')]
    concurrency: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct AmqpArgs {
    /// A short run (2,000 tasks, 200 round trips, no soak or scaling rows) for
    /// development: under 3 minutes. The full run adds the 100,000-task memory soak and the
    /// 1/2/4-process scaling rows (`bench soak`, `bench scale`).
    #[arg(long)]
    quick: bool,
    /// The broker (must be on this machine).
    #[arg(long, default_value = LOCAL_RABBITMQ)]
    broker: String,
    /// Redis for the Redis-backend rows (must be on this machine).
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// Only the raw ceiling and wasmq's own rows (no Celery): for profiling during
    /// development.
    #[arg(long, hide = true)]
    wasmq_only: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct SoakArgs {
    /// Tasks to run in all.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// The broker (must be on this machine).
    #[arg(long, default_value = LOCAL_RABBITMQ)]
    broker: String,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct ScaleArgs {
    /// Tasks per measurement.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// The broker (must be on this machine).
    #[arg(long, default_value = LOCAL_RABBITMQ)]
    broker: String,
}

/// Runs the benchmark with the options its flags ask for.
pub(super) async fn run(command: BenchCommand) -> Result<(), Failure> {
    let outcome = match command {
        BenchCommand::Embedded(args) => {
            let concurrency = args
                .concurrency
                .unwrap_or_else(|| WorkerOptions::default().concurrency);
            embedded::run(embedded::EmbeddedOptions {
                tasks: args.tasks,
                round_trips: args.round_trips,
                concurrency,
                sandbox: args
                    .engine
                    .sandbox_config(u32::try_from(concurrency + 4).unwrap_or(64)),
            })
            .await
        }
        BenchCommand::Amqp(args) => {
            amqp::run(amqp::AmqpOptions {
                quick: args.quick,
                broker: args.broker,
                redis: args.redis,
                wasmq_only: args.wasmq_only,
                sandbox: args.engine.sandbox_config(AMQP_POOL_SIZE),
            })
            .await
        }
        BenchCommand::Soak(args) => {
            soak::run(soak::SoakOptions {
                tasks: args.tasks,
                broker: args.broker,
                sandbox: args.engine.sandbox_config(AMQP_POOL_SIZE),
            })
            .await
        }
        BenchCommand::Scale(args) => {
            scale::run(scale::ScaleOptions {
                tasks: args.tasks,
                broker: args.broker,
            })
            .await
        }
    };
    outcome.map_err(failure)
}

/// A benchmark pointed at another machine is bad input (2), as is an unreadable plugin; a
/// plugin that is not one is exit 4; anything else is internal (70).
fn failure(error: anyhow::Error) -> Failure {
    if error.is::<NotLocal>() {
        return Failure::new(ExitStatus::BadInput, error);
    }
    match error.downcast::<PluginError>() {
        Ok(plugin) => plugin.into(),
        Err(error) => Failure::internal(error),
    }
}
