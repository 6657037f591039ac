//! The embedded result backend: one row per task in the `results` table of the SQLite file
//! the embedded broker uses. Rows expire after the configured time; a stored SUCCESS is
//! never overwritten (the upsert's `WHERE` clause refuses it).
//!
//! Chords count in two tables, `chord_sizes` (written by the client) and `chord_parts` (one
//! row per header member, keyed so a redelivered member counts once), with Redis's
//! semantics: the part that completes the chord reads every part in `group_index` order and
//! deletes the chord, in one transaction, so exactly one worker publishes the body.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use tokio::sync::Notify;

use super::{ChordPart, ChordResults, ReplyTo, ResultBackend, ResultError, ResultMeta, TaskState};
use crate::db::{Db, now_ms};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS results (
    task_id    TEXT PRIMARY KEY,
    status     TEXT    NOT NULL,
    meta       TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_expiry ON results (expires_at);
CREATE TABLE IF NOT EXISTS chord_sizes (
    group_id   TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chord_shapes (
    group_id   TEXT PRIMARY KEY,
    shape      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chord_parts (
    group_id   TEXT    NOT NULL,
    idx        INTEGER NOT NULL,
    task_id    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    result     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, task_id, idx)
);
";

/// Wakes this process's waiters when this process stores a result; results stored by other
/// processes wake them through the file's watcher ([`Db::changed`]), or are found by polling.
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

impl SqliteResultBackend {
    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.expires.as_millis()).unwrap_or(i64::MAX / 2)
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
        // With a watcher on the file, a store by another process wakes the wait; the polls
        // are then only the fallback for a missed wake-up.
        let longest_pause = if self.db.sees_commits() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(5)
        };
        super::poll_until_ready_or_woken(
            self,
            task_id,
            deadline,
            timeout,
            &[&LOCAL_STORE, self.db.changed()],
            longest_pause,
        )
        .await
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError> {
        let id = task_id.to_owned();
        let json: Option<String> = self
            .db
            .read(move |conn| {
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

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), ResultError> {
        let gid = group_id.to_owned();
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let ttl = self.ttl_ms();
        self.db
            .run(move |conn| {
                conn.execute("DELETE FROM chord_parts WHERE group_id = ?1", params![gid])?;
                conn.execute(
                    "INSERT OR REPLACE INTO chord_sizes (group_id, size, expires_at)
                     VALUES (?1, ?2, ?3)",
                    params![gid, size, now_ms().saturating_add(ttl)],
                )
            })
            .await?;
        Ok(())
    }

    async fn save_chord_shape(&self, group_id: &str, shape: &Value) -> Result<(), ResultError> {
        let gid = group_id.to_owned();
        let shape = shape.to_string();
        let ttl = self.ttl_ms();
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO chord_shapes (group_id, shape, expires_at)
                     VALUES (?1, ?2, ?3)",
                    params![gid, shape, now_ms().saturating_add(ttl)],
                )
            })
            .await?;
        Ok(())
    }

    async fn chord_part_return(
        &self,
        part: &ChordPart,
    ) -> Result<Option<ChordResults>, ResultError> {
        let gid = part.group_id.clone();
        let tid = part.task_id.clone();
        let index = part
            .index
            .and_then(|i| i64::try_from(i).ok())
            .unwrap_or(i64::MAX);
        let state = part.state.as_str().to_owned();
        let result = part.result.to_string();
        let expires_at = now_ms().saturating_add(self.ttl_ms());
        let rows = self
            .db
            .run(move |conn| {
                conn.execute(
                    "INSERT OR IGNORE INTO chord_parts
                     (group_id, idx, task_id, state, result, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![gid, index, tid, state, result, expires_at],
                )?;
                let size: Option<i64> = conn
                    .query_row(
                        "SELECT size FROM chord_sizes WHERE group_id = ?1",
                        params![gid],
                        |r| r.get(0),
                    )
                    .optional()?;
                let ready: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM chord_parts WHERE group_id = ?1",
                    params![gid],
                    |r| r.get(0),
                )?;
                if size.is_none_or(|size| ready < size) {
                    return Ok(None);
                }
                let rows = conn
                    .prepare(
                        "SELECT task_id, state, result FROM chord_parts
                         WHERE group_id = ?1 ORDER BY idx, task_id",
                    )?
                    .query_map(params![gid], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let shape: Option<String> = conn
                    .query_row(
                        "SELECT shape FROM chord_shapes WHERE group_id = ?1",
                        params![gid],
                        |r| r.get(0),
                    )
                    .optional()?;
                conn.execute("DELETE FROM chord_parts WHERE group_id = ?1", params![gid])?;
                conn.execute("DELETE FROM chord_sizes WHERE group_id = ?1", params![gid])?;
                conn.execute("DELETE FROM chord_shapes WHERE group_id = ?1", params![gid])?;
                Ok(Some((rows, shape)))
            })
            .await?;
        let Some((rows, shape)) = rows else {
            return Ok(None);
        };
        let members = rows
            .into_iter()
            .map(|(tid, state, result)| {
                let value = serde_json::from_str(&result).map_err(|e| ResultError::Corrupt {
                    task_id: tid.clone(),
                    reason: format!("chord part: {e}"),
                })?;
                Ok((tid, TaskState::parse(&state), value))
            })
            .collect::<Result<Vec<_>, ResultError>>()?;
        Ok(Some(ChordResults {
            members,
            saved_group: shape.and_then(|shape| serde_json::from_str(&shape).ok()),
        }))
    }

    async fn purge_expired(&self) -> Result<u64, ResultError> {
        let n = self
            .db
            .run(|conn| {
                let now = now_ms();
                conn.execute(
                    "DELETE FROM chord_sizes WHERE expires_at < ?1",
                    params![now],
                )?;
                conn.execute(
                    "DELETE FROM chord_parts WHERE expires_at < ?1",
                    params![now],
                )?;
                conn.execute(
                    "DELETE FROM chord_shapes WHERE expires_at < ?1",
                    params![now],
                )?;
                conn.execute("DELETE FROM results WHERE expires_at < ?1", params![now])
            })
            .await?;
        Ok(n as u64)
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.db.path().display())
    }
}
