//! Tasks written in Python (`sdk-python/`, `examples/python/tasks.py`), built once per test
//! run by the real `wasmq plugins build` (componentize-py installed on first use into the
//! toolchain directory, the example's `requirements.txt` from PyPI), then served end to end:
//! by a worker on the embedded broker (results, Celery's exception classes, a TypeError
//! naming the parameter, Retry retrying, Reject dead-lettering, a PyPI dependency, hostile
//! attempts failing with a precise reason while the worker carries on), by `wasmq call` and
//! `wasmq plugins inspect`, and to an unmodified Python Celery client over RabbitMQ.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Map, Value, json};
use wasmq::client::{GetError, SendOptions};
use wasmq::engine::{CallRequest, Outcome, Sandbox, SandboxConfig, StateUpdate};
use wasmq::results::ExceptionInfo;
use wasmq::worker::WorkerOptions;

use crate::processes::wasmq;
use crate::support::{
    KOMBU_AMQP_URL, Queue, RABBITMQ, REDIS_URL, dead_letters_at_least, python, runtime,
    spawn_worker, unique_queue,
};

const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `examples/python/tasks.py` built by `wasmq plugins build`, once per test run.
fn plugin() -> &'static Path {
    static PLUGIN: OnceLock<PathBuf> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("python-tasks")
            .join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("tasks.wasm");
        let (code, stdout, stderr) = run_in(
            &dir,
            &[
                "plugins",
                "build",
                &repo()
                    .join("examples/python/tasks.py")
                    .display()
                    .to_string(),
                "-o",
                &output.display().to_string(),
            ],
        );
        assert_eq!(code, 0, "wasmq plugins build failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains(": built "), "{stdout}");
        // Compiled once into the shared artifact cache, rather than by every test at once.
        runtime().block_on(async {
            cached_sandbox()
                .load_plugin(&output)
                .await
                .expect("the built plugin loads")
        });
        output
    })
}

/// Runs `wasmq ARGS` in `cwd`; (exit code, stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = wasmq(cwd).args(args).output().expect("run wasmq");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A sandbox sharing the artifact cache of `processes.rs`'s commands, so the Python plugin
/// (a ~22 MB component) is compiled once per build rather than once per test.
fn cached_sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: Some(std::env::temp_dir().join("wasmq-test-artifact-cache")),
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

async fn failure(result: &wasmq::client::AsyncResult, what: &str) -> ExceptionInfo {
    match result.get(WAIT).await {
        Err(GetError::Failed { exception, .. }) => exception,
        other => panic!("{what} must fail, got {other:?}"),
    }
}

