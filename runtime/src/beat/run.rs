//! [`Beat`]: the loop every beat runs, as follower or leader. One idea — when to renew, when
//! to try for the lease, which runs are due, and what a claim's answer means — hence a file
//! longer than 400 lines.
//!
//! **Follower**: try to take the lease; when another holder has it, try again when it is due
//! to expire (the store says when), so a dead leader is replaced within the lease's TTL.
//!
//! **Leader**: renew the lease every third of its TTL. A renewal the store refuses (the lease
//! expired, or was deleted or taken) means step down at once; a renewal that fails (the store
//! is unreachable) is retried, and the leader steps down by itself once its last good renewal
//! is about a TTL old. Between renewals, sleep until the next occurrence of any entry; then,
//! for each entry whose latest occurrence at or before now is newer than its last run, claim
//! it and, if the claim is won, send it. A run older than the grace period is a *missed* run:
//! with `catch_up = "one"` it fires (once: only the latest missed occurrence is claimed), with
//! `"none"` it is skipped.
//!
//! An entry's last run is the store's (read on becoming leader, then kept up by the claims);
//! an entry the store has never run starts from when this beat first saw it (or saw its
//! schedule change), so a new entry does not fire for instants before it existed.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::time::Instant;

use super::lease::{Acquired, Claim, LeaseStore};
use super::{CatchUp, Entry, Occurrence, Schedule};
use crate::client::{Client, SendOptions};

/// How a [`Beat`] behaves.
#[derive(Debug, Clone)]
pub struct BeatOptions {
    /// Its name in logs and in its lease token. Default: `beat@<hostname>`.
    pub node_name: String,
    /// How long the lease lasts unless renewed: a dead leader is replaced within it. The
    /// leader renews it every third of it. Default: 10 s.
    pub lease_ttl: Duration,
    /// How often the schedule file is checked for changes. Default: 1 s.
    pub reload_interval: Duration,
    /// How late a run may be sent and still not count as missed. Default: 1 s.
    pub grace: Duration,
}

impl Default for BeatOptions {
    fn default() -> Self {
        Self {
            node_name: format!("beat@{}", gethostname::gethostname().to_string_lossy()),
            lease_ttl: Duration::from_secs(10),
            reload_interval: Duration::from_secs(1),
            grace: Duration::from_secs(1),
        }
    }
}

/// What a beat did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BeatStats {
    /// Occurrences it claimed and sent.
    pub sent: u64,
    /// Occurrences it claimed but could not send.
    pub lost: u64,
    /// Missed runs skipped (`catch_up = "none"`).
    pub skipped: u64,
    /// Times it became the leader.
    pub terms: u64,
    /// Times it stepped down while running.
    pub step_downs: u64,
}

/// Sends a schedule's tasks while it holds the lease; see the module docs.
pub struct Beat {
    schedule: Schedule,
    client: Client,
    store: Arc<dyn LeaseStore>,
    options: BeatOptions,
    /// Its lease token: the node name and a fresh id, unique to this run.
    holder: String,
    /// The schedule file to follow, and its size and time as last read.
    file: Option<(PathBuf, Option<FileStamp>)>,
}

impl std::fmt::Debug for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beat")
            .field("holder", &self.holder)
            .field("store", &self.store.describe())
            .field("entries", &self.schedule.entries.len())
            .finish_non_exhaustive()
    }
}

type FileStamp = (Option<SystemTime>, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.modified().ok(), meta.len()))
}

impl Beat {
    /// A beat sending `schedule`'s tasks through `client`, agreeing with other beats in
    /// `store`.
    pub fn new(
        schedule: Schedule,
        client: Client,
        store: Arc<dyn LeaseStore>,
        options: BeatOptions,
    ) -> Self {
        Self {
            holder: format!("{}/{}", options.node_name, uuid::Uuid::new_v4().simple()),
            schedule,
            client,
            store,
            options,
            file: None,
        }
    }

    /// Reloads the schedule from `path` whenever the file changes.
    #[must_use]
    pub fn watching(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let stamp = stamp(&path);
        self.file = Some((path, stamp));
        self
    }

    /// Its lease token.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Runs until `shutdown` completes, then gives the lease up if it holds it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> BeatStats {
        tokio::pin!(shutdown);
        tracing::info!(holder = %self.holder, store = %self.store.describe(),
            entries = self.schedule.entries.len(), "beat starting");
        let mut state = State::new(self);
        loop {
            let wake = state.step().await;
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        state.stop().await
    }
}

/// The lease as this beat holds it.
struct Lead {
    /// When the last successful renewal was asked (the lease lasts a TTL from then).
    renewed: Instant,
    /// When to renew next.
    next_renew: Instant,
}

