//! Celery events from a wasmq worker, read by the real tools: `celery events --dump` and
//! Flower (both unmodified, from PyPI) on RabbitMQ's `celeryev` exchange, and `wasmq
//! events` on the embedded broker's events table.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpOptions;
use wasmq::client::SendOptions;
use wasmq::protocol::events::{Event, EventMessage};
use wasmq::worker::WorkerOptions;

use crate::semantics::Setup;
use crate::support::{
    KOMBU_AMQP_URL, Queue, RABBITMQ, REDIS_URL, bundled_registry, python, python_dir, runtime,
    sandbox, spawn_worker,
};

/// A child process killed when dropped, its output collected line by line.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONUNBUFFERED", "1")
            .spawn()
            .expect("start the monitor");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Self { child, lines }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `within` for a line containing `needle`.
    async fn wait_for(&self, needle: &str, within: Duration) -> bool {
        self.wait_for_line(&[needle], within).await
    }

    /// Waits up to `within` for one line containing every one of `needles` (other tests'
    /// workers share the `celeryev` exchange, so a needle alone may match their events).
    async fn wait_for_line(&self, needles: &[&str], within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self
                .output()
                .iter()
                .any(|line| needles.iter().all(|needle| line.contains(needle)))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// Publishes a probe event on `broker` until `monitor` prints it: its receiver is then
/// bound, and no event of the worker started next can be missed.
async fn until_listening(broker: &Arc<dyn Broker>, monitor: &Monitor) {
    let probe = format!("probe@{}", std::process::id());
    for _ in 0..150 {
        let mut event = Event::new("worker-heartbeat", json!({"freq": 2.0, "active": 0}));
        event.stamp(&probe, chrono::Utc::now().timestamp() as f64, 1, 1);
        broker
            .publish_events(&EventMessage::single(event))
            .await
            .unwrap();
        if monitor.wait_for(&probe, Duration::from_millis(200)).await {
            return;
        }
    }
    panic!(
        "the monitor never received an event: {:#?}",
        monitor.output()
    );
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn celery_events_dump_shows_a_wasmq_worker_and_its_tasks() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(events_dump(
        Setup::rabbitmq("events-dump", AmqpOptions::default()),
        KOMBU_AMQP_URL,
    ));
}

#[test]
fn celery_events_dump_shows_a_wasmq_worker_and_its_tasks_on_redis() {
    runtime().block_on(events_dump(
        Setup::redis("redis-events-dump"),
        "redis://127.0.0.1:6379/5",
    ));
}

/// `celery events --dump` on `broker_url` (kombu's spelling of `setup`'s broker) shows a
/// wasmq worker coming and going and its tasks' events as Celery formats them.
async fn events_dump(setup: Setup, broker_url: &str) {
    let node = format!("wasmq-events@{}", setup.queue);
    let dump = Monitor::start(
        Command::new(python())
            .args(["-m", "celery", "-b", broker_url, "events", "--dump"])
            .current_dir(std::env::temp_dir()),
    );
    assert!(
        dump.wait_for("starting capture", Duration::from_secs(30))
            .await,
        "celery events did not start: {:#?}",
        dump.output()
    );
    until_listening(&setup.broker, &dump).await;
    let worker = setup
        .start(WorkerOptions {
            task_events: true,
            ..setup.options(&node)
        })
        .await;
    let add = setup
        .send("math.add", json!([2, 3]), SendOptions::default())
        .await;
    let div = setup
        .send("math.div", json!([1, 0]), SendOptions::default())
        .await;
    assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(5));
    assert!(div.get(Duration::from_secs(30)).await.is_err());
    let failed_line = format!("task failed: math.div({})", div.id);
    assert!(
        dump.wait_for(&failed_line, Duration::from_secs(10)).await,
        "no task-failed event for {}: {:#?}",
        div.id,
        dump.output()
    );
    worker.stop().await;
    assert!(
        dump.wait_for_line(
            &[&format!("{node} ["), "] shutdown:"],
            Duration::from_secs(10)
        )
        .await,
        "no worker-offline event: {:#?}",
        dump.output()
    );
    let lines = dump.output();
    let mine: Vec<&String> = lines
        .iter()
        .filter(|line| line.starts_with(&format!("{node} [")))
        .collect();
    let has = |needles: &[&str]| {
        mine.iter()
            .any(|line| needles.iter().all(|needle| line.contains(needle)))
    };
    assert!(
        has(&["] started:", "sw_ident=wasmq", "freq=2.0", "active=0"]),
        "no worker-online: {mine:#?}"
    );
    assert!(
        has(&[&format!(
            "task received: math.add({}) args=(2, 3) kwargs={{}}",
            add.id
        )]),
        "no task-received for math.add: {mine:#?}"
    );
    assert!(
        has(&[
            &format!("task succeeded: math.add({})", add.id),
            "result=5",
            "runtime="
        ]),
        "no task-succeeded with result and runtime: {mine:#?}"
    );
    assert!(
        has(&[
            &failed_line,
            "exception=ZeroDivisionError('division by zero')"
        ]),
        "no task-failed with Celery's exception text: {mine:#?}"
    );
    assert!(
        has(&["] shutdown:", "sw_ident=wasmq"]),
        "no worker-offline: {mine:#?}"
    );
    setup.cleanup().await;
}

