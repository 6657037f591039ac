//! The plugin store in the embedded database file: blobs, releases and node reports in three
//! tables beside the broker's, shared by every process on the machine through SQLite.

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use super::{NodeReport, PluginStore, SignedRelease, StoreError, corrupt};
use crate::db::{Db, now_ms};
use crate::signing::sha256_hex;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS plugin_blobs (
    digest TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    stored INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    tenant TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    signed TEXT NOT NULL,
    stored INTEGER NOT NULL,
    PRIMARY KEY (tenant, epoch)
);
CREATE TABLE IF NOT EXISTS fleet (
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (tenant, node)
);
";

/// The plugin store in an embedded database file.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Db,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in the database file at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: Db::open(path, SCHEMA)?,
        })
    }

    fn name(&self) -> String {
        format!("sqlite://{}", self.db.path().display())
    }

    /// The JSON values of `sql`'s one column for `tenant`, parsed; `what` names a row in
    /// errors.
    async fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        sql: &'static str,
        tenant: &str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let key = tenant.to_owned();
        let texts: Vec<String> = self
            .db
            .run(move |conn| {
                let mut statement = conn.prepare(sql)?;
                let rows = statement.query_map([key], |row| row.get(0))?;
                rows.collect()
            })
            .await?;
        texts
            .iter()
            .map(|t| {
                serde_json::from_str(t)
                    .map_err(|e| corrupt(&self.name(), &format!("{what} of {tenant}"), e))
            })
            .collect()
    }
}

/// The tenant's latest epoch, read in the caller's transaction.
fn latest_in(conn: &rusqlite::Connection, tenant: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT MAX(epoch) FROM releases WHERE tenant = ?1",
        [tenant],
        |row| row.get(0),
    )
}

fn epoch_i64(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl PluginStore for EmbeddedStore {
    fn describe(&self) -> String {
        self.name()
    }

    async fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = sha256_hex(bytes);
        let (key, bytes) = (digest.clone(), bytes.to_vec());
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT OR IGNORE INTO plugin_blobs (digest, bytes, stored) VALUES (?1, ?2, ?3)",
                    params![key, bytes, now_ms()],
                )
            })
            .await?;
        Ok(digest)
    }

    async fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let digest = digest.to_owned();
        Ok(self
            .db
            .run(move |conn| {
                conn.query_row(
                    "SELECT bytes FROM plugin_blobs WHERE digest = ?1",
                    [digest],
                    |row| row.get(0),
                )
                .optional()
            })
            .await?)
    }

    async fn publish(
        &self,
        tenant: &str,
        epoch: u64,
        release: &SignedRelease,
    ) -> Result<(), StoreError> {
        let signed = serde_json::to_string(release).unwrap_or_default();
        let key = tenant.to_owned();
        // One transaction: the check and the insert cannot interleave with another deploy.
        let latest = self
            .db
            .run(move |conn| {
                let latest = latest_in(conn, &key)?;
                if latest.is_some_and(|l| l >= epoch_i64(epoch)) {
                    return Ok(latest);
                }
                conn.execute(
                    "INSERT INTO releases (tenant, epoch, signed, stored) VALUES (?1, ?2, ?3, ?4)",
                    params![key, epoch_i64(epoch), signed, now_ms()],
                )?;
                Ok(None)
            })
            .await?;
        match latest {
            Some(latest) => Err(StoreError::EpochTaken {
                tenant: tenant.to_owned(),
                epoch,
                latest: u64::try_from(latest).unwrap_or(0),
            }),
            None => Ok(()),
        }
    }

    async fn latest_epoch(&self, tenant: &str) -> Result<Option<u64>, StoreError> {
        let tenant = tenant.to_owned();
        let latest: Option<i64> = self.db.run(move |conn| latest_in(conn, &tenant)).await?;
        Ok(latest.and_then(|e| u64::try_from(e).ok()))
    }

    async fn release(&self, tenant: &str, epoch: u64) -> Result<Option<SignedRelease>, StoreError> {
        let key = tenant.to_owned();
        let text: Option<String> = self
            .db
            .run(move |conn| {
                conn.query_row(
                    "SELECT signed FROM releases WHERE tenant = ?1 AND epoch = ?2",
                    params![key, epoch_i64(epoch)],
                    |row| row.get(0),
                )
                .optional()
            })
            .await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| corrupt(&self.name(), &format!("release {tenant}/{epoch}"), e))
        })
        .transpose()
    }

    async fn releases(&self, tenant: &str) -> Result<Vec<(u64, SignedRelease)>, StoreError> {
        let key = tenant.to_owned();
        let rows: Vec<(i64, String)> = self
            .db
            .run(move |conn| {
                let mut statement = conn.prepare(
                    "SELECT epoch, signed FROM releases WHERE tenant = ?1 ORDER BY epoch",
                )?;
                let rows = statement.query_map([key], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect()
            })
            .await?;
        rows.iter()
            .map(|(epoch, text)| {
                let signed = serde_json::from_str(text)
                    .map_err(|e| corrupt(&self.name(), &format!("release {tenant}/{epoch}"), e))?;
                Ok((u64::try_from(*epoch).unwrap_or(0), signed))
            })
            .collect()
    }

    async fn report(&self, report: &NodeReport) -> Result<(), StoreError> {
        let text = serde_json::to_string(report).unwrap_or_default();
        let (tenant, node) = (report.tenant.clone(), report.node.clone());
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO fleet (tenant, node, report) VALUES (?1, ?2, ?3)",
                    params![tenant, node, text],
                )
            })
            .await?;
        Ok(())
    }

    async fn fleet(&self, tenant: &str) -> Result<Vec<NodeReport>, StoreError> {
        let sql = "SELECT report FROM fleet WHERE tenant = ?1 ORDER BY node";
        self.json_rows(sql, tenant, "a report").await
    }
}
