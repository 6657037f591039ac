//! `wasmq bench tenants`: the noisy-neighbour benchmark. Tenant B sends a `math.add` probe
//! at a steady rate (open loop) while tenant A, its backlog already queued, (1) floods
//! CPU-heavy tasks, (2) runs `hostile.spin` to its fuel ceiling, (3) runs `hostile.hog` to its
//! memory ceiling, (4) sends 1 MiB arguments. For each: B's probe latency (send → result)
//! p50/p99 against B alone — the ratio R = p99 with A / p99 alone — and A's throughput.
//! A fifth run floods both tenants at equal weights and reports Jain's fairness index over
//! the tasks each finished.
//!
//! Every run is made twice, side by side:
//! * **FIFO** — today without tenants: one worker consumes both tenants' queues from one
//!   broker as one merged stream;
//! * **fair** — two tenants on one worker: each its own broker (an SQLite file, or a
//!   RabbitMQ vhost created for the run), consumer and prefetch window, the slots shared by
//!   [`SlotArbiter`]: B has one reserved slot and A is capped to the others, so B never waits
//!   behind one of A's tasks.
//!
//! Probes still unanswered when the window and its grace have passed count as lasting until
//! then (p99 is then a lower bound, shown with `≥`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::rabbitmqctl;
use super::stats::percentile;
use crate::broker::Broker;
use crate::client::{Client, SendOptions};
use crate::engine::{Limits, Sandbox, SandboxConfig};
use crate::fair::{SlotArbiter, TenantShare};
use crate::registry::Registry;
use crate::results::ResultBackend;
use crate::worker::{Worker, WorkerOptions};

/// What `wasmq bench tenants` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct TenantsOptions {
    /// RabbitMQ (`amqp://…` on this machine, whose vhosts are created with `rabbitmqctl`),
    /// or none for the embedded broker.
    pub(crate) amqp: Option<String>,
    /// Tasks in tenant A's flood.
    pub(crate) flood: usize,
    /// Tasks in A's hostile and large-argument backlogs.
    pub(crate) hostile: usize,
    /// How long B probes in each run.
    pub(crate) window: Duration,
    /// B's probes per second.
    pub(crate) probe_rate: f64,
    /// The worker's slots.
    pub(crate) concurrency: usize,
    /// Only the runs with two tenants.
    pub(crate) fair_only: bool,
    /// The sandbox (its defaults are what A's hostile tasks run into).
    pub(crate) sandbox: SandboxConfig,
}

/// What tenant A does during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// Nothing: B alone.
    Idle,
    /// `flood` CPU-heavy tasks (`math.fib(27)`).
    Flood,
    /// `hostile.spin` until its fuel runs out.
    Spin,
    /// `hostile.hog` until its memory limit.
    Hog,
    /// `text.word_count` of 1 MiB of text.
    BigArgs,
    /// Both tenants flood (`math.fib(27)`), equal weights: the fairness index.
    BothFlood,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Idle => "B alone",
            Load::Flood => "A floods CPU-heavy tasks",
            Load::Spin => "A runs hostile.spin",
            Load::Hog => "A runs hostile.hog",
            Load::BigArgs => "A sends 1 MiB arguments",
            Load::BothFlood => "both flood (equal weights)",
        }
    }

    /// A's backlog: the task, its arguments, and how many.
    fn backlog(self, options: &TenantsOptions) -> Option<(&'static str, Value, usize)> {
        match self {
            Load::Idle => None,
            Load::Flood | Load::BothFlood => Some(("math.fib", json!([27]), options.flood)),
            Load::Spin => Some(("hostile.spin", json!([]), options.hostile)),
            Load::Hog => Some(("hostile.hog", json!([]), options.hostile)),
            Load::BigArgs => {
                // At most 200 of them: each is 1 MiB in the broker.
                let text = "lorem ipsum ".repeat((1 << 20) / 12);
                Some(("text.word_count", json!([text]), options.hostile.min(200)))
            }
        }
    }
}

