//! Per-call limits are honoured at their boundary: a budget just big enough passes, one
//! just too small fails with the right limit.

use std::time::Duration;

use crate::support::{HOSTILE, MATH, TEXT};
use wasmq::engine::{
    CallRequest, CpuMetering, LimitKind, LimitOverrides, Outcome, Sandbox, SandboxConfig,
};

use crate::support::{load, runtime, sandbox};

fn limit_kind(outcome: &Outcome) -> Option<LimitKind> {
    match outcome {
        Outcome::LimitExceeded(limit) => Some(limit.kind),
        _ => None,
    }
}

/// Under fuel metering the budget is exact: a call stops at the very unit it runs out.
#[test]
fn fuel_budget_boundary() {
    runtime().block_on(async {
        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: None,
            cpu_metering: CpuMetering::Fuel,
            ..SandboxConfig::default()
        })
        .unwrap();
        let math = load(&sandbox, MATH).await;
        let run = |fuel: u64| {
            let mut request = CallRequest::new("math.fib", "[20]");
            request.limits.fuel = Some(fuel);
            sandbox.call(&math, request)
        };
        let used = run(1_000_000_000).await.unwrap().fuel_used;
        assert!(used > 100_000, "fib(20) used only {used} fuel");
        // Fuel accounting is deterministic: the same call uses the same fuel.
        assert_eq!(run(1_000_000_000).await.unwrap().fuel_used, used);
        assert!(run(used).await.unwrap().outcome.is_success());
        // Fuel is checked at function entries and loop headers, so the smallest budget that
        // passes can be a little below what the call reports using: find it exactly.
        let (mut fails, mut passes) = (0_u64, used);
        while passes - fails > 1 {
            let mid = fails + (passes - fails) / 2;
            if run(mid).await.unwrap().outcome.is_success() {
                passes = mid;
            } else {
                fails = mid;
            }
        }
        assert!(passes > used * 9 / 10, "{passes} of {used}");
        let exact = run(passes).await.unwrap();
        assert_eq!(exact.outcome, Outcome::Success("6765".into()));
        let short = run(passes - 1).await.unwrap();
        assert_eq!(
            limit_kind(&short.outcome),
            Some(LimitKind::Fuel),
            "{}",
            short.outcome
        );
        assert_eq!(
            short.outcome.to_string(),
            format!("ran out of fuel (budget {})", passes - 1)
        );
    });
}

#[test]
fn memory_cap_boundary() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        const PAGE: u64 = 64 << 10;
        let run = |pages: u64| {
            let mut request = CallRequest::new("math.add", "[1, 2]");
            request.limits.memory_bytes = Some(pages * PAGE);
            sandbox.call(&math, request)
        };
        // The smallest number of wasm pages math.add runs in.
        let mut pages = 1;
        while !run(pages).await.unwrap().outcome.is_success() {
            pages += 1;
            assert!(pages < 1024, "math.add does not run in 64 MiB");
        }
        let short = run(pages - 1).await.unwrap();
        assert_eq!(
            limit_kind(&short.outcome),
            Some(LimitKind::Memory),
            "{}",
            short.outcome
        );

        // A task that allocates: the hog is stopped at exactly the cap it was given.
        let hostile = load(&sandbox, HOSTILE).await;
        for cap in [8_u64 << 20, 32 << 20] {
            let mut request = CallRequest::new("hostile.hog", "[]");
            request.limits.memory_bytes = Some(cap);
            let report = sandbox.call(&hostile, request).await.unwrap();
            assert_eq!(
                report.outcome.to_string(),
                format!("exceeded its memory limit ({} MiB)", cap >> 20)
            );
        }
    });
}

#[test]
fn wall_clock_boundary() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let hostile = load(&sandbox, HOSTILE).await;
        let generous = LimitOverrides {
            fuel: Some(u64::MAX),
            timeout: Some(Duration::from_secs(5)),
            ..LimitOverrides::default()
        };
        let mut request = CallRequest::new("math.fib", "[25]");
        request.limits = generous;
        assert!(
            sandbox
                .call(&math, request)
                .await
                .unwrap()
                .outcome
                .is_success()
        );

        let mut request = CallRequest::new("hostile.spin", "[]");
        request.limits = LimitOverrides {
            timeout: Some(Duration::from_millis(150)),
            ..generous
        };
        let report = sandbox.call(&hostile, request).await.unwrap();
        assert_eq!(limit_kind(&report.outcome), Some(LimitKind::WallTime));
        assert!(
            report.elapsed >= Duration::from_millis(150),
            "{:?}",
            report.elapsed
        );
    });
}

