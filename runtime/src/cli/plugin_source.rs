//! Where a worker's (or a tenant's) plugins come from: its folder, watched for hot deploys
//! and checked against its trust policy, or its plugin store's signed releases, followed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::exit::{ExitStatus, Failure};
use crate::broker::Broker;
use crate::deploy::{POLL_INTERVAL, ReleaseFollower};
use crate::engine::Sandbox;
use crate::registry::Registry;
use crate::signing::TrustPolicy;

/// How often a plugin folder is rescanned.
const FOLDER_INTERVAL: Duration = Duration::from_millis(500);

/// A registry and what keeps it current.
pub(super) struct PluginSource {
    /// The registry the worker looks tasks up in.
    pub(super) registry: Arc<Registry>,
    keeper: tokio::task::JoinHandle<()>,
    follower: Option<Arc<ReleaseFollower>>,
}

impl PluginSource {
    /// Stops following; a release follower reports the node stopped.
    pub(super) async fn stop(self) {
        self.keeper.abort();
        if let Some(follower) = self.follower {
            follower.report_stopped().await;
        }
    }
}

/// A registry serving `folder` or, with a store, `trust.tenant`'s releases, kept current
/// until [`PluginSource::stop`].
pub(super) async fn serve_plugins(
    sandbox: Arc<Sandbox>,
    folder: &Path,
    store: Option<&str>,
    trust: &TrustPolicy,
    node: &str,
    broker: &Arc<dyn Broker>,
) -> Result<PluginSource, Failure> {
    let who = |e: &dyn std::fmt::Display| format!("tenant {:?}: {e}", trust.tenant);
    if let Some(url) = store {
        let store = crate::releases::open(url).map_err(|e| Failure::bad_input(who(&e)))?;
        let registry = Arc::new(Registry::for_releases(sandbox, &trust.tenant));
        let follower = Arc::new(ReleaseFollower::new(
            Arc::clone(&store),
            Arc::clone(&registry),
            trust.clone(),
            node,
        ));
        let epoch = follower.start().await.map_err(|e| {
            Failure::new(
                ExitStatus::Internal,
                anyhow::anyhow!("{}", who(&format!("cannot read the plugin store: {e}"))),
            )
        })?;
        tracing::info!(tenant = %trust.tenant, store = %store.describe(), epoch = ?epoch,
            "following the plugin store's releases");
        // Doorbells from the broker, when it carries them; polling covers a missed one.
        let bells = broker.release_bells().await.unwrap_or_else(|error| {
            tracing::warn!(tenant = %trust.tenant, "no release doorbells, polling only: {error}");
            None
        });
        let keeper = Arc::clone(&follower).follow(POLL_INTERVAL, bells);
        return Ok(PluginSource {
            registry,
            keeper,
            follower: Some(follower),
        });
    }
    let policy = trust.is_active().then(|| trust.clone());
    let registry = Arc::new(
        Registry::load_folder(sandbox, folder, policy)
            .await
            .map_err(|e| Failure::new(ExitStatus::BadPlugin, anyhow::anyhow!("{}", who(&e))))?,
    );
    let keeper = registry.watch(FOLDER_INTERVAL);
    Ok(PluginSource {
        registry,
        keeper,
        follower: None,
    })
}
