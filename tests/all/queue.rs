//! The whole loop in one process over the embedded broker: client → SQLite broker → worker
//! → sandbox → SQLite results → client.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::client::{GetError, SendOptions};
use wasmq::protocol::{Envelope, Properties};
use wasmq::registry::Registry;
use wasmq::results::TaskState;
use wasmq::worker::WorkerOptions;

use crate::support::{
    Queue, bundled_registry, dead_letters_at_least, runtime, sandbox, spawn_worker,
};

fn options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        node_name: "test-worker".into(),
        shutdown_timeout: Duration::from_secs(10),
        ..WorkerOptions::default()
    }
}

fn args(values: Value) -> Vec<Value> {
    values.as_array().cloned().unwrap()
}

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn end_to_end_results_failures_retries_countdown_and_expiry() {
    runtime().block_on(async {
        let queue = Queue::new();
        let (stop, worker) = spawn_worker(&queue, bundled_registry(sandbox()).await, options(2));
        let client = &queue.client;
        let send = |task: &'static str, a: Value, o: SendOptions| {
            let client = client.clone();
            async move {
                client
                    .send_task(task, args(a), Map::new(), o)
                    .await
                    .unwrap()
            }
        };

        let sum = send("math.add", json!([2, 3]), SendOptions::default()).await;
        assert_eq!(sum.get(WAIT).await.unwrap(), json!(5));
        let meta = sum.meta().await.unwrap().unwrap();
        assert_eq!(meta.status, TaskState::Success);
        assert_eq!(meta.worker.as_deref(), Some("test-worker"));

        let kw = client
            .send_task(
                "math.add",
                vec![json!(1)],
                json!({"b": 41}).as_object().cloned().unwrap(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(kw.get(WAIT).await.unwrap(), json!(42));

        let div = send("math.div", json!([1, 0]), SendOptions::default()).await;
        match div.get(WAIT).await {
            Err(GetError::Failed { exception, .. }) => {
                assert_eq!(exception.to_string(), "ZeroDivisionError: division by zero");
                assert_eq!(exception.exc_module, "builtins");
            }
            other => panic!("expected a failure, got {other:?}"),
        }

        // Asks for two retries (100 ms each), then succeeds with the retry count.
        let flaky = send("math.flaky", json!([2]), SendOptions::default()).await;
        assert_eq!(flaky.get(WAIT).await.unwrap(), json!(2));

        // A hostile task's limit reaches the client as Celery's TimeLimitExceeded.
        let spin = send(
            "hostile.spin",
            json!([]),
            SendOptions {
                time_limit: Some(Duration::from_millis(300)),
                ..SendOptions::default()
            },
        )
        .await;
        match spin.get(WAIT).await {
            Err(GetError::Failed { exception, .. }) => {
                assert_eq!(exception.exc_type, "TimeLimitExceeded");
                assert_eq!(exception.exc_module, "billiard.exceptions");
            }
            other => panic!("expected TimeLimitExceeded, got {other:?}"),
        }

        let sent = chrono::Utc::now();
        let delayed = send(
            "math.add",
            json!([1, 1]),
            SendOptions {
                countdown: Some(Duration::from_millis(700)),
                ..SendOptions::default()
            },
        )
        .await;
        assert_eq!(delayed.get(WAIT).await.unwrap(), json!(2));
        let done = wasmq::protocol::parse_time(
            delayed
                .meta()
                .await
                .unwrap()
                .unwrap()
                .date_done
                .as_deref()
                .unwrap(),
        )
        .unwrap();
        let waited = (done - sent).to_std().unwrap();
        assert!(
            waited >= Duration::from_millis(700),
            "ran {waited:?} after sending"
        );

        let expired = send(
            "math.add",
            json!([1, 1]),
            SendOptions {
                countdown: Some(Duration::from_millis(300)),
                expires: Some(Duration::from_millis(100)),
                ..SendOptions::default()
            },
        )
        .await;
        match expired.get(WAIT).await {
            Err(GetError::Revoked { exception, .. }) => {
                assert_eq!(exception.exc_type, "TaskRevokedError");
                assert_eq!(exception.exc_message, [json!("expired")]);
            }
            other => panic!("expected REVOKED, got {other:?}"),
        }

        let _ = stop.send(());
        let stats = worker.await.unwrap();
        assert!(stats.retried.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    });
}

#[test]
fn drains_10000_tasks_with_every_result_correct() {
    runtime().block_on(async {
        let queue = Queue::new();
        let registry = bundled_registry(sandbox()).await;
        const N: i64 = 10_000;
        let mut ids = Vec::with_capacity(N as usize);
        for i in 0..N {
            let result = queue
                .client
                .send_task(
                    "math.add",
                    vec![json!(i), json!(i)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            ids.push(result);
        }
        assert_eq!(queue.broker.queue_length("celery").await.unwrap(), N as u64);
        let started = Instant::now();
        let (stop, worker) = spawn_worker(&queue, registry, options(2));
        for (i, result) in ids.iter().enumerate() {
            assert_eq!(
                result.get(Duration::from_secs(120)).await.unwrap(),
                json!(2 * i as i64),
                "task {i}"
            );
        }
        let drained = started.elapsed();
        let _ = stop.send(());
        let stats = worker.await.unwrap();
        assert_eq!(
            stats.succeeded.load(std::sync::atomic::Ordering::Relaxed),
            N as u64
        );
        assert_eq!(
            stats.received.load(std::sync::atomic::Ordering::Relaxed),
            N as u64,
            "no task ran twice"
        );
        assert_eq!(queue.broker.queue_length("celery").await.unwrap(), 0);
        eprintln!("drained {N} tasks in {drained:?}");
    });
}

fn raw(headers: Value, body: &[u8], content_type: &str) -> Envelope {
    Envelope {
        headers: headers.as_object().cloned().unwrap(),
        properties: Properties {
            content_type: Some(content_type.into()),
            ..Properties::default()
        },
        body: body.to_vec(),
    }
}

#[test]
fn every_malformed_message_class_ends_as_failure_and_dead_letter() {
    runtime().block_on(async {
        let queue = Queue::new();
        let (stop, worker) = spawn_worker(&queue, bundled_registry(sandbox()).await, options(2));
        let json = "application/json";
        let cases = [
            ("m-notjson", raw(json!({"task": "math.add", "id": "m-notjson"}), b"{not json", json), "the body is not JSON"),
            ("m-2elem", raw(json!({"task": "math.add", "id": "m-2elem"}), b"[[2, 5], {}]", json), "got 2 elements"),
            ("m-types", raw(json!({"task": "math.add", "id": "m-types"}), b"[{}, [], {}]", json), "args must be an array"),
            ("m-retries", raw(json!({"task": "math.add", "id": "m-retries", "retries": "x"}), b"[[1, 2], {}, {}]", json), "header \"retries\""),
            ("m-notask", raw(json!({"id": "m-notask"}), b"[[1, 2], {}, {}]", json), "no \"task\" header"),
            ("m-pickle", raw(json!({"task": "math.add", "id": "m-pickle"}), b"\x80\x04", "application/x-python-serialize"), "unsupported content type"),
            ("m-gzip", raw(json!({"task": "math.add", "id": "m-gzip", "compression": "application/x-gzip"}), b"x\x9c", json), "the compressed body cannot be read"),
            ("m-bzip2", raw(json!({"task": "math.add", "id": "m-bzip2", "compression": "application/x-bz2"}), b"BZh9", json), "unsupported compression"),
        ];
        for (_, envelope, _) in &cases {
            queue.broker.publish("celery", envelope, None).await.unwrap();
        }
        // No id at all: nothing to store a FAILURE under, but it is dead-lettered, not lost.
        queue
            .broker
            .publish("celery", &raw(json!({"task": "math.add"}), b"[[1, 2], {}, {}]", json), None)
            .await
            .unwrap();
        for (id, _, expected) in &cases {
            match queue.client.result(id).get(WAIT).await {
                Err(GetError::Failed { exception, .. }) => {
                    assert_eq!(exception.exc_type, "DecodeError", "{id}");
                    assert!(exception.message().contains(expected), "{id}: {exception}");
                }
                other => panic!("{id}: expected a DecodeError failure, got {other:?}"),
            }
        }
        // The worker keeps serving.
        let ok = queue.client.send_task("math.add", vec![json!(1), json!(2)], Map::new(), SendOptions::default()).await.unwrap();
        assert_eq!(ok.get(WAIT).await.unwrap(), json!(3));
        let dead = dead_letters_at_least(&*queue.broker, cases.len() + 1).await;
        assert_eq!(dead.len(), cases.len() + 1, "{dead:#?}");
        assert!(dead.iter().any(|d| d.task_id.is_none() && d.reason.contains("no \"id\" header")));
        assert!(dead.iter().all(|d| d.reason.starts_with("malformed message: ")));
        assert_eq!(queue.broker.queue_length("celery").await.unwrap(), 0, "nothing is redelivered in a loop");
        let _ = stop.send(());
        worker.await.unwrap();
    });
}

#[test]
fn unknown_tasks_and_bad_arguments_fail_and_are_dead_lettered() {
    runtime().block_on(async {
        let queue = Queue::new();
        let (stop, worker) = spawn_worker(&queue, bundled_registry(sandbox()).await, options(2));
        let unknown = queue
            .client
            .send_task(
                "proj.tasks.nope",
                vec![],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        match unknown.get(WAIT).await {
            Err(GetError::Failed { exception, .. }) => {
                assert_eq!(
                    (exception.exc_type.as_str(), exception.exc_module.as_str()),
                    ("NotRegistered", "celery.exceptions")
                );
                assert_eq!(exception.exc_message, [json!("proj.tasks.nope")]);
            }
            other => panic!("expected NotRegistered, got {other:?}"),
        }
        let bad = queue
            .client
            .send_task(
                "math.add",
                vec![json!("x")],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        match bad.get(WAIT).await {
            Err(GetError::Failed { exception, .. }) => {
                assert_eq!(exception.exc_type, "TypeError");
                assert!(
                    exception.message().contains("argument `a` must be i64"),
                    "{exception}"
                );
            }
            other => panic!("expected TypeError, got {other:?}"),
        }
        let dead = dead_letters_at_least(&*queue.broker, 2).await;
        let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(dead.len(), 2, "{reasons:?}");
        assert!(
            reasons.contains(&"unknown task proj.tasks.nope"),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("invalid arguments: math.add")),
            "{reasons:?}"
        );
        let _ = stop.send(());
        worker.await.unwrap();
    });
}

/// `bytes` with a custom section appended: the same plugin, a different file.
fn touched(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0, 5, 4, b't', b'e', b's', b't']);
    out
}

#[test]
fn hot_deploy_replace_broken_replace_and_removal_while_tasks_flow() {
    runtime().block_on(async {
        let queue = Queue::new();
        let folder = queue.plugin_folder(&["math"]);
        let sandbox = Arc::new(sandbox());
        let registry = Arc::new(Registry::load_folder(sandbox, &folder, None).await.unwrap());
        let watcher = registry.watch(Duration::from_millis(100));
        let (stop, worker) = spawn_worker(&queue, Arc::clone(&registry), options(2));

        // Background traffic on the plugin that stays: every result must be right.
        let client = queue.client.clone();
        let traffic = tokio::spawn(async move {
            let mut i = 0_i64;
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline {
                let r = client.send_task("math.add", vec![json!(i), json!(1)], Map::new(), SendOptions::default()).await.unwrap();
                assert_eq!(r.get(WAIT).await.unwrap(), json!(i + 1));
                i += 1;
            }
            i
        });

        let slugify = |text: &'static str| {
            let client = queue.client.clone();
            async move {
                client
                    .send_task("text.slugify", vec![json!(text)], Map::new(), SendOptions::default())
                    .await
                    .unwrap()
                    .get(WAIT)
                    .await
            }
        };
        let wait_until = |what: &'static str, check: Box<dyn Fn() -> bool>| async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting until {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };

        // Not deployed yet.
        assert!(matches!(slugify("A B").await, Err(GetError::Failed { exception, .. }) if exception.exc_type == "NotRegistered"));

        // Deploy: drop a new file in.
        let text_bytes = std::fs::read(Path::new(env!("WASMQ_BUNDLED_PLUGINS_DIR")).join("text.wasm")).unwrap();
        let text_path = folder.join("text.wasm");
        std::fs::write(&text_path, &text_bytes).unwrap();
        let r = Arc::clone(&registry);
        wait_until("text is deployed", Box::new(move || r.lookup("text.slugify").is_some())).await;
        assert_eq!(slugify("Hot Deploy").await.unwrap(), json!("hot-deploy"));
        let first_hash = registry.lookup("text.slugify").unwrap().content_hash().to_owned();

        // Replace with a changed file: the new version is swapped in.
        std::fs::write(&text_path, touched(&text_bytes)).unwrap();
        let r = Arc::clone(&registry);
        let old = first_hash.clone();
        wait_until("text is replaced", Box::new(move || r.lookup("text.slugify").is_some_and(|p| p.content_hash() != old))).await;
        assert_eq!(slugify("Replaced").await.unwrap(), json!("replaced"));

        // A broken replacement is reported and the previous version keeps serving.
        std::fs::write(&text_path, b"\0asm\x0d\0\x01\0 broken").unwrap();
        let r = Arc::clone(&registry);
        wait_until("the broken file is reported", Box::new(move || !r.snapshot().broken().is_empty())).await;
        assert_eq!(slugify("Still Here").await.unwrap(), json!("still-here"));

        // A second file claiming math's tasks is refused, naming both files.
        std::fs::copy(folder.join("math.wasm"), folder.join("math-copy.wasm")).unwrap();
        let r = Arc::clone(&registry);
        wait_until("the duplicate is refused", Box::new(move || r.snapshot().broken().len() == 2)).await;
        let broken = registry.snapshot().broken();
        let duplicate = &broken.iter().find(|(p, _)| p.ends_with("math-copy.wasm")).unwrap().1;
        assert!(duplicate.contains("math.wasm") && duplicate.contains("math-copy.wasm"), "{duplicate}");

        // Removal undeploys.
        std::fs::remove_file(&text_path).unwrap();
        let r = Arc::clone(&registry);
        wait_until("text is undeployed", Box::new(move || r.lookup("text.slugify").is_none())).await;
        assert!(matches!(slugify("Gone").await, Err(GetError::Failed { exception, .. }) if exception.exc_type == "NotRegistered"));

        let served = traffic.await.unwrap();
        assert!(served > 10, "only {served} background tasks ran");
        watcher.abort();
        let _ = stop.send(());
        worker.await.unwrap();
    });
}
