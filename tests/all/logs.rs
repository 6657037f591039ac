//! Logs and traces of a real `wasmq worker --log-format json` process on an embedded broker
//! file: every line is a JSON object; the lines of a task's run — its outcome and its
//! guest's own lines — carry the task's ids and the W3C trace its message's `traceparent`
//! named; what the run publishes (the next chain step, a retry) names the run's span as its
//! parent, so the trace follows the workflow; a malformed `traceparent` starts a new trace
//! and the task runs anyway. A Python Celery client traced by OpenTelemetry's own Celery
//! instrumentation sends a chain to a wasmq worker on RabbitMQ: both runs log the trace of
//! the client's request, so one trace covers the workflow across Python and wasmq.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{Map, Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpBroker;
use wasmq::canvas::{Signature, chain};
use wasmq::client::SendOptions;

use crate::processes::{signal, wait_exit, wait_for_log, wasmq};
use crate::support::{
    AMQP_URL, KOMBU_AMQP_URL, Queue, RABBITMQ, REDIS_URL, python, python_dir, runtime, unique_queue,
};

const WAIT: Duration = Duration::from_secs(60);

/// The traces the test's messages arrive in (as a Python producer's
/// `opentelemetry-instrumentation-celery` would name them).
const CHAIN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CHAIN_PARENT: &str = "00f067aa0ba902b7";
const RETRY_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const GUEST_TRACE: &str = "a3ce929d0e0e47364bf92f3577b34da6";

fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

fn step(task: &str, args: Value, id: &str) -> Signature {
    Signature::new(task, args.as_array().cloned().unwrap()).with_option("task_id", id)
}

fn traced(trace: &str) -> SendOptions {
    let mut headers = Map::new();
    headers.insert(
        "traceparent".into(),
        traceparent(trace, "b7ad6b7169203331").into(),
    );
    SendOptions {
        headers,
        ..SendOptions::default()
    }
}

fn start_worker(queue: &Queue, log: &std::path::Path) -> Child {
    let plugins = queue.plugin_folder(&["math", "text"]);
    wasmq(queue.dir.path())
        .args(["worker", "--log-format", "json", "--broker", &queue.url])
        .args(["--result-backend", &queue.url, "--name", "w-logs"])
        .arg("--plugins")
        .arg(plugins)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start wasmq worker")
}

/// The log's lines, each parsed (the test fails on one that is not a JSON object).
fn json_lines(log: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(object @ Value::Object(_)) => object,
            _ => panic!("not a JSON object: {line}\n{text}"),
        })
        .collect();
    assert!(lines.len() > 5, "{text}");
    lines
}

/// The lines of `task_id`'s runs; each has the span fields of a run.
fn lines_of<'a>(lines: &'a [Value], task_id: &str) -> Vec<&'a Value> {
    let of: Vec<_> = lines.iter().filter(|l| l["task_id"] == task_id).collect();
    assert!(!of.is_empty(), "no line of {task_id}");
    for line in &of {
        for field in ["task", "root_id", "trace_id", "span_id"] {
            assert!(line[field].is_string(), "{field} missing: {line}");
        }
    }
    of
}

/// The one line of `lines` saying the run ended as `outcome`.
fn outcome<'a>(lines: &[&'a Value], outcome: &str) -> &'a Value {
    let ends: Vec<_> = lines.iter().filter(|l| l["outcome"] == outcome).collect();
    assert_eq!(ends.len(), 1, "{outcome} in {lines:?}");
    assert!(ends[0]["runtime_ms"].is_f64(), "{:?}", ends[0]);
    ends[0]
}

