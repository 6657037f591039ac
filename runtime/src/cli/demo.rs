//! `wasmq demo`: the whole loop in one command, with nothing installed. A worker on a fresh
//! embedded broker (a SQLite file in a temporary folder) runs the bundled plugins; a client
//! sends real tasks, bad input, and every hostile task; a table shows how each ended. The
//! demo checks every outcome against what wasmq promises and exits non-zero if one differs
//! (say, a hostile task that managed to read a file).
//!
//! Longer than most files because it owns one whole idea, the demo: the tasks with the
//! outcome each must have, the run, the check and the table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::args::EngineArgs;
use super::exit::{ExitStatus, Failure};
use crate::broker::Broker;
use crate::client::{Client, SendOptions};
use crate::engine::Sandbox;
use crate::protocol::{Envelope, Properties};
use crate::registry::Registry;
use crate::results::{ResultBackend, ResultMeta, TaskState};
use crate::worker::{Worker, WorkerOptions};

/// The demo worker's node name.
const DEMO_NODE: &str = "wasmq-demo@localhost";

#[derive(Debug, clap::Args)]
pub(super) struct DemoArgs {
    /// Run on this broker instead of a fresh embedded one, e.g. amqp://guest:guest@127.0.0.1:5672/%2f.
    /// The demo uses a queue of its own there and deletes it afterwards.
    #[arg(long)]
    broker: Option<String>,
    /// Result backend for --broker, e.g. redis://127.0.0.1:6379/0 or rpc://.
    /// Default: redis://127.0.0.1:6379/0 with an AMQP broker.
    #[arg(long)]
    result_backend: Option<String>,
    /// Tasks run at once. Default: the number of CPUs.
    #[arg(long, short = 'c')]
    concurrency: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// What a demo task must end as.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Success,
    Failure(&'static str),
}

struct DemoTask {
    task: &'static str,
    args: Value,
    kwargs: Value,
    countdown: Option<Duration>,
    expect: Expect,
    what: &'static str,
}

fn task(task: &'static str, args: Value, expect: Expect, what: &'static str) -> DemoTask {
    DemoTask {
        task,
        args,
        kwargs: json!({}),
        countdown: None,
        expect,
        what,
    }
}

fn demo_tasks() -> Vec<DemoTask> {
    use Expect::{Failure as F, Success as S};
    let mut tasks = vec![
        task("math.add", json!([2, 3]), S, "a plain task"),
        task("math.mul", json!([6, 7]), S, "another"),
        task("math.fib", json!([25]), S, "CPU-bound (242785 calls)"),
        task("math.sum", json!([[1.5, 2.5, 3]]), S, "a list argument"),
        task("text.slugify", json!(["Hello, wasmq World!"]), S, "strings"),
        task(
            "text.word_count",
            json!(["the quick brown fox"]),
            S,
            "strings",
        ),
        task(
            "text.markdown",
            json!(["# wasmq\n*sandboxed* tasks"]),
            S,
            "a real crate (pulldown-cmark)",
        ),
        task(
            "math.flaky",
            json!([1]),
            S,
            "asks for one retry, then succeeds",
        ),
        task(
            "math.div",
            json!([1, 0]),
            F("ZeroDivisionError"),
            "a task's own failure",
        ),
        task(
            "math.add",
            json!([1, "x"]),
            F("TypeError"),
            "bad arguments: dead-lettered",
        ),
        task(
            "math.sqrt",
            json!([-1]),
            F("Reject"),
            "the task rejects it: dead-lettered",
        ),
        task(
            "math.pow",
            json!([2, 8]),
            F("NotRegistered"),
            "unknown task: dead-lettered",
        ),
        task(
            "hostile.spin",
            json!([]),
            F("TimeLimitExceeded"),
            "infinite loop",
        ),
        task(
            "hostile.hog",
            json!([]),
            F("MemoryError"),
            "allocates until refused",
        ),
        task(
            "hostile.recurse",
            json!([]),
            F("RecursionError"),
            "unbounded recursion",
        ),
        task("hostile.panic", json!([]), F("WasmTrap"), "panics"),
        task(
            "hostile.flood",
            json!([]),
            F("OutputLimitExceeded"),
            "endless stdout",
        ),
        task(
            "hostile.read_file",
            json!([]),
            F("PermissionError"),
            "reads /etc/passwd",
        ),
        task(
            "hostile.read_env",
            json!([]),
            F("KeyError"),
            "reads the environment",
        ),
        task(
            "hostile.connect",
            json!([]),
            F("ConnectionRefusedError"),
            "opens 127.0.0.1:5672",
        ),
        task(
            "hostile.big_result",
            json!([]),
            F("OutputLimitExceeded"),
            "returns 100 MB",
        ),
    ];
    let mut kwargs = task("math.add", json!([40]), S, "keyword arguments");
    kwargs.kwargs = json!({"b": 2});
    tasks.insert(1, kwargs);
    let mut delayed = task("math.add", json!([1, 1]), S, "countdown: runs 1 s later");
    delayed.countdown = Some(Duration::from_secs(1));
    tasks.insert(2, delayed);
    tasks
}

struct Row {
    task: String,
    args: String,
    state: String,
    detail: String,
    elapsed: Duration,
    ok: bool,
    what: &'static str,
}

pub(super) async fn run(args: DemoArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let folder = tempfile::tempdir().map_err(Failure::internal)?;
    let database = folder.path().join("wasmq.db");
    let embedded = format!("sqlite://{}", database.display());
    let url = args.broker.clone().unwrap_or_else(|| embedded.clone());
    let backend_url = match (&args.result_backend, &args.broker) {
        (Some(backend), _) => backend.clone(),
        (None, Some(_)) => "redis://127.0.0.1:6379/0".to_owned(),
        (None, None) => embedded.clone(),
    };
    let queue = if args.broker.is_some() {
        format!("wasmq-demo-{}", uuid::Uuid::new_v4().simple())
    } else {
        "celery".to_owned()
    };
    let broker = crate::broker::connect(&url).map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    let backend =
        crate::results::connect(&backend_url, crate::results::DEFAULT_RESULT_EXPIRES, &url)
            .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    let options = WorkerOptions {
        queues: vec![queue.clone()],
        concurrency: args
            .concurrency
            .unwrap_or_else(|| WorkerOptions::default().concurrency),
        node_name: DEMO_NODE.into(),
        ..WorkerOptions::default()
    };
    let sandbox = Arc::new(
        Sandbox::new(
            args.engine
                .sandbox_config(u32::try_from(options.concurrency + 4).unwrap_or(64)),
        )
        .map_err(Failure::internal)?,
    );
    let registry = Arc::new(
        Registry::bundled(Arc::clone(&sandbox))
            .await
            .map_err(|e| Failure::new(ExitStatus::BadPlugin, e))?,
    );
    let loaded = started.elapsed();

    println!(
        "wasmq demo: a worker (concurrency {}) on {} (results: {}) serving the bundled\n\
         plugins math, text, hostile, grants and stamp ({} tasks, loaded in {:.0?}). Every task runs in its own sandbox:\n\
         default limits {}.\n",
        options.concurrency,
        if args.broker.is_some() {
            format!("{url}, queue {queue}")
        } else {
            format!("a fresh embedded broker ({url})")
        },
        backend.describe(),
        registry.snapshot().tasks().len(),
        loaded,
        sandbox.config().defaults,
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(Arc::clone(&broker), Arc::clone(&backend), registry, options);
    let stats = worker.stats();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let client =
        Client::new(Arc::clone(&broker), Arc::clone(&backend)).with_default_queue(queue.clone());
    let tasks = demo_tasks();
    let mut pending = Vec::new();
    for demo in &tasks {
        let args_vec = demo.args.as_array().cloned().unwrap_or_default();
        let kwargs: Map<String, Value> = demo.kwargs.as_object().cloned().unwrap_or_default();
        let options = SendOptions {
            countdown: demo.countdown,
            ..SendOptions::default()
        };
        let sent = chrono::Utc::now();
        let result = client
            .send_task(demo.task, args_vec, kwargs, options)
            .await
            .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
        pending.push((result.id, sent));
    }
    let sent = chrono::Utc::now();
    let malformed = (
        send_malformed(&*broker, &queue, backend.reply_to()).await?,
        sent,
    );

    let mut rows = Vec::new();
    for (demo, (id, sent)) in tasks.iter().zip(&pending) {
        let meta = wait(&*backend, id).await?;
        let args_text = if demo.kwargs.as_object().is_some_and(|k| !k.is_empty()) {
            format!("{} {}", demo.args, demo.kwargs)
        } else {
            demo.args.to_string()
        };
        rows.push(row(
            demo.task,
            args_text,
            &meta,
            demo.expect,
            *sent,
            demo.what,
        ));
    }
    let meta = wait(&*backend, &malformed.0).await?;
    rows.push(row(
        "math.add",
        "body [[2, 5], {}]".into(),
        &meta,
        Expect::Failure("DecodeError"),
        malformed.1,
        "malformed message: dead-lettered",
    ));

    // After every attack, the same worker still serves.
    let sent = chrono::Utc::now();
    let after = client
        .send_task(
            "math.add",
            vec![json!(20), json!(22)],
            Map::new(),
            SendOptions::default(),
        )
        .await
        .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
    let meta = wait(&*backend, &after.id).await?;
    rows.push(row(
        "math.add",
        "[20,22]".into(),
        &meta,
        Expect::Success,
        sent,
        "after all of the above",
    ));

    let _ = stop.send(());
    let _ = worker.await;
    print_table(&rows);

    let dead = broker
        .dead_letters(&queue, 100)
        .await
        .map_err(Failure::internal)?;
    if args.broker.is_some() {
        broker
            .delete_queue(&queue)
            .await
            .map_err(Failure::internal)?;
        // The demo's node does not come back: its revocation queue goes too.
        broker
            .forget_node(DEMO_NODE)
            .await
            .map_err(Failure::internal)?;
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    let succeeded = rows.iter().filter(|r| r.state == "SUCCESS").count();
    println!(
        "\n{} tasks in {:.1?}: {} succeeded, {} failed as designed, {} messages dead-lettered; \
         the worker received {} messages (retries and the countdown included) and never stopped.",
        rows.len(),
        started.elapsed(),
        succeeded,
        rows.len() - succeeded - failed,
        dead.len(),
        stats.received.load(std::sync::atomic::Ordering::Relaxed),
    );
    if failed > 0 {
        return Err(Failure::internal(anyhow::anyhow!(
            "{failed} task(s) did not end as expected (marked ✗ above)"
        )));
    }
    println!(
        "Each hostile task cost exactly one failed task with a precise reason: no file, environment variable\n\
         or socket was reachable, and loops, memory bombs, recursion and floods were cut off at their limits."
    );
    Ok(())
}

/// Publishes the 2-element body that crash-loops Python Celery 5.6 workers.
async fn send_malformed(
    broker: &dyn Broker,
    queue: &str,
    reply_to: Option<String>,
) -> Result<String, Failure> {
    let id = uuid::Uuid::new_v4().to_string();
    let envelope = Envelope {
        headers: json!({"task": "math.add", "id": id})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        properties: Properties {
            content_type: Some("application/json".into()),
            reply_to,
            ..Properties::default()
        },
        body: b"[[2, 5], {}]".to_vec(),
    };
    broker
        .publish(queue, &envelope, None)
        .await
        .map_err(Failure::internal)?;
    Ok(id)
}

async fn wait(backend: &dyn ResultBackend, id: &str) -> Result<ResultMeta, Failure> {
    backend
        .wait(id, Duration::from_secs(60))
        .await
        .map_err(Failure::internal)
}

/// A table row; `elapsed` runs from the send to the result's `date_done`.
fn row(
    task: &str,
    args: String,
    meta: &ResultMeta,
    expect: Expect,
    sent: chrono::DateTime<chrono::Utc>,
    what: &'static str,
) -> Row {
    let elapsed = meta
        .date_done
        .as_deref()
        .and_then(crate::protocol::parse_time)
        .and_then(|done| (done - sent).to_std().ok())
        .unwrap_or_default();
    let (detail, ok) = match (&meta.status, expect) {
        (TaskState::Success, Expect::Success) => (meta.result.to_string(), true),
        (TaskState::Failure | TaskState::Revoked, Expect::Failure(kind)) => {
            let exception = meta.exception();
            let detail = exception
                .as_ref()
                .map_or_else(|| meta.result.to_string(), ToString::to_string);
            (detail, exception.is_some_and(|e| e.exc_type == kind))
        }
        _ => (meta.result.to_string(), false),
    };
    Row {
        task: task.into(),
        args,
        state: meta.status.to_string(),
        detail,
        elapsed,
        ok,
        what,
    }
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut clipped: String = text.chars().take(width.saturating_sub(1)).collect();
        clipped.push('…');
        clipped
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "  {:<18} {:<26} {:<8} {:<64} {:>7}  WHAT",
        "TASK", "ARGS", "STATE", "RESULT / ERROR", "SENT→DONE"
    );
    for row in rows {
        println!(
            "{} {:<18} {:<26} {:<8} {:<64} {:>7}  {}",
            if row.ok { "✓" } else { "✗" },
            clip(&row.task, 18),
            clip(&row.args, 26),
            row.state,
            clip(&row.detail, 64),
            format_elapsed(row.elapsed),
            row.what
        );
    }
}

fn format_elapsed(elapsed: Duration) -> String {
    if elapsed >= Duration::from_secs(1) {
        format!("{:.2}s", elapsed.as_secs_f64())
    } else {
        format!("{:.1}ms", elapsed.as_secs_f64() * 1000.0)
    }
}
