//! The table `wasmq bench redis` prints (recorded in BENCHMARKS.md): the rows it measured,
//! then the ratios against the raw ceiling and Celery with the project's goals beside them.
//! The wording and order of each row are what BENCHMARKS.md compares across runs; keep them.

use std::time::Duration;

use super::amqp_table::CeleryDrain;
use super::stats::format_percentiles as ms;

/// What the heading and the notes of the table say about the run.
pub(super) struct Run<'a> {
    /// Whether it was `--quick`.
    pub(super) quick: bool,
    /// The Redis URL (broker and results).
    pub(super) broker: &'a str,
    /// The Redis server's version.
    pub(super) redis_version: &'a str,
    /// The version of Python Celery.
    pub(super) celery_version: &'a str,
    /// Messages (tasks) per drain.
    pub(super) tasks: usize,
    /// Sequential round trips per latency row.
    pub(super) round_trips: usize,
    /// Raw consumers, and the in-process worker's slots.
    pub(super) consumers: usize,
    /// When a Celery drain was cut off.
    pub(super) stall_limit: Duration,
}

/// The raw Redis rows (rates per second, round trips p50/p95/p99 in ms).
pub(super) struct Ceiling {
    /// The size of one kombu message, in bytes.
    pub(super) message_bytes: usize,
    /// Pipelined `LPUSH` of the backlog.
    pub(super) push: f64,
    /// `BRPOP`, receipt, ack: three round trips a message.
    pub(super) each: f64,
    /// `BRPOP`, receipt; the acks of 100 in one pipeline.
    pub(super) batched: f64,
    /// `RPOP` of up to 64, their receipts in one pipeline, their acks in another.
    pub(super) popped: f64,
    pub(super) rtt: [f64; 3],
}

/// wasmq's rows on the Redis broker.
pub(super) struct WasmqRows {
    /// Tasks per second, results off.
    pub(super) off: f64,
    /// Tasks per second, Redis results.
    pub(super) redis: f64,
    /// `Client::call` round trips with Redis results.
    pub(super) rtt: [f64; 3],
    /// The CPU time per task of each drain (µs): off, Redis.
    pub(super) cpu_per_task: Vec<f64>,
}

/// Celery's rows on the Redis broker.
pub(super) struct CeleryRows {
    pub(super) drains: Vec<CeleryDrain>,
    /// Solo round trips with Redis results.
    pub(super) rtt: [f64; 3],
}

/// Everything one run measured; the wasmq rows are the reason they are missing when the
/// broker could not be opened or a wasmq row failed.
pub(super) struct Rows {
    pub(super) ceiling: Ceiling,
    pub(super) wasmq: Result<WasmqRows, String>,
    pub(super) celery: CeleryRows,
}

/// Prints the whole table of a run.
pub(super) fn print(run: &Run<'_>, rows: &Rows) {
    let Rows {
        ceiling,
        wasmq,
        celery,
    } = rows;
    let n = run.tasks;
    println!(
        "wasmq bench redis{}: {} trivial tasks, {} round trips; Redis {} ({}, broker and results), Python Celery {}, {} raw consumers and wasmq worker concurrency {} (in-process), {} cores; a kombu message of `add(2, 3)` is {} bytes\n",
        if run.quick { " --quick" } else { "" },
        n,
        run.round_trips,
        run.redis_version,
        run.broker.split('@').next_back().unwrap_or(""),
        run.celery_version,
        run.consumers,
        run.consumers,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        ceiling.message_bytes,
    );
    let missing = |reason: &str| format!("not measured ({reason})");
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| raw pipelined `LPUSH` of the kombu messages (1,000 a pipeline) | {:.0} msgs/s |",
        ceiling.push
    );
    println!(
        "| raw consumer ×{}: `BRPOP`, kombu's receipt (`ZADD`+`HSET`, one pipeline), ack each (`ZREM`+`HDEL`, one pipeline) | {:.0} msgs/s |",
        run.consumers, ceiling.each
    );
    println!(
        "| raw consumer ×{}: `BRPOP`, kombu's receipt, acks of 100 in one `ZREM`+`HDEL` pipeline | {:.0} msgs/s |",
        run.consumers, ceiling.batched
    );
    println!(
        "| raw consumer ×{}: `RPOP` of up to 64 at once, their receipts in one pipeline, their acks in another | {:.0} msgs/s |",
        run.consumers, ceiling.popped
    );
    match wasmq {
        Ok(w) => {
            println!(
                "| **wasmq** drain `math.add`, results off (after a 1,000-task warm-up drain) | **{:.0} tasks/s** |",
                w.off
            );
            println!(
                "| wasmq drain `math.add`, Redis results | {:.0} tasks/s |",
                w.redis
            );
            if let [off, redis, ..] = w.cpu_per_task[..] {
                println!(
                    "| wasmq process CPU per task in those drains (off / Redis) | {off:.0} / {redis:.0} µs |"
                );
            }
        }
        Err(reason) => println!("| **wasmq** drain `math.add` | {} |", missing(reason)),
    }
    for CeleryDrain {
        pool,
        concurrency,
        rate,
        stalled,
    } in &celery.drains
    {
        let note = stalled
            .map(|done| {
                format!(
                    " (stalled: {done} of {n} done in {} s, cut off)",
                    run.stall_limit.as_secs()
                )
            })
            .unwrap_or_default();
        println!(
            "| Celery {pool} `-c {concurrency}` drain `add`, results off | {rate:.0} tasks/s{note} |"
        );
    }
    println!(
        "| raw Redis round trip (`LPUSH` → `BRPOP`, receipt → `SET`+`PUBLISH` of a result, ack → subscriber) | {} |",
        ms(ceiling.rtt)
    );
    match wasmq {
        Ok(w) => println!(
            "| wasmq round trip, Redis results (`Client::call`) | {} |",
            ms(w.rtt)
        ),
        Err(reason) => println!("| wasmq round trip, Redis results | {} |", missing(reason)),
    }
    println!(
        "| Celery (solo) round trip, Redis results | {} |",
        ms(celery.rtt)
    );

    let best = celery
        .drains
        .iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate));
    println!();
    println!("| ratio | value | goal |");
    println!("|---|---|---|");
    let Ok(w) = wasmq else {
        println!("| wasmq / anything | not measured | |");
        return;
    };
    println!(
        "| wasmq drain / raw ceiling (ack each) | {:.2}× | ≥ 0.8× |",
        w.off / ceiling.each.max(1e-9)
    );
    println!(
        "| wasmq drain / raw ceiling (acks of 100) | {:.2}× | |",
        w.off / ceiling.batched.max(1e-9)
    );
    println!(
        "| wasmq drain / raw batch-pop ceiling (64 at once) | {:.2}× | |",
        w.off / ceiling.popped.max(1e-9)
    );
    if let Some(best) = best {
        println!(
            "| wasmq drain / best Celery pool ({} `-c {}`) | {:.1}× | ≥ 8× |",
            best.pool,
            best.concurrency,
            w.off / best.rate.max(1e-9)
        );
    }
    println!(
        "| Celery round-trip p50 / wasmq (Redis) | {:.1}× | ≥ 3× |",
        celery.rtt[0] / w.rtt[0].max(1e-9)
    );
    println!(
        "| wasmq round-trip p50 / raw | {:.2}× | |",
        w.rtt[0] / ceiling.rtt[0].max(1e-9)
    );
}
