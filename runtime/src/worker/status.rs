//! What a worker reports about itself: its counters, when consumption stops and resumes (a
//! broker reconnect), and the status file `wasmq status` turns into an exit code — so
//! readiness reflects actual consumption, not merely a live process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;

use super::Shared;
use crate::engine::LimitKind;

/// Counters of what a worker did.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Messages taken from the broker.
    pub received: AtomicU64,
    /// Tasks that succeeded.
    pub succeeded: AtomicU64,
    /// Tasks that ended as FAILURE (including limits and traps).
    pub failed: AtomicU64,
    /// Tasks sent back for a retry.
    pub retried: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Messages released for redelivery (shutdown, storage errors).
    pub released: AtomicU64,
    /// Tasks that ended REVOKED: revoked (not run, or interrupted) or expired.
    pub revoked: AtomicU64,
    /// Messages handed back to the broker to wait (eta not due, rate limit).
    pub deferred: AtomicU64,
    /// Messages settled one way or another (acked, dead-lettered, released): with
    /// `received`, how many the worker holds now.
    pub settled: AtomicU64,
    /// Tasks started, per task name (Celery's `total` in `inspect stats`).
    started_by_task: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Sandbox calls a limit stopped, by [`LimitKind::index`].
    limit_hits: [AtomicU64; LimitKind::ALL.len()],
}

impl WorkerStats {
    /// Counts a sandbox call stopped by a `kind` limit.
    pub(super) fn count_limit_hit(&self, kind: LimitKind) {
        self.limit_hits[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Sandbox calls a limit stopped so far, by limit name (`fuel`, `memory`, `time`,
    /// `stack`, `output`), every kind listed.
    pub fn limit_hits(&self) -> std::collections::BTreeMap<&'static str, u64> {
        LimitKind::ALL
            .iter()
            .map(|kind| {
                (
                    kind.name(),
                    self.limit_hits[kind.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Counts a start of task `name`.
    pub(super) fn count_start(&self, name: &str) {
        let mut started = self
            .started_by_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match started.get_mut(name) {
            Some(count) => *count += 1,
            None => {
                started.insert(name.to_owned(), 1);
            }
        }
    }

    /// Tasks started so far, per task name.
    pub fn started_by_task(&self) -> std::collections::BTreeMap<String, u64> {
        self.started_by_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, count)| (name.clone(), *count))
            .collect()
    }
}

/// Logs when consumption starts and stops (a broker reconnect), and keeps the status file
/// current, so readiness reflects actual consumption.
pub(super) async fn report(shared: Arc<Shared>, mut consuming: tokio::sync::watch::Receiver<bool>) {
    let mut last = *consuming.borrow();
    let mut consumed_before = last;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut settled = false;
    loop {
        let now = *consuming.borrow();
        if now != last {
            if now && consumed_before {
                tracing::info!("consuming again after reconnecting to the broker");
            } else if !now {
                tracing::warn!("not consuming: the broker connection is down; reconnecting");
            }
            consumed_before |= now;
            last = now;
        }
        shared.consuming.store(now, Ordering::Relaxed);
        if let Some(path) = &shared.options.status_file {
            write(
                path,
                &shared,
                now,
                if now { "consuming" } else { "reconnecting" },
            );
        }
        // A broker that never stops consuming (the embedded one) drops its sender at once:
        // the status file is still rewritten every second, so it stays fresh.
        if settled {
            tick.tick().await;
        } else {
            tokio::select! {
                changed = consuming.changed() => settled = changed.is_err(),
                _ = tick.tick() => {}
            }
        }
    }
}

/// The worker's status: its counters, what it runs and holds now, and where it consumes.
pub(super) fn snapshot(shared: &Shared, consuming: bool, state: &str) -> serde_json::Value {
    let stats = &shared.stats;
    let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let running = shared.running_tasks() as u64;
    let received = load(&stats.received);
    let settled = load(&stats.settled);
    serde_json::json!({
        "node": shared.options.node_name,
        "tenant": shared.options.tenant.as_ref().map(|t| t.name.clone()),
        "pid": std::process::id(),
        "state": state,
        "consuming": consuming,
        "queues": shared.options.queues,
        "broker": shared.broker.describe(),
        "updated": crate::protocol::format_time(&Utc::now()),
        "running": running,
        // Task slots it may use now (the autoscaler moves it).
        "concurrency": shared.slots.max_concurrency(shared.seat),
        // Taken from the broker and not settled yet, less the running ones: prefetched,
        // waiting for a slot, or waiting out an eta or a rate limit.
        "queued": received.saturating_sub(settled).saturating_sub(running),
        "finished": settled,
        "received": received,
        "succeeded": load(&stats.succeeded),
        "failed": load(&stats.failed),
        "retried": load(&stats.retried),
        "dead_lettered": load(&stats.dead_lettered),
        "revoked": load(&stats.revoked),
        "deferred": load(&stats.deferred),
        "limit_hits": stats.limit_hits(),
        "plugins": plugins(&shared.registry.snapshot()),
    })
}

/// What the worker serves: the release epoch (release mode), and every plugin that failed
/// to load or was refused, with why.
fn plugins(snapshot: &crate::registry::Snapshot) -> serde_json::Value {
    let refused: Vec<serde_json::Value> = snapshot
        .broken()
        .into_iter()
        .map(|(file, why)| serde_json::json!({"file": file.display().to_string(), "reason": why}))
        .collect();
    serde_json::json!({
        "epoch": snapshot.epoch(),
        "served": snapshot.plugins(),
        "failed": refused,
    })
}

/// Writes the status file atomically (temporary file, then rename).
pub(super) fn write(path: &Path, shared: &Shared, consuming: bool, state: &str) {
    write_json(path, &snapshot(shared, consuming, state));
}

/// Writes `status` to `path` atomically (temporary file, then rename).
pub(crate) fn write_json(path: &Path, status: &serde_json::Value) {
    // A temporary file of its own per write: the periodic writer and the last one at shutdown
    // (or several tenants' workers) never rename each other's half-written file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written =
        std::fs::write(&tmp, status.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        tracing::warn!(%error, path = %path.display(), "cannot write the status file");
    }
}
