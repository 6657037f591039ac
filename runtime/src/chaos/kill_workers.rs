//! SIGKILL a worker again and again during a drain: the tasks are published first, then a
//! `wasmq worker` drains them and is killed each time the drain reaches one of `kills`
//! random points (chosen by tasks finished, so the kills spread over the drain however fast
//! it runs), and restarted at once. Nothing a worker had leased but not acknowledged may be
//! lost: the broker redelivers it (RabbitMQ when the connection drops, the embedded broker
//! when the next worker finds the dead process's leases).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::ledger::{Ledger, Outcomes};
use super::processes::{Wasmq, WorkerSpec};
use super::{Check, Tally, only_local, recovery_summary};
use crate::broker::Broker;

/// What a kill-workers run does.
#[derive(Debug, Clone)]
pub struct KillWorkers {
    /// The broker: `sqlite://FILE` (the embedded broker) or an `amqp://` URL.
    pub broker: String,
    /// The result backend: `sqlite://FILE` or a `redis://` URL.
    pub results: String,
    /// Tasks to drain.
    pub tasks: usize,
    /// Times to kill the worker.
    pub kills: usize,
    /// The worker's task slots.
    pub concurrency: usize,
    /// How long the run may wait with no task finishing before it counts the rest as lost.
    pub stall: Duration,
}

/// Runs the scenario with `exe` as `wasmq`, in `dir`.
///
/// # Errors
/// When a server is not on this machine, a process cannot be started, the tasks cannot be
/// published, or the result backend cannot be read. Lost tasks are not an error: they are
/// what the [`Tally`] reports.
pub async fn run(exe: &Path, dir: &Path, options: &KillWorkers) -> anyhow::Result<Tally> {
    only_local(&options.broker)?;
    only_local(&options.results)?;
    let ledger = Ledger::new(options.tasks);
    let wasmq = Wasmq {
        exe: exe.to_owned(),
        dir: dir.to_owned(),
    };
    let queue = ledger.run.clone();
    let lines = (0..options.tasks).map(|i| ledger.line(i)).collect();
    let confirmed = wasmq
        .start_publisher(&options.broker, &options.results, &queue, lines)?
        .wait(Duration::from_secs(300))?;
    anyhow::ensure!(
        confirmed.len() == options.tasks,
        "the publisher confirmed {} of {} tasks",
        confirmed.len(),
        options.tasks
    );

    let spec = WorkerSpec {
        broker: options.broker.clone(),
        results: options.results.clone(),
        queue: queue.clone(),
        node: format!("{}@chaos", ledger.run),
        concurrency: options.concurrency,
        extra: Vec::new(),
    };
    let targets = kill_points(options.tasks, options.kills);
    let mut outcomes = Outcomes::new(&ledger);
    let mut recoveries = Vec::new();
    let mut last_kill: Option<(Instant, usize)> = None;
    let mut first_kill = None;
    let mut life = 0;
    let mut worker = loop {
        let log = dir.join(format!("worker-{life}.log"));
        outcomes.watch(log.clone());
        let mut worker = wasmq.start_worker(&spec, &log)?;
        let total = confirmed.len();
        if let Some((killed_at, finished_then)) = last_kill
            && finished_then < total
        {
            let progressed = outcomes
                .wait_until(options.stall, |o| o.finished() > finished_then)
                .await?;
            if progressed {
                recoveries.push(killed_at.elapsed());
            }
        }
        let Some(&target) = targets.get(life) else {
            break worker;
        };
        // Each life runs at least one task before it is killed, and none is killed once
        // the drain is over (a short run can end before its kill points).
        let floor = last_kill.map_or(0, |(_, finished)| finished + 1);
        outcomes
            .wait_until(options.stall, |o| {
                o.finished() >= target.max(floor).min(total)
            })
            .await?;
        if outcomes.finished() >= total {
            break worker;
        }
        // A few milliseconds more, at random, so the kill lands anywhere in a task's path
        // (running, storing the result, acknowledging), not just after a log line.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
        worker.kill();
        outcomes.refresh()?;
        let now = Instant::now();
        first_kill.get_or_insert(now);
        last_kill = Some((now, outcomes.finished()));
        life += 1;
    };
    outcomes
        .wait_until(options.stall, |o| {
            confirmed.iter().all(|id| o.has_finished(id))
        })
        .await?;
    let took = first_kill.map_or(Duration::ZERO, |at| at.elapsed());
    let broker = crate::broker::connect(&options.broker).context("cannot open the broker")?;
    super::settle(&*broker, &queue, &mut outcomes, options.stall).await?;
    worker.terminate(Duration::from_secs(10));

    let backend =
        crate::results::connect(&options.results, Duration::from_secs(3600), &options.broker)
            .context("cannot open the result backend")?;
    let (completed, lost, wrong) = ledger.verify(&*backend, &confirmed).await?;
    let left = broker.queue_length(&queue).await.unwrap_or(u64::MAX);
    let dead = broker
        .dead_letters(&queue, 10)
        .await
        .map(|d| d.len())
        .unwrap_or(0);
    let mut checks = vec![
        Check::new(format!("left in the queue: {left}"), left == 0),
        Check::new(format!("dead letters: {dead}"), dead == 0),
    ];
    if let Some(file) = crate::db::parse_url(&options.broker) {
        checks.push(integrity_check(&file)?);
    }
    clean_up(&*broker, &queue, &spec.node, &options.results, &confirmed).await;
    let (mean_recovery, worst_recovery) = recovery_summary(&recoveries);
    Ok(Tally {
        scenario: format!("kill-workers ({})", kind_of(&options.broker)),
        sent: confirmed.len(),
        completed,
        lost,
        wrong,
        duplicated: outcomes.duplicated(),
        faults: life,
        mean_recovery,
        worst_recovery,
        took,
        checks,
    })
}

