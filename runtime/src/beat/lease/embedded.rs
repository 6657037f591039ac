//! The lease store in the embedded database file (the one the embedded broker uses, or any
//! `sqlite://` file the beats share on one machine). Two tables:
//!
//! - `beat_leases(name, holder, expires_ms)` — one row per lease name (the prefix); a holder
//!   takes it when it is free or expired, by one upsert whose `WHERE` says so;
//! - `beat_runs(beat, entry, last_run_ms, task_id, runs)` — each entry's last claimed run.
//!
//! A claim is one statement: insert or update the entry's row only `WHERE` the claimer's lease
//! row is live *and* the stored instant is earlier. Every job runs inside SQLite's
//! `BEGIN IMMEDIATE` (see `db/`), so processes sharing the file are serialized by its write
//! lock. Expiry is judged by the callers' clocks, which on one machine are one clock.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use rusqlite::{OptionalExtension, params};

use super::{Acquired, Claim, LastRun, LeaseError, LeaseStore, duration_ms, millis};
use crate::beat::Occurrence;
use crate::db::{Db, now_ms};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS beat_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS beat_runs (
    beat TEXT NOT NULL,
    entry TEXT NOT NULL,
    last_run_ms INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    runs INTEGER NOT NULL,
    PRIMARY KEY (beat, entry)
);
";

/// A lease and claims in an embedded database file; see the module docs.
#[derive(Debug, Clone)]
pub struct EmbeddedLease {
    db: Db,
    /// The lease's name and the `beat` column of its runs.
    name: String,
}