#[test]
fn json_logs_carry_each_task_and_its_trace_through_a_chain_and_a_retry() {
    runtime().block_on(async {
        let queue = Queue::new();
        let log = queue.dir.path().join("worker.log");
        let mut worker = start_worker(&queue, &log);
        wait_for_log(&log, "worker ready");

        // add(2,2) | mul(10) | add(1): the last step goes to a queue nobody consumes, where
        // the test reads what mul's run published.
        let ids = ["first", "second", "third"].map(|s| format!("{s}-{}", uuid::Uuid::new_v4()));
        let mut headers = Map::new();
        headers.insert(
            "traceparent".into(),
            traceparent(CHAIN_TRACE, CHAIN_PARENT).into(),
        );
        headers.insert("tracestate".into(), "vendor=kept".into());
        let parked = format!("parked-{}", uuid::Uuid::new_v4());
        chain([
            step("math.add", json!([2, 2]), &ids[0]).with_option("headers", headers),
            step("math.mul", json!([10]), &ids[1]),
            step("math.add", json!([1]), &ids[2]).with_option("queue", parked.as_str()),
        ])
        .apply(&queue.client)
        .await
        .unwrap();
        let client = &queue.client;
        assert_eq!(client.result(&ids[1]).get(WAIT).await.unwrap(), json!(40));

        // A retry, a guest's own log line, and a malformed traceparent.
        let send = |task: &'static str, args: Value, options| async move {
            let args = args.as_array().cloned().unwrap();
            let sent = client.send_task(task, args, Map::new(), options).await;
            sent.unwrap().get(WAIT).await.unwrap()
        };
        let retried = send("math.flaky", json!([1]), traced(RETRY_TRACE));
        assert_eq!(retried.await, json!(1));
        let rendered = send("text.markdown", json!(["# hi"]), traced(GUEST_TRACE)).await;
        assert_eq!(rendered, json!("<h1>hi</h1>\n"));
        let mut malformed = SendOptions::default();
        malformed
            .headers
            .insert("traceparent".into(), "00-not-a-trace-01".into());
        malformed.task_id = Some(format!("malformed-{}", uuid::Uuid::new_v4()));
        let malformed_id = malformed.task_id.clone().unwrap();
        assert_eq!(send("math.add", json!([1, 2]), malformed).await, json!(3));

        // What mul's run published for the last step.
        let mut consumer = queue.broker.consume(&[parked], 1).await.unwrap();
        let next = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap()
            .unwrap();
        let headers = next.envelope.headers.clone();
        next.ack().await.unwrap();
        consumer.close().await;

        signal(&worker, "-TERM");
        assert!(wait_exit(&mut worker, Duration::from_secs(20)).success());
        let lines = json_lines(&log);

        // The chain: one trace; each run a span whose parent is what published its message.
        let first = lines_of(&lines, &ids[0]);
        let second = lines_of(&lines, &ids[1]);
        for line in first.iter().chain(&second) {
            assert_eq!(line["trace_id"], CHAIN_TRACE, "{line:?}");
            assert_eq!(line["root_id"], ids[0].as_str(), "{line:?}");
        }
        let added = outcome(&first, "succeeded");
        assert_eq!(added["task"], "math.add");
        assert_eq!(added["result"], "4");
        assert_eq!(added["parent_span_id"], CHAIN_PARENT);
        let multiplied = outcome(&second, "succeeded");
        assert_eq!(multiplied["parent_id"], ids[0].as_str());
        assert_eq!(multiplied["parent_span_id"], added["span_id"]);
        assert_ne!(multiplied["span_id"], added["span_id"]);
        assert_eq!(
            headers["traceparent"],
            format!(
                "00-{CHAIN_TRACE}-{}-01",
                multiplied["span_id"].as_str().unwrap()
            ),
            "the published step names mul's run as its parent"
        );
        assert_eq!(headers["tracestate"], "vendor=kept");

        // The retry: the second run's parent is the first run.
        let flaky_id = lines
            .iter()
            .find(|l| l["task"] == "math.flaky" && l["outcome"] == "retry")
            .and_then(|l| l["task_id"].as_str())
            .unwrap_or_else(|| panic!("no line of math.flaky: {lines:#?}"));
        let runs = lines_of(&lines, flaky_id);
        let retry = outcome(&runs, "retry");
        assert_eq!(retry["exception"], "Retry");
        let succeeded = outcome(&runs, "succeeded");
        assert_eq!(retry["trace_id"], RETRY_TRACE);
        assert_eq!(succeeded["trace_id"], RETRY_TRACE);
        assert_eq!(succeeded["parent_span_id"], retry["span_id"]);

        // The guest's own line, inside its task's span.
        let guest = lines
            .iter()
            .find(|l| l["target"] == "wasmq::guest")
            .expect("the guest's log line");
        assert_eq!(guest["message"], "rendered 4 bytes of markdown");
        assert_eq!(guest["trace_id"], GUEST_TRACE);
        assert!(guest["span_id"].is_string() && guest["root_id"].is_string());

        // A malformed traceparent: a new trace, and the task ran.
        let fresh = outcome(&lines_of(&lines, &malformed_id), "succeeded");
        let trace = fresh["trace_id"].as_str().unwrap();
        assert!(trace.len() == 32 && ![CHAIN_TRACE, RETRY_TRACE, GUEST_TRACE].contains(&trace));
        assert!(fresh["parent_span_id"].is_null(), "{fresh}");
    });
}

