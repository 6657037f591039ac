//! Canvas against real brokers: chains, links, errbacks, groups and chords run by an
//! in-process wasmq worker on the embedded SQLite broker and backend, and on RabbitMQ with
//! Redis results; a real Python Celery client's chain, group and chord served by a wasmq
//! worker; and the rpc backend refusing chords instead of hanging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpBroker;
use wasmq::canvas::{CanvasError, Signature, chain, chord, group};
use wasmq::client::{Client, GetError, SendOptions};
use wasmq::results::{ResultError, TaskState};
use wasmq::worker::WorkerOptions;

use crate::support::{
    AMQP_URL, KOMBU_AMQP_URL, Queue, RABBITMQ, REDIS_URL, bundled_registry, python, python_dir,
    runtime, sandbox, spawn_worker, unique_queue,
};

const WAIT: Duration = Duration::from_secs(30);

fn sig(task: &str, args: Value) -> Signature {
    Signature::new(task, args.as_array().cloned().unwrap())
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn options(queue: &str) -> WorkerOptions {
    WorkerOptions {
        queues: vec![queue.to_owned()],
        concurrency: 2,
        node_name: format!("wasmq-canvas@{queue}"),
        shutdown_timeout: Duration::from_secs(10),
        ..WorkerOptions::default()
    }
}

/// Expects a FAILURE of `exc_type` whose message contains `text`.
fn assert_failed(outcome: Result<Value, GetError>, exc_type: &str, text: &str) -> String {
    match outcome {
        Err(GetError::Failed { exception, task_id }) => {
            assert_eq!(exception.exc_type, exc_type, "{exception}");
            assert!(
                exception.message().contains(text),
                "{exception} lacks {text:?}"
            );
            task_id
        }
        other => panic!("expected {exc_type}, got {other:?}"),
    }
}

/// Chains, immutable steps, links, errbacks, a failing chain and groups: the same workflow
/// on every broker and backend.
async fn chains_links_and_groups(client: &Client) {
    // add(2,2) | add(4) | mul(10) → 80, each step's result prepended to the next.
    let first = id();
    let steps = [
        sig("math.add", json!([2, 2])).with_option("task_id", first.clone()),
        sig("math.add", json!([4])),
        sig("math.mul", json!([10])),
    ];
    let result = chain(steps).apply(client).await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!(80));
    assert_eq!(client.result(&first).get(WAIT).await.unwrap(), json!(4));
    let head = client.result(&first).meta().await.unwrap().unwrap();
    assert_eq!(head.result, json!(4));
    assert_eq!(head.children.len(), 1, "the next step is the first's child");
    let second = head.children[0][0][0]
        .as_str()
        .unwrap_or_else(|| panic!("{head:?}"))
        .to_owned();
    // The worker publishes the next step before it stores this step's result (Celery's
    // order), so the chain's end can be ready a moment before the middle is stored.
    assert_eq!(client.result(&second).get(WAIT).await.unwrap(), json!(8));
    let middle = client.result(&second).meta().await.unwrap().unwrap();
    assert_eq!(middle.result, json!(8));
    assert_eq!(middle.parent_id.as_deref(), Some(first.as_str()));

    // An immutable step ignores its parent's result: add(1,1) | add.si(5,5) | mul(2) → 20.
    let result = chain([
        sig("math.add", json!([1, 1])),
        sig("math.add", json!([5, 5])).immutable(),
        sig("math.mul", json!([2])),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!(20));

    // link: the callback gets the result; a mutable one prepended, an immutable one not.
    let (callback, still) = (id(), id());
    let linked = sig("math.add", json!([2, 3]))
        .link(sig("math.mul", json!([10])).with_option("task_id", callback.clone()))
        .link(
            sig("math.add", json!([7, 7]))
                .immutable()
                .with_option("task_id", still.clone()),
        )
        .apply(client)
        .await
        .unwrap();
    assert_eq!(linked.get(WAIT).await.unwrap(), json!(5));
    assert_eq!(client.result(&callback).get(WAIT).await.unwrap(), json!(50));
    assert_eq!(client.result(&still).get(WAIT).await.unwrap(), json!(14));

    // link_error: the errback is published with the failed task's id.
    let errback = id();
    let failing = sig("math.div", json!([1, 0]))
        .link(sig("math.add", json!([1])))
        .link_error(sig("text.slugify", json!([])).with_option("task_id", errback.clone()))
        .apply(client)
        .await
        .unwrap();
    assert_failed(
        failing.get(WAIT).await,
        "ZeroDivisionError",
        "division by zero",
    );
    assert_eq!(
        client.result(&errback).get(WAIT).await.unwrap(),
        json!(failing.id),
        "the errback's argument is the failed task's id"
    );

    // A failure mid-chain fails every later step at once: waiting on the end never hangs.
    let (after, last) = (id(), id());
    let started = Instant::now();
    let result = chain([
        sig("math.add", json!([1, 1])),
        sig("math.div", json!([0])),
        sig("math.add", json!([1])).with_option("task_id", after.clone()),
        sig("math.mul", json!([2])).with_option("task_id", last.clone()),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.id, last);
    assert_failed(
        result.get(WAIT).await,
        "ZeroDivisionError",
        "division by zero",
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        client.result(&after).state().await.unwrap(),
        TaskState::Failure
    );

    // group: every member's result, in order; members share the group id.
    let result = group((0..5).map(|i| sig("math.add", json!([i, i]))))
        .apply(client)
        .await
        .unwrap();
    assert_eq!(result.results.len(), 5);
    assert_eq!(
        result.get(WAIT).await.unwrap(),
        [0, 2, 4, 6, 8].map(|n| json!(n)).to_vec()
    );
    let member = result.results[3].meta().await.unwrap().unwrap();
    assert_eq!(member.group_id.as_deref(), Some(result.id.as_str()));

    // A callback wasmq cannot run fails the task with the reason instead of vanishing.
    let mut xmap = sig("celery.map", json!([]));
    xmap.subtask_type = Some("xmap".into());
    let refused = sig("math.add", json!([1, 2]))
        .link(xmap.clone())
        .apply(client)
        .await;
    match refused {
        // The client checks the canvas before sending it...
        Err(CanvasError::Unsupported(reason)) => assert!(reason.contains("xmap"), "{reason}"),
        other => panic!("expected an unsupported canvas, got {other:?}"),
    }
    // ...and the worker, receiving one from elsewhere, stores the reason as the FAILURE.
    let mut message = client.build_message(
        "math.add",
        vec![json!(1), json!(2)],
        Map::new(),
        &SendOptions::default(),
    );
    message.embed.callbacks = Some(vec![xmap.to_value()]);
    let sent = client.send_message(&message, None).await.unwrap();
    assert_failed(sent.get(WAIT).await, "NotImplementedError", "xmap");
}

/// Chords, a chain through a group (upgraded to a chord), and a chord whose member fails.
async fn chords(client: &Client) {
    // group(add(i, i) for i in 0..10) | sum → 90.
    let result = chord(
        (0..10).map(|i| sig("math.add", json!([i, i]))),
        sig("math.sum", json!([])),
    )
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap().as_f64(), Some(90.0));

    // add(1,1) | group(add(1), add(2)) | sum → sum([3, 4]) = 7.
    let result = chain([
        sig("math.add", json!([1, 1])),
        group([sig("math.add", json!([1])), sig("math.add", json!([2]))]).into(),
        sig("math.sum", json!([])),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap().as_f64(), Some(7.0));

    // A failed member fails the body with Celery's ChordError, once all members are in.
    let failing = id();
    let result = chord(
        [
            sig("math.add", json!([1, 1])),
            sig("math.div", json!([1, 0])).with_option("task_id", failing.clone()),
            sig("math.add", json!([2, 2])),
        ],
        sig("math.sum", json!([])),
    )
    .apply(client)
    .await
    .unwrap();
    let text = format!("Dependency {failing} raised ZeroDivisionError('division by zero')");
    assert_failed(result.get(WAIT).await, "ChordError", &text);
}

/// Regressions of issue 20 (the workflows Celery's own suite found stopping silently), with
/// the Rust client: steps after a chord (cause 1), a pre-set group id kept (cause 4), chains
/// ending in groups or chords inside chord headers (cause 5), `celery.starmap` (cause 6).
async fn workflows_beyond_one_chord(client: &Client) {
    let si = |task: &str, args: Value| sig(task, args).immutable();

    // Steps after a chord run: chord | div(2) → 6 / 2.
    let result = chain([
        chord(
            [
                sig("math.add", json!([1, 1])),
                sig("math.add", json!([2, 2])),
            ],
            sig("math.sum", json!([])),
        )
        .into(),
        sig("math.div", json!([2.0])),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!(3.0));

    // Two chords in a chain: the second's header gets the first's result, 6/2 + 6/3.
    let result = chain([
        chord(
            [
                sig("math.add", json!([1, 1])),
                sig("math.add", json!([2, 2])),
            ],
            sig("math.sum", json!([])),
        )
        .into(),
        chord(
            [sig("math.div", json!([2.0])), sig("math.div", json!([3.0]))],
            sig("math.sum", json!([])),
        )
        .into(),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!(5.0));

    // A failing first chord fails the chain's end (the second chord's body) instead of
    // leaving it PENDING.
    let result = chain([
        chord(
            [
                sig("math.add", json!([1, 1])),
                sig("math.div", json!([1, 0])),
            ],
            sig("math.sum", json!([])),
        )
        .into(),
        chord(
            [sig("math.div", json!([2.0])), sig("math.div", json!([3.0]))],
            sig("math.sum", json!([])),
        )
        .into(),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_failed(result.get(WAIT).await, "ChordError", "ZeroDivisionError");

    // A header member that is a chain ending in a group: the body gets nested results.
    let result = chord(
        [chain([
            si("math.add", json!([40, 2])),
            group([
                sig("math.identity", json!([])),
                sig("math.identity", json!([])),
            ])
            .into(),
        ])
        .into()],
        sig("math.identity", json!([])),
    )
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!([[42, 42]]));

    // A header member that is a chain ending in a chord reports through that chord's body.
    let result = chain([
        si("math.identity", json!([1])),
        chord(
            [
                si("math.identity", json!([2])),
                chain([
                    si("math.identity", json!([3])),
                    chord(
                        [
                            si("math.identity", json!([4])),
                            si("math.identity", json!([5])),
                        ],
                        si("math.identity", json!([6])),
                    )
                    .into(),
                ])
                .into(),
            ],
            si("math.identity", json!([7])),
        )
        .into(),
    ])
    .apply(client)
    .await
    .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), json!(7));

    // celery.starmap: the worker calls the named task once per argument list.
    let starmap = Signature::new("celery.starmap", vec![]).with_kwargs(
        json!({"task": sig("math.add", json!([])).to_value(), "it": [[1, 1], [2, 2]]})
            .as_object()
            .cloned()
            .unwrap(),
    );
    let all = group([starmap, sig("math.add", json!([3, 3]))])
        .apply(client)
        .await
        .unwrap();
    assert_eq!(all.get(WAIT).await.unwrap(), [json!([2, 4]), json!(6)]);
}

#[test]
fn canvas_on_the_embedded_broker_and_backend() {
    runtime().block_on(async {
        let queue = Queue::new();
        let (stop, worker) =
            spawn_worker(&queue, bundled_registry(sandbox()).await, options("celery"));
        chains_links_and_groups(&queue.client).await;
        chords(&queue.client).await;
        workflows_beyond_one_chord(&queue.client).await;
        let _ = stop.send(());
        worker.await.unwrap();
    });
}

/// Regression (issue 11, bug 1): the canvas published every step to the default queue,
/// ignoring `task_routes`. Each task must go where its route says, whoever publishes it: the
/// client for a workflow's first tasks, the worker for the steps that follow.
#[test]
fn workflow_steps_follow_task_routes() {
    runtime().block_on(async {
        let queue = Queue::new();
        let routes = || {
            wasmq::routes::TaskRoutes::new([
                ("math.add".to_owned(), "adds".to_owned()),
                ("math.mul".to_owned(), "muls".to_owned()),
                ("math.sum".to_owned(), "adds".to_owned()),
            ])
        };
        let worker_on = |queue_name: &str, node: &str| WorkerOptions {
            queues: vec![queue_name.to_owned()],
            concurrency: 2,
            node_name: node.to_owned(),
            routes: routes(),
            shutdown_timeout: Duration::from_secs(10),
            ..WorkerOptions::default()
        };
        // Nobody consumes the default queue: a task sent there is never run.
        let (stop_adds, adds) = spawn_worker(
            &queue,
            bundled_registry(sandbox()).await,
            worker_on("adds", "adder@routes"),
        );
        let (stop_muls, muls) = spawn_worker(
            &queue,
            bundled_registry(sandbox()).await,
            worker_on("muls", "multiplier@routes"),
        );
        let client = queue.client.clone().with_routes(routes());
        let wait = Duration::from_secs(15);
        // A step's result is stored after the steps that follow it are published (as
        // Celery does, so `children` is filled in): wait for it, the chain's end may come
        // first.
        let ran_on = |id: String| {
            let client = client.clone();
            async move {
                client
                    .result(&id)
                    .get(wait)
                    .await
                    .expect("the step finished");
                let meta = client.result(&id).meta().await.unwrap().unwrap();
                meta.worker.unwrap_or_default()
            }
        };

        let (add_id, mul_id) = (id(), id());
        let result = chain([
            sig("math.add", json!([2, 2])).with_option("task_id", add_id.clone()),
            sig("math.mul", json!([10])).with_option("task_id", mul_id.clone()),
            sig("math.add", json!([1])),
        ])
        .apply(&client)
        .await
        .unwrap();
        assert_eq!(result.get(wait).await.unwrap(), json!(41));
        assert_eq!(ran_on(add_id).await, "adder@routes");
        assert_eq!(ran_on(mul_id).await, "multiplier@routes");

        let members = group([
            sig("math.mul", json!([1, 2])),
            sig("math.mul", json!([3, 4])),
        ])
        .apply(&client)
        .await
        .unwrap();
        assert_eq!(members.get(wait).await.unwrap(), [json!(2), json!(12)]);
        for member in &members.results {
            assert_eq!(ran_on(member.id.clone()).await, "multiplier@routes");
        }

        let body_id = id();
        let total = chord(
            [
                sig("math.mul", json!([1, 1])),
                sig("math.mul", json!([2, 2])),
            ],
            sig("math.sum", json!([])).with_option("task_id", body_id.clone()),
        )
        .apply(&client)
        .await
        .unwrap();
        assert_eq!(total.get(wait).await.unwrap(), json!(5.0));
        assert_eq!(
            ran_on(body_id).await,
            "adder@routes",
            "the body is routed too"
        );

        let _ = stop_adds.send(());
        let _ = stop_muls.send(());
        adds.await.unwrap();
        muls.await.unwrap();
    });
}

async fn amqp_worker(
    queue: &str,
    backend_url: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Arc<wasmq::worker::WorkerStats>>,
) {
    let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
    let backend =
        wasmq::results::connect(backend_url, Duration::from_secs(3600), AMQP_URL).unwrap();
    let worker = wasmq::worker::Worker::new(
        broker,
        backend,
        bundled_registry(sandbox()).await,
        options(queue),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    (stop, handle)
}

fn amqp_client(queue: &str, backend_url: &str) -> Client {
    let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
    let backend =
        wasmq::results::connect(backend_url, Duration::from_secs(3600), AMQP_URL).unwrap();
    Client::new(broker, backend).with_default_queue(queue)
}

/// Deletes `queue` and what RabbitMQ holds for its (stopped) worker's node.
async fn delete(queue: &str) {
    let broker = AmqpBroker::new(AMQP_URL).unwrap();
    broker.delete_queue(queue).await.unwrap();
    broker.forget_node(&options(queue).node_name).await.unwrap();
}

/// The chord's Redis keys, as Celery names them: the group's meta key and every suffix
/// wasmq's chord counter writes (`results::redis::group_key`). Asked for by name, not with `KEYS`, which scans the whole database and times
/// out once benchmarks have left hundreds of thousands of results in it.
async fn chord_keys(group_id: &str) -> Vec<String> {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys = Vec::new();
    for suffix in ["", ".s", ".j", ".t", ".d", ".c"] {
        let key = format!("celery-taskset-meta-{group_id}{suffix}");
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        if exists {
            keys.push(key);
        }
    }
    keys
}

#[test]
fn canvas_on_rabbitmq_with_redis_results() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("canvas");
        let (stop, worker) = amqp_worker(&queue, REDIS_URL).await;
        let client = amqp_client(&queue, REDIS_URL);
        chains_links_and_groups(&client).await;
        chords(&client).await;
        workflows_beyond_one_chord(&client).await;

        // Exactly Celery's keys: the size is written first; completion deletes them.
        let gid = id();
        let body = id();
        let result = chord(
            (0..3).map(|i| sig("math.add", json!([i, 1]))),
            sig("math.sum", json!([])).with_option("task_id", body.clone()),
        )
        .with_group_id(&gid)
        .apply(&client)
        .await
        .unwrap();
        assert_eq!(result.id, body);
        assert_eq!(result.get(WAIT).await.unwrap().as_f64(), Some(6.0));
        let meta = result.meta().await.unwrap().unwrap();
        assert_eq!(meta.group_id.as_deref(), Some(gid.as_str()));
        let keys = chord_keys(&gid).await;
        assert_eq!(
            keys,
            [format!("celery-taskset-meta-{gid}.c")],
            "only the completion marker stays"
        );
        let redis = redis::Client::open(REDIS_URL).unwrap();
        let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&keys[0])
            .query_async(&mut connection)
            .await
            .unwrap();

        let _ = stop.send(());
        worker.await.unwrap();
        delete(&queue).await;
    });
}