fn kwargs(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

#[test]
fn python_tasks_are_served_by_a_worker_on_the_embedded_broker() {
    let plugin = plugin();
    runtime().block_on(async {
        let queue = Queue::new();
        let folder = queue.dir.path().join("plugins");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(plugin, folder.join("tasks.wasm")).unwrap();
        let registry = Arc::new(
            wasmq::registry::Registry::load_folder(Arc::new(cached_sandbox()), &folder, None)
                .await
                .unwrap(),
        );
        let options = WorkerOptions {
            concurrency: 2,
            node_name: "python-tasks".into(),
            ..WorkerOptions::default()
        };
        let (stop, handle) = spawn_worker(&queue, registry, options);
        let client = &queue.client;
        let send = |task: &'static str, args: Value, kw: Value, options: SendOptions| async move {
            client
                .send_task(task, args.as_array().cloned().unwrap(), kwargs(kw), options)
                .await
                .unwrap()
        };
        let plain = SendOptions::default;

        // Results, positional and keyword arguments.
        let add = send("tasks.add", json!([2, 3]), json!({}), plain()).await;
        assert_eq!(add.get(WAIT).await.unwrap(), json!(5));
        let greet = send(
            "tasks.greet",
            json!(["Ada"]),
            json!({"greeting": "Hi"}),
            plain(),
        )
        .await;
        assert_eq!(greet.get(WAIT).await.unwrap(), json!("Hi, Ada!"));

        // Arguments bound like a Python call: a TypeError naming the task and the parameter.
        let missing = send("tasks.add", json!([1]), json!({}), plain()).await;
        let e = failure(&missing, "tasks.add(1)").await;
        assert_eq!(e.exc_type, "TypeError", "{e:?}");
        assert_eq!(
            e.exc_message,
            [json!("tasks.add(a, b): missing a required argument: 'b'")]
        );
        let keyword_only = send("tasks.greet", json!(["Ada", "Hi"]), json!({}), plain()).await;
        let e = failure(
            &keyword_only,
            "greet with a keyword-only argument given positionally",
        )
        .await;
        assert_eq!(e.exc_type, "TypeError", "{e:?}");
        assert!(
            e.exc_message[0]
                .as_str()
                .unwrap()
                .contains("tasks.greet(name, *, greeting, punctuation): too many positional"),
            "{e:?}"
        );

        // Exceptions keep their Python class, so a Celery client raises the same type.
        let div = send("tasks.div", json!([1, 0]), json!({}), plain()).await;
        let e = failure(&div, "tasks.div(1, 0)").await;
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("builtins", "ZeroDivisionError")
        );
        assert_eq!(e.exc_message, [json!("division by zero")]);
        let spend = send("tasks.spend", json!([500]), json!({}), plain()).await;
        let e = failure(&spend, "tasks.spend(500)").await;
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("tasks", "QuotaError")
        );
        assert_eq!(e.exc_message, [json!(500), json!(100)]);
        let unencodable = send("tasks.bad_result", json!([]), json!({}), plain()).await;
        let e = failure(&unencodable, "tasks.bad_result").await;
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("kombu.exceptions", "EncodeError")
        );
        assert!(
            e.exc_message[0]
                .as_str()
                .unwrap()
                .contains("tasks.bad_result: the result is not JSON-serialisable (set)"),
            "{e:?}"
        );

        // Retry retries: the task sees its retry count grow until it succeeds.
        let flaky = send("tasks.flaky", json!([2]), json!({}), plain()).await;
        assert_eq!(
            flaky.get(WAIT).await.unwrap(),
            json!({"retries": 2, "id": flaky.id})
        );
        // Reject: a Reject failure, and the message is dead-lettered (as are the two calls
        // with invalid arguments above).
        let refuse = send("tasks.refuse", json!(["no thanks"]), json!({}), plain()).await;
        let e = failure(&refuse, "tasks.refuse").await;
        assert_eq!(e.exc_type, "Reject", "{e:?}");
        let dead = dead_letters_at_least(queue.broker.as_ref(), 3).await;
        let reasons: Vec<(Option<String>, String)> = dead
            .iter()
            .map(|d| (d.task_id.clone(), d.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        for (id, reason) in [
            (&refuse.id, "rejected by the task: no thanks"),
            (
                &missing.id,
                "invalid arguments: tasks.add(a, b): missing a required argument: 'b'",
            ),
        ] {
            assert!(
                reasons.contains(&(Some(id.clone()), reason.to_owned())),
                "{reasons:?}"
            );
        }

        // The request reaches the task through wasmq.current().
        let mut headers = Map::new();
        headers.insert("x-tenant".into(), json!("t1"));
        let request = send(
            "tasks.request",
            json!([]),
            json!({}),
            SendOptions {
                headers,
                ..SendOptions::default()
            },
        )
        .await;
        let seen = request.get(WAIT).await.unwrap();
        assert_eq!(seen["id"], json!(request.id), "{seen}");
        assert_eq!(seen["task"], "tasks.request", "{seen}");
        assert_eq!(seen["retries"], 0, "{seen}");
        assert_eq!(seen["headers"], json!({"x-tenant": "t1"}), "{seen}");

        // A pure-Python dependency from PyPI (python-slugify, text-unidecode).
        let slug = send(
            "tasks.slug",
            json!(["Héllo Wörld, ça va?"]),
            json!({}),
            plain(),
        )
        .await;
        assert_eq!(slug.get(WAIT).await.unwrap(), json!("hello-world-ca-va"));

        // Hostile attempts fail with a precise reason; the worker carries on.
        let file = send("tasks.read_file", json!([]), json!({}), plain()).await;
        let e = failure(&file, "tasks.read_file").await;
        assert_eq!(e.exc_type, "FileNotFoundError", "{e:?}");
        // WASI's ENOENT, and the path, so the client's FileNotFoundError names it.
        assert_eq!(
            e.exc_message,
            [
                json!(44),
                json!("No such file or directory"),
                json!("/etc/passwd")
            ]
        );
        let env = send("tasks.read_env", json!(["HOME"]), json!({}), plain()).await;
        let e = failure(&env, "tasks.read_env").await;
        assert_eq!(
            (e.exc_type.as_str(), &e.exc_message[..]),
            ("KeyError", &[json!("HOME")][..])
        );
        let socket = send(
            "tasks.connect",
            json!(["127.0.0.1", 5672]),
            json!({}),
            plain(),
        )
        .await;
        let e = failure(&socket, "tasks.connect").await;
        assert_eq!(e.exc_type, "PermissionError", "{e:?}");
        assert!(
            format!("{:?}", e.exc_message).contains("Permission denied"),
            "{e:?}"
        );
        let lookup = send("tasks.resolve", json!(["example.com"]), json!({}), plain()).await;
        let e = failure(&lookup, "tasks.resolve").await;
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("socket", "gaierror"),
            "{e:?}"
        );
        let spin = send("tasks.spin", json!([]), json!({}), plain()).await;
        let e = failure(&spin, "tasks.spin").await;
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("billiard.exceptions", "TimeLimitExceeded"),
            "{e:?}"
        );
        let after = send("tasks.add", json!([20, 22]), json!({}), plain()).await;
        assert_eq!(after.get(WAIT).await.unwrap(), json!(42));

        let _ = stop.send(());
        handle.await.unwrap();
    });
}

