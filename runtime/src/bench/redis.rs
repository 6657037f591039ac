//! `wasmq bench redis`: wasmq on the Redis broker side by side with the raw Redis ceiling and
//! Python Celery on the same Redis, in one run, printed as a markdown table with the ratios
//! against the goals (`redis_table.rs`).
//!
//! Rows: the raw ceiling — N messages of exactly what wasmq's client LPUSHes for
//! `math.add(2, 3)` (kombu's JSON envelope, as a Celery client writes it; `redis_ceiling.rs`),
//! pushed pipelined, then drained by as many raw `BRPOP` consumers as the wasmq worker has
//! slots, each doing kombu's bookkeeping (receipt, then ack each, or acks of 100), and for
//! reference by consumers taking 64 at a time (`RPOP` with a count); wasmq's drain of N
//! `math.add` published through its client (results off, and with Redis results) by an
//! in-process worker; Celery's prefork (-c 2), threads (-c 8) and solo pools draining the
//! same kombu messages (of `tasks.add`); and sequential round trips with Redis results (raw,
//! wasmq's `Client::call`, Celery solo).
//!
//! Everything runs in one Redis database (`redis://127.0.0.1:6379/14` by default), the broker
//! and the result backend alike, with a queue of its own per measurement; whatever the run
//! made there is deleted at the end, also when a row failed (`redis_db.rs`). When the wasmq
//! rows cannot be measured (a broker that cannot be opened, a drain that fails), they say
//! why and the command fails after printing the rest.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::amqp::Progress;
use super::amqp_table::CeleryDrain;
use super::harness::Harness;
use super::redis_ceiling::{push, raw_drain, raw_round_trips, task_messages};
use super::redis_db::BenchDb;
use super::redis_table::{self, Ceiling, CeleryRows, Rows, Run, WasmqRows};
use super::stats::p50_p95_p99;
use super::{celery, only_local, queue_name};
use crate::engine::SandboxConfig;
use crate::worker::WorkerOptions;

/// The default of `--broker`: a database of its own on the local Redis.
pub(crate) const LOCAL_REDIS: &str = "redis://127.0.0.1:6379/14";

/// Messages the batch-popping raw consumer takes at once: wasmq's prefetch a slot.
const RAW_POP: usize = 64;

/// Tasks of the wasmq warm-up drain before the measured ones.
const WARM_UP: usize = 1_000;

/// What `wasmq bench redis` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct RedisOptions {
    /// A short run (5,000 tasks, 200 round trips).
    pub(crate) quick: bool,
    /// The Redis database used as broker and result backend (must be on this machine).
    pub(crate) broker: String,
    /// The sandbox of the in-process workers.
    pub(crate) sandbox: SandboxConfig,
}

/// Sizes of one run.
struct Plan {
    /// Messages (tasks) per drain.
    tasks: usize,
    /// Sequential round trips per latency row.
    round_trips: usize,
    /// Raw consumers: the in-process worker's slots.
    consumers: usize,
    /// A Celery drain slower than this is cut off and reported as stalled.
    stall_limit: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        Self {
            tasks: if quick { 5_000 } else { 20_000 },
            round_trips: if quick { 200 } else { 1_000 },
            consumers: WorkerOptions::default().concurrency,
            stall_limit: Duration::from_secs(if quick { 20 } else { 120 }),
        }
    }
}

fn add_args(i: usize) -> Vec<Value> {
    vec![json!(i), json!(i)]
}

