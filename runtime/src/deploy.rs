//! Following releases: a worker serves what its tenant's latest signed release names.
//!
//! A [`ReleaseFollower`] polls the plugin store for its tenant's latest epoch (one cheap
//! read), and at once when the broker rings a release doorbell (RabbitMQ: `wasmq deploy
//! --broker`); when it is newer than the one served: reads the release, verifies its
//! signature with the tenant's trusted keys and that it was signed for this tenant and
//! this epoch (an old manifest published again is refused as a replay), fetches only the
//! blobs it does not already serve and checks each one's digest, then hands it to the
//! registry, which loads every plugin off the executor and swaps all at once
//! ([`Registry::apply_release`]). A release that fails is reported with its reason and not
//! retried until a newer one appears; the previous one keeps serving. A store that cannot
//! be reached is retried at the next poll.
//!
//! The node reports what it serves to the store after every change and every few seconds
//! (`wasmq fleet`). A worker that was down, or a new one, catches up when it starts
//! ([`ReleaseFollower::start`]): the latest release, or — if that one cannot be applied —
//! the newest earlier one that can, so a new node serves what the fleet served before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use crate::broker::ReleaseBell;
use crate::registry::{Registry, ReleaseError};
use crate::releases::{NodeReport, PluginStore, StoreError};
use crate::signing::TrustPolicy;

/// How often a worker asks the store for its tenant's latest epoch.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often a node reports what it serves when nothing changes.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Earlier releases tried at start when the latest cannot be applied.
const FALLBACK_DEPTH: u64 = 5;

/// Keeps one tenant's registry on the tenant's latest release.
pub struct ReleaseFollower {
    store: Arc<dyn PluginStore>,
    registry: Arc<Registry>,
    trust: TrustPolicy,
    node: String,
    /// The latest epoch that could not be applied, and why.
    failed: Mutex<Option<(u64, String)>>,
}

impl std::fmt::Debug for ReleaseFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseFollower")
            .field("tenant", &self.trust.tenant)
            .field("store", &self.store.describe())
            .finish_non_exhaustive()
    }
}

impl ReleaseFollower {
    /// A follower of `trust.tenant`'s releases in `store`, serving them in `registry`, as
    /// node `node`.
    pub fn new(
        store: Arc<dyn PluginStore>,
        registry: Arc<Registry>,
        trust: TrustPolicy,
        node: &str,
    ) -> Self {
        Self {
            store,
            registry,
            trust,
            node: node.to_owned(),
            failed: Mutex::new(None),
        }
    }