#[test]
fn flower_lists_a_wasmq_worker_and_its_tasks() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("events-flower", AmqpOptions::default());
        let node = format!("wasmq-flower@{}", setup.queue);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let flower = Monitor::start(
            Command::new(python())
                .args(["-m", "celery", "--broker", KOMBU_AMQP_URL, "flower"])
                .arg("--address=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg("--inspect_timeout=3000")
                .env("FLOWER_UNAUTHENTICATED_API", "true")
                .current_dir(std::env::temp_dir()),
        );
        assert!(
            flower
                .wait_for("Visit me at", Duration::from_secs(30))
                .await,
            "Flower did not start: {:#?}",
            flower.output()
        );
        // Task events off: Flower's `enable_events` broadcast must switch them on.
        let worker = setup.start(setup.options(&node)).await;
        let probe = |mode: &'static str| {
            let (queue, node) = (setup.queue.clone(), node.clone());
            tokio::task::spawn_blocking(move || {
                Command::new(python())
                    .arg(python_dir().join("flower_probe.py"))
                    .env("FLOWER", format!("http://127.0.0.1:{port}"))
                    .env("BROKER", KOMBU_AMQP_URL)
                    .env("BACKEND", REDIS_URL)
                    .env("QUEUE", queue)
                    .env("NODE", node)
                    .env("MODE", mode)
                    .output()
                    .expect("run the Flower probe")
            })
        };
        let output = probe("watch").await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the probe failed:\n{stdout}\n{}\nFlower:\n{:#?}",
            String::from_utf8_lossy(&output.stderr),
            flower.output()
        );
        let report: Value = serde_json::from_str(&stdout).unwrap();
        eprintln!("Flower saw: {report:#}");
        assert_eq!(report["online"], true, "{report:#}");
        let succeeded = &report["succeeded"];
        assert_eq!(succeeded["state"], "SUCCESS", "{report:#}");
        assert_eq!(succeeded["worker"], node.as_str(), "{report:#}");
        assert_eq!(succeeded["result"], "5", "{report:#}");
        assert!(
            succeeded["runtime"].as_f64().is_some_and(|r| r > 0.0),
            "{report:#}"
        );
        assert_eq!(succeeded["args"], "(2, 3)", "{report:#}");
        let failed = &report["failed"];
        assert_eq!(failed["state"], "FAILURE", "{report:#}");
        assert_eq!(
            failed["exception"], "ZeroDivisionError('division by zero')",
            "{report:#}"
        );
        // Flower's worker page inspects the worker; `stats` must answer or it is a 404.
        for method in ["stats", "registered", "active_queues"] {
            assert!(
                report["inspected"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(method)),
                "Flower did not get {method}: {report:#}"
            );
        }
        assert_eq!(report["registered_add"], true, "{report:#}");
        assert_eq!(report["stats_pool"], 2, "{report:#}");
        assert_eq!(report["worker_page"], 200, "{report:#}");

        worker.stop().await;
        let output = probe("offline").await.unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        assert_eq!(
            report["offline"],
            true,
            "Flower still lists the stopped worker as online: {report:#} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        setup.cleanup().await;
    });
}

