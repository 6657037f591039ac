//! `wasmq inspect`/`control` on the embedded broker: `wasmq worker` processes on one
//! SQLite file answer the `wasmq` CLI (and the broker's own `broadcast_control`) through
//! the file's `control_commands` and `control_replies` tables — ping, stats, registered,
//! active with every slot spinning, rate_limit (enforced), shutdown, a broadcast reaching
//! two workers and a destination reaching one, a cast that gets no reply, and malformed
//! rows that cost the worker nothing.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::{Broker, ControlBroadcast};
use wasmq::client::SendOptions;
use wasmq::protocol::ControlCommand;

use super::cli::{WorkerProcess, ask, until_active};
use crate::support::{Queue, runtime};

/// `wasmq <args> --broker <url>`.
fn wasmq(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(args)
        .args(["--broker", url])
        .output()
        .expect("run wasmq")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `wasmq <args> --json --broker <url>`'s replies, `{node: reply}`.
fn replies(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = wasmq(url, &all);
    assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {output:?}"))
}

/// Starts worker `node` on the file (the test's own broker and backend), one queue.
async fn start(queue: &Queue, node: &str, slots: usize) -> WorkerProcess {
    let (url, node, dir) = (
        queue.url.clone(),
        node.to_owned(),
        queue.dir.path().to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        WorkerProcess::start_on(&url, &url, "celery", &node, slots, &dir)
    })
    .await
    .unwrap()
}

/// Waits until `node` answers a ping: "ready" is logged before the worker listens for
/// commands, and a command is for the workers listening when it is sent.
async fn until_it_answers(broker: &dyn Broker, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask(broker, node, "ping").await.is_empty() {
        assert!(Instant::now() < deadline, "{node} never answered");
    }
}

