//! `wasmq inspect`/`control` and Celery's `celery control` against a `wasmq worker`
//! process on RabbitMQ, `wasmq inspect ping` against a Python Celery worker and against no
//! worker at all (exit 69), and `ping` with every task slot spinning.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::{Broker, ControlBroadcast, ControlReply};
use wasmq::client::SendOptions;
use wasmq::protocol::ControlCommand;

use crate::interop::PythonWorker;
use crate::semantics::Setup;
use crate::support::{AMQP_URL, KOMBU_AMQP_URL, RABBITMQ, REDIS_URL, runtime};

/// `wasmq <args> --broker <RabbitMQ>`.
fn wasmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(args)
        .args(["--broker", AMQP_URL])
        .output()
        .expect("run wasmq")
}

/// `celery -b <RabbitMQ> <args>` from the test virtualenv.
fn celery(args: &[&str]) -> Output {
    Command::new(crate::support::python())
        .args(["-m", "celery", "-b", KOMBU_AMQP_URL])
        .args(args)
        .output()
        .expect("run celery")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `wasmq worker` process; killed when dropped if still running.
pub(super) struct WorkerProcess {
    pub(super) child: Child,
    log: std::path::PathBuf,
}

impl WorkerProcess {
    /// A worker on RabbitMQ with Redis results, two slots.
    fn start(queue: &str, node: &str, dir: &std::path::Path) -> Self {
        Self::start_on(AMQP_URL, REDIS_URL, queue, node, 2, dir)
    }

    /// A worker on `broker` with results in `backend`, consuming `queue` with `slots`
    /// slots, logging to `<dir>/<node>.log`; returns once it is ready.
    pub(super) fn start_on(
        broker: &str,
        backend: &str,
        queue: &str,
        node: &str,
        slots: usize,
        dir: &std::path::Path,
    ) -> Self {
        let log = dir.join(format!("{node}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            // Its default plugin folder and state files go in the test's folder, never
            // the crate's (cli::regression_spawned_commands_write_nothing_into_the_crate_directory).
            .current_dir(dir)
            .args(["worker", "--broker", broker, "--result-backend", backend])
            .args(["-Q", queue, "-c", &slots.to_string(), "-n", node])
            // Spinning tasks run for seconds: a large fuel budget, a short enough deadline.
            .args(["--fuel", "100000000000", "--timeout", "20s"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start wasmq worker");
        let worker = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !worker.log_text().contains("worker ready: consuming") {
            assert!(
                Instant::now() < deadline,
                "the worker never became ready:\n{}",
                worker.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        worker
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit code once it exits within `within`; none if it is still running.
    pub(super) fn exit_code_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `method` sent to `node` only, through the broker as `wasmq inspect` sends it.
pub(super) async fn ask(broker: &dyn Broker, node: &str, method: &str) -> Vec<ControlReply> {
    let broadcast = ControlBroadcast {
        command: ControlCommand::new(method, Map::new(), Some(vec![node.to_owned()])),
        reply: true,
        timeout: Duration::from_secs(2),
        limit: Some(1),
    };
    broker.broadcast_control(&broadcast).await.unwrap()
}

/// Waits (up to 20 s) until `node` reports `count` active tasks.
pub(super) async fn until_active(broker: &dyn Broker, node: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let active = ask(broker, node, "active").await;
        if active
            .first()
            .and_then(|r| r.reply.as_array())
            .map(Vec::len)
            == Some(count)
        {
            return;
        }
        assert!(Instant::now() < deadline, "the tasks never ran: {active:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn wasmq_inspect_and_control_a_worker_process_whose_slots_all_spin() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let setup = Setup::rabbitmq("cli-control", Default::default());
        let node = format!("wasmq-cli@{}", setup.queue);
        let (queue, node_, path) = (setup.queue.clone(), node.clone(), dir.path().to_owned());
        let mut worker =
            tokio::task::spawn_blocking(move || WorkerProcess::start(&queue, &node_, &path))
                .await
                .unwrap();
        // "Ready" is logged as consuming starts; the mailbox is declared just after (an
        // exclusive queue, which a passive declare from elsewhere cannot see): wait for a
        // first answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        while ask(setup.broker.as_ref(), &node, "ping").await.is_empty() {
            assert!(Instant::now() < deadline, "{node} never answered");
        }

        let ping = wasmq(&["inspect", "ping", "-d", &node, "-t", "5"]);
        let out = text(&ping.stdout);
        assert_eq!(ping.status.code(), Some(0), "{out}{}", text(&ping.stderr));
        assert!(
            out.contains(&format!("-> {node}: OK")) && out.contains("pong"),
            "{out}"
        );
        assert!(out.contains("1 node online."), "{out}");
        let stats = wasmq(&["inspect", "stats", "-d", &node, "-t", "5", "--json"]);
        let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
        assert_eq!(stats[&node]["pool"]["max-concurrency"], 2, "{stats:#}");
        assert_eq!(stats[&node]["wasmq"]["consuming"], json!([setup.queue]));

        // pool_shrink / pool_grow move the slots within the two the worker started with.
        let shrink = wasmq(&["control", "pool_shrink", "1", "-d", &node, "-t", "5"]);
        assert!(
            text(&shrink.stdout).contains("pool will shrink"),
            "{shrink:?}"
        );
        let stats = wasmq(&["inspect", "stats", "-d", &node, "-t", "5", "--json"]);
        let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
        assert_eq!(stats[&node]["pool"]["max-concurrency"], 1, "{stats:#}");
        assert_eq!(
            stats[&node]["pool"]["processes"].as_array().unwrap().len(),
            1
        );
        let grow = wasmq(&["control", "pool_grow", "1", "-d", &node, "-t", "5"]);
        assert!(text(&grow.stdout).contains("pool will grow"), "{grow:?}");
        let beyond = wasmq(&["control", "pool_grow", "1", "-d", &node, "-t", "5"]);
        let beyond = text(&beyond.stdout);
        assert!(
            beyond.contains(&format!("-> {node}: ERROR")) && beyond.contains("started with"),
            "{beyond}"
        );

        // Every slot spinning: ping still answers within 100 ms.
        let spinning: Vec<_> = futures_util::future::join_all(
            (0..2).map(|_| setup.send("hostile.spin", json!([]), SendOptions::default())),
        )
        .await;
        until_active(setup.broker.as_ref(), &node, 2).await;
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let asked = Instant::now();
            let replies = ask(setup.broker.as_ref(), &node, "ping").await;
            let took = asked.elapsed();
            assert_eq!(replies.len(), 1, "{replies:?}");
            assert_eq!(replies[0].reply, json!({"ok": "pong"}));
            slowest = slowest.max(took);
        }
        let active = ask(setup.broker.as_ref(), &node, "active").await;
        assert_eq!(
            active[0].reply.as_array().map(Vec::len),
            Some(2),
            "both slots still spinning after the pings"
        );
        println!("ping with every slot spinning: slowest of 5 round trips {slowest:?}");
        // Served on the control plane's own thread: never behind a spinning guest.
        assert!(
            slowest < Duration::from_millis(100),
            "ping took {slowest:?} under load"
        );
        for spin in &spinning {
            setup.client.revoke(&spin.id, true).await.unwrap();
        }

        // `celery control shutdown`: the worker exits, with status 0.
        let shutdown = celery(&["control", "shutdown", "-d", &node, "-t", "1"]);
        drop(shutdown);
        let code = tokio::task::spawn_blocking(move || {
            let code = worker.exit_code_within(Duration::from_secs(30));
            (code, worker.log_text())
        })
        .await
        .unwrap();
        assert_eq!(code.0, Some(0), "{}", code.1);
        setup.broker.forget_node(&node).await.unwrap();
        setup.cleanup().await;
    });
}

#[test]
fn wasmq_inspect_ping_reaches_a_python_worker_and_exits_69_when_nobody_answers() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let queue = crate::support::unique_queue("py-inspect");
    let python = PythonWorker::start(&queue, REDIS_URL, dir.path());
    let node = format!("py-{queue}@localhost");
    let ping = wasmq(&["inspect", "ping", "-d", &node, "-t", "10"]);
    let out = text(&ping.stdout);
    assert_eq!(ping.status.code(), Some(0), "{out}{}", text(&ping.stderr));
    assert!(
        out.contains(&format!("-> {node}: OK")) && out.contains("pong"),
        "{out}"
    );
    let registered = wasmq(&["inspect", "registered", "-d", &node, "-t", "10", "--json"]);
    let registered: Value = serde_json::from_slice(&registered.stdout).unwrap();
    assert!(
        registered[&node]
            .as_array()
            .is_some_and(|tasks| tasks.iter().any(|t| t == "tasks.add")),
        "{registered:#}"
    );
    drop(python);

    let nobody = format!("nobody@{queue}");
    let ping = wasmq(&["inspect", "ping", "-d", &nobody, "-t", "1"]);
    assert_eq!(ping.status.code(), Some(69), "{ping:?}");
    assert!(
        text(&ping.stderr).contains("No nodes replied within time constraint"),
        "{ping:?}"
    );
    runtime().block_on(async {
        let broker = wasmq::broker::amqp::AmqpBroker::new(AMQP_URL).unwrap();
        broker.delete_queue(&queue).await.unwrap();
    });
}
