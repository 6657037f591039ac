//! Two workers and a publisher racing on one SQLite file, each killed with SIGKILL again
//! and again — mid-transaction, mid-checkpoint, mid-group-commit, wherever the kill lands —
//! and restarted at once. A killed publisher is restarted from the task after the last one
//! it saw confirmed, as a client retrying would (so a task it had committed but not yet
//! printed is sent twice, and runs twice: counted, not lost). Afterwards SQLite's
//! `PRAGMA integrity_check` must pass, every confirmed task must have its right result,
//! and nothing may be left in the queue or dead-lettered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::kill_workers::{clean_up, integrity_check};
use super::ledger::{Ledger, Outcomes};
use super::processes::{Killable, Publisher, Wasmq, WorkerSpec};
use super::{Check, Tally, recovery_summary};

/// What a SQLite race does.
#[derive(Debug, Clone)]
pub struct SqliteRace {
    /// Tasks to publish.
    pub tasks: usize,
    /// Processes to kill, one at a time (a worker or, while it still has work, the publisher).
    pub kills: usize,
    /// The pause between kills: a random time up to this long.
    pub pause: Duration,
    /// Each worker's task slots.
    pub concurrency: usize,
    /// How long the run may wait with no task finishing before it counts the rest as lost.
    pub stall: Duration,
}

/// A worker of the race: its spec, its process, and the log of its current life.
struct RacingWorker {
    spec: WorkerSpec,
    process: Killable,
    log: PathBuf,
    lives: usize,
}

/// Runs the race with `exe` as `wasmq`, in `dir` (where the SQLite file is made).
///
/// # Errors
/// When a process cannot be started or the file cannot be read afterwards. Lost tasks are
/// not an error: they are what the [`Tally`] reports.
pub async fn run(exe: &Path, dir: &Path, options: &SqliteRace) -> anyhow::Result<Tally> {
    let ledger = Ledger::new(options.tasks);
    let file = dir.join("race.db");
    let url = format!("sqlite://{}", file.display());
    let wasmq = Wasmq {
        exe: exe.to_owned(),
        dir: dir.to_owned(),
    };
    let queue = ledger.run.clone();
    let mut outcomes = Outcomes::new(&ledger);
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        let spec = WorkerSpec {
            broker: url.clone(),
            results: url.clone(),
            queue: queue.clone(),
            node: format!("{}-{name}@chaos", ledger.run),
            concurrency: options.concurrency,
            extra: Vec::new(),
        };
        let log = dir.join(format!("worker-{name}-0.log"));
        outcomes.watch(log.clone());
        let process = wasmq.start_worker(&spec, &log)?;
        workers.push(RacingWorker {
            spec,
            process,
            log,
            lives: 0,
        });
    }
    let publish_from = |first: usize| -> anyhow::Result<Publisher> {
        let lines = (first..options.tasks).map(|i| ledger.line(i)).collect();
        wasmq.start_publisher(&url, &url, &queue, lines)
    };
    let mut publisher = Some(publish_from(0)?);
    let mut confirmed = HashSet::new();
    let mut recoveries = Vec::new();
    // A restarted worker's recovery ends with the first success in its new log.
    let mut recovering: Vec<(PathBuf, Instant)> = Vec::new();
    let started = Instant::now();
    let mut faults = 0;
    for _ in 0..options.kills {
        let pause = Duration::from_millis(rand::random_range(0..=options.pause.as_millis() as u64));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            outcomes.refresh()?;
            recovering.retain(|(log, killed_at)| {
                let recovered = outcomes.logged_in(log) > 0;
                if recovered {
                    recoveries.push(killed_at.elapsed());
                }
                !recovered
            });
        }
        let publishing = publisher.as_mut().is_some_and(|p| !p.has_exited());
        let victim = rand::random_range(0..if publishing { 3 } else { 2 });
        faults += 1;
        if victim == 2 {
            let killed = publisher.take().expect("publishing").kill();
            let resume = killed
                .iter()
                .filter_map(|id| ledger.index(id))
                .max()
                .map_or(0, |i| i + 1);
            confirmed.extend(killed);
            publisher = Some(publish_from(resume)?);
            continue;
        }
        let worker = &mut workers[victim];
        worker.process.kill();
        let killed_at = Instant::now();
        worker.lives += 1;
        worker.log = dir.join(format!(
            "worker-{}-{}.log",
            if victim == 0 { "a" } else { "b" },
            worker.lives
        ));
        outcomes.watch(worker.log.clone());
        worker.process = wasmq.start_worker(&worker.spec, &worker.log)?;
        recovering.push((worker.log.clone(), killed_at));
    }
    if let Some(publisher) = publisher.take() {
        confirmed.extend(publisher.wait(Duration::from_secs(300))?);
    }
    let confirmed: Vec<String> = confirmed.into_iter().collect();
    outcomes
        .wait_until(options.stall, |o| {
            confirmed.iter().all(|id| o.has_finished(id))
        })
        .await?;
    for (log, killed_at) in recovering {
        if outcomes.logged_in(&log) > 0 {
            // Its first success came after the kills stopped being watched: an upper bound.
            recoveries.push(killed_at.elapsed());
        }
    }
    let took = started.elapsed();
    let broker = crate::broker::connect(&url).context("cannot open the broker")?;
    super::settle(&*broker, &queue, &mut outcomes, options.stall).await?;
    for worker in &mut workers {
        worker.process.terminate(Duration::from_secs(10));
    }

    let backend = crate::results::connect(&url, Duration::from_secs(3600), &url)
        .context("cannot open the result backend")?;
    let (completed, lost, wrong) = ledger.verify(&*backend, &confirmed).await?;
    let left = broker.queue_length(&queue).await.unwrap_or(u64::MAX);
    let dead = broker
        .dead_letters(&queue, 10)
        .await
        .map(|d| d.len())
        .unwrap_or(0);
    let checks = vec![
        integrity_check(&file)?,
        Check::new(format!("left in the queue: {left}"), left == 0),
        Check::new(format!("dead letters: {dead}"), dead == 0),
    ];
    for worker in &workers {
        clean_up(&*broker, &queue, &worker.spec.node, &url, &[]).await;
    }
    let (mean_recovery, worst_recovery) = recovery_summary(&recoveries);
    Ok(Tally {
        scenario: "sqlite-race (2 workers + publisher)".to_owned(),
        sent: confirmed.len(),
        completed,
        lost,
        wrong,
        duplicated: outcomes.duplicated(),
        faults,
        mean_recovery,
        worst_recovery,
        took,
        checks,
    })
}