/// How the worker serves the two tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One worker, one merged stream (no tenants).
    Fifo,
    /// Two tenants sharing the slots fairly.
    Fair,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Fifo => "FIFO (no tenants)",
            Mode::Fair => "fair (two tenants)",
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Measured {
    /// B's probe latencies in ms, sorted (unanswered ones at the window's end).
    probes: Vec<f64>,
    /// Probes unanswered at the end.
    missed: usize,
    /// A's tasks finished per second during the window.
    a_rate: f64,
    /// B's tasks finished per second during the window (both-flood run).
    b_rate: f64,
}

/// Where one run's tenants live: a broker and backend for each (the same for both in FIFO).
struct Place {
    a: (Arc<dyn Broker>, Arc<dyn ResultBackend>),
    b: (Arc<dyn Broker>, Arc<dyn ResultBackend>),
    /// Removes what the run created (RabbitMQ vhosts); files go with the temporary folder.
    cleanup: Vec<String>,
}

const QUEUE_A: &str = "tenant-a";
const QUEUE_B: &str = "tenant-b";

/// A fresh RabbitMQ vhost open to the benchmark's user; its name.
fn vhost(tag: &str) -> anyhow::Result<String> {
    let name = format!("wasmq-bench-{tag}-{}", uuid::Uuid::new_v4().simple());
    rabbitmqctl(&["add_vhost", &name])?;
    rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
    Ok(name)
}

fn endpoint(url: &str, results: &str) -> anyhow::Result<(Arc<dyn Broker>, Arc<dyn ResultBackend>)> {
    let broker = crate::broker::connect(url)?;
    let backend = crate::results::connect(results, Duration::from_secs(600), url)?;
    Ok((broker, backend))
}

fn place(options: &TenantsOptions, mode: Mode, folder: &std::path::Path) -> anyhow::Result<Place> {
    let sqlite = |name: &str| format!("sqlite://{}", folder.join(name).display());
    match (&options.amqp, mode) {
        (None, Mode::Fifo) => {
            let url = sqlite(&format!("fifo-{}.db", uuid::Uuid::new_v4().simple()));
            let a = endpoint(&url, &url)?;
            Ok(Place {
                b: a.clone(),
                a,
                cleanup: Vec::new(),
            })
        }
        (None, Mode::Fair) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let (url_a, url_b) = (sqlite(&format!("a-{id}.db")), sqlite(&format!("b-{id}.db")));
            Ok(Place {
                a: endpoint(&url_a, &url_a)?,
                b: endpoint(&url_b, &url_b)?,
                cleanup: Vec::new(),
            })
        }
        (Some(base), mode) => {
            let root = base
                .rsplit_once('/')
                .map_or(base.as_str(), |(root, _)| root);
            let results = "redis://127.0.0.1:6379/0";
            let va = vhost("a")?;
            let a = endpoint(&format!("{root}/{va}"), results)?;
            if mode == Mode::Fifo {
                return Ok(Place {
                    b: a.clone(),
                    a,
                    cleanup: vec![va],
                });
            }
            let vb = vhost("b")?;
            Ok(Place {
                a,
                b: endpoint(&format!("{root}/{vb}"), results)?,
                cleanup: vec![va, vb],
            })
        }
    }
}

/// Publishes `n` × `task(args)` with 8 publishers, results off.
async fn backlog(client: &Client, task: &str, args: Value, n: usize) -> anyhow::Result<()> {
    let args = args.as_array().cloned().unwrap_or_default();
    super::publish_tasks(client, task, move |_| args.clone(), n, || {}).await
}

