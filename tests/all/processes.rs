//! Behaviour that is about processes, tested with real `wasmq` processes sharing one
//! embedded broker file: a worker and `wasmq send` in separate processes, a worker killed
//! with SIGKILL mid-task, two workers on one file, graceful shutdown on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use wasmq::client::SendOptions;

use crate::support::{Queue, runtime};

const WAIT: Duration = Duration::from_secs(60);

/// A shared artifact cache so each process does not recompile the plugins.
fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("wasmq-test-artifact-cache")
}

/// `wasmq`, run in `cwd`: a test's temporary folder, where the relative defaults
/// (`.wasmq/state/` of a worker, the `.wasmq/wasmq.db` of a command given no broker) land
/// instead of the crate directory cargo runs the tests in (bug 2 of issue 11).
pub(crate) fn wasmq(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmq"));
    command
        .current_dir(cwd)
        .env("WASMQ_CACHE_DIR", cache_dir())
        .env_remove("WASMQ_LOG");
    command
}

/// Starts `wasmq worker` on the queue's file; its log goes to `log`.
fn start_worker(
    queue: &Queue,
    plugins: &Path,
    name: &str,
    concurrency: usize,
    log: &Path,
) -> Child {
    wasmq(queue.dir.path())
        .args([
            "worker",
            "--broker",
            &queue.url,
            "--result-backend",
            &queue.url,
        ])
        .arg("--plugins")
        .arg(plugins)
        .args([
            "--name",
            name,
            "--concurrency",
            &concurrency.to_string(),
            "--shutdown-timeout",
            "20s",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start wasmq worker")
}

pub(crate) fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the log contains `text` (the worker logs "worker ready" once consuming).
pub(crate) fn wait_for_log(log: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let content = std::fs::read_to_string(log).unwrap_or_default();
        if content.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never logged {text:?}:\n{content}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_in_log(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(text)
        .count()
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn send_and_result_from_other_processes_reach_a_worker_process() {
    let queue = Queue::new();
    let plugins = queue.plugin_folder(&["math", "text"]);
    let log = queue.dir.path().join("worker.log");
    let mut worker = start_worker(&queue, &plugins, "w1", 2, &log);
    wait_for_log(&log, "worker ready");

    let send = |args: &[&str]| {
        let output = wasmq(queue.dir.path())
            .arg("send")
            .args(args)
            .args(["--broker", &queue.url, "--result-backend", &queue.url])
            .output()
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    assert_eq!(
        send(&["math.add", "[2, 3]", "--wait"]),
        (0, "5\n".into(), String::new())
    );
    let (code, _, stderr) = send(&["math.div", "[1, 0]", "--wait"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: math.div[")
            && stderr.ends_with("] failed: ZeroDivisionError: division by zero\n"),
        "{stderr}"
    );
    // Without --wait: the id, then `wasmq result --wait` in yet another process.
    let (code, id, _) = send(&["text.slugify", "[\"Two Shells\"]", "--id", "my-task-1"]);
    assert_eq!((code, id.as_str()), (0, "my-task-1\n"));
    let output = wasmq(queue.dir.path())
        .args([
            "result",
            "my-task-1",
            "--wait",
            "--result-backend",
            &queue.url,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "\"two-shells\"\n"
    );
    // Environment variables select the same endpoints as the flags.
    let output = wasmq(queue.dir.path())
        .args(["send", "math.mul", "[6, 7]", "--wait"])
        .env("WASMQ_BROKER", &queue.url)
        .env("WASMQ_RESULT_BACKEND", &queue.url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "42\n");
    // Nothing arrives for a task nobody consumes: a timeout exit code.
    let (code, _, stderr) = send(&[
        "math.add",
        "[1, 1]",
        "--queue",
        "nobody",
        "--wait",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(code, 5, "{stderr}");

    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)).success());
}

/// A commit by one process wakes the other at once (the file watcher), in both directions:
/// the idle worker finds a task sent from this process, and this process's wait finds the
/// worker's result, without waiting out a polling period. The sends are 150 ms apart, longer
/// than the 100 ms the idle side sleeps between polls when a watcher is present, so a watcher
/// that never fires makes every round trip last tens of milliseconds.
#[test]
fn a_worker_process_and_a_client_process_wake_each_other_on_commit() {
    let queue = Queue::new();
    let plugins = queue.plugin_folder(&["math"]);
    let log = queue.dir.path().join("worker.log");
    let mut worker = start_worker(&queue, &plugins, "w1", 1, &log);
    wait_for_log(&log, "worker ready");
    let latencies = runtime().block_on(async {
        let mut latencies = Vec::new();
        for i in 0..21 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let started = Instant::now();
            let result = queue
                .client
                .send_task(
                    "math.add",
                    vec![json!(i), json!(1)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            assert_eq!(result.get(WAIT).await.unwrap(), json!(i + 1));
            latencies.push(started.elapsed());
        }
        latencies
    });
    // The worker stops before anything is checked, so a failure leaves no process behind.
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)).success());
    let mut sorted = latencies.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    assert!(
        median < Duration::from_millis(30),
        "median round trip {median:?} across processes: a commit did not wake the other side \
         (all: {latencies:?})"
    );
}

#[test]
fn a_worker_killed_mid_task_loses_nothing_after_restart() {
    runtime().block_on(async {
        let queue = Queue::new();
        let plugins = queue.plugin_folder(&["math"]);
        let first_log = queue.dir.path().join("first.log");
        let mut first = start_worker(&queue, &plugins, "w-killed", 2, &first_log);
        wait_for_log(&first_log, "worker ready");

        let mut results = Vec::new();
        for _ in 0..6 {
            let r = queue
                .client
                .send_task(
                    "math.sleep",
                    vec![json!(1.0)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            results.push(r);
        }
        // Two are running (concurrency 2) and the rest are prefetched when it dies.
        tokio::time::sleep(Duration::from_millis(500)).await;
        first.kill().unwrap();
        first.wait().unwrap();
        assert_eq!(
            count_in_log(&first_log, "succeeded in"),
            0,
            "killed before any finished"
        );

        let second_log = queue.dir.path().join("second.log");
        let mut second = start_worker(&queue, &plugins, "w-restarted", 2, &second_log);
        for r in &results {
            assert_eq!(r.get(WAIT).await.unwrap(), json!(1.0));
        }
        assert!(
            std::fs::read_to_string(&second_log)
                .unwrap()
                .contains("redelivering messages leased by dead processes"),
            "the restarted worker should reclaim the dead worker's leases at once"
        );
        assert_eq!(count_in_log(&second_log, "succeeded in"), 6);
        signal(&second, "-TERM");
        assert!(wait_exit(&mut second, Duration::from_secs(20)).success());
    });
}

#[test]
fn two_workers_on_one_file_share_the_work_without_running_a_task_twice() {
    runtime().block_on(async {
        let queue = Queue::new();
        let plugins = queue.plugin_folder(&["math"]);
        let logs = [
            queue.dir.path().join("a.log"),
            queue.dir.path().join("b.log"),
        ];
        let mut workers = [
            start_worker(&queue, &plugins, "w-a", 2, &logs[0]),
            start_worker(&queue, &plugins, "w-b", 2, &logs[1]),
        ];
        wait_for_log(&logs[0], "worker ready");
        wait_for_log(&logs[1], "worker ready");
        const N: usize = 200;
        let mut results = Vec::new();
        for i in 0..N {
            let r = queue
                .client
                .send_task(
                    "math.sleep",
                    vec![json!(0.005 + (i % 3) as f64 * 0.001)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            results.push(r);
        }
        let mut by_worker = std::collections::HashMap::<String, usize>::new();
        for r in &results {
            r.get(WAIT).await.unwrap();
            let worker = r.meta().await.unwrap().unwrap().worker.unwrap();
            *by_worker.entry(worker).or_default() += 1;
        }
        let runs = count_in_log(&logs[0], "succeeded in") + count_in_log(&logs[1], "succeeded in");
        assert_eq!(runs, N, "every task ran exactly once across both workers");
        assert_eq!(by_worker.len(), 2, "both workers took work: {by_worker:?}");
        assert!(by_worker.values().all(|n| *n >= N / 10), "{by_worker:?}");
        for worker in &mut workers {
            signal(worker, "-TERM");
        }
        for worker in &mut workers {
            assert!(wait_exit(worker, Duration::from_secs(20)).success());
        }
    });
}

#[test]
fn graceful_shutdown_finishes_running_tasks_and_leaves_the_rest() {
    runtime().block_on(async {
        let queue = Queue::new();
        let plugins = queue.plugin_folder(&["math"]);
        let log = queue.dir.path().join("worker.log");
        let mut worker = start_worker(&queue, &plugins, "w-graceful", 2, &log);
        wait_for_log(&log, "worker ready");
        let mut results = Vec::new();
        for _ in 0..6 {
            let r = queue
                .client
                .send_task(
                    "math.sleep",
                    vec![json!(1.0)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            results.push(r);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        signal(&worker, "-TERM");
        let status = wait_exit(&mut worker, Duration::from_secs(20));
        assert!(status.success(), "{status:?}");
        // The two running tasks finished; the four waiting ones were given back at once.
        assert_eq!(count_in_log(&log, "succeeded in"), 2);
        assert_eq!(queue.broker.queue_length("celery").await.unwrap(), 4);
        let finished = futures_ready(&results).await;
        assert_eq!(finished, 2);

        // A second worker runs the rest.
        let log2 = queue.dir.path().join("worker2.log");
        let mut second = start_worker(&queue, &plugins, "w-next", 2, &log2);
        for r in &results {
            assert_eq!(r.get(WAIT).await.unwrap(), json!(1.0));
        }
        // A second signal exits at once, even with tasks running.
        let long = queue
            .client
            .send_task(
                "math.sleep",
                vec![json!(30.0)],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        let _ = long;
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(&second, "-TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(&second, "-TERM");
        let status = wait_exit(&mut second, Duration::from_secs(5));
        assert_eq!(status.code(), Some(130));
    });
}

async fn futures_ready(results: &[wasmq::client::AsyncResult]) -> usize {
    let mut ready = 0;
    for r in results {
        if r.ready().await.unwrap() {
            ready += 1;
        }
    }
    ready
}
