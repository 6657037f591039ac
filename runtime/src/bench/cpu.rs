//! `wasmq bench cpu`: what the sandbox costs CPU-heavy tasks. Six workloads
//! (`bench/cpu-workloads`: fib, a Markdown render, a regex scan, a JSON transform, SHA-256,
//! a sort) run as native Rust in this process and as the `cpu` plugin's tasks in three
//! sandboxes that differ only in how they meter CPU: not at all (no epoch checks, no fuel:
//! the cost of Wasm itself), CPU time (the default: epoch checks, the thread CPU clock read
//! at each tick) and fuel (wasmtime's instruction count). Calls are interleaved round by
//! round (native, then each sandbox), so a disturbance of the machine hits every column
//! alike; each cell is the median of the rounds. Every build must compute the same answer.
//!
//! Then a spinning task (`hostile.spin`) is given a budget of 10⁹ fuel under each metering
//! that can enforce one, to show the hard CPU limit holds in every mode: how long it ran
//! and what stopped it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::stats::percentile;
use crate::engine::{
    CallRequest, CpuMetering, LimitOverrides, Outcome, Plugin, Sandbox, SandboxConfig,
};

/// What `wasmq bench cpu` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct CpuOptions {
    /// Rounds per workload (each round runs every column once).
    pub(crate) rounds: usize,
    /// Only these workloads (all when empty).
    pub(crate) only: Vec<String>,
    /// Another build of the `cpu` plugin to measure instead of the bundled one (a different
    /// guest profile, say).
    pub(crate) plugin: Option<PathBuf>,
    /// The base sandbox settings; the bench sets the metering of each column.
    pub(crate) sandbox: SandboxConfig,
}

/// The sandboxed columns, in table order.
const METERINGS: [CpuMetering; 3] = [CpuMetering::Off, CpuMetering::Time, CpuMetering::Fuel];

/// One workload's medians, in seconds per call, and what fuel metering counted.
struct Row {
    name: &'static str,
    size: u32,
    native: f64,
    /// By [`METERINGS`].
    sandboxed: [f64; 3],
    /// Fuel per CPU second under fuel metering (the guest's instruction rate).
    fuel_rate: f64,
}

/// Runs the measurement and prints its tables.
///
/// # Errors
/// When a plugin does not load, a call fails, or two builds disagree on an answer.
pub(crate) async fn run(options: CpuOptions) -> anyhow::Result<()> {
    let workloads: Vec<(&'static str, u32)> = cpu_workloads::WORKLOADS
        .iter()
        .copied()
        .filter(|(name, _)| options.only.is_empty() || options.only.iter().any(|o| o == name))
        .collect();
    if workloads.is_empty() {
        bail!(
            "no workload is called {}; the workloads are {}",
            options.only.join(", "),
            names()
        );
    }
    let bytes = match &options.plugin {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the cpu plugin {}", path.display()))?,
        None => crate::bundled::CPU.to_vec(),
    };
    let mut sandboxes = Vec::new();
    for metering in METERINGS {
        let sandbox = Sandbox::new(SandboxConfig {
            cpu_metering: metering,
            ..options.sandbox.clone()
        })?;
        let plugin = sandbox.load_plugin_bytes("cpu", &bytes).await?;
        sandboxes.push((sandbox, plugin));
    }
    println!(
        "wasmq bench cpu: {} rounds per workload; cells are the median time of one call \
         (the sandboxed ones include a fresh instance, ~20 µs)\n",
        options.rounds
    );
    let mut rows = Vec::new();
    for (name, size) in workloads {
        rows.push(measure(name, size, options.rounds, &sandboxes).await?);
    }
    print_table(&rows);
    println!();
    spin_stops(&options.sandbox).await
}

fn names() -> String {
    cpu_workloads::WORKLOADS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn measure(
    name: &'static str,
    size: u32,
    rounds: usize,
    sandboxes: &[(Sandbox, Plugin)],
) -> anyhow::Result<Row> {
    let expected = cpu_workloads::run(name, size).context("a known workload")?;
    let task = format!("cpu.{name}");
    let mut native = Vec::with_capacity(rounds);
    let mut sandboxed: [Vec<f64>; 3] = Default::default();
    let (mut fuel, mut fuel_cpu) = (0_u128, Duration::ZERO);
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let answer = std::hint::black_box(cpu_workloads::run(
            std::hint::black_box(name),
            std::hint::black_box(size),
        ));
        native.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            answer == Some(expected),
            "native {name} is not deterministic"
        );
        for (column, (sandbox, plugin)) in sandboxes.iter().enumerate() {
            let request = CallRequest::new(&task, format!("[{size}]"));
            let started = Instant::now();
            let report = sandbox.call(plugin, request).await?;
            sandboxed[column].push(started.elapsed().as_secs_f64());
            match &report.outcome {
                Outcome::Success(json) if json.trim() == expected.to_string() => {}
                other => bail!(
                    "{task}({size}) under {} metering gave {other}, native gave {expected}",
                    METERINGS[column].name()
                ),
            }
            if METERINGS[column] == CpuMetering::Fuel {
                fuel += u128::from(report.fuel_used);
                fuel_cpu += report.cpu_time;
            }
        }
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        percentile(&values, 0.5)
    };
    let [off, time, fuel_column] = sandboxed;
    Ok(Row {
        name,
        size,
        native: median(native),
        sandboxed: [median(off), median(time), median(fuel_column)],
        fuel_rate: fuel as f64 / fuel_cpu.as_secs_f64().max(1e-9),
    })
}