/// The loop's state.
struct State {
    beat: Beat,
    /// Each entry's schedule as text and when this beat first saw it so.
    seen: HashMap<String, (String, DateTime<Utc>)>,
    /// Each entry's last claimed run, as far as this beat knows.
    last: HashMap<String, DateTime<Utc>>,
    lead: Option<Lead>,
    /// When a follower next tries to take the lease.
    next_acquire: Instant,
    /// When the schedule file is next checked.
    next_reload: Instant,
    /// When to try again after the store failed a claim.
    retry_at: Option<Instant>,
    /// Whether "following" was logged since the last change of role.
    said_following: bool,
    stats: BeatStats,
}

impl State {
    fn new(beat: Beat) -> Self {
        let now = Instant::now();
        let mut state = Self {
            seen: HashMap::new(),
            last: HashMap::new(),
            lead: None,
            next_acquire: now,
            next_reload: now + beat.options.reload_interval,
            retry_at: None,
            said_following: false,
            stats: BeatStats::default(),
            beat,
        };
        let schedule = state.beat.schedule.clone();
        state.adopt(schedule);
        state
    }

    fn ttl(&self) -> Duration {
        self.beat.options.lease_ttl
    }

    /// One turn of the loop; returns when to take the next.
    async fn step(&mut self) -> Instant {
        if Instant::now() >= self.next_reload {
            self.reload();
            self.next_reload = Instant::now() + self.beat.options.reload_interval;
        }
        self.keep_lease().await;
        if self.lead.is_some() {
            self.fire_due().await;
        }
        self.next_wake()
    }

    /// Follows the schedule file: a changed file that validates replaces the schedule.
    fn reload(&mut self) {
        let Some((path, seen)) = &mut self.beat.file else {
            return;
        };
        let now = stamp(path);
        if now == *seen {
            return;
        }
        *seen = now;
        match Schedule::load(path) {
            Ok(schedule) if schedule != self.beat.schedule => {
                tracing::info!(
                    entries = schedule.entries.len(),
                    "schedule changed; reloaded"
                );
                self.adopt(schedule);
            }
            Ok(_) => {}
            Err(error) => tracing::error!(
                error = %error,
                "the schedule file no longer validates; keeping the previous schedule"
            ),
        }
    }

    /// Takes `schedule` on; an entry new or with a changed schedule starts from now.
    fn adopt(&mut self, schedule: Schedule) {
        let now = Utc::now();
        self.seen = schedule
            .entries
            .iter()
            .map(|entry| {
                let when = entry.when.to_string();
                let since = match self.seen.get(&entry.name) {
                    Some((before, since)) if *before == when => *since,
                    _ => now,
                };
                (entry.name.clone(), (when, since))
            })
            .collect();
        self.beat.schedule = schedule;
    }

