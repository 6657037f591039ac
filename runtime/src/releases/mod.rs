//! Releases and the plugin store: where a fleet's plugins and what each tenant serves live.
//!
//! The store is content-addressed: a plugin's bytes are kept under their SHA-256, so a blob
//! is fetched by the digest a signed release names and checked against it, and a rollback
//! finds the old bytes still there. Beside the blobs it keeps each tenant's releases by
//! epoch (an epoch is taken once: two deploys racing cannot both publish epoch 7) and each
//! node's report of what it serves (`wasmq fleet`).
//!
//! Two stores, behind [`PluginStore`]: the embedded database file ([`EmbeddedStore`],
//! `sqlite://…`, the same file the embedded broker uses on one machine) and Redis
//! ([`RedisStore`], `redis://…`), which every worker of a RabbitMQ fleet can reach. Redis
//! was chosen over a shared folder (it needs a shared file system the fleet may not have)
//! and over RabbitMQ messages (a queue is not a cache, and a new worker must find the
//! *current* set, which a fanout cannot replay). An OCI registry client would be a third
//! implementation of the trait.

mod embedded;
mod manifest;
mod redis;

use std::sync::Arc;

pub use embedded::EmbeddedStore;
pub use manifest::{CANARY_BUCKETS, Canary, RELEASE_FORMAT, Release, SignedRelease, canary_bucket};
pub use redis::RedisStore;
use serde::{Deserialize, Serialize};

/// Errors of a plugin store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// Redis failed.
    #[error("plugin store {store}: {source}")]
    Redis {
        /// The store, without credentials.
        store: String,
        /// The cause.
        #[source]
        source: ::redis::RedisError,
    },
    /// The epoch is not above the tenant's latest: another deploy took it first.
    #[error("tenant {tenant} is already at epoch {latest}; epoch {epoch} cannot be published")]
    EpochTaken {
        /// The tenant.
        tenant: String,
        /// The epoch refused.
        epoch: u64,
        /// The latest epoch.
        latest: u64,
    },
    /// Something stored does not parse.
    #[error("plugin store {store}: {what} is corrupt: {reason}")]
    Corrupt {
        /// The store.
        store: String,
        /// What was read.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The URL names no store wasmq knows.
    #[error("{0:?} is not a plugin store: use sqlite://PATH or redis://HOST:PORT/DB")]
    Url(String),
}

impl StoreError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(e) => e.is_transient(),
            StoreError::Redis { source, .. } => crate::redis_client::is_transient(source),
            StoreError::EpochTaken { .. } | StoreError::Corrupt { .. } | StoreError::Url(_) => {
                false
            }
        }
    }
}

/// What one node reports of one tenant's release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The tenant.
    pub tenant: String,
    /// The worker's node name.
    pub node: String,
    /// The epoch it serves, if any.
    pub serving: Option<u64>,
    /// The latest epoch it could not apply, and why (it keeps serving `serving`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<(u64, String)>,
    /// The plugins it serves: name → digest (the canary's as `name (canary)`).
    #[serde(default)]
    pub plugins: std::collections::BTreeMap<String, String>,
    /// When it reported, in milliseconds since the Unix epoch.
    pub updated_ms: i64,
    /// The node stopped (a clean shutdown): not waited for, not counted as behind.
    #[serde(default)]
    pub stopped: bool,
}

/// Where plugin blobs, releases and node reports are kept.
#[async_trait::async_trait]
pub trait PluginStore: Send + Sync + std::fmt::Debug {
    /// The store, for logs (no credentials).
    fn describe(&self) -> String;
    /// Stores `bytes` under their SHA-256 (idempotent); returns the digest.
    async fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError>;
    /// The bytes stored under `digest`, if any (not checked: the caller checks the digest).
    async fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Publishes a release of `tenant` at `epoch`, which must be above its latest.
    async fn publish(
        &self,
        tenant: &str,
        epoch: u64,
        release: &SignedRelease,
    ) -> Result<(), StoreError>;
    /// The tenant's latest epoch (a cheap read, polled by every worker).
    async fn latest_epoch(&self, tenant: &str) -> Result<Option<u64>, StoreError>;
    /// The tenant's release at `epoch`.
    async fn release(&self, tenant: &str, epoch: u64) -> Result<Option<SignedRelease>, StoreError>;
    /// Every release of the tenant with the epoch it is listed under, oldest first.
    async fn releases(&self, tenant: &str) -> Result<Vec<(u64, SignedRelease)>, StoreError>;
    /// Records a node's report (replacing its previous one).
    async fn report(&self, report: &NodeReport) -> Result<(), StoreError>;
    /// Every node's latest report for `tenant`.
    async fn fleet(&self, tenant: &str) -> Result<Vec<NodeReport>, StoreError>;

    /// The tenant's latest release.
    async fn latest(&self, tenant: &str) -> Result<Option<SignedRelease>, StoreError> {
        match self.latest_epoch(tenant).await? {
            Some(epoch) => self.release(tenant, epoch).await,
            None => Ok(None),
        }
    }
}

/// Opens the store at `url`: `sqlite://PATH` or `redis://HOST:PORT/DB` (`rediss://` too).
///
/// # Errors
/// An unknown scheme, a bad URL, or an embedded file that cannot be opened.
pub fn open(url: &str) -> Result<Arc<dyn PluginStore>, StoreError> {
    if let Some(path) = crate::db::parse_url(url) {
        return Ok(Arc::new(EmbeddedStore::open(&path)?));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(RedisStore::open(url)?));
    }
    Err(StoreError::Url(url.to_owned()))
}

fn corrupt(store: &str, what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        store: store.to_owned(),
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}
