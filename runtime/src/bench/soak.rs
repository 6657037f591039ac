//! `wasmq bench soak`: the resident memory of a worker (in this process, with its client)
//! idle with the bundled plugins loaded, at full load, and after every 20,000 tasks, on
//! RabbitMQ with results off. Tasks are published in rounds of 20,000 by 8 concurrent
//! publishers while the worker drains; memory that grows round after round is a leak.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::stats::rss_kib;
use super::workers::InProcessWorker;
use super::{only_local, publish_adds, queue_name};
use crate::broker::Broker;
use crate::broker::amqp::AmqpBroker;
use crate::client::Client;
use crate::engine::{Sandbox, SandboxConfig};
use crate::registry::Registry;
use crate::worker::WorkerOptions;

/// What `wasmq bench soak` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct SoakOptions {
    /// Tasks to run in all.
    pub(crate) tasks: usize,
    /// The broker, as lapin spells it (must be on this machine).
    pub(crate) broker: String,
    /// The worker's sandbox.
    pub(crate) sandbox: SandboxConfig,
}

/// Runs the soak and prints its table.
///
/// # Errors
/// When the broker is not on this machine ([`super::NotLocal`]) or RabbitMQ or Redis cannot
/// be reached.
pub(crate) async fn run(options: SoakOptions) -> anyhow::Result<()> {
    only_local(&options.broker)?;
    super::expire_leftover_queues(&options.broker);
    let broker = Arc::new(AmqpBroker::new(&options.broker)?);
    let sandbox = Arc::new(Sandbox::new(options.sandbox)?);
    let registry = Arc::new(Registry::bundled(Arc::clone(&sandbox)).await?);
    let queue = queue_name("soak");
    let backend = crate::results::connect(
        "redis://127.0.0.1:6379/0",
        Duration::from_secs(60),
        &options.broker,
    )?;
    let client = Client::new(Arc::clone(&broker) as Arc<dyn Broker>, backend)
        .with_default_queue(queue.clone());
    let worker = InProcessWorker::spawn(
        Arc::clone(&broker) as Arc<dyn Broker>,
        client.backend(),
        registry,
        WorkerOptions {
            queues: vec![queue.clone()],
            node_name: "wasmq-soak@localhost".into(),
            ..WorkerOptions::default()
        },
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib();
    println!("| tasks done | resident memory (this process: worker + client) |");
    println!("|---|---|");
    println!(
        "| 0 (idle, bundled plugins loaded) | {:.1} MiB |",
        idle as f64 / 1024.0
    );
    let round = 20_000.min(options.tasks.max(1));
    let mut sent = 0;
    let mut peak = idle;
    let started = Instant::now();
    while sent < options.tasks {
        let this_round = round.min(options.tasks - sent);
        publish_adds(&client, this_round, || peak = peak.max(rss_kib())).await?;
        sent += this_round;
        while (worker.stats.succeeded.load(Ordering::Relaxed) as usize) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(rss_kib());
        }
        println!("| {sent} | {:.1} MiB |", rss_kib() as f64 / 1024.0);
    }
    println!("| peak during the run | {:.1} MiB |", peak as f64 / 1024.0);
    eprintln!("{} tasks in {:.1?}", options.tasks, started.elapsed());
    worker.stop().await;
    broker.delete_queue(&queue).await?;
    Ok(())
}
