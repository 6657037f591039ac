//! Python Celery, the baseline of `wasmq bench amqp` and `wasmq bench redis`: a virtualenv with the newest Celery 5.x
//! (installed on first use into `$WASMQ_CELERY_VENV`, default `.wasmq/bench-venv`), its
//! worker pools as child processes, a timed drain, and `bench/celery_bench.py` for its round
//! trips and publish rate. The Celery app is `tests/python/tasks.py`, the one the interop
//! tests use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use super::harness::Harness;
use super::queue_name;
use super::workers::BenchProcess;

/// Python with Celery (newest 5.x) and redis-py, in a virtualenv, installed if missing.
pub(super) fn python() -> anyhow::Result<PathBuf> {
    let venv = std::env::var_os("WASMQ_CELERY_VENV")
        .map_or_else(|| PathBuf::from(".wasmq/bench-venv"), PathBuf::from);
    // Absolute: the Celery worker is started from the folder of its app, where a relative
    // path would name nothing.
    let venv =
        std::path::absolute(&venv).with_context(|| format!("cannot resolve {}", venv.display()))?;
    let python = venv.join("bin").join("python");
    let ready = Command::new(&python)
        .args(["-c", "import celery, redis"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        eprintln!("installing Celery into {} …", venv.display());
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("cannot run python3")?;
        anyhow::ensure!(
            created.success(),
            "cannot create a virtualenv at {}",
            venv.display()
        );
        let installed = Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "celery[redis]>=5.5,<6"])
            .status()
            .context("cannot run pip")?;
        anyhow::ensure!(installed.success(), "cannot install Celery");
    }
    Ok(python)
}

/// The installed Celery's version, e.g. `5.5.3` (empty when it cannot be read).
pub(super) fn version(python: &Path) -> String {
    Command::new(python)
        .args(["-c", "import celery; print(celery.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The folder of the Celery app (`tasks.py`).
fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python")
}

fn bench_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/celery_bench.py")
}

/// kombu spells the default vhost `//` where lapin writes `/%2f` (other URLs, e.g.
/// `redis://`, are the same for both).
fn kombu_url(lapin_url: &str) -> String {
    lapin_url.replace("/%2f", "//").replace("/%2F", "//")
}

/// Runs `celery_bench.py COMMAND N` (`roundtrip` or `publish`) and parses its JSON.
pub(super) fn script(
    python: &Path,
    broker: &str,
    backend: &str,
    queue: &str,
    command: &str,
    n: usize,
) -> anyhow::Result<Value> {
    let output = Command::new(python)
        .arg(bench_script())
        .args([command, &n.to_string()])
        .env("PYTHONPATH", app_dir())
        .env("BROKER", kombu_url(broker))
        .env("BACKEND", backend)
        .env("QUEUE", queue)
        .output()
        .context("cannot run celery_bench.py")?;
    anyhow::ensure!(
        output.status.success(),
        "celery_bench.py {command} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Starts a Celery worker (`pool` with `concurrency`) consuming `queue`; results go to
/// `backend` (empty: off).
pub(super) fn worker(
    python: &Path,
    broker: &str,
    backend: &str,
    queue: &str,
    pool: &str,
    concurrency: usize,
) -> anyhow::Result<BenchProcess> {
    let process = BenchProcess::spawn(
        Command::new(python)
            .args([
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-P",
                pool,
                "-c",
                &concurrency.to_string(),
            ])
            .args([
                "-Q",
                queue,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "error",
            ])
            .args([
                "--hostname",
                &format!("bench-{pool}-{}@localhost", std::process::id()),
            ])
            .current_dir(app_dir())
            .env("BROKER", kombu_url(broker))
            .env("BACKEND", backend)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .context("cannot start a Celery worker")?;
    Ok(process)
}

/// A Celery pool drains `n` queued tasks (results off); returns tasks per second, timed
/// from the first message taken to an empty queue, and whether it stalled (the drain is cut
/// off after the harness's stall limit and the rate taken over what was done).
pub(super) async fn drain(
    h: &Harness,
    python: &Path,
    pool: &str,
    concurrency: usize,
    task: &str,
    n: usize,
    args: impl Fn(usize) -> Vec<Value>,
) -> anyhow::Result<(f64, Option<u64>)> {
    let queue = queue_name(&format!("celery-{pool}"));
    let client = h.client(h.backend(&h.redis_url)?, &queue);
    h.publish_pipelined(&client, task, n, args, true).await?;
    let worker = worker(python, &h.broker_url, "", &queue, pool, concurrency)?;
    let timed = time_drain(worker, n, h.stall_limit, || h.broker.queue_length(&queue)).await;
    h.broker.delete_queue(&queue).await?;
    timed
}

/// Times a Celery `worker` draining `n` queued tasks: `left()` says how many are still to
/// be taken, polled every 20 ms. Returns tasks per second, from the first taken until none
/// is left, and how many were done when it was cut off (`stall_limit` after the first was
/// taken, or 30 s more when none ever is). Stops the worker before returning.
pub(super) async fn time_drain<F, E>(
    worker: BenchProcess,
    n: usize,
    stall_limit: Duration,
    mut left: impl FnMut() -> F,
) -> anyhow::Result<(f64, Option<u64>)>
where
    F: Future<Output = Result<u64, E>>,
    E: Into<anyhow::Error>,
{
    let total = n as u64;
    let mut started = None;
    let give_up = Instant::now() + stall_limit + Duration::from_secs(30);
    let mut stalled = None;
    let mut done = total;
    loop {
        let left = left().await.map_err(Into::into)?;
        if left < total && started.is_none() {
            started = Some(Instant::now());
        }
        if left == 0 {
            break;
        }
        if started.is_some_and(|s| s.elapsed() > stall_limit) || Instant::now() > give_up {
            done = total - left.min(total);
            stalled = Some(done);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    drop(worker);
    Ok((done as f64 / elapsed.as_secs_f64().max(1e-9), stalled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_spells_the_default_vhost_with_two_slashes() {
        assert_eq!(
            kombu_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:guest@127.0.0.1:5672//"
        );
        assert_eq!(kombu_url("amqp://h:5672/%2F"), "amqp://h:5672//");
        assert_eq!(kombu_url("amqp://h:5672/tenant"), "amqp://h:5672/tenant");
    }
}