/// `kills` distinct points of a drain of `tasks`, ascending, as counts of tasks finished:
/// spread at random over its first 90 %.
pub(crate) fn kill_points(tasks: usize, kills: usize) -> Vec<usize> {
    let span = (tasks * 9 / 10).max(1);
    let mut points: Vec<usize> = (0..kills).map(|_| rand::random_range(1..=span)).collect();
    points.sort_unstable();
    points
}

/// What kind of broker `url` is, for the table.
pub(crate) fn kind_of(url: &str) -> &'static str {
    if url.starts_with("sqlite://") {
        "embedded"
    } else if url.starts_with("amqp") {
        "RabbitMQ"
    } else if url.starts_with("redis") {
        "Redis"
    } else {
        "other"
    }
}

/// SQLite's own check of the file: every page, index and constraint.
pub(crate) fn integrity_check(file: &Path) -> anyhow::Result<Check> {
    let db = rusqlite::Connection::open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let found: String = db
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .context("PRAGMA integrity_check")?;
    Ok(Check::new(
        format!("integrity_check: {found}"),
        found == "ok",
    ))
}

/// Removes what the run left on shared servers: its queue and the node's queues on the
/// broker, its results in Redis. Best effort; a note says what could not be removed.
pub(crate) async fn clean_up(
    broker: &dyn Broker,
    queue: &str,
    node: &str,
    results: &str,
    ids: &[String],
) {
    if let Err(error) = broker.delete_queue(queue).await {
        eprintln!("note: could not delete queue {queue}: {error}");
    }
    if let Err(error) = broker.forget_node(node).await {
        eprintln!("note: could not remove node {node}'s queues: {error}");
    }
    if results.starts_with("redis") {
        let deleted = async {
            let client = ::redis::Client::open(results)?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            for chunk in ids.chunks(1000) {
                let keys: Vec<String> = chunk
                    .iter()
                    .map(|id| format!("celery-task-meta-{id}"))
                    .collect();
                ::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut connection)
                    .await?;
            }
            Ok::<_, ::redis::RedisError>(())
        };
        if let Err(error) = deleted.await {
            eprintln!("note: could not delete the run's results: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_points_rise_within_the_first_nine_tenths() {
        for _ in 0..100 {
            let points = kill_points(1000, 10);
            assert_eq!(points.len(), 10);
            assert!(points.windows(2).all(|w| w[0] <= w[1]));
            assert!(points.iter().all(|p| (1..=900).contains(p)), "{points:?}");
        }
        assert_eq!(kill_points(1, 2), vec![1, 1]);
    }

    #[test]
    fn a_fresh_file_passes_the_integrity_check() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.db");
        rusqlite::Connection::open(&file)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        assert_eq!(
            integrity_check(&file).unwrap(),
            Check::new("integrity_check: ok", true)
        );
    }
}