    fn tenant(&self) -> &str {
        &self.trust.tenant
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, Option<(u64, String)>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Catches up when the worker starts: serves the latest release, or the newest of the
    /// few before it that applies. Returns the epoch served, if any.
    ///
    /// # Errors
    /// When the store cannot be read: the worker should not start serving nothing.
    pub async fn start(&self) -> Result<Option<u64>, StoreError> {
        let Some(latest) = self.store.latest_epoch(self.tenant()).await? else {
            tracing::warn!(tenant = self.tenant(), store = %self.store.describe(),
                "no release yet: tasks stay unknown until `wasmq deploy`");
            self.report().await;
            return Ok(None);
        };
        for epoch in (latest.saturating_sub(FALLBACK_DEPTH).max(1)..=latest).rev() {
            match self.apply(epoch).await {
                Ok(()) => break,
                Err(ReleaseError::Store(error)) => return Err(error),
                Err(error) => {
                    tracing::error!(
                        tenant = self.tenant(),
                        epoch,
                        "cannot serve this release: {error}"
                    );
                    let mut failed = self.failed();
                    if failed.is_none() {
                        *failed = Some((epoch, error.to_string()));
                    }
                }
            }
        }
        self.report().await;
        Ok(self.registry.snapshot().epoch())
    }

    /// Applies the tenant's latest release if it is newer than the one served and has not
    /// failed already. Returns the epoch applied, if one was.
    ///
    /// # Errors
    /// Why the latest release was not applied (the previous one keeps serving).
    pub async fn check(&self) -> Result<Option<u64>, ReleaseError> {
        let Some(latest) = self.store.latest_epoch(self.tenant()).await? else {
            return Ok(None);
        };
        let serving = self.registry.snapshot().epoch();
        if serving.is_some_and(|s| latest <= s)
            || self.failed().as_ref().is_some_and(|(e, _)| *e == latest)
        {
            return Ok(None);
        }
        match self.apply(latest).await {
            Ok(()) => {
                *self.failed() = None;
                Ok(Some(latest))
            }
            Err(error) => {
                if !error.is_transient() {
                    *self.failed() = Some((latest, error.to_string()));
                }
                Err(error)
            }
        }
    }

    /// Reads, verifies, fetches and serves the release at `epoch`.
    async fn apply(&self, epoch: u64) -> Result<(), ReleaseError> {
        let started = Instant::now();
        let signed = self
            .store
            .release(self.tenant(), epoch)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                store: self.store.describe(),
                what: format!("release {}/{epoch}", self.tenant()),
                reason: "listed as the latest but absent".into(),
            })?;
        let release = signed
            .verify(&self.trust.keys, self.tenant())
            .map_err(|source| ReleaseError::Untrusted { epoch, source })?;
        if release.epoch != epoch {
            return Err(ReleaseError::Misfiled {
                listed: epoch,
                signed: release.epoch,
            });
        }
        let snapshot = self.registry.snapshot();
        if let Some(serving) = snapshot.epoch()
            && epoch <= serving
        {
            return Err(ReleaseError::Stale { epoch, serving });
        }
        let mut blobs = HashMap::new();
        for (plugin, digest) in release.digests() {
            if snapshot.serves_digest(&digest) || blobs.contains_key(&digest) {
                continue;
            }
            let bytes =
                self.store
                    .blob(&digest)
                    .await?
                    .ok_or_else(|| ReleaseError::MissingBlob {
                        epoch,
                        plugin: plugin.clone(),
                        digest: digest.clone(),
                    })?;
            blobs.insert(digest, bytes);
        }
        let fetched = started.elapsed();
        self.registry.apply_release(&release, &blobs).await?;
        tracing::info!(
            tenant = self.tenant(),
            epoch,
            signed_by = %signed.key_id,
            plugins = ?release.plugins.keys().collect::<Vec<_>>(),
            canary = ?release.canary.as_ref().map(|c| format!("{} {}%", c.plugin, c.percent)),
            fetched_in = ?fetched,
            applied_in = ?started.elapsed(),
            "serving release"
        );
        Ok(())
    }

    /// Writes this node's report to the store (logged, never fatal).
    pub async fn report(&self) {
        self.write_report(false).await;
    }

    /// Reports that this node stopped, so deploys do not wait for it.
    pub async fn report_stopped(&self) {
        self.write_report(true).await;
    }

    async fn write_report(&self, stopped: bool) {
        let snapshot = self.registry.snapshot();
        let report = NodeReport {
            tenant: self.tenant().to_owned(),
            node: self.node.clone(),
            serving: snapshot.epoch(),
            failed: self.failed().clone(),
            plugins: snapshot.plugins(),
            updated_ms: chrono::Utc::now().timestamp_millis(),
            stopped,
        };
        if let Err(error) = self.store.report(&report).await {
            tracing::warn!(
                tenant = self.tenant(),
                "cannot report to the plugin store: {error}"
            );
        }
    }

    /// Polls the store every `interval`, and at once on a doorbell for this tenant
    /// (`bells`, when the broker carries them), until the returned task is aborted,
    /// applying each new release and reporting.
    pub fn follow(
        self: Arc<Self>,
        interval: Duration,
        mut bells: Option<tokio::sync::mpsc::Receiver<ReleaseBell>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut reported = Instant::now();
                loop {
                    let rung = async {
                        match bells.as_mut() {
                            Some(bells) => bells.recv().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = tick.tick() => {}
                        bell = rung => match bell {
                            Some(bell) if bell.tenant != self.tenant() => continue,
                            Some(_) => {}
                            // The broker's listener is gone: polling goes on.
                            None => bells = None,
                        },
                    }
                    let changed = match self.check().await {
                        Ok(applied) => applied.is_some(),
                        Err(error) if error.is_transient() => {
                            tracing::warn!(
                                tenant = self.tenant(),
                                "cannot read the plugin store; retrying: {error}"
                            );
                            false
                        }
                        Err(error) => {
                            let serving = self.registry.snapshot().epoch();
                            tracing::error!(tenant = self.tenant(), serving = ?serving,
                                "release refused; the one served keeps serving: {error}");
                            true
                        }
                    };
                    if changed || reported.elapsed() >= REPORT_INTERVAL {
                        self.report().await;
                        reported = Instant::now();
                    }
                }
            }
            .in_current_span(),
        )
    }
}