#[test]
fn python_tasks_log_and_report_states_through_the_host() {
    let plugin = plugin();
    runtime().block_on(async {
        let sandbox = cached_sandbox();
        let loaded = sandbox.load_plugin(plugin).await.unwrap();
        let seen: Arc<std::sync::Mutex<Vec<StateUpdate>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let mut request = CallRequest::new("tasks.progress", "[2]");
        request.id = "py-42".into();
        let report = sandbox
            .call_with_listener(
                &loaded,
                request,
                Some(Arc::new(move |u| sink.lock().unwrap().push(u))),
            )
            .await
            .unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Success(v) if v == "2"),
            "{}",
            report.outcome
        );
        let states: Vec<(String, Value)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|u| (u.state.clone(), u.meta.clone()))
            .collect();
        assert_eq!(
            states,
            [
                ("PROGRESS".to_owned(), json!({"done": 1, "total": 2})),
                ("PROGRESS".to_owned(), json!({"done": 2, "total": 2}))
            ]
        );
    });
    // The log lines reach the worker's log (`wasmq call` prints the guest's info records).
    let dir = tempfile::tempdir().unwrap();
    let path = plugin.display().to_string();
    let (code, stdout, stderr) = run_in(dir.path(), &["call", &path, "tasks.progress", "[2]"]);
    assert_eq!((code, stdout.trim()), (0, "2"), "{stderr}");
    assert!(
        stderr.contains("step 1 of 2") && stderr.contains("step 2 of 2"),
        "{stderr}"
    );
}

