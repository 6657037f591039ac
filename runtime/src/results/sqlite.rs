//! The embedded result backend: one row per task in the `results` table of the SQLite file
//! the embedded broker uses. Rows expire after the configured time; a stored SUCCESS is
//! never overwritten (the upsert's `WHERE` clause refuses it).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use tokio::sync::Notify;

use super::{ReplyTo, ResultBackend, ResultError, ResultMeta};
use crate::sqlite::{Db, now_ms};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS results (
    task_id    TEXT PRIMARY KEY,
    status     TEXT    NOT NULL,
    meta       TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_expiry ON results (expires_at);
";

/// Wakes this process's waiters when this process stores a result; results stored by other
/// processes are found by polling.
static LOCAL_STORE: Notify = Notify::const_new();

/// The embedded SQLite result backend.
#[derive(Debug, Clone)]
pub struct SqliteResultBackend {
    db: Db,
    expires: Duration,
}

impl SqliteResultBackend {
    /// Opens (creating if needed) the backend in the database file at `path`; results are
    /// kept for `expires`.
    ///
    /// # Errors
    /// When the file cannot be opened or initialised.
    pub fn open(path: &Path, expires: Duration) -> Result<Self, ResultError> {
        Ok(Self {
            db: Db::open(path, SCHEMA)?,
            expires,
        })
    }
}

#[async_trait]
impl ResultBackend for SqliteResultBackend {
    async fn store(&self, meta: &ResultMeta, _reply: Option<&ReplyTo>) -> Result<(), ResultError> {
        let task_id = meta.task_id.clone();
        let status = meta.status.as_str().to_owned();
        let json = serde_json::to_string(meta).expect("meta serializes");
        let ttl = i64::try_from(self.expires.as_millis()).unwrap_or(i64::MAX / 2);
        self.db
            .run(move |conn| {
                let now = now_ms();
                conn.prepare_cached(
                    "INSERT INTO results (task_id, status, meta, expires_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (task_id) DO UPDATE SET
                         status = excluded.status, meta = excluded.meta,
                         expires_at = excluded.expires_at, updated_at = excluded.updated_at
                     WHERE results.status != 'SUCCESS' OR results.expires_at < ?5",
                )?
                .execute(params![
                    task_id,
                    status,
                    json,
                    now.saturating_add(ttl),
                    now
                ])
            })
            .await?;
        LOCAL_STORE.notify_waiters();
        Ok(())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<ResultMeta, ResultError> {
        let deadline = tokio::time::Instant::now() + timeout;
        super::poll_until_ready_or_woken(self, task_id, deadline, timeout, Some(&LOCAL_STORE)).await
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError> {
        let id = task_id.to_owned();
        let json: Option<String> = self
            .db
            .run(move |conn| {
                conn.prepare_cached(
                    "SELECT meta FROM results WHERE task_id = ?1 AND expires_at >= ?2",
                )?
                .query_row(params![id, now_ms()], |r| r.get(0))
                .optional()
            })
            .await?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| ResultError::Corrupt {
                task_id: task_id.to_owned(),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    async fn purge_expired(&self) -> Result<u64, ResultError> {
        let n = self
            .db
            .run(|conn| {
                conn.execute(
                    "DELETE FROM results WHERE expires_at < ?1",
                    params![now_ms()],
                )
            })
            .await?;
        Ok(n as u64)
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.db.path().display())
    }
}
