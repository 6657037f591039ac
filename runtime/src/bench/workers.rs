//! The workers a benchmark measures: child processes (a Celery worker, `wasmq worker`) that
//! are stopped when dropped, so an early error never leaves one running, and wasmq workers
//! in this process with a stop handle and their counters.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::registry::Registry;
use crate::results::ResultBackend;
use crate::worker::{Worker, WorkerOptions, WorkerStats};

/// A benchmark child process (a Celery or wasmq worker), stopped with SIGTERM when dropped.
pub(super) struct BenchProcess(Child);

impl BenchProcess {
    /// Starts `command`.
    pub(super) fn spawn(command: &mut Command) -> std::io::Result<Self> {
        command.spawn().map(Self)
    }

    /// The process id.
    pub(super) fn id(&self) -> u32 {
        self.0.id()
    }
}

/// Writes the bundled plugins into `folder` with `wasmq plugins export`, as an operator
/// would (the harness does not reach into the CLI's modules).
pub(super) fn export_bundled(exe: &Path, folder: &Path) -> anyhow::Result<()> {
    let status = Command::new(exe)
        .args(["plugins", "export"])
        .arg(folder)
        .stdout(Stdio::null())
        .status()
        .context("cannot run wasmq plugins export")?;
    anyhow::ensure!(status.success(), "wasmq plugins export failed: {status}");
    Ok(())
}

/// CPU time (user + system) a process of this machine has used so far, from
/// `/proc/<pid>/stat`; `None` off Linux or once the process is gone.
pub(super) fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so cut at its closing paren):
    // state is field 3, utime 14 and stime 15, in clock ticks of 1/100 s (USER_HZ).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time (user + system) the local RabbitMQ (`beam.smp`) and Redis (`redis-server`)
/// processes have used so far: what a drain costs the servers it runs against, on a machine
/// where they share the cores with the worker. Zero for servers that are not local.
pub(super) fn services_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| matches!(comm.trim_end(), "beam.smp" | "redis-server"))
        })
        .filter_map(process_cpu)
        .sum()
}

impl Drop for BenchProcess {
    /// SIGTERM (a graceful stop, as an operator would), then SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A wasmq worker running in this process until [`InProcessWorker::stop`].
pub(super) struct InProcessWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    /// Its broker, to forget the node once it has stopped.
    broker: Arc<dyn Broker>,
    /// Its node name.
    node: String,
    handle: tokio::task::JoinHandle<()>,
    /// Its counters, read while it runs to time drains.
    pub(super) stats: Arc<WorkerStats>,
}

impl InProcessWorker {
    /// Starts a worker on a task of its own.
    pub(super) fn spawn(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Arc<Registry>,
        options: WorkerOptions,
    ) -> Self {
        let node = options.node_name.clone();
        let worker = Worker::new(Arc::clone(&broker), backend, registry, options);
        let stats = worker.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = worker
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            stop,
            broker,
            node,
            handle,
            stats,
        }
    }

    /// Asks the worker to shut down, waits until it has, and drops what the broker kept
    /// for its node (on RabbitMQ its durable revocation queue): a bench's node never comes
    /// back.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.await;
        if let Err(error) = self.broker.forget_node(&self.node).await {
            eprintln!(
                "        could not remove node {}'s queues: {error}",
                self.node
            );
        }
    }
}
