//! `wasmq bench autoscale`: adaptive concurrency against fixed sizes, on the embedded
//! broker with an in-process worker (a fresh database per run, the backlog queued before
//! the worker starts):
//!
//! 1. **throughput** on a mix of I/O-bound and CPU-bound tasks (`math.sleep` and
//!    `math.fib`, alternating): tasks finished per second over the window, for each fixed
//!    concurrency and for `--concurrency auto`;
//! 2. **memory**: a mix of memory-heavy tasks (`hostile.hog`, which fills its memory limit)
//!    and sleeping ones, every task limited to the same memory, run by a fixed high
//!    concurrency and by `auto` with a memory budget: the most memory committed at once
//!    (tasks running × their limit, counted by the worker's own hooks), the resident memory
//!    it reached above where the run started, and the throughput.
//!
//! Results are off (`ignore_result`), so a task's hooks run while it still holds its slot
//! and the running count is exact. Each run is bounded by its task count and its window.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::stats::rss_kib;
use crate::autoscale::AutoscalePolicy;
use crate::client::Client;
use crate::engine::{Sandbox, SandboxConfig};
use crate::registry::Registry;
use crate::worker::{Hooks, Worker, WorkerOptions};

/// What `wasmq bench autoscale` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct AutoscaleOptions {
    /// How long each run may last.
    pub(crate) window: Duration,
    /// Tasks queued for each run (at most this many run).
    pub(crate) tasks: usize,
    /// The fixed concurrencies `auto` is compared with.
    pub(crate) fixed: Vec<usize>,
    /// How long the I/O-bound tasks sleep, in seconds.
    pub(crate) sleep: f64,
    /// The CPU-bound tasks' `math.fib` argument.
    pub(crate) fib: u32,
    /// The memory budget of the memory run's `auto`.
    pub(crate) budget: u64,
    /// The sandbox (its pool sized for the largest concurrency; its default memory limit
    /// is every task's).
    pub(crate) sandbox: SandboxConfig,
}

/// How a run sizes its worker.
#[derive(Debug, Clone)]
enum Size {
    Fixed(usize),
    Auto(AutoscalePolicy),
}

