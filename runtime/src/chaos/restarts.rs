//! Servers restarted during a drain: the Redis that stores the results (SIGKILLed and
//! started again), then RabbitMQ (`rabbitmqctl stop_app`/`start_app`, so its durable queues
//! and persistent messages survive, as in a rolling upgrade). The Redis is one the harness
//! starts for the run, on a free port, with an append-only file synced on every write:
//! restarting the machine's shared Redis would disturb everyone else using it, and one
//! that keeps nothing on disk would lose every stored result by design, which would say
//! nothing about wasmq. While a result cannot be stored the worker must not acknowledge
//! its message: every confirmed task must end with its right result.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::kill_workers::clean_up;
use super::ledger::{Ledger, Outcomes};
use super::processes::{Killable, Wasmq, WorkerSpec};
use super::{Check, Tally, only_local, recovery_summary};

/// What a restarts run does.
#[derive(Debug, Clone)]
pub struct Restarts {
    /// RabbitMQ on this machine; `rabbitmqctl` must be able to stop and start it.
    pub broker: String,
    /// Tasks to drain.
    pub tasks: usize,
    /// The worker's task slots.
    pub concurrency: usize,
    /// How long the run may wait with no task finishing before it counts the rest as lost.
    pub stall: Duration,
}

/// A Redis server of the run's own, with an append-only file synced on every write.
pub struct OwnRedis {
    process: Killable,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    /// Starts `redis-server` on a free port of 127.0.0.1, its files in `dir`.
    ///
    /// # Errors
    /// When `redis-server` cannot be started or does not answer within 10 s.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let process = Self::spawn(dir, port)?;
        let redis = Self {
            process,
            port,
            dir: dir.to_owned(),
        };
        redis.wait_ready().await?;
        Ok(redis)
    }

    fn spawn(dir: &Path, port: u16) -> anyhow::Result<Killable> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (is Redis installed?)")?;
        Ok(Killable::from(child))
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it with SIGKILL and starts it again on the same port and files.
    ///
    /// # Errors
    /// When it cannot be started again.
    pub async fn kill_and_restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.process.kill();
        tokio::time::sleep(down_for).await;
        self.process = Self::spawn(&self.dir, self.port)?;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = ::redis::Client::open(self.url())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && ::redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `rabbitmqctl` with `args`.
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("cannot run rabbitmqctl")?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Stops and starts the local RabbitMQ's application (its data survives), and waits until
/// it serves again.
///
/// # Errors
/// When `rabbitmqctl` fails.
pub async fn restart_rabbitmq(down_for: Duration) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["stop_app"])?;
        std::thread::sleep(down_for);
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup"])
    })
    .await?
}

/// Runs the scenario with `exe` as `wasmq`, in `dir`.
///
/// # Errors
/// When a server is not on this machine or cannot be restarted, a process cannot be
/// started, or the results cannot be read. Lost tasks are what the [`Tally`] reports.
pub async fn run(exe: &Path, dir: &Path, options: &Restarts) -> anyhow::Result<Tally> {
    only_local(&options.broker)?;
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let mut redis = OwnRedis::start(&redis_dir).await?;
    let results = redis.url();
    let ledger = Ledger::new(options.tasks);
    let wasmq = Wasmq {
        exe: exe.to_owned(),
        dir: dir.to_owned(),
    };
    let queue = ledger.run.clone();
    let lines = (0..options.tasks).map(|i| ledger.line(i)).collect();
    let confirmed = wasmq
        .start_publisher(&options.broker, &results, &queue, lines)?
        .wait(Duration::from_secs(300))?;
    let spec = WorkerSpec {
        broker: options.broker.clone(),
        results: results.clone(),
        queue: queue.clone(),
        node: format!("{}@chaos", ledger.run),
        concurrency: options.concurrency,
        extra: Vec::new(),
    };
    let log = dir.join("worker.log");
    let mut outcomes = Outcomes::new(&ledger);
    outcomes.watch(log.clone());
    let mut worker = wasmq.start_worker(&spec, &log)?;

    let started = Instant::now();
    let mut recoveries = Vec::new();
    let mut checks = Vec::new();
    // At fixed points of the drain, so a fast drain cannot end before the second restart:
    // Redis first (a SIGKILL bites at once: every result after it waits for Redis), then
    // RabbitMQ (`stop_app` takes seconds to close its connections, and the worker drains on
    // meanwhile).
    for (server, percent) in [("Redis", 20), ("RabbitMQ", 40)] {
        let target = options.tasks * percent / 100;
        outcomes
            .wait_until(options.stall, |o| o.finished() >= target)
            .await?;
        let began = Instant::now();
        if server == "RabbitMQ" {
            restart_rabbitmq(Duration::from_secs(1)).await?;
        } else {
            redis.kill_and_restart(Duration::from_secs(1)).await?;
        }
        let back = began.elapsed();
        outcomes.refresh()?;
        let finished_then = outcomes.finished();
        if outcomes
            .wait_until(options.stall, |o| {
                o.finished() > finished_then || o.finished() >= confirmed.len()
            })
            .await?
            && outcomes.finished() > finished_then
        {
            recoveries.push(began.elapsed());
        }
        checks.push(Check::new(
            format!("{server} back after {} ms", back.as_millis()),
            true,
        ));
    }
    outcomes
        .wait_until(options.stall, |o| {
            confirmed.iter().all(|id| o.has_finished(id))
        })
        .await?;
    let took = started.elapsed();
    let broker = crate::broker::connect(&options.broker).context("cannot open the broker")?;
    super::settle(&*broker, &queue, &mut outcomes, options.stall).await?;
    worker.terminate(Duration::from_secs(10));

    let backend = crate::results::connect(&results, Duration::from_secs(3600), &options.broker)
        .context("cannot open the result backend")?;
    let (completed, lost, wrong) = ledger.verify(&*backend, &confirmed).await?;
    let left = broker.queue_length(&queue).await.unwrap_or(u64::MAX);
    let dead = broker
        .dead_letters(&queue, 10)
        .await
        .map(|d| d.len())
        .unwrap_or(0);
    checks.push(Check::new(format!("left in the queue: {left}"), left == 0));
    checks.push(Check::new(format!("dead letters: {dead}"), dead == 0));
    clean_up(&*broker, &queue, &spec.node, &results, &[]).await;
    let (mean_recovery, worst_recovery) = recovery_summary(&recoveries);
    Ok(Tally {
        scenario: "restarts (the results' Redis, then RabbitMQ)".to_owned(),
        sent: confirmed.len(),
        completed,
        lost,
        wrong,
        duplicated: outcomes.duplicated(),
        faults: 2,
        mean_recovery,
        worst_recovery,
        took,
        checks,
    })
}
