//! `wasmq bench scale`: drain throughput with 1, 2 and 4 `wasmq worker` processes
//! (concurrency 2 each) on one queue, results off, timed from the first message taken to an
//! empty queue (at most the workers' prefetch is still in flight then). The workers are this
//! very binary, started as an operator would start them.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::workers::{BenchProcess, export_bundled};
use super::{only_local, publish_adds, queue_name};
use crate::broker::Broker;
use crate::broker::amqp::AmqpBroker;
use crate::client::Client;

/// What `wasmq bench scale` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct ScaleOptions {
    /// Tasks per measurement.
    pub(crate) tasks: usize,
    /// The broker, as lapin spells it (must be on this machine).
    pub(crate) broker: String,
}

/// Runs the three drains and prints their table.
///
/// # Errors
/// When the broker is not on this machine ([`super::NotLocal`]), RabbitMQ or Redis cannot be
/// reached, or the worker processes cannot be started.
pub(crate) async fn run(options: ScaleOptions) -> anyhow::Result<()> {
    only_local(&options.broker)?;
    super::expire_leftover_queues(&options.broker);
    let broker = Arc::new(AmqpBroker::new(&options.broker)?);
    let exe = std::env::current_exe()?;
    let folder = tempfile::tempdir()?;
    let plugins = folder.path().join("plugins");
    export_bundled(&exe, &plugins)?;
    let backend = crate::results::connect(
        "redis://127.0.0.1:6379/0",
        Duration::from_secs(60),
        &options.broker,
    )?;
    println!(
        "| worker processes (concurrency 2 each) | drain `math.add`, results off | vs 1 process |"
    );
    println!("|---|---|---|");
    let mut single = None;
    for processes in [1_usize, 2, 4] {
        let queue = queue_name(&format!("scale{processes}"));
        let client = Client::new(Arc::clone(&broker) as Arc<dyn Broker>, Arc::clone(&backend))
            .with_default_queue(queue.clone());
        publish_adds(&client, options.tasks, || {}).await?;
        let mut workers = Vec::new();
        for w in 0..processes {
            let worker = BenchProcess::spawn(
                Command::new(&exe)
                    .args([
                        "worker",
                        "--broker",
                        &options.broker,
                        "-Q",
                        &queue,
                        "--concurrency",
                        "2",
                        "--name",
                    ])
                    .arg(format!("wasmq-scale-{w}@localhost"))
                    .arg("--plugins")
                    .arg(&plugins)
                    .env("WASMQ_LOG", "error")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .context("cannot start a wasmq worker")?;
            workers.push(worker);
        }
        let total = options.tasks as u64;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = broker.queue_length(&queue).await?;
            if left < total && started.is_none() {
                started = Some(Instant::now());
            }
            if left == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rate =
            options.tasks as f64 / started.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
        drop(workers);
        broker.delete_queue(&queue).await?;
        let base = *single.get_or_insert(rate);
        println!("| {processes} | {rate:.0} tasks/s | {:.2}× |", rate / base);
    }
    Ok(())
}