#[test]
fn wasmq_events_tails_the_embedded_broker() {
    runtime().block_on(async {
        let queue = Queue::new();
        let node = "wasmq-events-embedded@test";
        let tail = Monitor::start(
            Command::new(env!("CARGO_BIN_EXE_wasmq"))
                .args(["events", "--json", "--timeout", "60s", "--broker"])
                .arg(&queue.url),
        );
        until_listening(&queue.broker, &tail).await;
        let (stop, worker) = spawn_worker(
            &queue,
            bundled_registry(sandbox()).await,
            WorkerOptions {
                concurrency: 2,
                node_name: node.into(),
                task_events: true,
                heartbeat: Some(Duration::from_millis(500)),
                ..WorkerOptions::default()
            },
        );
        let add = queue
            .client
            .send_task(
                "math.add",
                vec![json!(20), json!(22)],
                serde_json::Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(42));
        let id = add.id.to_owned();
        let seen = tail
            .wait_for("task-succeeded", Duration::from_secs(10))
            .await
            && tail
                .wait_for("worker-heartbeat", Duration::from_secs(5))
                .await;
        let _ = stop.send(());
        worker.await.unwrap();
        assert!(
            seen && tail
                .wait_for("worker-offline", Duration::from_secs(5))
                .await,
            "{:#?}",
            tail.output()
        );
        let events: Vec<Value> = tail
            .output()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let of_task: Vec<&str> = events
            .iter()
            .filter(|event| event["uuid"] == id.as_str())
            .filter_map(|event| event["type"].as_str())
            .collect();
        assert_eq!(
            of_task,
            ["task-received", "task-started", "task-succeeded"],
            "{events:#?}"
        );
        let succeeded = events
            .iter()
            .find(|event| event["type"] == "task-succeeded")
            .unwrap();
        assert_eq!(succeeded["result"], "42");
        assert_eq!(succeeded["hostname"], node);
        assert!(succeeded["clock"].as_u64().unwrap() > 0);
        assert!(succeeded["runtime"].as_f64().unwrap() > 0.0);
        let kinds: Vec<&str> = events
            .iter()
            .filter(|event| event["hostname"] == node)
            .filter_map(|event| event["type"].as_str())
            .collect();
        assert_eq!(kinds.first(), Some(&"worker-online"), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"worker-offline"), "{kinds:?}");
    });
}

/// Regression: the first worker's heartbeat used to open the broker's shared events
/// connection on its control plane, whose runtime dies with the worker; every later
/// worker's events on that broker then hung. Two workers, one after the other, on one
/// broker: the second one's events arrive.
#[test]
fn a_workers_events_flow_after_an_earlier_worker_on_its_broker_stopped() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("events-twice", AmqpOptions::default());
        let mut events = setup.broker.events().await.unwrap().unwrap();
        for round in 0..2 {
            let node = format!("wasmq-events-twice-{round}@{}", setup.queue);
            let worker = setup
                .start(WorkerOptions {
                    heartbeat: Some(Duration::from_millis(200)),
                    ..setup.options(&node)
                })
                .await;
            let seen = heartbeat_from(&mut events, &node).await;
            worker.stop().await;
            assert!(seen, "no heartbeat from worker {round} ({node})");
        }
        setup.cleanup().await;
    });
}

/// Whether a heartbeat of `node` arrives on `events` within 10 s.
async fn heartbeat_from(
    events: &mut tokio::sync::mpsc::Receiver<EventMessage>,
    node: &str,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, events.recv()).await {
        let heartbeat = message
            .events()
            .iter()
            .any(|event| event.kind() == "worker-heartbeat");
        if message.hostname == node && heartbeat {
            return true;
        }
    }
    false
}
