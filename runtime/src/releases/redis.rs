//! The plugin store in Redis, which every worker of a fleet can reach:
//!
//! ```text
//! wasmq:plugins:blob:<sha256>     the plugin's bytes
//! wasmq:releases:<tenant>         hash: epoch → signed release (JSON)
//! wasmq:releases:<tenant>:latest  the latest epoch (what every worker polls)
//! wasmq:fleet:<tenant>            hash: node → its report (JSON)
//! ```
//!
//! A release is published by one script that compares the epoch with the latest and writes
//! both keys, so two deploys racing for one epoch cannot both win.

use ::redis::AsyncCommands as _;
use ::redis::aio::ConnectionManager;

use super::{NodeReport, PluginStore, SignedRelease, StoreError, corrupt};
use crate::redis_client::RedisClient;
use crate::signing::sha256_hex;

/// Publishes ARGV[2] at epoch ARGV[1] unless the latest (KEYS[1]) is at or above it;
/// returns -1 when published, else the latest epoch.
const PUBLISH_SCRIPT: &str = r"
local latest = redis.call('GET', KEYS[1])
if latest and tonumber(latest) >= tonumber(ARGV[1]) then
    return tonumber(latest)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return -1
";

/// The plugin store in Redis.
pub struct RedisStore {
    redis: RedisClient,
    publish: ::redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisStore").field(&self.redis).finish()
    }
}

fn blob_key(digest: &str) -> String {
    format!("wasmq:plugins:blob:{digest}")
}
fn releases_key(tenant: &str) -> String {
    format!("wasmq:releases:{tenant}")
}
fn latest_key(tenant: &str) -> String {
    format!("wasmq:releases:{tenant}:latest")
}
fn fleet_key(tenant: &str) -> String {
    format!("wasmq:fleet:{tenant}")
}

impl RedisStore {
    /// A store at `url` (`redis://[user:password@]host:port/db`); connects on first use.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let redis = RedisClient::open(url).map_err(|source| StoreError::Redis {
            store: url.split('@').next_back().unwrap_or(url).to_owned(),
            source,
        })?;
        Ok(Self {
            redis,
            publish: ::redis::Script::new(PUBLISH_SCRIPT),
        })
    }

    fn failed(&self, source: ::redis::RedisError) -> StoreError {
        StoreError::Redis {
            store: self.redis.describe().to_owned(),
            source,
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.redis.connection().await.map_err(|e| self.failed(e))
    }

    /// Deletes every key of `tenant` (its releases and reports; blobs are shared by digest
    /// and stay): for tests that must leave Redis as they found it.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn forget_tenant(&self, tenant: &str) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let _: i64 = connection
            .del(&[releases_key(tenant), latest_key(tenant), fleet_key(tenant)])
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl PluginStore for RedisStore {
    fn describe(&self) -> String {
        self.redis.describe().to_owned()
    }

    async fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = sha256_hex(bytes);
        let mut connection = self.connection().await?;
        let _: bool = connection
            .set_nx(blob_key(&digest), bytes)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(digest)
    }

    async fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut connection = self.connection().await?;
        connection
            .get(blob_key(digest))
            .await
            .map_err(|e| self.failed(e))
    }

    async fn publish(
        &self,
        tenant: &str,
        epoch: u64,
        release: &SignedRelease,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let signed = serde_json::to_string(release).unwrap_or_default();
        let latest: i64 = self
            .publish
            .key(latest_key(tenant))
            .key(releases_key(tenant))
            .arg(epoch)
            .arg(signed)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.failed(e))?;
        match u64::try_from(latest) {
            Ok(latest) => Err(StoreError::EpochTaken {
                tenant: tenant.to_owned(),
                epoch,
                latest,
            }),
            Err(_) => Ok(()),
        }
    }

    async fn latest_epoch(&self, tenant: &str) -> Result<Option<u64>, StoreError> {
        let mut connection = self.connection().await?;
        connection
            .get(latest_key(tenant))
            .await
            .map_err(|e| self.failed(e))
    }

    async fn release(&self, tenant: &str, epoch: u64) -> Result<Option<SignedRelease>, StoreError> {
        let mut connection = self.connection().await?;
        let text: Option<String> = connection
            .hget(releases_key(tenant), epoch)
            .await
            .map_err(|e| self.failed(e))?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| corrupt(&self.describe(), &format!("release {tenant}/{epoch}"), e))
        })
        .transpose()
    }

    async fn releases(&self, tenant: &str) -> Result<Vec<(u64, SignedRelease)>, StoreError> {
        let mut connection = self.connection().await?;
        let mut all: Vec<(u64, String)> = connection
            .hgetall(releases_key(tenant))
            .await
            .map_err(|e| self.failed(e))?;
        all.sort_by_key(|(epoch, _)| *epoch);
        all.iter()
            .map(|(epoch, t)| {
                let signed = serde_json::from_str(t).map_err(|e| {
                    corrupt(&self.describe(), &format!("release {tenant}/{epoch}"), e)
                })?;
                Ok((*epoch, signed))
            })
            .collect()
    }

    async fn report(&self, report: &NodeReport) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let text = serde_json::to_string(report).unwrap_or_default();
        let _: i64 = connection
            .hset(fleet_key(&report.tenant), &report.node, text)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn fleet(&self, tenant: &str) -> Result<Vec<NodeReport>, StoreError> {
        let mut connection = self.connection().await?;
        let all: Vec<(String, String)> = connection
            .hgetall(fleet_key(tenant))
            .await
            .map_err(|e| self.failed(e))?;
        let mut reports = all
            .iter()
            .map(|(node, t)| {
                serde_json::from_str(t)
                    .map_err(|e| corrupt(&self.describe(), &format!("the report of {node}"), e))
            })
            .collect::<Result<Vec<NodeReport>, _>>()?;
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(reports)
    }
}