fn ms(seconds: f64) -> String {
    format!("{:.2} ms", seconds * 1e3)
}

fn print_table(rows: &[Row]) {
    println!(
        "| workload | native | Wasm, no metering | Wasm, CPU time (default) | Wasm, fuel | \
         default ÷ no metering | fuel ÷ no metering | no metering ÷ native | fuel per CPU second |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut worst = (0.0_f64, "");
    for row in rows {
        let [off, time, fuel] = row.sandboxed;
        let default_ratio = time / off.max(1e-12);
        if default_ratio > worst.0 {
            worst = (default_ratio, row.name);
        }
        println!(
            "| {}({}) | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {:.2e} |",
            row.name,
            row.size,
            ms(row.native),
            ms(off),
            ms(time),
            ms(fuel),
            default_ratio,
            fuel / off.max(1e-12),
            off / row.native.max(1e-12),
            row.fuel_rate,
        );
    }
    println!(
        "\nGoal: the default within 1.25× of Wasm with no metering on every workload: worst \
         {:.2}× ({}) — {}",
        worst.0,
        worst.1,
        if worst.0 <= 1.25 { "met" } else { "missed" }
    );
}

/// `hostile.spin` under each metering that enforces a CPU budget: stopped, and how fast.
async fn spin_stops(base: &SandboxConfig) -> anyhow::Result<()> {
    const BUDGET: u64 = 1_000_000_000;
    println!(
        "A spinning task (hostile.spin) with a budget of {BUDGET} fuel (100 ms of CPU at \
         {} fuel per CPU second) and a 10 s wall-clock limit:\n",
        crate::engine::FUEL_PER_CPU_SECOND
    );
    println!("| metering | stopped after (wall) | CPU time used | outcome |");
    println!("|---|---:|---:|---|");
    for metering in [CpuMetering::Time, CpuMetering::Fuel] {
        let sandbox = Sandbox::new(SandboxConfig {
            cpu_metering: metering,
            ..base.clone()
        })?;
        let hostile = sandbox
            .load_plugin_bytes("hostile", crate::bundled::HOSTILE)
            .await?;
        let mut request = CallRequest::new("hostile.spin", "[]");
        request.limits = LimitOverrides {
            fuel: Some(BUDGET),
            timeout: Some(Duration::from_secs(10)),
            ..LimitOverrides::default()
        };
        let started = Instant::now();
        let report = sandbox.call(&hostile, request).await?;
        let took = started.elapsed();
        let stopped_by_budget = matches!(
            &report.outcome,
            Outcome::LimitExceeded(limit) if limit.kind == crate::engine::LimitKind::Fuel
        );
        println!(
            "| {} | {} | {} | {}{} |",
            metering.name(),
            ms(took.as_secs_f64()),
            ms(report.cpu_time.as_secs_f64()),
            report.outcome,
            if stopped_by_budget {
                ""
            } else {
                " (NOT the CPU budget)"
            }
        );
        anyhow::ensure!(
            stopped_by_budget,
            "hostile.spin under {} metering was not stopped by its CPU budget: {}",
            metering.name(),
            report.outcome
        );
    }
    Ok(())
}