#[test]
fn rpc_results_refuse_chords_instead_of_hanging() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("canvas-rpc");
        let (stop, worker) = amqp_worker(&queue, "rpc://").await;
        let client = amqp_client(&queue, "rpc://");

        // The client refuses, as Celery's rpc backend does (NotImplementedError).
        let refused = chord([sig("math.add", json!([1, 1]))], sig("math.sum", json!([])))
            .apply(&client)
            .await;
        assert!(
            matches!(
                refused,
                Err(CanvasError::Backend(ResultError::ChordsUnsupported(_)))
            ),
            "{refused:?}"
        );

        // A header member sent anyway (e.g. by a client with another backend) fails the
        // body at once; the body's waiter is answered on its rpc queue.
        let body = id();
        let member = sig("math.add", json!([1, 1]))
            .with_option("group_id", id())
            .with_option("group_index", 0)
            .with_option(
                "chord",
                sig("math.sum", json!([]))
                    .with_option("task_id", body.clone())
                    .to_value(),
            );
        let member = member.apply(&client).await.unwrap();
        assert_eq!(member.get(WAIT).await.unwrap(), json!(2));
        assert_failed(
            client.result(&body).get(WAIT).await,
            "NotImplementedError",
            "cannot run chords",
        );

        // Chains work on rpc: every step answers the client that started the chain.
        let result = chain([sig("math.add", json!([2, 2])), sig("math.mul", json!([10]))])
            .apply(&client)
            .await
            .unwrap();
        assert_eq!(result.get(WAIT).await.unwrap(), json!(40));

        let _ = stop.send(());
        worker.await.unwrap();
        delete(&queue).await;
    });
}