#[test]
fn python_plugins_inspect_call_and_build_errors_on_the_command_line() {
    let plugin = plugin().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_in(dir.path(), &["plugins", "inspect", &plugin]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(wasmq:task@0.3.0, Python, "), "{stdout}");
    assert!(
        stdout.contains("tasks.greet(name, *, greeting, punctuation)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tasks.flaky(succeed_on)"),
        "ctx is not a parameter: {stdout}"
    );
    assert!(stdout.contains("default limits: timeout 5s"), "{stdout}");

    // A bad call is bad input naming the parameter; the task is not run.
    let (code, _, stderr) = run_in(dir.path(), &["call", &plugin, "tasks.add", "[1]"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("missing a required argument: 'b'"),
        "{stderr}"
    );

    // A syntax error is one line naming the file and line, not a stack dump.
    let broken = dir.path().join("broken.py");
    std::fs::write(
        &broken,
        "from wasmq import task\n\n@task\ndef add(a, b)\n    return a + b\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_in(
        dir.path(),
        &["plugins", "build", &broken.display().to_string()],
    );
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("broken.py:4: SyntaxError: "), "{stderr}");
    assert!(!dir.path().join("broken.wasm").exists());

    // A missing dependency names the module.
    let needy = dir.path().join("needy.py");
    std::fs::write(&needy, "import no_such_package_for_wasmq\n").unwrap();
    let (code, _, stderr) = run_in(
        dir.path(),
        &["plugins", "build", &needy.display().to_string()],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "needy.py:1: ModuleNotFoundError: No module named 'no_such_package_for_wasmq'"
        ),
        "{stderr}"
    );
}

/// An unmodified Python Celery client, over RabbitMQ with Redis results, calls the Python
/// tasks and catches the exception types they raised inside the sandbox.
#[test]
fn a_python_celery_client_catches_the_exception_a_python_task_raised() {
    let plugin = plugin();
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let queue_name = unique_queue("python-tasks");
    runtime().block_on(async {
        let broker: Arc<dyn wasmq::broker::Broker> = Arc::new(
            wasmq::broker::amqp::AmqpBroker::new(crate::support::AMQP_URL).unwrap(),
        );
        let backend = wasmq::results::connect(
            REDIS_URL,
            Duration::from_secs(600),
            crate::support::AMQP_URL,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(plugin, dir.path().join("tasks.wasm")).unwrap();
        let registry = Arc::new(
            wasmq::registry::Registry::load_folder(Arc::new(cached_sandbox()), dir.path(), None)
                .await
                .unwrap(),
        );
        let node = format!("wasmq-test@{queue_name}");
        let worker = wasmq::worker::Worker::new(
            broker.clone(),
            backend,
            registry,
            WorkerOptions {
                queues: vec![queue_name.clone()],
                concurrency: 2,
                node_name: node.clone(),
                ..WorkerOptions::default()
            },
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

        let client = r#"
import json, os, sys
from celery import Celery
app = Celery("client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
def call(name, *args, **kwargs):
    try:
        return {"ok": app.send_task(name, args=args, kwargs=kwargs, queue=os.environ["QUEUE"]).get(timeout=60)}
    except ZeroDivisionError as e:
        return {"caught": "ZeroDivisionError", "message": str(e)}
    except TypeError as e:
        return {"caught": "TypeError", "message": str(e)}
print(json.dumps({
    "add": call("tasks.add", 2, 3),
    "greet": call("tasks.greet", "Ada", greeting="Hi"),
    "div": call("tasks.div", 1, 0),
    "bad_call": call("tasks.add", 1),
}))
"#;
        let python = python();
        let queue_env = queue_name.clone();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args(["-c", client])
                .env("BROKER", KOMBU_AMQP_URL)
                .env("BACKEND", REDIS_URL)
                .env("QUEUE", queue_env)
                .output()
                .expect("run the Python client")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let results: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(results["add"], json!({"ok": 5}), "{results:#}");
        assert_eq!(results["greet"], json!({"ok": "Hi, Ada!"}), "{results:#}");
        assert_eq!(
            results["div"],
            json!({"caught": "ZeroDivisionError", "message": "division by zero"}),
            "{results:#}"
        );
        assert_eq!(results["bad_call"]["caught"], "TypeError", "{results:#}");
        assert!(
            results["bad_call"]["message"]
                .as_str()
                .unwrap()
                .contains("missing a required argument: 'b'"),
            "{results:#}"
        );

        let _ = stop.send(());
        handle.await.unwrap();
        broker.delete_queue(&queue_name).await.unwrap();
        broker.forget_node(&node).await.unwrap();
    });
}