impl Size {
    fn label(&self) -> String {
        match self {
            Size::Fixed(n) => n.to_string(),
            Size::Auto(policy) => format!("auto ({}–{})", policy.min, policy.max),
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Measured {
    done: u64,
    elapsed: Duration,
    /// The most tasks running at once.
    most_running: usize,
    /// The smallest and largest slot counts seen (sampled every 100 ms).
    slots: (usize, usize),
    /// Resident memory reached above the start of the run, in MiB.
    rss_above_start_mib: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs both parts and prints their tables.
///
/// # Errors
/// When the sandbox, the bundled plugins or a run's temporary database cannot be set up.
pub(crate) async fn run(options: AutoscaleOptions) -> anyhow::Result<()> {
    let sandbox = Arc::new(Sandbox::new(options.sandbox.clone())?);
    let registry = Arc::new(Registry::bundled(sandbox).await?);
    let task_memory = options.sandbox.defaults.memory_bytes;
    let auto = AutoscalePolicy::auto();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

    println!(
        "### Throughput: `math.sleep({})` and `math.fib({})` alternating, {} queued, window {:?}, {cpus} CPUs\n",
        options.sleep, options.fib, options.tasks, options.window
    );
    println!("| concurrency | tasks done | tasks/s | vs best fixed | slots used (min–max) |");
    println!("|---|---|---|---|---|");
    let (sleep, fib) = (options.sleep, options.fib);
    let mix = move |i: usize| {
        if i.is_multiple_of(2) {
            ("math.sleep", json!([sleep]))
        } else {
            ("math.fib", json!([fib]))
        }
    };
    let mut rows = Vec::new();
    for size in options
        .fixed
        .iter()
        .map(|&n| Size::Fixed(n))
        .chain([Size::Auto(auto.clone())])
    {
        let measured = measure(&registry, &options, &size, mix).await?;
        rows.push((size, measured));
    }
    let best = rows
        .iter()
        .filter(|(size, _)| matches!(size, Size::Fixed(_)))
        .map(|(_, m)| m.rate())
        .fold(0.0, f64::max);
    for (size, m) in &rows {
        println!(
            "| {} | {} | {:.1} | {:+.1} % | {}–{} |",
            size.label(),
            m.done,
            m.rate(),
            (m.rate() / best - 1.0) * 100.0,
            m.slots.0,
            m.slots.1,
        );
    }

    let high = options.fixed.iter().copied().max().unwrap_or(16);
    let budgeted = AutoscalePolicy {
        memory_budget: Some(options.budget),
        ..auto
    };
    println!(
        "\n### Memory: `hostile.hog` (fills its {} MiB limit) and `math.sleep({})` alternating, auto's budget {} MiB\n",
        task_memory >> 20,
        options.sleep,
        options.budget >> 20
    );
    println!(
        "| concurrency | memory budget | most committed at once (running × limit) | resident memory above the start | tasks/s |"
    );
    println!("|---|---|---|---|---|");
    let memory_mix = move |i: usize| {
        if i.is_multiple_of(2) {
            ("hostile.hog", json!([]))
        } else {
            ("math.sleep", json!([sleep]))
        }
    };
    for size in [Size::Fixed(high), Size::Auto(budgeted)] {
        let m = measure(&registry, &options, &size, memory_mix).await?;
        let budget = match &size {
            Size::Auto(policy) => policy
                .memory_budget
                .map_or("none".to_owned(), |b| format!("{} MiB", b >> 20)),
            Size::Fixed(_) => "none".to_owned(),
        };
        println!(
            "| {} | {budget} | {} MiB ({} tasks) | {:.0} MiB | {:.1} |",
            size.label(),
            (m.most_running as u64 * task_memory) >> 20,
            m.most_running,
            m.rss_above_start_mib,
            m.rate(),
        );
    }
    Ok(())
}

/// One run: `options.tasks` tasks (`task(i)` names the i-th) queued on a fresh embedded
/// broker, then a worker sized as `size` runs them until they are done or the window ends.
async fn measure(
    registry: &Arc<Registry>,
    options: &AutoscaleOptions,
    size: &Size,
    task: impl Fn(usize) -> (&'static str, serde_json::Value),
) -> anyhow::Result<Measured> {
    let folder = tempfile::tempdir()?;
    let url = format!("sqlite://{}", folder.path().join("bench.db").display());
    let broker = crate::broker::connect(&url)?;
    let backend = crate::results::connect(&url, crate::results::DEFAULT_RESULT_EXPIRES, &url)?;
    let client = Client::new(Arc::clone(&broker), Arc::clone(&backend));
    for i in 0..options.tasks {
        let (name, args) = task(i);
        client
            .send_task(
                name,
                args.as_array().cloned().unwrap_or_default(),
                serde_json::Map::new(),
                crate::client::SendOptions {
                    ignore_result: Some(true),
                    ..crate::client::SendOptions::default()
                },
            )
            .await?;
    }

    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (up, down, seen) = (
        Arc::clone(&running),
        Arc::clone(&running),
        Arc::clone(&most),
    );
    let hooks = Hooks::new()
        .before_task(move |_| {
            let now = up.fetch_add(1, Ordering::Relaxed) + 1;
            seen.fetch_max(now, Ordering::Relaxed);
        })
        .after_task(move |_| {
            down.fetch_sub(1, Ordering::Relaxed);
        });
    let (concurrency, autoscale) = match size {
        Size::Fixed(n) => (*n, None),
        Size::Auto(policy) => (policy.max, Some(policy.clone())),
    };
    let worker = Worker::new(
        broker,
        backend,
        Arc::clone(registry),
        WorkerOptions {
            concurrency,
            autoscale,
            hooks,
            node_name: "wasmq-bench-autoscale@localhost".into(),
            shutdown_timeout: Duration::from_secs(2),
            heartbeat: None,
            ..WorkerOptions::default()
        },
    );
    let stats = worker.stats();
    let status = worker.status_view();
    let rss_start = rss_kib();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let handle = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    // Every 100 ms: the slots in use, the resident memory; until done or the window ends.
    let mut measured = Measured {
        slots: (usize::MAX, 0),
        ..Measured::default()
    };
    let mut rss_most = rss_start;
    let total = options.tasks as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let snapshot = status.snapshot();
        if let Some(slots) = snapshot["concurrency"].as_u64() {
            let slots = usize::try_from(slots).unwrap_or(usize::MAX);
            measured.slots = (measured.slots.0.min(slots), measured.slots.1.max(slots));
        }
        rss_most = rss_most.max(rss_kib());
        let settled = stats.settled.load(Ordering::Relaxed);
        if settled >= total || started.elapsed() >= options.window {
            break;
        }
    }
    measured.elapsed = started.elapsed();
    measured.done = stats.settled.load(Ordering::Relaxed);
    let _ = stop.send(());
    handle.await??;
    measured.most_running = most.load(Ordering::Relaxed);
    measured.rss_above_start_mib = rss_most.saturating_sub(rss_start) as f64 / 1024.0;
    Ok(measured)
}
