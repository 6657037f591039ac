//! `wasmq bench`: the flags of each benchmark and how its errors end the command. The
//! measurements themselves are the library's harness, `crate::bench`.

use super::args::EngineArgs;
use super::exit::{ExitStatus, Failure};
use crate::bench::{NotLocal, amqp, autoscale, cpu, deploy, embedded, redis, scale, soak, tenants};
use crate::engine::Limits;
use crate::engine::PluginError;
use crate::worker::WorkerOptions;

/// The default broker of the RabbitMQ benchmarks, as lapin spells it.
const LOCAL_RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Instance slots of the sandbox of the RabbitMQ and Redis benchmarks' in-process workers.
const AMQP_POOL_SIZE: u32 = 32;

#[derive(Debug, clap::Subcommand)]
pub(super) enum BenchCommand {
    /// The embedded (SQLite) broker and result backend, worker in-process.
    Embedded(EmbeddedArgs),
    /// RabbitMQ: wasmq side by side with the raw AMQP ceiling and Python Celery.
    Amqp(AmqpArgs),
    /// Redis: wasmq on the Redis broker side by side with the raw Redis ceiling (kombu's
    /// messages, BRPOP consumers) and Python Celery on the same Redis.
    Redis(RedisArgs),
    /// RabbitMQ: the worker's resident memory idle, under load and across many tasks.
    Soak(SoakArgs),
    /// RabbitMQ: drain throughput with 1, 2 and 4 worker processes.
    Scale(ScaleArgs),
    /// The noisy neighbour: tenant B's latency while tenant A floods or attacks, FIFO
    /// (no tenants) side by side with two tenants sharing the slots fairly.
    Tenants(TenantsArgs),
    /// A fleet deploy's cost to a running worker: publish → served, and its tasks' round
    /// trips while releases are swapped in.
    Deploy(DeployArgs),
    /// `--concurrency auto` against fixed concurrencies: throughput on a mix of sleeping and
    /// CPU-bound tasks, and the memory committed on a memory-heavy mix under a budget.
    Autoscale(AutoscaleArgs),
    /// CPU-heavy workloads (fib, Markdown, regex, JSON, SHA-256, sort) as native Rust and
    /// as Wasm with no CPU metering, CPU-time metering (the default) and fuel; then a
    /// spinning task stopped by its CPU budget under each metering. No broker.
    Cpu(CpuArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct CpuArgs {
    /// Rounds per workload; each cell is the median of its rounds.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Only these workloads, comma-separated (fib, markdown, regex, json, sha256, sort).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Another build of the `cpu` plugin (plugins/cpu) to measure, e.g. with another guest
    /// profile. Default: the one bundled in this binary.
    #[arg(long)]
    plugin: Option<std::path::PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct AutoscaleArgs {
    /// How long each run may last, e.g. 40s.
    #[arg(long, default_value = "40s")]
    window: String,
    /// Tasks queued for each run.
    #[arg(long, default_value_t = 4_000)]
    tasks: usize,
    /// The fixed concurrencies to compare with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    fixed: Vec<usize>,
    /// Seconds each I/O-bound task sleeps.
    #[arg(long, default_value_t = 0.25)]
    sleep: f64,
    /// The CPU-bound tasks' math.fib argument (34: about 45 ms of CPU here).
    #[arg(long, default_value_t = 34)]
    fib: u32,
    /// Every task's memory limit, e.g. 64MiB.
    #[arg(long, default_value = "64MiB")]
    memory: String,
    /// The memory budget of auto in the memory run, e.g. 256MiB.
    #[arg(long, default_value = "256MiB")]
    budget: String,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct DeployArgs {
    /// Releases to publish, one after another.
    #[arg(long, default_value_t = 10)]
    deploys: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct TenantsArgs {
    /// RabbitMQ on this machine (a vhost per tenant, made with rabbitmqctl), e.g.
    /// amqp://guest:guest@127.0.0.1:5672/%2f. Default: the embedded broker.
    #[arg(long)]
    amqp: Option<String>,
    /// Tasks in tenant A's CPU-heavy flood (math.fib(27)).
    #[arg(long, default_value_t = 20_000)]
    flood: usize,
    /// Tasks in A's hostile (spin, hog) and 1 MiB-argument backlogs.
    #[arg(long, default_value_t = 2_000)]
    hostile: usize,
    /// How long B probes in each run, e.g. 10s.
    #[arg(long, default_value = "10s")]
    window: String,
    /// B's probes per second.
    #[arg(long, default_value_t = 5.0)]
    probe_rate: f64,
    /// The worker's slots.
    #[arg(long, short = 'c', default_value_t = 2)]
    concurrency: usize,
    /// Only the runs with two tenants (skips the FIFO baseline, whose starved probes take
    /// the longest).
    #[arg(long)]
    fair_only: bool,
    #[command(flatten)]
    engine: EngineArgs,
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
    /// Only the task-events rows (the same drain with task events off and on, alternated):
    /// what task events cost on this machine.
    #[arg(long)]
    events_only: bool,
    /// Alternations of the events-off and events-on drains.
    #[arg(long, default_value_t = 5)]
    event_rounds: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, clap::Args)]
pub(super) struct RedisArgs {
    /// A short run (5,000 tasks, 200 round trips) for development: under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// The Redis database used as broker and result backend (must be on this machine).
    /// Give the bench a database of its own: every key that appears in it during the run
    /// is deleted at the end.
    #[arg(long, default_value = redis::LOCAL_REDIS)]
    broker: String,
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
                events_only: args.events_only,
                event_rounds: args.event_rounds.max(1),
                sandbox: args.engine.sandbox_config(AMQP_POOL_SIZE),
            })
            .await
        }
        BenchCommand::Redis(args) => {
            redis::run(redis::RedisOptions {
                quick: args.quick,
                broker: args.broker,
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
        BenchCommand::Tenants(args) => {
            let window = crate::units::parse_duration(&args.window)
                .map_err(|e| Failure::bad_input(format!("--window: {e}")))?;
            if args.concurrency < 2 || args.probe_rate.is_nan() || args.probe_rate <= 0.0 {
                return Err(Failure::bad_input(
                    "bench tenants needs at least 2 slots and a positive probe rate",
                ));
            }
            let mut sandbox = args
                .engine
                .sandbox_config(u32::try_from(args.concurrency + 4).unwrap_or(64));
            // What A's hostile tasks run into: about 0.2 s of fuel, 64 MiB, 5 s.
            sandbox.defaults = Limits {
                fuel: 2_000_000_000,
                memory_bytes: 64 << 20,
                timeout: std::time::Duration::from_secs(5),
            };
            tenants::run(tenants::TenantsOptions {
                amqp: args.amqp,
                flood: args.flood,
                hostile: args.hostile,
                window,
                probe_rate: args.probe_rate,
                concurrency: args.concurrency,
                fair_only: args.fair_only,
                sandbox,
            })
            .await
        }
        BenchCommand::Deploy(args) => {
            deploy::run(deploy::DeployOptions {
                deploys: args.deploys.max(1),
                sandbox: args.engine.sandbox_config(8),
            })
            .await
        }
        BenchCommand::Autoscale(args) => {
            let window = crate::units::parse_duration(&args.window)
                .map_err(|e| Failure::bad_input(format!("--window: {e}")))?;
            let bytes = |flag: &str, text: &str| {
                crate::units::parse_bytes(text)
                    .map_err(|e| Failure::bad_input(format!("--{flag}: {e}")))
            };
            let (memory, budget) = (
                bytes("memory", &args.memory)?,
                bytes("budget", &args.budget)?,
            );
            if args.fixed.is_empty() || args.fixed.contains(&0) || args.tasks == 0 {
                return Err(Failure::bad_input(
                    "bench autoscale needs tasks and fixed concurrencies of at least 1",
                ));
            }
            let auto = crate::autoscale::AutoscalePolicy::auto().max;
            let largest = args.fixed.iter().copied().max().unwrap_or(1).max(auto);
            let mut sandbox = args
                .engine
                .sandbox_config(u32::try_from(largest + 4).unwrap_or(u32::MAX));
            sandbox.defaults.memory_bytes = memory;
            autoscale::run(autoscale::AutoscaleOptions {
                window,
                tasks: args.tasks,
                fixed: args.fixed,
                sleep: args.sleep,
                fib: args.fib,
                budget,
                sandbox,
            })
            .await
        }
        BenchCommand::Cpu(args) => {
            if args.rounds == 0 {
                return Err(Failure::bad_input("bench cpu needs at least 1 round"));
            }
            cpu::run(cpu::CpuOptions {
                rounds: args.rounds,
                only: args.only,
                plugin: args.plugin,
                sandbox: args.engine.sandbox_config(8),
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
