#![allow(missing_docs)] // criterion_group! generates undocumented items.

//! Per-call sandbox costs, side by side in one run:
//!
//! * `trivial_call/{pooling,on_demand}`: fresh `Store` + instantiate + `math.add(1, 2)` +
//!   drop, with each instance allocator (CPU-time metering, the default), and
//!   `trivial_call/pooling_fuel_metering` with fuel metering instead;
//! * `fib_25/{cpu-time,fuel,uninstrumented,native}`: a call-heavy guest under each CPU
//!   metering, with none (no epochs, no fuel), and the same Rust code compiled natively.
//!
//! Run with `cargo bench -p wasmq --bench sandbox`; figures are recorded in BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmq::engine::{
    AllocatorKind, CallRequest, CpuMetering, LimitOverrides, Plugin, Sandbox, SandboxConfig,
};

fn setup(config: SandboxConfig) -> (tokio::runtime::Runtime, Sandbox, Plugin) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: None,
        ..config
    })
    .expect("sandbox");
    let plugin = runtime
        .block_on(sandbox.load_plugin_bytes("math", wasmq::bundled::MATH))
        .expect("math plugin");
    (runtime, sandbox, plugin)
}

fn call(
    runtime: &tokio::runtime::Runtime,
    sandbox: &Sandbox,
    plugin: &Plugin,
    request: &CallRequest,
) {
    let report = runtime
        .block_on(sandbox.call(plugin, request.clone()))
        .expect("call");
    assert!(report.outcome.is_success(), "{}", report.outcome);
    black_box(report);
}

fn trivial_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("trivial_call");
    for (name, allocator, cpu_metering) in [
        ("pooling", AllocatorKind::Pooling, CpuMetering::Time),
        ("on_demand", AllocatorKind::OnDemand, CpuMetering::Time),
        (
            "pooling_fuel_metering",
            AllocatorKind::Pooling,
            CpuMetering::Fuel,
        ),
    ] {
        let (runtime, sandbox, plugin) = setup(SandboxConfig {
            allocator,
            cpu_metering,
            ..SandboxConfig::default()
        });
        assert_eq!(
            sandbox.allocator(),
            allocator,
            "{name} allocator unavailable"
        );
        let request = CallRequest::new("math.add", "[1, 2]");
        group.bench_function(name, |b| {
            b.iter(|| call(&runtime, &sandbox, &plugin, &request))
        });
    }
    group.finish();
}

fn fib_native(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib_native(n - 1) + fib_native(n - 2)
    }
}

fn fib_25(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_25");
    group.sample_size(30);
    let mut request = CallRequest::new("math.fib", "[25]");
    request.limits = LimitOverrides {
        fuel: Some(u64::MAX),
        ..LimitOverrides::default()
    };
    for (name, cpu_metering) in [
        ("cpu-time", CpuMetering::Time),
        ("fuel", CpuMetering::Fuel),
        ("uninstrumented", CpuMetering::Off),
    ] {
        let (runtime, sandbox, plugin) = setup(SandboxConfig {
            cpu_metering,
            ..SandboxConfig::default()
        });
        group.bench_function(name, |b| {
            b.iter(|| call(&runtime, &sandbox, &plugin, &request))
        });
    }
    group.bench_function("native", |b| {
        b.iter(|| black_box(fib_native(black_box(25))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = trivial_call, fib_25
}
criterion_main!(benches);
