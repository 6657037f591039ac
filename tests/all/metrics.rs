//! `wasmq worker --metrics`: a running worker's Prometheus endpoint, scraped and parsed by
//! the official Python parser, counts exactly the tasks sent, under celery-exporter's
//! names, labels and buckets.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use wasmq::client::SendOptions;

use crate::support::{Queue, python, python_dir, runtime};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sum of the samples named `name` whose labels include every pair of `labels`.
fn sample(report: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[0] == name)
        .filter(|s| labels.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().unwrap())
        .sum()
}

fn scrape(url: &str, raw: &std::path::Path) -> Value {
    let output = Command::new(python())
        .arg(python_dir().join("scrape_metrics.py"))
        .env("URL", url)
        .env("RAW", raw)
        .output()
        .expect("run the scraper");
    assert!(
        output.status.success(),
        "the scrape failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn metrics_count_the_tasks_a_worker_ran() {
    runtime().block_on(async {
        let queue = Queue::new();
        let plugins = queue.plugin_folder(&["math", "hostile"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let _worker = Killed(
            Command::new(env!("CARGO_BIN_EXE_wasmq"))
                .args([
                    "worker",
                    "--concurrency",
                    "2",
                    "--name",
                    "wasmq@metrics-box",
                ])
                .args(["--broker", &queue.url, "--result-backend", &queue.url])
                .arg("--plugins")
                .arg(&plugins)
                .args(["--metrics", &format!("127.0.0.1:{port}")])
                .args(["--fuel", "100000000"])
                .env("WASMQ_LOG", "warn")
                .current_dir(queue.dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("start the worker"),
        );
        let send = |task: &'static str, args: Value| {
            let client = queue.client.clone();
            async move {
                client
                    .send_task(
                        task,
                        args.as_array().cloned().unwrap(),
                        serde_json::Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap()
            }
        };
        let mut sent = Vec::new();
        for i in 0..20 {
            sent.push(send("math.add", json!([i, 1])).await);
        }
        let failing = [
            send("math.div", json!([1, 0])).await,
            send("math.div", json!([2, 0])).await,
        ];
        let spin = send("hostile.spin", json!([])).await;
        for result in &sent {
            result.get(Duration::from_secs(60)).await.unwrap();
        }
        for result in failing.iter().chain([&spin]) {
            assert!(result.get(Duration::from_secs(60)).await.is_err());
        }
        // Counted once the result is stored; the gauges are sampled every 5 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let raw = queue.dir.path().join("scrape.txt");
        let raw_ = raw.clone();
        let report = tokio::task::spawn_blocking(move || scrape(&url, &raw_))
            .await
            .unwrap();
        lint_with_promtool(&raw);
        let host = ("hostname", "metrics-box");
        let celery = ("queue_name", "celery");
        assert_eq!(
            report["content_type"],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(report["/healthz"], 200, "{report:#}");
        assert_eq!(report["/readyz"], 200, "{report:#}");
        let add = ("name", "math.add");
        assert_eq!(
            sample(&report, "celery_task_received_total", &[add, host, celery]),
            20.0
        );
        assert_eq!(
            sample(&report, "celery_task_started_total", &[add, host, celery]),
            20.0
        );
        assert_eq!(
            sample(&report, "celery_task_succeeded_total", &[add, host, celery]),
            20.0
        );
        assert_eq!(
            sample(
                &report,
                "celery_task_failed_total",
                &[
                    ("name", "math.div"),
                    ("exception", "ZeroDivisionError"),
                    host,
                    celery
                ]
            ),
            2.0
        );
        assert_eq!(
            sample(&report, "celery_task_runtime_count", &[add, host, celery]),
            20.0
        );
        let buckets: Vec<String> = report["samples"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s[0] == "celery_task_runtime_bucket" && s[1]["name"] == "math.add")
            .map(|s| s[1]["le"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            buckets,
            [
                "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0",
                "2.5", "5.0", "7.5", "10.0", "+Inf"
            ],
            "celery-exporter's buckets"
        );
        assert_eq!(sample(&report, "celery_worker_up", &[host]), 1.0);
        assert_eq!(sample(&report, "wasmq_consuming", &[]), 1.0);
        assert_eq!(
            sample(
                &report,
                "wasmq_sandbox_limit_exceeded_total",
                &[("name", "hostile.spin"), ("limit", "fuel")]
            ),
            1.0,
            "{report:#}"
        );
        assert_eq!(
            sample(
                &report,
                "wasmq_tenant_tasks_total",
                &[("tenant", "-"), add, ("state", "SUCCESS")]
            ),
            20.0
        );
        // `inspect stats` carries the same count, by limit, for monitors without Prometheus
        // (the dashboard shows it).
        let stats = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .args([
                "inspect",
                "stats",
                "-d",
                "wasmq@metrics-box",
                "-t",
                "5",
                "--json",
            ])
            .args(["--broker", &queue.url])
            .output()
            .unwrap();
        let stats: Value =
            serde_json::from_slice(&stats.stdout).unwrap_or_else(|e| panic!("{e}: {stats:?}"));
        assert_eq!(
            stats["wasmq@metrics-box"]["wasmq"]["limit_hits"],
            json!({"fuel": 1, "memory": 0, "output": 0, "stack": 0, "time": 0}),
            "{stats:#}"
        );
        assert_eq!(sample(&report, "celery_queue_length", &[celery]), 0.0);
        assert!(sample(&report, "wasmq_task_fuel_used_count", &[add]) >= 20.0);
        assert_eq!(sample(&report, "wasmq_plugins_served", &[]), 2.0);
    });
}

/// `promtool check metrics` (Debian's prometheus package, which `.ci/run` installs and then
/// sets `WASMQ_REQUIRE_PROMTOOL`) lints the scrape; without promtool the lint is skipped
/// with a note unless it is required.
fn lint_with_promtool(raw: &std::path::Path) {
    let text = std::fs::read(raw).unwrap();
    let run = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match run {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var_os("WASMQ_REQUIRE_PROMTOOL").is_none(),
                "promtool is required but cannot run: {error}"
            );
            eprintln!("note: promtool not installed ({error}); the lint is skipped");
            return;
        }
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