impl EmbeddedLease {
    /// Opens (creating if needed) the tables in the database file at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path, name: &str) -> Result<Self, LeaseError> {
        Ok(Self {
            db: Db::open(path, SCHEMA)?,
            name: name.to_owned(),
        })
    }

    /// Deletes the lease row whoever holds it (tests steal the lease with it).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn break_lease(&self) -> Result<(), LeaseError> {
        let name = self.name.clone();
        self.db
            .run(move |conn| conn.execute("DELETE FROM beat_leases WHERE name = ?1", [name]))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for EmbeddedLease {
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<Acquired, LeaseError> {
        let (name, holder) = (self.name.clone(), holder.to_owned());
        let ttl = millis(ttl);
        Ok(self
            .db
            .run(move |conn| {
                let now = now_ms();
                let taken = conn.execute(
                    "INSERT INTO beat_leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE
                     SET holder = excluded.holder, expires_ms = excluded.expires_ms
                     WHERE beat_leases.holder = excluded.holder OR beat_leases.expires_ms <= ?4",
                    params![name, holder, now + ttl, now],
                )?;
                if taken == 1 {
                    return Ok(Acquired::Held);
                }
                let expires: i64 = conn.query_row(
                    "SELECT expires_ms FROM beat_leases WHERE name = ?1",
                    [&name],
                    |row| row.get(0),
                )?;
                Ok(Acquired::Busy {
                    retry_in: duration_ms(expires - now),
                })
            })
            .await?)
    }

    async fn renew(&self, holder: &str, ttl: Duration) -> Result<bool, LeaseError> {
        let (name, holder) = (self.name.clone(), holder.to_owned());
        let ttl = millis(ttl);
        Ok(self
            .db
            .run(move |conn| {
                let now = now_ms();
                conn.execute(
                    "UPDATE beat_leases SET expires_ms = ?3
                     WHERE name = ?1 AND holder = ?2 AND expires_ms > ?4",
                    params![name, holder, now + ttl, now],
                )
            })
            .await?
            == 1)
    }

    async fn release(&self, holder: &str) -> Result<(), LeaseError> {
        let (name, holder) = (self.name.clone(), holder.to_owned());
        self.db
            .run(move |conn| {
                conn.execute(
                    "DELETE FROM beat_leases WHERE name = ?1 AND holder = ?2",
                    params![name, holder],
                )
            })
            .await?;
        Ok(())
    }

    async fn claim(
        &self,
        holder: &str,
        occurrence: &Occurrence,
        task_id: &str,
    ) -> Result<Claim, LeaseError> {
        let (name, holder) = (self.name.clone(), holder.to_owned());
        let (entry, at, task_id) = (
            occurrence.entry.clone(),
            occurrence.at_ms(),
            task_id.to_owned(),
        );
        Ok(self
            .db
            .run(move |conn| {
                let now = now_ms();
                let won = conn.execute(
                    "INSERT INTO beat_runs (beat, entry, last_run_ms, task_id, runs)
                     SELECT ?1, ?2, ?3, ?4, 1 WHERE EXISTS (
                         SELECT 1 FROM beat_leases
                         WHERE name = ?1 AND holder = ?5 AND expires_ms > ?6)
                     ON CONFLICT (beat, entry) DO UPDATE
                     SET last_run_ms = excluded.last_run_ms, task_id = excluded.task_id,
                         runs = beat_runs.runs + 1
                     WHERE beat_runs.last_run_ms < excluded.last_run_ms",
                    params![name, entry, at, task_id, holder, now],
                )?;
                if won == 1 {
                    return Ok(Claim::Won);
                }
                let holds = conn
                    .query_row(
                        "SELECT 1 FROM beat_leases
                         WHERE name = ?1 AND holder = ?2 AND expires_ms > ?3",
                        params![name, holder, now],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                Ok(if holds {
                    Claim::Taken
                } else {
                    Claim::NotHolder
                })
            })
            .await?)
    }

    async fn last_runs(&self, _entries: &[String]) -> Result<HashMap<String, LastRun>, LeaseError> {
        let name = self.name.clone();
        Ok(self
            .db
            .run(move |conn| {
                let mut statement = conn.prepare(
                    "SELECT entry, last_run_ms, task_id, runs FROM beat_runs WHERE beat = ?1",
                )?;
                let rows = statement.query_map([name], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                })?;
                let mut runs = HashMap::new();
                for row in rows {
                    let (entry, at, task_id, count) = row?;
                    if let Some(at) = DateTime::from_timestamp_millis(at) {
                        let count = u64::try_from(count).unwrap_or(0);
                        runs.insert(
                            entry,
                            LastRun {
                                at,
                                task_id,
                                runs: count,
                            },
                        );
                    }
                }
                Ok(runs)
            })
            .await?)
    }

    async fn holder(&self) -> Result<Option<String>, LeaseError> {
        let name = self.name.clone();
        Ok(self
            .db
            .run(move |conn| {
                conn.query_row(
                    "SELECT holder FROM beat_leases WHERE name = ?1 AND expires_ms > ?2",
                    params![name, now_ms()],
                    |row| row.get(0),
                )
                .optional()
            })
            .await?)
    }

    fn describe(&self) -> String {
        format!("sqlite://{} ({})", self.db.path().display(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Occurrence {
        Occurrence::new(
            "ping",
            DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap(),
        )
    }

    /// The lease and the claim fence against each other on a real file: one holder at a
    /// time, an occurrence claimed once, an older one never, a stolen lease claims nothing.
    #[test]
    fn one_holder_and_one_claim_per_occurrence() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedLease::open(&dir.path().join("beat.db"), "t").unwrap();
            let ttl = Duration::from_secs(5);
            assert_eq!(store.acquire("a", ttl).await.unwrap(), Acquired::Held);
            assert_eq!(
                store.acquire("a", ttl).await.unwrap(),
                Acquired::Held,
                "again"
            );
            match store.acquire("b", ttl).await.unwrap() {
                Acquired::Busy { retry_in } => assert!(retry_in <= ttl && retry_in > ttl / 2),
                other => panic!("b took a's lease: {other:?}"),
            }
            assert_eq!(store.holder().await.unwrap().as_deref(), Some("a"));
            assert_eq!(store.claim("a", &at(10), "id10").await.unwrap(), Claim::Won);
            assert_eq!(
                store.claim("a", &at(10), "id10").await.unwrap(),
                Claim::Taken
            );
            assert_eq!(store.claim("a", &at(5), "id5").await.unwrap(), Claim::Taken);
            assert_eq!(
                store.claim("b", &at(20), "id20").await.unwrap(),
                Claim::NotHolder
            );
            assert!(!store.renew("b", ttl).await.unwrap());
            assert!(store.renew("a", ttl).await.unwrap());
            store.break_lease().await.unwrap();
            assert!(!store.renew("a", ttl).await.unwrap(), "stolen");
            assert_eq!(
                store.claim("a", &at(20), "id20").await.unwrap(),
                Claim::NotHolder
            );
            assert_eq!(store.acquire("b", ttl).await.unwrap(), Acquired::Held);
            assert_eq!(store.claim("b", &at(20), "id20").await.unwrap(), Claim::Won);
            let last = &store.last_runs(&[]).await.unwrap()["ping"];
            assert_eq!(
                (last.at, last.task_id.as_str(), last.runs),
                (at(20).at, "id20", 2)
            );
            store.release("a").await.unwrap();
            assert_eq!(
                store.holder().await.unwrap().as_deref(),
                Some("b"),
                "not a's"
            );
            store.release("b").await.unwrap();
            assert_eq!(store.holder().await.unwrap(), None);
            // An expired lease is free for the taking.
            assert_eq!(
                store.acquire("c", Duration::from_millis(1)).await.unwrap(),
                Acquired::Held
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(store.acquire("d", ttl).await.unwrap(), Acquired::Held);
        });
    }
}