    async fn keep_lease(&mut self) {
        let ttl = self.ttl();
        let asked = Instant::now();
        if let Some(lead) = &mut self.lead {
            if asked < lead.next_renew {
                return;
            }
            match self.beat.store.renew(&self.beat.holder, ttl).await {
                Ok(true) => {
                    lead.renewed = asked;
                    lead.next_renew = asked + ttl / 3;
                }
                Ok(false) => {
                    self.step_down("lost the beat lease (it expired or was taken); following")
                }
                Err(error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cannot renew the beat lease"
                    );
                    if Instant::now() >= lead.renewed + ttl - ttl / 10 {
                        self.step_down("the beat lease could not be renewed in time; following");
                    } else {
                        lead.next_renew =
                            Instant::now() + (ttl / 10).max(Duration::from_millis(50));
                    }
                }
            }
            return;
        }
        if asked < self.next_acquire {
            return;
        }
        match self.beat.store.acquire(&self.beat.holder, ttl).await {
            Ok(Acquired::Held) => {
                self.lead = Some(Lead {
                    renewed: asked,
                    next_renew: asked + ttl / 3,
                });
                self.stats.terms += 1;
                self.said_following = false;
                let names: Vec<String> = self
                    .beat
                    .schedule
                    .entries
                    .iter()
                    .map(|e| e.name.clone())
                    .collect();
                match self.beat.store.last_runs(&names).await {
                    Ok(runs) => {
                        self.last = runs.into_iter().map(|(name, run)| (name, run.at)).collect();
                    }
                    Err(error) => tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cannot read the last runs; starting from what this beat knows"
                    ),
                }
                tracing::info!(holder = %self.beat.holder, "leading the beat");
            }
            Ok(Acquired::Busy { retry_in }) => {
                if !self.said_following {
                    tracing::info!(holder = %self.beat.holder, "another beat leads; following");
                    self.said_following = true;
                }
                self.next_acquire =
                    Instant::now() + retry_in.clamp(Duration::from_millis(10), ttl / 3);
            }
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot reach the beat lease store; retrying"
                );
                self.next_acquire = Instant::now() + (ttl / 3).min(Duration::from_secs(1));
            }
        }
    }

    fn step_down(&mut self, why: &str) {
        if self.lead.take().is_some() {
            tracing::warn!(holder = %self.beat.holder, "{why}");
            self.stats.step_downs += 1;
            self.said_following = true;
            self.next_acquire = Instant::now();
        }
    }

    /// Claims and sends each entry's due occurrence.
    async fn fire_due(&mut self) {
        self.retry_at = None;
        let entries = self.beat.schedule.entries.clone();
        for entry in entries.iter().filter(|e| e.enabled) {
            let now = Utc::now();
            let Some(at) = entry.when.latest_at_or_before(now) else {
                continue;
            };
            // The store's last run; for an entry it never ran, when this beat first saw it.
            let since = self.seen.get(&entry.name).map(|(_, since)| *since);
            let last = self.last.get(&entry.name).copied().or(since);
            if last.is_some_and(|last| at <= last) {
                continue;
            }
            let late = (now - at).to_std().unwrap_or_default();
            if entry.catch_up == CatchUp::None && late > self.beat.options.grace {
                tracing::info!(entry = %entry.name, at = %rfc3339(at),
                    "skipping a missed run (catch_up = \"none\")");
                self.last.insert(entry.name.clone(), at);
                self.stats.skipped += 1;
                continue;
            }
            let occurrence = Occurrence::new(&entry.name, at);
            let id = occurrence.task_id();
            match self
                .beat
                .store
                .claim(&self.beat.holder, &occurrence, &id)
                .await
            {
                Ok(Claim::Won) => {
                    self.last.insert(entry.name.clone(), at);
                    self.send(entry, &occurrence, id, late).await;
                }
                Ok(Claim::Taken) => {
                    tracing::debug!(entry = %entry.name, at = %rfc3339(at), "already claimed");
                    self.last.insert(entry.name.clone(), at);
                }
                Ok(Claim::NotHolder) => {
                    self.step_down("lost the beat lease (a claim was refused); following");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = &error as &dyn std::error::Error, entry = %entry.name,
                        "cannot claim a run; trying again in a second");
                    self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }

    /// Sends a claimed occurrence: a few tries, then it is logged as lost (never sent twice).
    async fn send(&mut self, entry: &Entry, occurrence: &Occurrence, id: String, late: Duration) {
        let options = SendOptions {
            task_id: Some(id.clone()),
            queue: entry.queue.clone(),
            priority: entry.priority,
            expires: entry.expires,
            headers: entry.headers.clone(),
            countdown: entry
                .jitter
                .map(|jitter| occurrence.jitter(jitter))
                .filter(|delay| !delay.is_zero()),
            ..SendOptions::default()
        };
        let patience = (self.ttl() / 4).max(Duration::from_secs(1));
        for attempt in 1..=3u32 {
            let sent = tokio::time::timeout(
                patience,
                self.beat.client.send_task(
                    &entry.task,
                    entry.args.clone(),
                    entry.kwargs.clone(),
                    options.clone(),
                ),
            )
            .await;
            match sent {
                Ok(Ok(_)) => {
                    tracing::info!(entry = %entry.name, task = %entry.task, id = %id,
                        at = %rfc3339(occurrence.at), late_ms = late.as_millis() as u64, "sent");
                    self.stats.sent += 1;
                    return;
                }
                Ok(Err(error)) => tracing::warn!(error = &error as &dyn std::error::Error,
                    entry = %entry.name, id = %id, attempt, "cannot send a claimed run"),
                Err(_) => tracing::warn!(entry = %entry.name, id = %id, attempt,
                    "sending a claimed run timed out"),
            }
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
        }
        tracing::error!(entry = %entry.name, id = %id, at = %rfc3339(occurrence.at),
            "a claimed run could not be sent and is lost (it is not sent twice)");
        self.stats.lost += 1;
    }

    /// The next time anything is due: a renewal or a run (leader), a try for the lease
    /// (follower), a look at the schedule file, a retry.
    fn next_wake(&self) -> Instant {
        let mut wake = self.next_reload;
        if let Some(retry) = self.retry_at {
            wake = wake.min(retry);
        }
        let Some(lead) = &self.lead else {
            return wake.min(self.next_acquire);
        };
        wake = wake.min(lead.next_renew);
        let now = Utc::now();
        let next_run = self
            .beat
            .schedule
            .entries
            .iter()
            .filter(|entry| entry.enabled)
            .filter_map(|entry| entry.when.next_after(now))
            .min();
        if let Some(next) = next_run {
            let wait = (next - now).to_std().unwrap_or_default();
            wake = wake.min(Instant::now() + wait);
        }
        wake
    }

    /// Gives the lease up (a follower takes over at once) and reports.
    async fn stop(mut self) -> BeatStats {
        if self.lead.take().is_some() {
            match self.beat.store.release(&self.beat.holder).await {
                Ok(()) => tracing::info!(holder = %self.beat.holder, "released the beat lease"),
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot release the beat lease; it expires by itself"
                ),
            }
        }
        tracing::info!(stats = ?self.stats, "beat stopped");
        self.stats
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}
