//! Every task of the `hostile` plugin is contained: one failed call with a precise reason,
//! and the same engine keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{HOSTILE, MATH};
use wasmq::engine::{CallRequest, LimitKind, LimitOverrides, Outcome, Sandbox, SandboxConfig};

use crate::support::{load, runtime, success};

/// What each hostile task must end as, and a fragment of its message.
fn expected(task: &str) -> (&'static str, &'static str) {
    match task {
        "hostile.spin" => (
            "limit:fuel",
            "ran out of CPU time (budget 200ms of CPU = 2000000000 fuel)",
        ),
        "hostile.hog" => ("limit:memory", "exceeded its memory limit (128 MiB)"),
        "hostile.recurse" => (
            "limit:stack",
            "overflowed its stack (wasm stack limit 512 KiB)",
        ),
        "hostile.panic" => (
            "trap",
            "panicked at hostile/src/lib.rs:56:5: the hostile plugin panicked on purpose",
        ),
        "hostile.flood" => (
            "limit:output",
            "wrote more than 256 KiB to stdout or stderr",
        ),
        "hostile.read_file" => ("failed", "PermissionError: cannot read /etc/passwd"),
        "hostile.read_env" => ("failed", "KeyError: no environment visible"),
        "hostile.connect" => (
            "failed",
            "ConnectionRefusedError: cannot connect to 127.0.0.1:5672",
        ),
        "hostile.big_result" => (
            "limit:output",
            "passed more than 16 MiB to the host at once (the result size limit)",
        ),
        // The attacks on grants, without any grant (tests/all/grants.rs has them with).
        "hostile.read_outside" => ("failed", "FileNotFoundError: cannot read /etc/passwd: "),
        "hostile.write_readonly" => (
            "failed",
            "PermissionError: cannot change /etc/passwd (truncate: ",
        ),
        "hostile.bind_listen" => ("failed", "PermissionError: cannot listen (127.0.0.1:8080: "),
        "hostile.read_variable" => ("failed", "KeyError: no variable HOME is served"),
        "hostile.follow_symlink" => ("failed", "symlink /tmp/link -> /etc not planted"),
        other => panic!("no expectation for {other}: every hostile task needs one"),
    }
}

/// The arguments each hostile task is called with.
fn arguments(task: &str) -> &'static str {
    match task {
        "hostile.read_outside" | "hostile.write_readonly" => r#"["/etc/passwd"]"#,
        "hostile.bind_listen" => "[8080]",
        "hostile.read_variable" => r#"["HOME"]"#,
        "hostile.follow_symlink" => r#"["/tmp/link", "/etc", "passwd"]"#,
        _ => "[]",
    }
}

#[test]
fn every_hostile_task_is_contained_and_the_engine_keeps_serving() {
    runtime().block_on(async {
        // A small pool: if a trap leaked a slot, the 1,000 calls below would run out.
        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: None,
            pool_size: 8,
            ..SandboxConfig::default()
        })
        .unwrap();
        let hostile = load(&sandbox, HOSTILE).await;
        let math = load(&sandbox, MATH).await;
        assert_eq!(hostile.tasks().len(), 14);
        for task in hostile.tasks() {
            let mut request = CallRequest::new(&task.name, arguments(&task.name));
            request.limits = LimitOverrides {
                fuel: Some(2_000_000_000),
                // The default 128 MiB: big_result needs room to build its 100 MB.
                memory_bytes: None,
                timeout: Some(Duration::from_secs(10)),
            };
            let report = sandbox.call(&hostile, request).await.unwrap();
            let (kind, fragment) = expected(&task.name);
            assert_eq!(
                report.outcome.kind_name(),
                kind,
                "{}: {}",
                task.name,
                report.outcome
            );
            let message = report.outcome.to_string();
            assert!(message.contains(fragment), "{}: {message}", task.name);
            // The engine still works between attacks.
            assert_eq!(success(&sandbox, &math, "math.add", "[1, 2]").await, 3);
        }
        for i in 0..1_000_i64 {
            let result = success(&sandbox, &math, "math.add", &format!("[{i}, {i}]")).await;
            assert_eq!(result, 2 * i);
        }
    });
}

#[test]
fn hostile_tasks_running_concurrently_do_not_disturb_a_correct_one() {
    runtime().block_on(async {
        let sandbox = Arc::new(
            Sandbox::new(SandboxConfig {
                cache_dir: None,
                ..SandboxConfig::default()
            })
            .unwrap(),
        );
        let hostile = load(&sandbox, HOSTILE).await;
        let math = load(&sandbox, MATH).await;
        let mut attacks = Vec::new();
        for task in [
            "hostile.spin",
            "hostile.hog",
            "hostile.flood",
            "hostile.recurse",
        ] {
            let (sandbox, hostile) = (Arc::clone(&sandbox), hostile.clone());
            attacks.push(tokio::spawn(async move {
                let mut request = CallRequest::new(task, "[]");
                request.limits.timeout = Some(Duration::from_millis(500));
                request.limits.memory_bytes = Some(32 << 20);
                sandbox.call(&hostile, request).await.unwrap().outcome
            }));
        }
        for i in 0..200_i64 {
            assert_eq!(
                success(&sandbox, &math, "math.mul", &format!("[{i}, 3]")).await,
                3 * i
            );
        }
        for attack in attacks {
            assert!(!attack.await.unwrap().is_success());
        }
    });
}

/// A CPU-bound guest yields to the executor at every epoch tick: on a single-threaded
/// runtime, a ticker task keeps running while `hostile.spin` spins.
#[test]
fn a_spinning_guest_does_not_pin_the_executor_thread() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: None,
            ..SandboxConfig::default()
        })
        .unwrap();
        let hostile = load(&sandbox, HOSTILE).await;
        let ticks = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&ticks);
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut request = CallRequest::new("hostile.spin", "[]");
        request.limits = LimitOverrides {
            fuel: Some(u64::MAX),
            timeout: Some(Duration::from_millis(600)),
            ..LimitOverrides::default()
        };
        let started = Instant::now();
        let report = sandbox.call(&hostile, request).await.unwrap();
        let spun = started.elapsed();
        ticker.abort();
        assert!(
            matches!(&report.outcome, Outcome::LimitExceeded(l) if l.kind == LimitKind::WallTime),
            "{}",
            report.outcome
        );
        assert_eq!(
            report.outcome.to_string(),
            "exceeded its time limit (600ms)"
        );
        assert!(
            spun >= Duration::from_millis(600),
            "stopped early: {spun:?}"
        );
        // The ticker shares the only executor thread with the spinning guest; it ran (a
        // pinned thread would leave it at 0). It cannot run more often than every 10 ms
        // epoch tick, so about 60 times on an idle machine; a loaded one (CI with builds
        // beside it: 16 seen) gives the thread fewer slices, so the bar is well above 0 and
        // well below 60.
        let ticks = ticks.load(Ordering::Relaxed);
        assert!(ticks >= 5, "the ticker ran only {ticks} times in {spun:?}");
    });
}
