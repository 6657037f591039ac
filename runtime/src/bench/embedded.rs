//! `wasmq bench embedded`: the whole loop on a fresh embedded broker in a temporary folder,
//! an in-process worker and the bundled `math` plugin:
//! 1. publish rate: `Client::send_task` of N trivial tasks (`math.add`), one at a time;
//! 2. drain: the worker starts with the N tasks queued; time until the last result is
//!    stored (results on: every task's meta is written, then its message acked);
//! 3. round trip: M sequential `send_task` → `get`, reporting p50/p95/p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, json};

use super::stats::{format_ms as ms, percentile};
use super::workers::InProcessWorker;
use crate::client::{Client, SendOptions};
use crate::engine::{Sandbox, SandboxConfig};
use crate::registry::Registry;
use crate::worker::WorkerOptions;

/// What `wasmq bench embedded` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct EmbeddedOptions {
    /// Tasks to publish and drain.
    pub(crate) tasks: usize,
    /// Sequential round trips for the latency percentiles.
    pub(crate) round_trips: usize,
    /// Worker concurrency.
    pub(crate) concurrency: usize,
    /// The worker's sandbox.
    pub(crate) sandbox: SandboxConfig,
}

/// Runs the three measurements and prints their table.
///
/// # Errors
/// When the temporary folder, the embedded database or the bundled plugin cannot be set up
/// (a [`crate::engine::PluginError`] keeps its type), or a task does not finish.
pub(crate) async fn run(options: EmbeddedOptions) -> anyhow::Result<()> {
    let folder = tempfile::tempdir()?;
    let url = format!("sqlite://{}", folder.path().join("bench.db").display());
    let broker = crate::broker::connect(&url)?;
    let backend = crate::results::connect(&url, crate::results::DEFAULT_RESULT_EXPIRES, &url)?;
    let worker_options = WorkerOptions {
        concurrency: options.concurrency,
        node_name: "wasmq-bench@localhost".into(),
        ..WorkerOptions::default()
    };
    let sandbox = Arc::new(Sandbox::new(options.sandbox)?);
    let math = sandbox
        .load_plugin_bytes("math", crate::bundled::MATH)
        .await?;
    let registry = Arc::new(Registry::from_plugins(
        Arc::clone(&sandbox),
        vec![("math".into(), math)],
    )?);
    let client = Client::new(Arc::clone(&broker), Arc::clone(&backend));

    // 1. Publish rate.
    let started = Instant::now();
    let mut last = None;
    for i in 0..options.tasks {
        let n = json!(i);
        last = Some(
            client
                .send_task(
                    "math.add",
                    vec![n.clone(), n],
                    Map::new(),
                    SendOptions::default(),
                )
                .await?,
        );
    }
    let publish = started.elapsed();

    // 2. Drain with the worker starting on a full queue.
    let started = Instant::now();
    let worker = InProcessWorker::spawn(
        Arc::clone(&broker),
        Arc::clone(&backend),
        registry,
        worker_options,
    );
    if let Some(last) = &last {
        last.get(Duration::from_secs(600)).await?;
    }
    while broker.queue_length("celery").await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = started.elapsed();

    // 3. Sequential round trips on the idle worker.
    let mut latencies = Vec::with_capacity(options.round_trips);
    for i in 0..options.round_trips {
        let started = Instant::now();
        let result = client
            .send_task(
                "math.add",
                vec![json!(i), json!(1)],
                Map::new(),
                SendOptions::default(),
            )
            .await?;
        result.get(Duration::from_secs(60)).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    worker.stop().await;

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(f64::EPSILON);
    println!(
        "wasmq bench embedded: {} tasks, {} round trips, worker concurrency {}, broker {url}\n",
        options.tasks, options.round_trips, options.concurrency
    );
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| publish `math.add` (`Client::send_task`, one at a time) | {:.0} msgs/s |",
        rate(options.tasks, publish)
    );
    println!(
        "| drain {} queued `math.add`, results stored | {:.0} tasks/s ({:.2} s) |",
        options.tasks,
        rate(options.tasks, drain),
        drain.as_secs_f64()
    );
    println!(
        "| round trip send → result, sequential ({}) | p50 {} · p95 {} · p99 {} |",
        options.round_trips,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 99.0))
    );
    Ok(())
}
