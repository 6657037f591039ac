//! `wasmq bench amqp`: wasmq side by side with the raw AMQP ceiling and Python Celery, in one
//! run, on the RabbitMQ (and Redis) of this machine, printed as a markdown table.
//!
//! Every measurement uses a queue of its own, deleted afterwards. Python Celery (the newest
//! 5.x) is installed into a virtualenv by the harness (`$WASMQ_CELERY_VENV`, default
//! `.wasmq/bench-venv`). The harness only ever talks to 127.0.0.1 and stops by itself.
//!
//! Rows: raw lapin drain (ack each / ack every 100 with `multiple`); wasmq worker drain of N
//! trivial `math.add` tasks with results off, with Redis results, with rpc results; Celery
//! drains with the prefork (-c 2), threads (-c 8) and solo pools, results off; sequential
//! round trips (p50/p95/p99) for wasmq and Celery with rpc and Redis; a CPU-bound task
//! (fib(25)) in wasmq, in Celery and as native Rust; the publish rate of each client; and
//! the ratios; then the same drain with task events off and on, alternated, with a receiver
//! bound to `celeryev` (what task events cost). The full run (not `--quick`) ends with the
//! memory soak and the scaling rows.
//!
//! This file runs the measurements in order; the table they print is `amqp_table.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::amqp_table::{self, CeleryDrain, CeleryRows, FibRows, Run, WasmqRows};
use super::harness::{CONFIRM_WINDOW, Harness};
use super::stats::p50_p95_p99;
use super::{ceiling, celery, expire_leftover_queues, only_local, queue_name, scale, soak};
use crate::client::{Client, SendOptions};
use crate::engine::SandboxConfig;

/// What `wasmq bench amqp` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct AmqpOptions {
    /// A short run (2,000 tasks, 200 round trips, no soak or scaling rows).
    pub(crate) quick: bool,
    /// The broker, as lapin spells it (must be on this machine).
    pub(crate) broker: String,
    /// Redis for the Redis-backend rows (must be on this machine).
    pub(crate) redis: String,
    /// Only the raw ceiling and wasmq's own rows (no Celery), in a terse table.
    pub(crate) wasmq_only: bool,
    /// Only the task-events rows.
    pub(crate) events_only: bool,
    /// Alternations of the events-off and events-on drains.
    pub(crate) event_rounds: usize,
    /// The sandbox of the in-process workers (and of the soak of a full run).
    pub(crate) sandbox: SandboxConfig,
}

/// Sizes of one run.
struct Plan {
    /// Trivial `math.add` tasks per drain.
    tasks: usize,
    /// Sequential round trips per latency row.
    round_trips: usize,
    /// `math.fib(25)` tasks per CPU-bound drain.
    fib_tasks: usize,
    /// `math.add` tasks per drain of the task-events rows (long enough that a drain is not
    /// mostly its start and end).
    event_tasks: usize,
    /// Alternations of the events-off and events-on drains.
    event_rounds: usize,
}

impl Plan {
    fn new(quick: bool, event_rounds: usize) -> Self {
        if quick {
            Self {
                tasks: 2_000,
                round_trips: 200,
                fib_tasks: 200,
                event_tasks: 10_000,
                event_rounds,
            }
        } else {
            Self {
                tasks: 20_000,
                round_trips: 1_000,
                fib_tasks: 2_000,
                event_tasks: 20_000,
                event_rounds,
            }
        }
    }
}

/// Progress on stderr: seconds since the run started and what it measures now.
pub(super) struct Progress(pub(super) Instant);

