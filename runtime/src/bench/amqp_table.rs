//! The table `wasmq bench amqp` prints (recorded in BENCHMARKS.md): the rows it measured,
//! then the ratios against the raw ceiling and Celery with the project's goals beside them.
//! The wording and order of each row are what BENCHMARKS.md compares across runs; keep them.

use std::time::Duration;

use super::harness::CONFIRM_WINDOW;
use super::stats::format_percentiles as ms;
use crate::worker::WorkerOptions;

/// What the heading and the notes of the table say about the run.
pub(super) struct Run<'a> {
    /// Whether it was `--quick`.
    pub(super) quick: bool,
    /// The broker, as lapin spells it.
    pub(super) broker: &'a str,
    /// The version of Python Celery.
    pub(super) celery_version: &'a str,
    /// Trivial tasks per drain.
    pub(super) tasks: usize,
    /// Sequential round trips per latency row.
    pub(super) round_trips: usize,
    /// `fib(25)` tasks per CPU-bound drain.
    pub(super) fib_tasks: usize,
    /// When a Celery drain was cut off.
    pub(super) stall_limit: Duration,
    /// The CPU time per task of each wasmq drain (µs), in order: off, Redis, rpc, fib.
    pub(super) cpu_per_task: Vec<f64>,
}

/// The raw ceiling and wasmq's own rows (rates per second, round trips p50/p95/p99 in ms).
pub(super) struct WasmqRows {
    pub(super) raw_each: f64,
    pub(super) raw_batched: f64,
    pub(super) raw_bare: f64,
    /// Raw lapin publishing the same messages with the same confirm window.
    pub(super) raw_publish: f64,
    pub(super) publish: f64,
    pub(super) publish_pipelined: f64,
    pub(super) off: f64,
    pub(super) redis: f64,
    pub(super) rpc: f64,
    pub(super) raw_rtt: [f64; 3],
    pub(super) rtt_rpc: [f64; 3],
    pub(super) rtt_redis: [f64; 3],
    pub(super) rtt_rpc_confirmed: [f64; 3],
    pub(super) rtt_redis_confirmed: [f64; 3],
}

/// One Celery pool's drain.
pub(super) struct CeleryDrain {
    pub(super) pool: &'static str,
    pub(super) concurrency: usize,
    /// Tasks per second.
    pub(super) rate: f64,
    /// How many were done when it was cut off, if it stalled.
    pub(super) stalled: Option<u64>,
}

/// Celery's rows: each pool's drain, its round trips with rpc and Redis results, its
/// publish rate.
pub(super) struct CeleryRows {
    pub(super) drains: Vec<CeleryDrain>,
    pub(super) rtt_rpc: [f64; 3],
    pub(super) rtt_redis: [f64; 3],
    pub(super) publish: f64,
}

/// The CPU-bound rows, in tasks (or calls) per second.
pub(super) struct FibRows {
    /// How the worker's sandbox metered CPU.
    pub(super) metering: crate::engine::CpuMetering,
    pub(super) wasmq: f64,
    pub(super) celery: f64,
    pub(super) native: f64,
}

impl WasmqRows {
    /// The terse table of `--wasmq-only`, for profiling during development.
    pub(super) fn print_terse(&self, cpu_per_task: &[f64]) {
        let Self {
            raw_each,
            raw_batched,
            raw_bare,
            raw_publish,
            publish,
            publish_pipelined,
            off,
            redis,
            rpc,
            ..
        } = self;
        println!(
            "| raw ack each | {raw_each:.0} |\n| raw batched | {raw_batched:.0} |\n| raw bare | {raw_bare:.0} |"
        );
        println!(
            "| wasmq off | {off:.0} |\n| wasmq redis | {redis:.0} |\n| wasmq rpc | {rpc:.0} |"
        );
        println!(
            "| wasmq publish | {publish:.0} |\n| wasmq publish pipelined | {publish_pipelined:.0} |\n| raw publish pipelined | {raw_publish:.0} |"
        );
        println!("| raw rtt | {} |", ms(self.raw_rtt));
        println!(
            "| rtt rpc | {} |\n| rtt redis | {} |",
            ms(self.rtt_rpc),
            ms(self.rtt_redis)
        );
        println!(
            "| rtt rpc confirmed | {} |\n| rtt redis confirmed | {} |",
            ms(self.rtt_rpc_confirmed),
            ms(self.rtt_redis_confirmed)
        );
        println!("| off / batched | {:.2} |", off / raw_batched);
        println!(
            "| publish pipelined / raw | {:.2} |",
            publish_pipelined / raw_publish
        );
        println!("| cpu µs/task | {cpu_per_task:.1?} |");
    }
}