#[test]
fn a_python_clients_opentelemetry_trace_continues_through_a_wasmq_chain() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let queue = Queue::new();
    let log = queue.dir.path().join("worker.log");
    let amqp_queue = unique_queue("otel");
    let node = format!("wasmq-otel@{amqp_queue}");
    let plugins = queue.plugin_folder(&["math"]);
    let mut worker = wasmq(queue.dir.path())
        .args(["worker", "--log-format", "json", "--broker", AMQP_URL])
        .args([
            "--result-backend",
            REDIS_URL,
            "-Q",
            &amqp_queue,
            "--name",
            &node,
        ])
        .arg("--plugins")
        .arg(plugins)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start wasmq worker");
    wait_for_log(&log, "worker ready");

    let output = std::process::Command::new(python())
        .arg(python_dir().join("otel_client.py"))
        .env("BROKER", KOMBU_AMQP_URL)
        .env("BACKEND", REDIS_URL)
        .env("QUEUE", &amqp_queue)
        .output()
        .expect("run the traced Python client");
    signal(&worker, "-TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(20)).success());
    runtime().block_on(async {
        let broker = AmqpBroker::new(AMQP_URL).unwrap();
        broker.delete_queue(&amqp_queue).await.unwrap();
        broker.forget_node(&node).await.unwrap();
    });
    assert!(
        output.status.success(),
        "the traced client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["value"], 40, "{report:#}");
    let trace = report["trace_id"].as_str().unwrap();
    assert_eq!(trace.len(), 32, "{report:#}");
    // The instrumentation's producer span is in the request's trace and named the message's
    // parent: the first run's parent span is one of the client's producer spans.
    let producers: Vec<&str> = report["producer_span_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!producers.is_empty(), "no producer span: {report:#}");
    for producer_trace in report["producer_trace_ids"].as_array().unwrap() {
        assert_eq!(producer_trace, trace, "{report:#}");
    }

    let lines = json_lines(&log);
    let ids: Vec<&str> = report["ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let first = lines_of(&lines, ids[0]);
    let second = lines_of(&lines, ids[1]);
    for line in first.iter().chain(&second) {
        assert_eq!(line["trace_id"], trace, "{line:?}");
    }
    let added = outcome(&first, "succeeded");
    assert!(
        producers.contains(&added["parent_span_id"].as_str().unwrap_or_default()),
        "the first run's parent is the client's producer span: {added:?} {report:#}"
    );
    let multiplied = outcome(&second, "succeeded");
    assert_eq!(multiplied["parent_span_id"], added["span_id"]);
}
