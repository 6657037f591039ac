//! `wasmq bench`: throughput and latency of the whole loop, measured in one run and printed
//! as a markdown table (recorded in BENCHMARKS.md).
//!
//! `wasmq bench embedded` uses a fresh embedded broker in a temporary folder, an in-process
//! worker and the bundled `math` plugin:
//! 1. publish rate: `Client::send_task` of N trivial tasks (`math.add`), one at a time;
//! 2. drain: the worker starts with the N tasks queued; time until the last result is
//!    stored (results on: every task's meta is written, then its message acked);
//! 3. round trip: M sequential `send_task` → `get`, reporting p50/p95/p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, json};

use super::{EngineArgs, Failure};
use crate::client::{Client, SendOptions};
use crate::engine::Sandbox;
use crate::registry::Registry;
use crate::worker::{Worker, WorkerOptions};

#[derive(Debug, clap::Subcommand)]
pub(super) enum BenchCommand {
    /// The embedded (SQLite) broker and result backend, worker in-process.
    Embedded(EmbeddedArgs),
    /// RabbitMQ: wasmq side by side with the raw AMQP ceiling and Python Celery.
    Amqp(super::bench_amqp::AmqpArgs),
    /// RabbitMQ: the worker's resident memory idle, under load and across many tasks.
    Soak(super::bench_amqp::SoakArgs),
    /// RabbitMQ: drain throughput with 1, 2 and 4 worker processes.
    Scale(super::bench_amqp::ScaleArgs),
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

pub(super) async fn run(command: BenchCommand) -> Result<(), Failure> {
    match command {
        BenchCommand::Embedded(args) => embedded(args).await,
        BenchCommand::Amqp(args) => super::bench_amqp::run(args).await,
        BenchCommand::Soak(args) => super::bench_amqp::soak(args).await,
        BenchCommand::Scale(args) => super::bench_amqp::scale(args).await,
    }
}

/// The `p`-th percentile (nearest rank) of sorted values.
pub(super) fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn embedded(args: EmbeddedArgs) -> Result<(), Failure> {
    let folder = tempfile::tempdir().map_err(Failure::internal)?;
    let url = format!("sqlite://{}", folder.path().join("bench.db").display());
    let broker = crate::broker::connect(&url).map_err(Failure::internal)?;
    let backend = crate::results::connect(&url, crate::results::DEFAULT_RESULT_EXPIRES, &url)
        .map_err(Failure::internal)?;
    let options = WorkerOptions {
        concurrency: args
            .concurrency
            .unwrap_or_else(|| WorkerOptions::default().concurrency),
        node_name: "wasmq-bench@localhost".into(),
        ..WorkerOptions::default()
    };
    let sandbox = Arc::new(
        Sandbox::new(
            args.engine
                .sandbox_config(u32::try_from(options.concurrency + 4).unwrap_or(64)),
        )
        .map_err(Failure::internal)?,
    );
    let math = sandbox
        .load_plugin_bytes("math", crate::bundled::MATH)
        .await?;
    let registry = Arc::new(
        Registry::from_plugins(Arc::clone(&sandbox), vec![("math".into(), math)])
            .map_err(Failure::internal)?,
    );
    let client = Client::new(Arc::clone(&broker), Arc::clone(&backend));
    let send_error = |e: crate::client::SendError| Failure::internal(anyhow::anyhow!("{e:#}"));

    // 1. Publish rate.
    let started = Instant::now();
    let mut last = None;
    for i in 0..args.tasks {
        let n = json!(i);
        last = Some(
            client
                .send_task(
                    "math.add",
                    vec![n.clone(), n],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .map_err(send_error)?,
        );
    }
    let publish = started.elapsed();

    // 2. Drain with the worker starting on a full queue.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(
        Arc::clone(&broker),
        Arc::clone(&backend),
        registry,
        options.clone(),
    );
    let started = Instant::now();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    if let Some(last) = &last {
        last.get(Duration::from_secs(600))
            .await
            .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
    }
    while broker
        .queue_length("celery")
        .await
        .map_err(Failure::internal)?
        > 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = started.elapsed();

    // 3. Sequential round trips on the idle worker.
    let mut latencies = Vec::with_capacity(args.round_trips);
    for i in 0..args.round_trips {
        let started = Instant::now();
        let result = client
            .send_task(
                "math.add",
                vec![json!(i), json!(1)],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .map_err(send_error)?;
        result
            .get(Duration::from_secs(60))
            .await
            .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let _ = stop.send(());
    let _ = worker.await;

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(f64::EPSILON);
    println!(
        "wasmq bench embedded: {} tasks, {} round trips, worker concurrency {}, broker {url}\n",
        args.tasks, args.round_trips, options.concurrency
    );
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| publish `math.add` (`Client::send_task`, one at a time) | {:.0} msgs/s |",
        rate(args.tasks, publish)
    );
    println!(
        "| drain {} queued `math.add`, results stored | {:.0} tasks/s ({:.2} s) |",
        args.tasks,
        rate(args.tasks, drain),
        drain.as_secs_f64()
    );
    println!(
        "| round trip send → result, sequential ({}) | p50 {} · p95 {} · p99 {} |",
        args.round_trips,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 99.0))
    );
    Ok(())
}