/// Runs one measurement: the workers start with A's backlog queued, B probes for the window.
async fn measure(
    options: &TenantsOptions,
    sandbox: &Arc<Sandbox>,
    registry: &Arc<Registry>,
    mode: Mode,
    load: Load,
    folder: &std::path::Path,
) -> anyhow::Result<Measured> {
    let place = place(options, mode, folder)?;
    let client_a =
        Client::new(Arc::clone(&place.a.0), Arc::clone(&place.a.1)).with_default_queue(QUEUE_A);
    let client_b =
        Client::new(Arc::clone(&place.b.0), Arc::clone(&place.b.1)).with_default_queue(QUEUE_B);
    if let Some((task, args, n)) = load.backlog(options) {
        backlog(&client_a, task, args.clone(), n).await?;
        if load == Load::BothFlood {
            backlog(&client_b, task, args, n).await?;
        }
    }
    let node = format!("wasmq-bench-tenants@{}", uuid::Uuid::new_v4().simple());
    let base = WorkerOptions {
        node_name: node,
        prefetch_multiplier: 2,
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    let spawn = |worker: Worker, handles: &mut Vec<_>| {
        let mut stopped = stopped.clone();
        handles.push(tokio::spawn(async move {
            worker
                .run(async move { drop(stopped.wait_for(|s| *s).await) })
                .await
        }));
    };
    match mode {
        Mode::Fifo => {
            let worker = Worker::new(
                Arc::clone(&place.a.0),
                Arc::clone(&place.a.1),
                Arc::clone(registry),
                WorkerOptions {
                    queues: vec![QUEUE_A.into(), QUEUE_B.into()],
                    concurrency: options.concurrency,
                    ..base
                },
            );
            spawn(worker, &mut handles);
        }
        Mode::Fair => {
            let both = load == Load::BothFlood;
            let others = options.concurrency.saturating_sub(1).max(1);
            let shares = vec![
                TenantShare {
                    max_concurrency: if both { options.concurrency } else { others },
                    ..TenantShare::new("a")
                },
                TenantShare {
                    reserved: usize::from(!both),
                    ..TenantShare::new("b")
                },
            ];
            let slots = SlotArbiter::new(options.concurrency, shares)?;
            for (seat, (queue, (broker, backend), cap)) in [
                (
                    QUEUE_A,
                    place.a.clone(),
                    if both { options.concurrency } else { others },
                ),
                (QUEUE_B, place.b.clone(), options.concurrency),
            ]
            .into_iter()
            .enumerate()
            {
                let worker = Worker::sharing(
                    broker,
                    backend,
                    Arc::clone(registry),
                    WorkerOptions {
                        queues: vec![queue.into()],
                        concurrency: cap,
                        prefetch: Some(16 * cap),
                        ..base.clone()
                    },
                    slots.clone(),
                    seat,
                );
                spawn(worker, &mut handles);
            }
        }
    }

    // B probes at a steady rate; each probe waits for its own result. What each tenant ran
    // is what left its queue (the same measure for one merged worker and for two).
    let started = Instant::now();
    let (a_before, b_before) = (
        place.a.0.queue_length(QUEUE_A).await?,
        place.b.0.queue_length(QUEUE_B).await?,
    );
    let mut probes = Vec::new();
    let mut measured = Measured::default();
    if load == Load::BothFlood {
        tokio::time::sleep(options.window).await;
    } else {
        let period = Duration::from_secs_f64(1.0 / options.probe_rate);
        let mut tick = tokio::time::interval(period);
        while started.elapsed() < options.window {
            tick.tick().await;
            let client = client_b.clone();
            let sent = Instant::now();
            let probe = tokio::spawn(async move {
                let result = client
                    .send_task(
                        "math.add",
                        vec![json!(1), json!(2)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .ok()?;
                result.get(Duration::from_secs(3600)).await.ok()?;
                Some(sent.elapsed())
            });
            probes.push((sent, probe));
        }
    }
    let window = started.elapsed().as_secs_f64();
    let (a_after, b_after) = (
        place.a.0.queue_length(QUEUE_A).await?,
        place.b.0.queue_length(QUEUE_B).await?,
    );
    measured.a_rate = a_before.saturating_sub(a_after) as f64 / window;
    measured.b_rate = b_before.saturating_sub(b_after) as f64 / window;
    let grace = options.window / 2;
    let deadline = tokio::time::Instant::now() + grace;
    for (sent, probe) in probes {
        match tokio::time::timeout_at(deadline, probe).await {
            Ok(Ok(Some(latency))) => measured.probes.push(latency.as_secs_f64() * 1000.0),
            _ => {
                // Unanswered: it lasted at least until now.
                measured.missed += 1;
                measured.probes.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    measured.probes.sort_by(f64::total_cmp);
    let _ = stop.send(true);
    for handle in handles {
        let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
    }
    for vhost in &place.cleanup {
        let _ = rabbitmqctl(&["delete_vhost", vhost]);
    }
    let _ = sandbox;
    Ok(measured)
}

/// Jain's fairness index of `rates` (1 = perfectly even, 1/n = one takes everything).
fn jain(rates: &[f64]) -> f64 {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (rates.len() as f64 * squares)
}

/// Runs every measurement and prints the table.
///
/// # Errors
/// When a broker, a vhost or the bundled plugins cannot be set up.
pub(crate) async fn run(options: TenantsOptions) -> anyhow::Result<()> {
    if let Some(url) = &options.amqp {
        super::only_local(url)?;
    }
    let folder = tempfile::tempdir()?;
    let sandbox = Arc::new(Sandbox::new(options.sandbox.clone())?);
    let mut plugins = Vec::new();
    for (name, bytes) in [
        ("math", crate::bundled::MATH),
        ("text", crate::bundled::TEXT),
        ("hostile", crate::bundled::HOSTILE),
    ] {
        plugins.push((
            name.to_owned(),
            sandbox.load_plugin_bytes(name, bytes).await?,
        ));
    }
    let registry = Arc::new(Registry::from_plugins(Arc::clone(&sandbox), plugins)?);
    let limits: Limits = options.sandbox.defaults;
    println!(
        "wasmq bench tenants — {}, {} slots, B probes math.add at {}/s for {:?} per run; \
         A's backlog: {} × math.fib(27), {} hostile or 1 MiB tasks (limits: fuel {}, memory {} MiB, timeout {:?})\n",
        if options.amqp.is_some() {
            "RabbitMQ, a vhost per tenant"
        } else {
            "embedded broker, a file per tenant"
        },
        options.concurrency,
        options.probe_rate,
        options.window,
        options.flood,
        options.hostile,
        limits.fuel,
        limits.memory_bytes >> 20,
        limits.timeout,
    );
    println!(
        "| scenario | mode | B p50 | B p95 | B p99 | R (p99 / alone) | A tasks/s | missed probes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let modes: &[Mode] = if options.fair_only {
        &[Mode::Fair]
    } else {
        &[Mode::Fifo, Mode::Fair]
    };
    for &mode in modes {
        let alone = measure(
            &options,
            &sandbox,
            &registry,
            mode,
            Load::Idle,
            folder.path(),
        )
        .await?;
        let alone_p99 = percentile(&alone.probes, 99.0);
        row(Load::Idle, mode, &alone, alone_p99);
        for load in [Load::Flood, Load::Spin, Load::Hog, Load::BigArgs] {
            let measured =
                measure(&options, &sandbox, &registry, mode, load, folder.path()).await?;
            row(load, mode, &measured, alone_p99);
        }
    }
    println!("\n| scenario | mode | A tasks/s | B tasks/s | Jain's index |");
    println!("|---|---|---|---|---|");
    for &mode in modes {
        let both = measure(
            &options,
            &sandbox,
            &registry,
            mode,
            Load::BothFlood,
            folder.path(),
        )
        .await?;
        let rates = [both.a_rate, both.b_rate];
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.3} |",
            Load::BothFlood.label(),
            mode.label(),
            both.a_rate,
            both.b_rate,
            jain(&rates)
        );
    }
    Ok(())
}

fn row(load: Load, mode: Mode, measured: &Measured, alone_p99: f64) {
    let p50 = percentile(&measured.probes, 50.0);
    let p95 = percentile(&measured.probes, 95.0);
    let p99 = percentile(&measured.probes, 99.0);
    let bound = if measured.missed > 0 { "≥ " } else { "" };
    println!(
        "| {} | {} | {:.2} ms | {bound}{:.2} ms | {bound}{:.2} ms | {bound}{:.2} | {:.1} | {} of {} |",
        load.label(),
        mode.label(),
        p50,
        p95,
        p99,
        if alone_p99 > 0.0 {
            p99 / alone_p99
        } else {
            f64::NAN
        },
        measured.a_rate,
        measured.missed,
        measured.probes.len(),
    );
}

#[cfg(test)]
mod tests {
    use super::jain;

    #[test]
    fn jains_index_is_one_when_even_and_one_over_n_when_one_takes_all() {
        assert!((jain(&[5.0, 5.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[10.0, 0.0]) - 0.5).abs() < 1e-9);
        assert!((jain(&[3.0, 1.0]) - 0.8).abs() < 1e-9);
    }
}