/// Rows in the file's `control_replies`.
fn reply_rows(queue: &Queue) -> i64 {
    let conn = rusqlite::Connection::open(queue.dir.path().join("wasmq.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM control_replies", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn wasmq_inspect_and_control_a_worker_on_the_embedded_broker() {
    runtime().block_on(async {
        let queue = Queue::new();
        let url = queue.url.clone();
        let node = "wasmq-embedded@control";
        let mut worker = start(&queue, node, 2).await;
        until_it_answers(queue.broker.as_ref(), node).await;

        // Rows no worker can read, then a ping: the worker skips them and answers.
        {
            let conn = rusqlite::Connection::open(queue.dir.path().join("wasmq.db")).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch(
                "INSERT INTO control_commands (at, expires, body) VALUES (0, 0, 'not json');
                 INSERT INTO control_commands (at, expires, body) VALUES (0, 'soon', x'00ff');
                 INSERT INTO control_commands (at, expires, body) VALUES (0, 0, 42);
                 INSERT INTO control_commands (at, expires, body)
                     VALUES (0, 0, '{\"method\": 5, \"arguments\": []}');",
            )
            .unwrap();
        }
        let ping = wasmq(&url, &["inspect", "ping", "-d", node, "-t", "5"]);
        let out = text(&ping.stdout);
        assert_eq!(ping.status.code(), Some(0), "{out}{}", text(&ping.stderr));
        assert!(
            out.contains(&format!("-> {node}: OK")) && out.contains("pong"),
            "{out}"
        );
        assert!(out.contains("1 node online."), "{out}");
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "the worker died"
        );
        assert!(
            worker
                .log_text()
                .contains("remote control: ignoring a malformed command"),
            "{}",
            worker.log_text()
        );

        let stats = replies(&url, &["inspect", "stats", "-d", node, "-t", "5"]);
        assert_eq!(stats[node]["pool"]["max-concurrency"], 2, "{stats:#}");
        assert_eq!(stats[node]["wasmq"]["consuming"], json!(["celery"]));
        let registered = replies(&url, &["inspect", "registered", "-d", node, "-t", "5"]);
        let tasks = registered[node].as_array().expect("a list of tasks");
        assert!(
            tasks.contains(&json!("math.add")) && tasks.contains(&json!("hostile.spin")),
            "{registered:#}"
        );

        // rate_limit: then five math.add at 2/s take at least 1.5 s (at once without it).
        let limited = wasmq(
            &url,
            &[
                "control",
                "rate_limit",
                "math.add",
                "2/s",
                "-d",
                node,
                "-t",
                "5",
            ],
        );
        assert!(
            text(&limited.stdout).contains("new rate limit set successfully"),
            "{limited:?}"
        );
        let sent = Instant::now();
        let mut results = Vec::new();
        for i in 0..5 {
            results.push(
                queue
                    .client
                    .send_task(
                        "math.add",
                        vec![json!(i), json!(i)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        for (i, result) in results.iter().enumerate() {
            assert_eq!(
                result.get(Duration::from_secs(30)).await.unwrap(),
                json!(2 * i)
            );
        }
        let took = sent.elapsed();
        assert!(
            took >= Duration::from_millis(1_500),
            "5 runs at 2/s took {took:?}"
        );
        let rated = replies(
            &url,
            &["inspect", "registered", "rate_limit", "-d", node, "-t", "5"],
        );
        assert!(
            rated[node]
                .as_array()
                .is_some_and(|tasks| tasks.contains(&json!("math.add [rate_limit=2/s]"))),
            "{rated:#}"
        );

        // Every slot spinning: `active` lists both, and ping still answers at once.
        let mut spinning = Vec::new();
        for _ in 0..2 {
            spinning.push(
                queue
                    .client
                    .send_task(
                        "hostile.spin",
                        Vec::new(),
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        until_active(queue.broker.as_ref(), node, 2).await;
        let active = replies(&url, &["inspect", "active", "-d", node, "-t", "5"]);
        let names: Vec<&Value> = active[node]
            .as_array()
            .expect("a list of tasks")
            .iter()
            .map(|task| &task["name"])
            .collect();
        assert_eq!(
            names,
            [&json!("hostile.spin"), &json!("hostile.spin")],
            "{active:#}"
        );
        let mut round_trips = Vec::new();
        for _ in 0..10 {
            let asked = Instant::now();
            let replies = ask(queue.broker.as_ref(), node, "ping").await;
            round_trips.push(asked.elapsed());
            assert_eq!(replies.len(), 1, "{replies:?}");
            assert_eq!(replies[0].reply, json!({"ok": "pong"}));
        }
        round_trips.sort();
        let (median, slowest) = (round_trips[round_trips.len() / 2], round_trips[9]);
        println!(
            "embedded ping with every slot spinning: median {median:?}, slowest {slowest:?} of 10"
        );
        // Polling costs up to 50 ms (the worker) + 20 ms (the client) by design; the rest
        // of the bound is room for a loaded two-core CI machine. A ping served behind a
        // spinning slot would take most of a second.
        assert!(
            slowest < Duration::from_millis(250),
            "ping took {slowest:?} under load"
        );
        let active = ask(queue.broker.as_ref(), node, "active").await;
        assert_eq!(
            active[0].reply.as_array().map(Vec::len),
            Some(2),
            "both slots still spinning after the pings"
        );
        for spin in &spinning {
            queue.client.revoke(&spin.id, true).await.unwrap();
        }

        // `control shutdown`: no reply (as Celery), and the worker exits with status 0.
        let shutdown = wasmq(&url, &["control", "shutdown", "-d", node, "-t", "1"]);
        assert_eq!(shutdown.status.code(), Some(69), "{shutdown:?}");
        let (code, log) = tokio::task::spawn_blocking(move || {
            let code = worker.exit_code_within(Duration::from_secs(30));
            (code, worker.log_text())
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "{log}");
        assert!(log.contains("remote control: shutting down"), "{log}");
    });
}

#[test]
fn two_workers_on_one_file_answer_a_broadcast_and_a_destination_reaches_one() {
    runtime().block_on(async {
        let queue = Queue::new();
        let url = queue.url.clone();
        let (a, b) = ("wasmq-a@embedded", "wasmq-b@embedded");
        let mut first = start(&queue, a, 1).await;
        let mut second = start(&queue, b, 1).await;
        until_it_answers(queue.broker.as_ref(), a).await;
        until_it_answers(queue.broker.as_ref(), b).await;

        let everyone = replies(&url, &["inspect", "ping", "-t", "2"]);
        assert_eq!(
            everyone,
            json!({a: {"ok": "pong"}, b: {"ok": "pong"}}),
            "a broadcast reaches both"
        );

        // b counts every command it is handed (its `clock`); pings for a leave it alone.
        let clock = |replies: &Value| replies[b]["clock"].as_u64().expect("a clock");
        let before = clock(&replies(&url, &["inspect", "clock", "-d", b, "-t", "5"]));
        for _ in 0..3 {
            let asked = Instant::now();
            let only_a = replies(&url, &["inspect", "ping", "-d", a, "-t", "10"]);
            assert_eq!(only_a, json!({a: {"ok": "pong"}}));
            // Collection stops at the one node named, long before the timeout.
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "{:?}",
                asked.elapsed()
            );
        }
        let after = clock(&replies(&url, &["inspect", "clock", "-d", b, "-t", "5"]));
        assert_eq!(after, before + 1, "b was handed commands for a");

        // A cast runs but writes no reply row.
        assert_eq!(reply_rows(&queue), 0, "the replies read are deleted");
        let cast = ControlBroadcast {
            command: ControlCommand::new("enable_events", Map::new(), Some(vec![b.to_owned()])),
            reply: false,
            timeout: Duration::from_secs(5),
            limit: None,
        };
        assert!(
            queue
                .broker
                .broadcast_control(&cast)
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(reply_rows(&queue), 0, "a cast got a reply");
        let enabled = ask(queue.broker.as_ref(), b, "enable_events").await;
        assert_eq!(
            enabled[0].reply,
            json!({"ok": "task events already enabled"}),
            "the cast did not run"
        );
        let enabled = ask(queue.broker.as_ref(), a, "enable_events").await;
        assert_eq!(
            enabled[0].reply,
            json!({"ok": "task events enabled"}),
            "the cast for b ran on a"
        );

        for (worker, node) in [(&mut first, a), (&mut second, b)] {
            let shutdown = wasmq(&url, &["control", "shutdown", "-d", node, "-t", "1"]);
            drop(shutdown);
            let code = worker.exit_code_within(Duration::from_secs(30));
            assert_eq!(code, Some(0), "{}", worker.log_text());
        }
    });
}