/// Runs every row, deletes what the run made in Redis, and prints the table.
///
/// # Errors
/// When Redis is not on this machine ([`super::NotLocal`]) or cannot be reached, a raw or
/// Celery row fails, or the wasmq rows could not be measured (after printing the others).
pub(crate) async fn run(options: RedisOptions) -> anyhow::Result<()> {
    only_local(&options.broker)?;
    anyhow::ensure!(
        options.broker.starts_with("redis://"),
        "bench redis needs a redis:// URL, not {}",
        options.broker
    );
    let plan = Plan::new(options.quick);
    let python = celery::python()?;
    let celery_version = celery::version(&python);
    let db = BenchDb::open(&options.broker).await?;
    if db.keys_before() > 0 {
        eprintln!(
            "note: {} holds {} keys already; the run deletes every key that appears in it while it runs",
            options.broker,
            db.keys_before()
        );
    }
    let progress = Progress(Instant::now());
    let measured = measure(&options, &plan, &python, &db, &progress).await;
    if measured.is_err() {
        // A worker dropped by the error may still be stopping (releasing what it held).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let cleaned = db.clean().await;
    match &cleaned {
        Ok(keys) => eprintln!("removed the {keys} keys the run made in {}", options.broker),
        Err(error) => eprintln!("could not clean up {}: {error:#}", options.broker),
    }
    let rows = measured?;
    cleaned?;
    progress.step("done");
    redis_table::print(
        &Run {
            quick: options.quick,
            broker: &options.broker,
            redis_version: &db.version,
            celery_version: &celery_version,
            tasks: plan.tasks,
            round_trips: plan.round_trips,
            consumers: plan.consumers,
            stall_limit: plan.stall_limit,
        },
        &rows,
    );
    eprintln!("total {:.0?}", progress.0.elapsed());
    if let Err(reason) = &rows.wasmq {
        anyhow::bail!("the wasmq rows were not measured: {reason}");
    }
    Ok(())
}

/// Every row, in order: the raw ceiling, wasmq, Celery, then the round trips.
async fn measure(
    options: &RedisOptions,
    plan: &Plan,
    python: &Path,
    db: &BenchDb,
    progress: &Progress,
) -> anyhow::Result<Rows> {
    let ceiling = measure_ceiling(plan, db, progress).await?;
    let wasmq = match crate::broker::connect(&options.broker) {
        Ok(broker) => {
            let h = Harness::over(
                broker,
                &options.broker,
                &options.broker,
                plan.stall_limit,
                options.sandbox.clone(),
            )
            .await?;
            measure_wasmq(&h, plan, progress)
                .await
                .map_err(|error| format!("{error:#}"))
        }
        Err(error) => {
            progress.step(&format!("no wasmq rows: {error}"));
            Err(error.to_string())
        }
    };
    let celery = measure_celery(&options.broker, python, plan, db, progress).await?;
    Ok(Rows {
        ceiling,
        wasmq,
        celery,
    })
}

/// The raw pipelined push, the raw drains and the raw round trips.
async fn measure_ceiling(
    plan: &Plan,
    db: &BenchDb,
    progress: &Progress,
) -> anyhow::Result<Ceiling> {
    let n = plan.tasks;
    let client = db.client();
    let drain = |pop: usize, ack_every: usize| async move {
        let queue = queue_name("raw");
        let messages = task_messages("math.add", &queue, n);
        let message_bytes = messages.first().map_or(0, Vec::len);
        let pushed = push(client, &queue, &messages).await?;
        drop(messages);
        let drained = raw_drain(client, &queue, n, plan.consumers, pop, ack_every).await;
        db.drop_queue(&queue).await?;
        anyhow::Ok((
            n as f64 / pushed.as_secs_f64(),
            n as f64 / drained?.as_secs_f64().max(1e-9),
            message_bytes,
        ))
    };
    progress.step("raw push, then BRPOP drain, ack each");
    let (push_rate, each, message_bytes) = drain(1, 1).await?;
    progress.step("raw push, then BRPOP drain, acks of 100");
    let (_, batched, _) = drain(1, 100).await?;
    progress.step("raw push, then RPOP-64 drain, acks of each 64");
    let (_, popped, _) = drain(RAW_POP, RAW_POP).await?;
    progress.step("raw Redis round trips");
    let queue = queue_name("raw-rtt");
    let messages = task_messages("math.add", &queue, plan.round_trips + 1);
    let rtt = raw_round_trips(client, &queue, &messages).await;
    db.drop_queue(&queue).await?;
    Ok(Ceiling {
        message_bytes,
        push: push_rate,
        each,
        batched,
        popped,
        rtt: p50_p95_p99(&rtt?),
    })
}

/// wasmq's drains (results off, Redis results) and its round trips.
async fn measure_wasmq(h: &Harness, plan: &Plan, progress: &Progress) -> anyhow::Result<WasmqRows> {
    let n = plan.tasks;
    // The first drain of a run pays for what the worker sets up once (sandbox instances,
    // the broker's scripts and connections); a short drain takes that off the measured ones.
    progress.step("wasmq warm-up drain (not counted)");
    h.wasmq_drain("math.add", WARM_UP, add_args, None).await?;
    progress.step("wasmq drain, results off");
    let off = h.wasmq_drain("math.add", n, add_args, None).await?;
    progress.step("wasmq drain, Redis results");
    let redis = h
        .wasmq_drain("math.add", n, add_args, Some(&h.redis_url))
        .await?;
    progress.step("wasmq round trips, Redis results");
    let rtt = h
        .wasmq_round_trips(&h.redis_url, plan.round_trips, true)
        .await?;
    Ok(WasmqRows {
        off,
        redis,
        rtt,
        // The warm-up's is the first.
        cpu_per_task: h.cpu_per_task().split_off(1),
    })
}

/// Celery's drains with each pool and its round trips, on the Redis at `url`.
async fn measure_celery(
    url: &str,
    python: &Path,
    plan: &Plan,
    db: &BenchDb,
    progress: &Progress,
) -> anyhow::Result<CeleryRows> {
    let n = plan.tasks;
    let mut drains = Vec::new();
    for (pool, concurrency) in [("prefork", 2), ("threads", 8), ("solo", 1)] {
        progress.step(&format!(
            "Celery {pool} -c {concurrency} drain, results off"
        ));
        let queue = queue_name(&format!("celery-{pool}"));
        push(db.client(), &queue, &task_messages("tasks.add", &queue, n)).await?;
        let worker = celery::worker(python, url, "", &queue, pool, concurrency)?;
        let timed = celery::time_drain(worker, n, plan.stall_limit, || db.waiting(&queue)).await;
        db.drop_queue(&queue).await?;
        let (rate, stalled) = timed?;
        drains.push(CeleryDrain {
            pool,
            concurrency,
            rate,
            stalled,
        });
    }
    progress.step("Celery (solo) round trips, Redis results");
    let queue = queue_name("celery-rtt");
    let worker = celery::worker(python, url, url, &queue, "solo", 1)?;
    let result = celery::script(python, url, url, &queue, "roundtrip", plan.round_trips);
    drop(worker);
    db.drop_queue(&queue).await?;
    let result = result?;
    let ms = |p: &str| result[p].as_f64().unwrap_or(0.0);
    Ok(CeleryRows {
        drains,
        rtt: [ms("p50"), ms("p95"), ms("p99")],
    })
}