#[test]
fn plugin_defaults_apply_and_callers_override_them_within_the_ceiling() {
    runtime().block_on(async {
        let sandbox = wasmq::engine::Sandbox::new(wasmq::engine::SandboxConfig {
            cache_dir: None,
            ceiling: wasmq::engine::Limits {
                fuel: 5_000_000,
                memory_bytes: 1 << 30,
                timeout: Duration::from_secs(60),
            },
            ..wasmq::engine::SandboxConfig::default()
        })
        .unwrap();
        // text.markdown declares #[task(memory = "64MiB", timeout = "10s")].
        let text = load(&sandbox, TEXT).await;
        let declared = text.task("text.markdown").unwrap().limits;
        assert_eq!(declared.memory_bytes, Some(64 << 20));
        assert_eq!(declared.timeout, Some(Duration::from_secs(10)));
        let report = sandbox
            .call(&text, CallRequest::new("text.markdown", r#"["*x*"]"#))
            .await
            .unwrap();
        assert!(report.outcome.is_success(), "{}", report.outcome);
        assert_eq!(
            report.limits.memory_bytes,
            64 << 20,
            "the plugin default applies"
        );
        assert_eq!(report.limits.timeout, Duration::from_secs(10));
        let mut request = CallRequest::new("text.markdown", r#"["*x*"]"#);
        request.limits.memory_bytes = Some(32 << 20);
        let report = sandbox.call(&text, request).await.unwrap();
        assert_eq!(
            report.limits.memory_bytes,
            32 << 20,
            "the caller overrides it"
        );

        let hostile = load(&sandbox, HOSTILE).await;
        let mut request = CallRequest::new("hostile.spin", "[]");
        request.limits.fuel = Some(u64::MAX);
        let report = sandbox.call(&hostile, request).await.unwrap();
        assert_eq!(
            report.limits.fuel, 5_000_000,
            "the ceiling wins over the caller"
        );
        assert_eq!(
            report.outcome.to_string(),
            "ran out of CPU time (budget 500us of CPU = 5000000 fuel)"
        );
    });
}

/// The CPU budget is hard under both meterings a worker can run with: a spinning task is
/// stopped by it (not by its far longer wall-clock limit), under CPU-time metering within a
/// tick (10 ms) of CPU past the budget.
#[test]
fn a_spinning_task_is_stopped_by_its_cpu_budget_under_every_metering() {
    runtime().block_on(async {
        for metering in [CpuMetering::Time, CpuMetering::Fuel] {
            let sandbox = Sandbox::new(SandboxConfig {
                cache_dir: None,
                cpu_metering: metering,
                ..SandboxConfig::default()
            })
            .unwrap();
            let hostile = load(&sandbox, HOSTILE).await;
            let mut request = CallRequest::new("hostile.spin", "[]");
            request.limits = LimitOverrides {
                fuel: Some(1_000_000_000), // 100 ms of CPU under CPU-time metering
                timeout: Some(Duration::from_secs(20)),
                ..LimitOverrides::default()
            };
            let report = sandbox.call(&hostile, request).await.unwrap();
            let name = metering.name();
            assert_eq!(
                limit_kind(&report.outcome),
                Some(LimitKind::Fuel),
                "{name}: {}",
                report.outcome
            );
            assert!(
                report.elapsed < Duration::from_secs(10),
                "{name}: ran {:?}",
                report.elapsed
            );
            if metering == CpuMetering::Time {
                assert_eq!(
                    report.outcome.to_string(),
                    "ran out of CPU time (budget 100ms of CPU = 1000000000 fuel)"
                );
                assert!(
                    report.cpu_time >= Duration::from_millis(100)
                        && report.cpu_time < Duration::from_millis(150),
                    "stopped after {:?} of CPU",
                    report.cpu_time
                );
            } else {
                assert_eq!(
                    report.outcome.to_string(),
                    "ran out of fuel (budget 1000000000)"
                );
            }
        }
    });
}

/// CPU-time metering charges the CPU a task uses, not the time it waits: a task that
/// sleeps 300 ms on a budget of 100 ms of CPU succeeds, charged almost nothing.
#[test]
fn cpu_time_metering_does_not_charge_waiting() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let mut request = CallRequest::new("math.sleep", "[0.3]");
        request.limits.fuel = Some(1_000_000_000);
        let report = sandbox.call(&math, request).await.unwrap();
        assert!(report.outcome.is_success(), "{}", report.outcome);
        assert!(report.elapsed >= Duration::from_millis(300));
        assert!(
            report.cpu_time < Duration::from_millis(50),
            "charged {:?} for sleeping",
            report.cpu_time
        );
    });
}
