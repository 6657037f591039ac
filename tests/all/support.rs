//! Helpers shared by the test modules.

use std::path::Path;

use wasmq::engine::{CallReport, CallRequest, Outcome, Plugin, Sandbox, SandboxConfig};

/// The bundled plugins, built from `plugins/` by `runtime/build.rs`.
pub(crate) const MATH: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/math.wasm");
/// See [`MATH`].
pub(crate) const TEXT: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/text.wasm");
/// See [`MATH`].
pub(crate) const HOSTILE: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/hostile.wasm");
/// See [`MATH`].
pub(crate) const GRANTS: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/grants.wasm");

/// A sandbox with no artifact cache (tests that exercise the cache make their own).
pub(crate) fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: None,
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

/// Loads a plugin from its path.
pub(crate) async fn load(sandbox: &Sandbox, path: &str) -> Plugin {
    sandbox
        .load_plugin(Path::new(path))
        .await
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

/// Calls `task` with positional `args` and returns the report.
pub(crate) async fn call(sandbox: &Sandbox, plugin: &Plugin, task: &str, args: &str) -> CallReport {
    sandbox
        .call(plugin, CallRequest::new(task, args))
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"))
}

/// Calls `task` and returns its JSON result, panicking on any other outcome.
pub(crate) async fn success(
    sandbox: &Sandbox,
    plugin: &Plugin,
    task: &str,
    args: &str,
) -> serde_json::Value {
    match call(sandbox, plugin, task, args).await.outcome {
        Outcome::Success(json) => serde_json::from_str(&json).expect("result is JSON"),
        other => panic!("{task}({args}) did not succeed: {other}"),
    }
}

/// A multi-threaded runtime like the worker's.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    // `RUST_LOG=wasmq=debug cargo test …` shows the workers' logs of a test.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An embedded broker and result backend in a fresh temporary folder.
pub(crate) struct Queue {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) url: String,
    pub(crate) broker: std::sync::Arc<dyn wasmq::broker::Broker>,
    pub(crate) backend: std::sync::Arc<dyn wasmq::results::ResultBackend>,
    pub(crate) client: wasmq::client::Client,
}

impl Queue {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
        let broker = wasmq::broker::connect(&url).unwrap();
        let backend =
            wasmq::results::connect(&url, std::time::Duration::from_secs(3600), &url).unwrap();
        let client = wasmq::client::Client::new(broker.clone(), backend.clone());
        Self {
            dir,
            url,
            broker,
            backend,
            client,
        }
    }

    /// A folder holding copies of the bundled plugins named in `names`.
    pub(crate) fn plugin_folder(&self, names: &[&str]) -> std::path::PathBuf {
        let folder = self.dir.path().join("plugins");
        std::fs::create_dir_all(&folder).unwrap();
        for name in names {
            let source = Path::new(env!("WASMQ_BUNDLED_PLUGINS_DIR")).join(format!("{name}.wasm"));
            std::fs::copy(source, folder.join(format!("{name}.wasm"))).unwrap();
        }
        folder
    }
}

/// A registry of the bundled plugins (math, text, hostile, grants, stamp), in memory.
pub(crate) async fn bundled_registry(
    sandbox: Sandbox,
) -> std::sync::Arc<wasmq::registry::Registry> {
    std::sync::Arc::new(
        wasmq::registry::Registry::bundled(std::sync::Arc::new(sandbox))
            .await
            .unwrap(),
    )
}

/// A worker running in this process until the returned sender is dropped or fired.
pub(crate) fn spawn_worker(
    queue: &Queue,
    registry: std::sync::Arc<wasmq::registry::Registry>,
    options: wasmq::worker::WorkerOptions,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::sync::Arc<wasmq::worker::WorkerStats>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = wasmq::worker::Worker::new(
        queue.broker.clone(),
        queue.backend.clone(),
        registry,
        options,
    );
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

/// Waits (up to 30 s) until the broker holds at least `n` dead letters; they are settled just
/// after the result is stored, so a test that has the result may have to wait a moment.
pub(crate) async fn dead_letters_at_least(
    broker: &dyn wasmq::broker::Broker,
    n: usize,
) -> Vec<wasmq::broker::DeadLetter> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let dead = broker.dead_letters("celery", 1000).await.unwrap();
        if dead.len() >= n || std::time::Instant::now() > deadline {
            return dead;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// RabbitMQ and Redis on this machine, as lapin and kombu spell them.
pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// See [`AMQP_URL`].
pub(crate) const KOMBU_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672//";
/// See [`AMQP_URL`].
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// Whether RabbitMQ has a queue named `queue`: a passive declare, on a connection of its own.
pub(crate) async fn rabbitmq_has_queue(queue: &str) -> bool {
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let exists = channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .is_ok();
    let _ = connection.close(200, "OK".into()).await;
    exists
}

/// Tests that share RabbitMQ take this lock for reading; the one that closes every
/// connection takes it for writing.
pub(crate) static RABBITMQ: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A queue name no other test or run uses.
pub(crate) fn unique_queue(prefix: &str) -> String {
    format!("wasmq-test-{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Python with Celery, redis-py, Flower and prometheus-client installed (pinned in
/// `tests/celery-suite/requirements.txt` and `tests/python/requirements.txt`): `$WASMQ_CELERY_VENV`, which
/// `.ci/run` prepares, or a virtualenv this function creates under the target directory.
pub(crate) fn python() -> std::path::PathBuf {
    static PYTHON: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = std::env::var_os("WASMQ_CELERY_VENV")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("celery-venv"));
            let python = venv.join("bin").join("python");
            let ready = std::process::Command::new(&python)
                .args(["-c", "import celery, redis, flower, prometheus_client"])
                .status()
                .is_ok_and(|s| s.success());
            if !ready {
                let status = std::process::Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .expect("python3 -m venv");
                assert!(
                    status.success(),
                    "cannot create a virtualenv at {}",
                    venv.display()
                );
                let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
                let status = std::process::Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet", "-r"])
                    .arg(requirements.join("celery-suite/requirements.txt"))
                    .arg("-r")
                    .arg(requirements.join("python/requirements.txt"))
                    .status()
                    .expect("pip install celery");
                assert!(
                    status.success(),
                    "cannot install Celery into {}",
                    venv.display()
                );
            }
            python
        })
        .clone()
}

/// The folder holding the Python side of the interop tests.
pub(crate) fn python_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python")
}
