//! `wasmq chaos`: faults injected into real runs, and what they cost — tasks lost, wrong or
//! run twice, and how long the fleet took to recover. Each scenario drives real `wasmq`
//! processes (this binary's `worker` and `send --bulk`) against a real broker on this
//! machine, kills or disturbs them, then checks every task it sent against the result
//! backend. The CLI prints a table (`cli/chaos.rs`); `tests/all/chaos.rs` runs short
//! versions and asserts on the same [`Tally`].
//!
//! ```text
//! ledger        the tasks of a run: ids, expected results, outcomes read from logs (ledger.rs)
//! processes     wasmq child processes: workers to kill, the bulk publisher     (processes.rs)
//! kill_workers  SIGKILL a worker again and again during a drain               (kill_workers.rs)
//! sqlite_race   workers and a publisher on one SQLite file, all under kill -9 (sqlite_race.rs)
//! network       latency, stalls, resets, half-open links to RabbitMQ          (network.rs)
//!   proxy         the fault-injecting TCP proxy the worker connects through    (proxy.rs)
//! restarts      RabbitMQ and the results' Redis restarted during a drain       (restarts.rs)
//! ```
//!
//! The tasks are `math.add(i, i)` with ids `<run>-<i>`, so a result is checked against the
//! id it belongs to: **lost** is a confirmed task with no result, **wrong** a result that
//! is not `2i`, **duplicated** a task whose success was logged more than once (at-least-once
//! delivery: a worker killed between running a task and acknowledging it runs it again
//! after the restart — counted, not hidden).
//!
//! Errors are `anyhow`, as in the benchmark harness: the harness is an edge, an error ends
//! the run with a message for its operator, and no caller branches on its kind.

pub mod kill_workers;
pub mod ledger;
pub mod network;
pub mod processes;
pub mod proxy;
pub mod restarts;
pub mod sqlite_race;

use std::time::Duration;

/// What one scenario did and found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// The scenario and its broker, e.g. `kill-workers (embedded)`.
    pub scenario: String,
    /// Tasks the broker confirmed to a publisher.
    pub sent: usize,
    /// Confirmed tasks whose stored result is right.
    pub completed: usize,
    /// Confirmed tasks with no result when the run gave up waiting.
    pub lost: usize,
    /// Results that are not what the task computes.
    pub wrong: usize,
    /// Tasks whose success was logged more than once (run again after a kill).
    pub duplicated: usize,
    /// Faults injected (processes killed, connections broken).
    pub faults: usize,
    /// The slowest recovery: from a fault to the next task finished.
    pub worst_recovery: Duration,
    /// The mean recovery.
    pub mean_recovery: Duration,
    /// From the first fault to the last result.
    pub took: Duration,
    /// Other checks, e.g. SQLite's `PRAGMA integrity_check`.
    pub checks: Vec<Check>,
}

/// One check beyond the results: what was looked at and whether it held.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was found, e.g. `integrity_check: ok` or `left in the queue: 0`.
    pub found: String,
    /// Whether it is what a run without loss leaves.
    pub passed: bool,
}

impl Check {
    /// A check that `passed`, described by `found`.
    pub fn new(found: impl Into<String>, passed: bool) -> Self {
        Self {
            found: found.into(),
            passed,
        }
    }
}

impl Tally {
    /// Whether nothing was lost or wrong and every extra check passed.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.wrong == 0
            && self.sent == self.completed
            && self.checks.iter().all(|check| check.passed)
    }
}

/// The mean and the worst of `recoveries`.
pub(crate) fn recovery_summary(recoveries: &[Duration]) -> (Duration, Duration) {
    if recoveries.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let total: Duration = recoveries.iter().sum();
    (
        total / recoveries.len() as u32,
        recoveries.iter().copied().max().unwrap_or_default(),
    )
}

/// The markdown table `wasmq chaos` prints and RELIABILITY.md records.
pub fn table(tallies: &[Tally]) -> String {
    let mut out = String::from(
        "| scenario | sent | completed | lost | wrong | run twice | faults | recovery mean / worst | took | checks |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for t in tallies {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} ms | {:.1} s | {} |\n",
            t.scenario,
            t.sent,
            t.completed,
            t.lost,
            t.wrong,
            t.duplicated,
            t.faults,
            t.mean_recovery.as_millis(),
            t.worst_recovery.as_millis(),
            t.took.as_secs_f64(),
            if t.checks.is_empty() {
                "—".to_owned()
            } else {
                t.checks
                    .iter()
                    .map(|c| {
                        if c.passed {
                            c.found.clone()
                        } else {
                            format!("**FAILED** {}", c.found)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ));
    }
    out
}

/// Once every task has finished, lets the worker drain what is left — the redelivered
/// copies of tasks that already ran (a kill or a restart puts unacknowledged messages back)
/// — until `queue` is empty and no task has finished for half a second, or `within` runs
/// out. A worker stopped before that would hand those copies back, and the queue would not
/// be empty for a reason that is not a loss.
pub(crate) async fn settle(
    broker: &dyn crate::broker::Broker,
    queue: &str,
    outcomes: &mut ledger::Outcomes,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        outcomes.refresh()?;
        if broker.queue_length(queue).await.unwrap_or(u64::MAX) == 0
            && outcomes.quiet_for() > Duration::from_millis(500)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Refuses a broker or result store that is not on this machine: chaos floods and kills.
pub(crate) fn only_local(url: &str) -> anyhow::Result<()> {
    if url.starts_with("sqlite://") {
        return Ok(());
    }
    crate::bench::only_local(url).map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_is_clean_only_with_nothing_lost_or_wrong() {
        let clean = Tally {
            sent: 3,
            completed: 3,
            duplicated: 2,
            ..Tally::default()
        };
        assert!(
            clean.is_clean(),
            "tasks run twice are counted, not a failure"
        );
        assert!(
            !Tally {
                lost: 1,
                ..clean.clone()
            }
            .is_clean()
        );
        assert!(
            !Tally {
                wrong: 1,
                ..clean.clone()
            }
            .is_clean()
        );
        let failed = Check::new("integrity_check: page 3 is never used", false);
        assert!(
            !Tally {
                checks: vec![failed],
                ..clean.clone()
            }
            .is_clean()
        );
        assert!(
            !Tally {
                completed: 2,
                ..clean
            }
            .is_clean()
        );
    }

    #[test]
    fn recovery_is_summarised_as_mean_and_worst() {
        let (mean, worst) =
            recovery_summary(&[Duration::from_millis(100), Duration::from_millis(300)]);
        assert_eq!(
            (mean, worst),
            (Duration::from_millis(200), Duration::from_millis(300))
        );
        assert_eq!(recovery_summary(&[]), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn the_table_has_a_row_per_scenario() {
        let table = table(&[Tally {
            scenario: "kill-workers (embedded)".into(),
            sent: 10,
            completed: 10,
            checks: vec![Check::new("integrity_check: ok", true)],
            ..Tally::default()
        }]);
        assert!(table.contains("| kill-workers (embedded) | 10 | 10 | 0 | 0 | 0 | 0 |"));
        assert!(table.ends_with("integrity_check: ok |\n"));
    }
}