/// Prints the whole table of a run.
pub(super) fn print(run: &Run<'_>, wasmq: &WasmqRows, celery: &CeleryRows, fib: &FibRows) {
    let n = run.tasks;
    let best_celery = celery
        .drains
        .iter()
        .map(|drain| drain.rate)
        .fold(0.0_f64, f64::max);
    println!(
        "wasmq bench amqp{}: {} trivial tasks, {} round trips, {} fib(25) tasks; RabbitMQ {}, Python Celery {}, wasmq worker concurrency {} (in-process), {} cores\n",
        if run.quick { " --quick" } else { "" },
        n,
        run.round_trips,
        run.fib_tasks,
        run.broker.split('@').next_back().unwrap_or(""),
        run.celery_version,
        WorkerOptions::default().concurrency,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| raw lapin consumer, the same Celery messages, ack each (prefetch 100) | {:.0} msgs/s |",
        wasmq.raw_each
    );
    println!(
        "| raw lapin consumer, the same Celery messages, ack every 100 with `multiple` (prefetch 1000) | {:.0} msgs/s |",
        wasmq.raw_batched
    );
    println!(
        "| raw lapin consumer, the body alone (no headers), ack every 100 with `multiple` (prefetch 1000) | {:.0} msgs/s |",
        wasmq.raw_bare
    );
    println!(
        "| **wasmq** drain `math.add`, results off | **{:.0} tasks/s** |",
        wasmq.off
    );
    println!(
        "| wasmq drain `math.add`, Redis results | {:.0} tasks/s |",
        wasmq.redis
    );
    println!(
        "| wasmq drain `math.add`, rpc results | {:.0} tasks/s |",
        wasmq.rpc
    );
    if let [off, redis, rpc, ..] = run.cpu_per_task[..] {
        println!(
            "| wasmq process CPU per task in those drains (off / Redis / rpc) | {off:.0} / {redis:.0} / {rpc:.0} µs |"
        );
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
        "| raw AMQP round trip (persistent publish → consumer → transient reply, lapin) | {} |",
        ms(wasmq.raw_rtt)
    );
    println!(
        "| wasmq round trip, rpc (`Client::call`) | {} |",
        ms(wasmq.rtt_rpc)
    );
    println!(
        "| wasmq round trip, Redis (`Client::call`) | {} |",
        ms(wasmq.rtt_redis)
    );
    println!(
        "| wasmq round trip, rpc (`send_task`, confirmed, then `get`) | {} |",
        ms(wasmq.rtt_rpc_confirmed)
    );
    println!(
        "| wasmq round trip, Redis (`send_task`, confirmed, then `get`) | {} |",
        ms(wasmq.rtt_redis_confirmed)
    );
    println!("| Celery (solo) round trip, rpc | {} |", ms(celery.rtt_rpc));
    println!(
        "| Celery (solo) round trip, Redis | {} |",
        ms(celery.rtt_redis)
    );
    println!(
        "| fib(25): wasmq (Wasm, {} metering), 2 slots | {:.0} tasks/s |",
        fib.metering.name(),
        fib.wasmq
    );
    println!(
        "| fib(25): Celery prefork `-c 2` (Python) | {:.1} tasks/s |",
        fib.celery
    );
    println!(
        "| fib(25): native Rust, 2 threads, no queue | {:.0} calls/s |",
        fib.native
    );
    println!(
        "| publish: wasmq `Client::send_task` (each confirmed before the next) | {:.0} msgs/s |",
        wasmq.publish
    );
    println!(
        "| publish: wasmq `Client::submit` ({CONFIRM_WINDOW} confirmations outstanding, all awaited) | {:.0} msgs/s |",
        wasmq.publish_pipelined
    );
    println!(
        "| publish: raw lapin, the same messages ({CONFIRM_WINDOW} confirmations outstanding, all awaited) | {:.0} msgs/s |",
        wasmq.raw_publish
    );
    println!(
        "| publish: Celery `apply_async` | {:.0} msgs/s |",
        celery.publish
    );
    println!();
    println!("| ratio | value | goal |");
    println!("|---|---|---|");
    println!(
        "| wasmq drain / raw batched-ack ceiling | {:.2}× | ≥ 0.85× |",
        wasmq.off / wasmq.raw_batched
    );
    println!(
        "| wasmq drain / raw ack-each ceiling | {:.2}× | |",
        wasmq.off / wasmq.raw_each
    );
    println!(
        "| wasmq drain / best Celery pool | {:.1}× | ≥ 8× |",
        wasmq.off / best_celery.max(1e-9)
    );
    println!(
        "| Celery round-trip p50 / wasmq (rpc) | {:.1}× | ≥ 3× |",
        celery.rtt_rpc[0] / wasmq.rtt_rpc[0].max(1e-9)
    );
    println!(
        "| Celery round-trip p50 / wasmq (Redis) | {:.1}× | ≥ 3× |",
        celery.rtt_redis[0] / wasmq.rtt_redis[0].max(1e-9)
    );
    println!(
        "| publish with {CONFIRM_WINDOW} confirmations outstanding: wasmq / raw lapin | {:.2}× | ≥ 0.8× |",
        wasmq.publish_pipelined / wasmq.raw_publish.max(1e-9)
    );
    println!(
        "| fib(25) throughput: native / wasmq (queue included) | {:.2}× | ≤ 1.5× |",
        fib.native / fib.wasmq.max(1e-9)
    );
    println!(
        "| fib(25) throughput: wasmq / Celery | {:.0}× | |",
        fib.wasmq / fib.celery.max(1e-9)
    );
}
