//! `wasmq bench embedded`: the whole loop on a fresh embedded broker in a temporary folder,
//! an in-process worker and the bundled `math` plugin:
//! 1. publish rate: `Client::send_task` of N trivial tasks (`math.add`), one at a time;
//! 2. drain: the worker starts with the N tasks queued; time until the last result is
//!    stored (results on: every task's meta is written, then its message acked);
//! 3. round trip: M sequential `send_task` → `get`, reporting p50/p95/p99;
//! 4. across processes: a `wasmq worker` process on another file of the folder, this
//!    process as the client, M round trips 20 ms apart (so the worker has gone idle before
//!    each), then the idle worker's CPU over 10 s — once with the file watcher waking each
//!    side on the other's commits, once with polling only (`WASMQ_SQLITE_WATCH=off`, the
//!    behaviour before watchers), side by side.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use serde_json::{Map, json};

use super::stats::{format_ms as ms, percentile};
use super::workers::{BenchProcess, InProcessWorker, export_bundled, process_cpu};
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

    // 4. Across processes, with and without the file watcher.
    let plugins = folder.path().join("plugins");
    export_bundled(&std::env::current_exe()?, &plugins)?;
    let watched = cross_process(folder.path(), &plugins, true, options.round_trips).await?;
    let polled = cross_process(folder.path(), &plugins, false, options.round_trips).await?;

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
    for (label, measured) in [
        ("file watcher (default)", &watched),
        ("polling only (`WASMQ_SQLITE_WATCH=off`)", &polled),
    ] {
        println!(
            "| across processes, {label}: round trip ({}, 20 ms apart) | p50 {} · p95 {} · p99 {} |",
            options.round_trips,
            ms(percentile(&measured.latencies, 50.0)),
            ms(percentile(&measured.latencies, 95.0)),
            ms(percentile(&measured.latencies, 99.0))
        );
        println!(
            "| across processes, {label}: idle worker's CPU over 10 s | {} |",
            measured
                .idle_cpu
                .map_or_else(|| "n/a".to_owned(), |p| format!("{p:.2} % of a core"))
        );
    }
    Ok(())
}

/// Round trips to a worker in another process, and that worker's CPU while idle.
struct CrossProcess {
    /// Send → result, sorted.
    latencies: Vec<Duration>,
    /// The idle worker's CPU in percent of one core (Linux only).
    idle_cpu: Option<f64>,
}

/// Starts `wasmq worker` on a new file in `folder` and measures `round_trips` round trips
/// from this process, then the worker's idle CPU; with the file watcher on both sides, or
/// with polling only on both.
async fn cross_process(
    folder: &Path,
    plugins: &Path,
    watch: bool,
    round_trips: usize,
) -> anyhow::Result<CrossProcess> {
    let file = folder.join(if watch { "watched.db" } else { "polled.db" });
    let url = format!("sqlite://{}", file.display());
    crate::db::watch_files_opened_from_now(watch);
    let opened = (|| -> anyhow::Result<_> {
        let broker = crate::broker::connect(&url)?;
        let backend = crate::results::connect(&url, crate::results::DEFAULT_RESULT_EXPIRES, &url)?;
        Ok((broker, backend))
    })();
    crate::db::watch_files_opened_from_now(true);
    let (broker, backend) = opened?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["worker", "--broker", &url, "--result-backend", &url])
        .args([
            "--concurrency",
            "1",
            "--name",
            "wasmq-bench-cross@localhost",
        ])
        .arg("--plugins")
        .arg(plugins)
        .env("WASMQ_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !watch {
        command.env("WASMQ_SQLITE_WATCH", "off");
    }
    let worker = BenchProcess::spawn(&mut command).context("cannot start a wasmq worker")?;
    let client = Client::new(broker, backend);
    let add = |i: usize| {
        let client = client.clone();
        async move {
            client
                .send_task(
                    "math.add",
                    vec![json!(i), json!(1)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await?
                .get(Duration::from_secs(120))
                .await?;
            anyhow::Ok(())
        }
    };
    // The worker is up once it has answered (it compiles its plugins first).
    add(0).await?;
    let mut latencies = Vec::with_capacity(round_trips);
    for i in 0..round_trips {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        add(i).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = process_cpu(worker.id());
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let after = process_cpu(worker.id());
    let idle_cpu = before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b).as_secs_f64() / window.as_secs_f64() * 100.0);
    drop(worker);
    Ok(CrossProcess {
        latencies,
        idle_cpu,
    })
}