#[test]
fn python_celery_canvas_is_served_by_a_wasmq_worker() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    python();
    runtime().block_on(async {
        let queue = unique_queue("pycanvas");
        let (stop, worker) = amqp_worker(&queue, REDIS_URL).await;
        let queue_for_python = queue.clone();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python())
                .arg(python_dir().join("canvas_client.py"))
                .env("BROKER", KOMBU_AMQP_URL)
                .env("BACKEND", REDIS_URL)
                .env("QUEUE", queue_for_python)
                .output()
                .expect("run the Python canvas client")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the Python client failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let results: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        check_python_canvas_results(&results);
        let _ = stop.send(());
        worker.await.unwrap();
        delete(&queue).await;
    });
}

/// What `tests/python/canvas_client.py` must report when a wasmq worker serves it (on any
/// broker).
pub(crate) fn check_python_canvas_results(results: &Value) {
    assert_eq!(results["chain"], json!({"ok": 8}), "{results:#}");
    assert_eq!(results["chain3"], json!({"ok": 80}), "{results:#}");
    assert_eq!(results["immutable"], json!({"ok": 20}), "{results:#}");
    assert_eq!(
        results["group"],
        json!({"ok": [0, 2, 4, 6, 8]}),
        "{results:#}"
    );
    assert_eq!(results["chord"], json!({"ok": 90.0}), "{results:#}");
    assert_eq!(results["link"], json!({"ok": [5, 50]}), "{results:#}");
    let failed = &results["chord_failure"];
    assert_eq!(failed["error"], "ChordError", "{results:#}");
    assert_eq!(failed["is_chord_error"], true, "{results:#}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("raised ZeroDivisionError('division by zero')"),
        "{results:#}"
    );
    let chain_failure = &results["chain_failure"];
    assert_eq!(chain_failure["error"], "ZeroDivisionError", "{results:#}");
    // Issue 20's workflows, from an unmodified Python client.
    assert_eq!(
        results["chain_after_chord"],
        json!({"ok": [2.0, 1.0]}),
        "{results:#}"
    );
    let failed = &results["chords_in_chain_failure"];
    assert_eq!(failed["is_chord_error"], true, "{results:#}");
    assert_eq!(
        results["nested_header"],
        json!({"ok": [[42, 42]]}),
        "{results:#}"
    );
    assert_eq!(
        results["chord_chain_chord"],
        json!({"ok": 7}),
        "{results:#}"
    );
    assert_eq!(
        results["starmap"],
        json!({"ok": [[2, 4], 6]}),
        "{results:#}"
    );
}