impl Progress {
    /// Prints `what` with the seconds since the run started.
    pub(super) fn step(&self, what: &str) {
        eprintln!("[{:>5.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

fn add_args(i: usize) -> Vec<Value> {
    vec![json!(i), json!(i)]
}

/// Runs every row and prints the table; the full run then runs `bench soak` and
/// `bench scale`.
///
/// # Errors
/// When a server is not on this machine ([`super::NotLocal`]), cannot be reached, or a
/// measurement does not finish.
pub(crate) async fn run(options: AmqpOptions) -> anyhow::Result<()> {
    only_local(&options.broker)?;
    only_local(&options.redis)?;
    expire_leftover_queues(&options.broker);
    let plan = Plan::new(options.quick, options.event_rounds);
    let python = celery::python()?;
    let version = celery::version(&python);
    let stall_limit = Duration::from_secs(if options.quick { 20 } else { 120 });
    let h = Harness::connect(
        &options.broker,
        &options.redis,
        stall_limit,
        options.sandbox.clone(),
    )
    .await?;
    let progress = Progress(Instant::now());

    if options.events_only {
        let events = measure_events(&h, &plan, &progress).await?;
        print_events(&events, &plan);
        return Ok(());
    }
    let wasmq = measure_wasmq(&h, &plan, &progress).await?;
    if options.wasmq_only {
        wasmq.print_terse(&h.cpu_per_task());
        print_events(&measure_events(&h, &plan, &progress).await?, &plan);
        return Ok(());
    }
    let celery = measure_celery(&h, &python, &plan, &progress).await?;
    let fib = measure_fib(&h, &python, &plan, &progress).await?;
    let events = measure_events(&h, &plan, &progress).await?;
    progress.step("done");

    let run = Run {
        quick: options.quick,
        broker: &options.broker,
        celery_version: &version,
        tasks: plan.tasks,
        round_trips: plan.round_trips,
        fib_tasks: plan.fib_tasks,
        stall_limit: h.stall_limit,
        cpu_per_task: h.cpu_per_task(),
    };
    amqp_table::print(&run, &wasmq, &celery, &fib);
    print_events(&events, &plan);
    if !options.quick {
        // The full mode also runs the memory soak and the scaling rows.
        println!();
        progress.step("memory soak (100,000 tasks)");
        soak::run(soak::SoakOptions {
            tasks: 100_000,
            broker: options.broker.clone(),
            sandbox: options.sandbox.clone(),
        })
        .await?;
        println!();
        progress.step("scaling: 1, 2 and 4 worker processes");
        scale::run(scale::ScaleOptions {
            tasks: plan.tasks,
            broker: options.broker.clone(),
        })
        .await?;
    }
    eprintln!("total {:.0?}", progress.0.elapsed());
    Ok(())
}

/// The raw ceiling and wasmq's own rows.
async fn measure_wasmq(h: &Harness, plan: &Plan, progress: &Progress) -> anyhow::Result<WasmqRows> {
    let n = plan.tasks;
    // The raw ceiling drains the very message wasmq's client sends for `math.add` (Celery's
    // protocol 2: ~20 headers and the JSON body), and for reference the body alone.
    let message = Client::new(Arc::clone(&h.broker), h.backend(&h.redis_url)?)
        .build_message(
            "math.add",
            add_args(1),
            Map::new(),
            &SendOptions {
                ignore_result: Some(true),
                ..SendOptions::default()
            },
        )
        .encode();
    let (body, properties) = (
        message.body.as_slice(),
        crate::broker::amqp::properties_of(&message),
    );
    let rate = |elapsed: std::time::Duration| n as f64 / elapsed.as_secs_f64();
    let raw = |properties, prefetch, ack_every| async move {
        let window = CONFIRM_WINDOW;
        let run = ceiling::raw_drain(
            &h.broker_url,
            n,
            body,
            &properties,
            window,
            prefetch,
            ack_every,
        )
        .await?;
        anyhow::Ok(run)
    };
    progress.step("raw lapin publish and drain, ack each");
    let raw_each = raw(properties.clone(), 100, 1).await?;
    progress.step("raw lapin publish and drain, ack every 100 (multiple)");
    let raw_batched_run = raw(properties.clone(), 1000, 100).await?;
    progress.step("raw lapin drain, body only, ack every 100 (multiple)");
    let raw_bare = rate(
        raw(lapin::BasicProperties::default(), 1000, 100)
            .await?
            .drain,
    );
    // Both runs with the same messages published them the same way: the faster counts.
    let raw_publish = rate(raw_each.publish.min(raw_batched_run.publish));
    let (raw_each, raw_batched) = (rate(raw_each.drain), rate(raw_batched_run.drain));

    progress.step("wasmq drain, results off");
    let publish_queue = queue_name("publish");
    let publish_client = h.client(h.backend(&h.redis_url)?, &publish_queue);
    let publish = h
        .publish(&publish_client, "math.add", n.min(5_000), add_args, true)
        .await?;
    h.broker.delete_queue(&publish_queue).await?;
    let publish_pipelined = h
        .publish_pipelined(&publish_client, "math.add", n, add_args, true)
        .await?;
    h.broker.delete_queue(&publish_queue).await?;
    let off = h.wasmq_drain("math.add", n, add_args, None).await?;
    progress.step("wasmq drain, Redis results");
    let redis = h
        .wasmq_drain("math.add", n, add_args, Some(&h.redis_url))
        .await?;
    progress.step("wasmq drain, rpc results");
    let rpc = h
        .wasmq_drain("math.add", n, add_args, Some("rpc://"))
        .await?;
    progress.step("raw AMQP round trips");
    let raw_rtt = p50_p95_p99(
        &ceiling::raw_round_trips(&h.broker_url, plan.round_trips, body, &properties).await?,
    );
    progress.step("wasmq round trips");
    Ok(WasmqRows {
        raw_each,
        raw_batched,
        raw_bare,
        raw_publish,
        publish,
        publish_pipelined,
        off,
        redis,
        rpc,
        raw_rtt,
        rtt_rpc: h
            .wasmq_round_trips("rpc://", plan.round_trips, true)
            .await?,
        rtt_redis: h
            .wasmq_round_trips(&h.redis_url, plan.round_trips, true)
            .await?,
        rtt_rpc_confirmed: h
            .wasmq_round_trips("rpc://", plan.round_trips, false)
            .await?,
        rtt_redis_confirmed: h
            .wasmq_round_trips(&h.redis_url, plan.round_trips, false)
            .await?,
    })
}

/// One drain's rows of task events off and on, alternated `event_rounds` times.
#[derive(Default)]
struct EventRow {
    /// The results backend (`results off`, `Redis results`).
    results: &'static str,
    /// Tasks/s with task events off, a round each.
    off: Vec<f64>,
    /// Tasks/s with task events on.
    on: Vec<f64>,
    /// The bench process's CPU µs a task, events off (the worker and the event receiver).
    cpu_off: Vec<f64>,
    /// The same, events on.
    cpu_on: Vec<f64>,
    /// The local RabbitMQ's and Redis's CPU µs a task, events off.
    services_off: Vec<f64>,
    /// The same, events on.
    services_on: Vec<f64>,
    /// Events received per task while on (3 when none is dropped: received, started,
    /// succeeded).
    per_task: Vec<f64>,
}

type EventRows = Vec<EventRow>;

/// Task events' cost at full drain: the same drain (results off, and Redis results) with the
/// worker's task events off and on, alternated, while a receiver bound to `celeryev` takes
/// every event as Flower would.
async fn measure_events(
    h: &Harness,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<EventRows> {
    let n = plan.event_tasks;
    let mut rows: EventRows = vec![
        EventRow {
            results: "results off",
            ..EventRow::default()
        },
        EventRow {
            results: "Redis results",
            ..EventRow::default()
        },
    ];
    let mut receiver = h
        .broker
        .events()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the broker carries no events"))?;
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let counting = tokio::spawn(async move {
        while let Some(message) = receiver.recv().await {
            // Counted, not built: a monitor would run elsewhere.
            let events = message.count() as u64;
            counter.fetch_add(events, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Let the receiver's queue be bound before the first drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 1..=plan.event_rounds {
        for row in &mut rows {
            let results = row.results;
            let backend = (results == "Redis results").then_some(h.redis_url.as_str());
            let last_cpu = || h.cpu_per_task().last().copied().unwrap_or(0.0);
            let last_services = || h.service_cpu_per_task().last().copied().unwrap_or(0.0);
            progress.step(&format!("task events: {results}, off (round {round})"));
            row.off.push(
                h.wasmq_drain_with("math.add", n, add_args, backend, false)
                    .await?,
            );
            row.cpu_off.push(last_cpu());
            row.services_off.push(last_services());
            progress.step(&format!("task events: {results}, on (round {round})"));
            let before = received.load(std::sync::atomic::Ordering::Relaxed);
            row.on.push(
                h.wasmq_drain_with("math.add", n, add_args, backend, true)
                    .await?,
            );
            row.cpu_on.push(last_cpu());
            row.services_on.push(last_services());
            // Events still in flight after the drain are counted too.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let got = received.load(std::sync::atomic::Ordering::Relaxed) - before;
            row.per_task.push(got as f64 / n as f64);
        }
    }
    counting.abort();
    Ok(rows)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn print_events(rows: &EventRows, plan: &Plan) {
    let (tasks, rounds) = (plan.event_tasks, plan.event_rounds);
    println!();
    println!(
        "Task events at full drain ({tasks} math.add a drain, a receiver bound to celeryev; {rounds} alternated rounds, tasks/s):"
    );
    println!();
    println!(
        "| drain | events off | events on | on / off (medians) | on / off, each round after its off drain (median) | CPU µs/task off → on (medians) | RabbitMQ + Redis CPU µs/task off → on | events received a task (fewest) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let list = |values: &[f64]| {
        values
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for row in rows {
        // Each on drain against the off drain just before it: paired, so a slow stretch of
        // the machine weighs on both sides of a ratio.
        let paired: Vec<f64> = row
            .on
            .iter()
            .zip(&row.off)
            .map(|(on, off)| on / off)
            .collect();
        println!(
            "| {} | {} | {} | **{:.2}** | {} (**{:.2}**) | {:.0} → {:.0} | {:.0} → {:.0} | {:.2} |",
            row.results,
            list(&row.off),
            list(&row.on),
            median(&row.on) / median(&row.off),
            paired
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            median(&paired),
            median(&row.cpu_off),
            median(&row.cpu_on),
            median(&row.services_off),
            median(&row.services_on),
            row.per_task.iter().copied().fold(f64::INFINITY, f64::min)
        );
    }
}

/// Celery's drains with each pool, its round trips and its publish rate.
async fn measure_celery(
    h: &Harness,
    python: &std::path::Path,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<CeleryRows> {
    let n = plan.tasks;
    let mut drains = Vec::new();
    for (pool, concurrency) in [("prefork", 2), ("threads", 8), ("solo", 1)] {
        progress.step(&format!(
            "Celery {pool} -c {concurrency} drain, results off"
        ));
        let (rate, stalled) =
            celery::drain(h, python, pool, concurrency, "tasks.add", n, add_args).await?;
        drains.push(CeleryDrain {
            pool,
            concurrency,
            rate,
            stalled,
        });
    }

    progress.step("Celery round trips");
    let mut round_trips = Vec::new();
    for backend in ["rpc://", h.redis_url.as_str()] {
        let queue = queue_name("celery-rtt");
        let worker = celery::worker(python, &h.broker_url, backend, &queue, "solo", 1)?;
        let result = celery::script(
            python,
            &h.broker_url,
            backend,
            &queue,
            "roundtrip",
            plan.round_trips,
        )?;
        drop(worker);
        h.broker.delete_queue(&queue).await?;
        round_trips.push([
            result["p50"].as_f64().unwrap_or(0.0),
            result["p95"].as_f64().unwrap_or(0.0),
            result["p99"].as_f64().unwrap_or(0.0),
        ]);
    }

    progress.step("publish rate of Celery's apply_async");
    let queue = queue_name("celery-publish");
    let publish =
        celery::script(python, &h.broker_url, "", &queue, "publish", n.min(5_000))?["rate"]
            .as_f64()
            .unwrap_or(0.0);
    h.broker.delete_queue(&queue).await?;
    Ok(CeleryRows {
        drains,
        rtt_rpc: round_trips[0],
        rtt_redis: round_trips[1],
        publish,
    })
}

/// The CPU-bound rows: `math.fib(25)` in wasmq, `tasks.fib(25)` in Celery's prefork pool,
/// and `fib(25)` as native Rust on 2 threads with no queue.
async fn measure_fib(
    h: &Harness,
    python: &std::path::Path,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<FibRows> {
    progress.step("CPU-bound fib(25)");
    let m = plan.fib_tasks;
    let fib_args = |_: usize| vec![json!(25)];
    let wasmq = h.wasmq_drain("math.fib", m, fib_args, None).await?;
    let celery = celery::drain(h, python, "prefork", 2, "tasks.fib", m, fib_args)
        .await?
        .0;
    let native_started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..m / 2 {
                    std::hint::black_box(fib(std::hint::black_box(25)));
                }
            });
        }
    });
    let native = m as f64 / native_started.elapsed().as_secs_f64();
    Ok(FibRows {
        metering: h.registry.sandbox().config().cpu_metering,
        wasmq,
        celery,
        native,
    })
}

/// The native baseline of the CPU-bound rows: the same naive recursion as `math.fib`.
fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}
