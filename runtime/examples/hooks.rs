//! An embedded worker that logs each task through hooks (wasmq's counterpart of Celery's
//! signals): the embedded broker and result store in a temporary folder, the bundled
//! plugins, a worker running in this process, and a client sending it a few tasks.
//!
//! ```sh
//! cargo run --release --example hooks
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, json};
use wasmq::client::{Client, SendOptions};
use wasmq::engine::{Sandbox, SandboxConfig};
use wasmq::registry::Registry;
use wasmq::worker::{Hooks, Worker, WorkerOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    let broker = wasmq::broker::connect(&url)?;
    let backend = wasmq::results::connect(&url, Duration::from_secs(3600), &url)?;
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        cache_dir: None,
        ..SandboxConfig::default()
    })?);
    let registry = Arc::new(Registry::bundled(sandbox).await?);

    // Hooks run inline on the worker's executor: keep them quick (a counter, a log line, a
    // message on a channel). A panicking hook is logged; the task carries on.
    let busy_micros = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&busy_micros);
    let hooks = Hooks::new()
        .worker_ready(|w| {
            println!(
                "ready: {} consuming {:?}, {} slots",
                w.node, w.queues, w.concurrency
            )
        })
        .before_task(|t| {
            println!(
                "start  {} {} ({} bytes of arguments)",
                t.name, t.id, t.args_size
            )
        })
        .after_task(move |t| {
            let runtime = t.runtime.unwrap_or_default();
            counted.fetch_add(
                u64::try_from(runtime.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            println!(
                "end    {} {} {} in {runtime:?}",
                t.name,
                t.id,
                t.state.as_str()
            );
        })
        .on_failure(|t| println!("FAILED {} {}: {}", t.name, t.id, t.exception.unwrap_or("?")))
        .on_retry(|t| println!("retry  {} {} (retries so far: {})", t.name, t.id, t.retries))
        .worker_shutdown(|w| println!("stopped: {}", w.node));
    let options = WorkerOptions {
        concurrency: 2,
        node_name: "hooks-example@localhost".into(),
        hooks,
        ..WorkerOptions::default()
    };
    let worker = Worker::new(broker.clone(), backend.clone(), registry, options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let client = Client::new(broker, backend);
    let send = |task: &'static str, args: serde_json::Value| {
        let client = client.clone();
        async move {
            let args = args.as_array().cloned().unwrap_or_default();
            client
                .send_task(task, args, Map::new(), SendOptions::default())
                .await
        }
    };
    let results = [
        send("math.add", json!([2, 3])).await?,
        send("math.fib", json!([20])).await?,
        send("math.div", json!([1, 0])).await?,
        send("math.flaky", json!([1])).await?,
    ];
    for result in &results {
        // Success or the task's own exception: the hooks above have said which.
        let _ = result.get(Duration::from_secs(30)).await;
    }
    let _ = stop.send(());
    running.await??;
    println!(
        "sandbox time of the tasks: {:?}",
        Duration::from_micros(busy_micros.load(Ordering::Relaxed))
    );
    Ok(())
}