/// Runs the `wasmq` binary; returns (exit code, stdout, stderr).
fn wasmq(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(args)
        .env("WASMQ_LOG", "off")
        .output()
        .expect("run wasmq");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn canvas_cli_chain_group_and_chord_with_exit_codes() {
    runtime().block_on(async {
        let queue = Queue::new();
        let (stop, worker) =
            spawn_worker(&queue, bundled_registry(sandbox()).await, options("celery"));
        let url = queue.url.clone();
        let run = move |args: &[&str]| {
            let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            all.extend([
                "--broker".into(),
                url.clone(),
                "--result-backend".into(),
                url.clone(),
            ]);
            tokio::task::spawn_blocking(move || {
                wasmq(&all.iter().map(String::as_str).collect::<Vec<_>>())
            })
        };
        let chained = run(&[
            "chain",
            "math.add[2,2]",
            "math.add[4]",
            "math.mul[10]",
            "--wait",
        ]);
        assert_eq!(chained.await.unwrap(), (0, "80\n".into(), String::new()));
        let immutable = run(&["chain", "math.add[1,1]", "math.add![5,5]", "--wait"]);
        assert_eq!(immutable.await.unwrap(), (0, "10\n".into(), String::new()));
        let grouped = run(&["group", "math.add[1,2]", "math.add[3,4]", "--wait"]);
        assert_eq!(grouped.await.unwrap(), (0, "[3,7]\n".into(), String::new()));
        let chorded = run(&[
            "chord",
            "--body",
            "math.sum",
            "math.add[1,1]",
            "math.add[2,2]",
            "--wait",
        ]);
        assert_eq!(chorded.await.unwrap(), (0, "6.0\n".into(), String::new()));

        // Without --wait: the ids, one per line, that `wasmq result` then reads.
        let (code, ids, _) = run(&["group", "math.add[1,1]", "math.add[2,2]"])
            .await
            .unwrap();
        assert_eq!((code, ids.lines().count()), (0, 2), "{ids}");
        let first = ids.lines().next().unwrap().to_owned();
        let read = run(&["result", &first, "--wait"]).await.unwrap();
        assert_eq!(read, (0, "2\n".into(), String::new()));

        // A failing step: exit 1 with the error; bad syntax: exit 2.
        let (code, _, stderr) = run(&[
            "chain",
            "math.add[1,1]",
            "math.div[0]",
            "math.add[1]",
            "--wait",
        ])
        .await
        .unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("ZeroDivisionError: division by zero"),
            "{stderr}"
        );
        let (code, _, stderr) = run(&["chain", "math.add[1,]", "--wait"]).await.unwrap();
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.starts_with("error: \"math.add[1,]\": arguments are not JSON"),
            "{stderr}"
        );

        let _ = stop.send(());
        worker.await.unwrap();
    });
}
