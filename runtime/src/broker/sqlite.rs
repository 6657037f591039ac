//! The embedded broker: queues in a SQLite file that several processes on one machine share.
//!
//! A message is a row of `messages` with a `visible_at` time (delayed messages are simply
//! rows that become visible later) and a priority. Consuming *leases* rows: a single
//! `UPDATE … RETURNING` marks up to the free prefetch slots as held by this process until
//! `lease_expires`. A background task renews the leases of live processes every
//! [`SqliteBrokerOptions::renew_every`]; a process that dies stops renewing, so its rows
//! become visible again after at most [`SqliteBrokerOptions::lease`] — and at once when a
//! consumer on the same host sees that the holder's process no longer exists (a restarted
//! worker finding its predecessor's stale leases). Nothing is lost, and every delivery
//! counts its attempts (`deliveries`), which later feeds poison-message protection.
//!
//! Settling: ack deletes the row, dead-letter moves it to `dead_letters` with the reason,
//! release clears the lease. Each checks that this process still holds the lease.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params, params_from_iter};
use tokio::sync::Notify;

use super::{Broker, BrokerError, Consumer, DeadLetter, Delivery, Revocation, Settle};
use crate::protocol::{Envelope, Properties};
use crate::sqlite::{Db, now_ms};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT    NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    visible_at    INTEGER NOT NULL,
    headers       TEXT    NOT NULL,
    properties    TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    deliveries    INTEGER NOT NULL DEFAULT 0,
    leased_by     TEXT,
    leased_host   TEXT,
    leased_pid    INTEGER,
    lease_expires INTEGER,
    created_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, visible_at, id);
CREATE INDEX IF NOT EXISTS messages_leased ON messages (leased_by);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT    NOT NULL,
    task_id    TEXT,
    reason     TEXT    NOT NULL,
    deliveries INTEGER NOT NULL,
    headers    TEXT    NOT NULL,
    properties TEXT    NOT NULL,
    body       BLOB    NOT NULL,
    dead_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT    NOT NULL,
    terminate  INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL
);
";

/// Tuning of the embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct SqliteBrokerOptions {
    /// How long a lease lasts without renewal; a dead worker's messages come back after at
    /// most this long. Default: 10 s.
    pub lease: Duration,
    /// How often a live consumer renews its leases. Default: 2 s.
    pub renew_every: Duration,
    /// Longest sleep between polls of an idle queue (other processes' messages are found by
    /// polling; this process's own publishes wake consumers at once). Default: 5 ms.
    pub max_poll_interval: Duration,
    /// Most rows fetched by one lease query. Default: 64.
    pub max_batch: usize,
}

impl Default for SqliteBrokerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            max_poll_interval: Duration::from_millis(5),
            max_batch: 64,
        }
    }
}

/// Wakes this process's idle consumers when this process publishes.
static LOCAL_PUBLISH: Notify = Notify::const_new();

/// Who holds a lease: this process.
#[derive(Debug)]
struct Owner {
    id: String,
    host: String,
    pid: u32,
}

/// The embedded SQLite broker.
#[derive(Debug, Clone)]
pub struct SqliteBroker {
    db: Db,
    owner: Arc<Owner>,
    options: SqliteBrokerOptions,
}

impl SqliteBroker {
    /// Opens (creating if needed) the broker in the database file at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or initialised.
    pub fn open(path: &Path, options: SqliteBrokerOptions) -> Result<Self, BrokerError> {
        let db = Db::open(path, SCHEMA)?;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        let id = format!("{host}:{pid}:{}", uuid::Uuid::new_v4().simple());
        Ok(Self {
            db,
            owner: Arc::new(Owner { id, host, pid }),
            options,
        })
    }

    /// Releases leases held by processes on this host that no longer exist.
    async fn release_dead_leases(&self) -> Result<usize, BrokerError> {
        let owner = Arc::clone(&self.owner);
        Ok(self
            .db
            .run(move |conn| {
                let pids: Vec<(String, i64)> = {
                    let mut stmt = conn.prepare_cached(
                        "SELECT DISTINCT leased_by, leased_pid FROM messages
                         WHERE leased_host = ?1 AND leased_by != ?2",
                    )?;
                    stmt.query_map(params![owner.host, owner.id], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<_, _>>()?
                };
                let mut released = 0;
                for (holder, pid) in pids {
                    if i64::from(owner.pid) != pid && !process_exists(pid) {
                        released += conn.execute(
                            "UPDATE messages SET leased_by = NULL, leased_host = NULL,
                                 leased_pid = NULL, lease_expires = NULL
                             WHERE leased_by = ?1",
                            params![holder],
                        )?;
                    }
                }
                Ok(released)
            })
            .await?)
    }
}

/// Whether a process with this pid exists on this (Linux) host. Elsewhere, leases simply
/// expire.
fn process_exists(pid: i64) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("headers and properties serialize")
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let now = now_ms();
        let visible_at =
            now + delay.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
        let queue = queue.to_owned();
        let headers = to_json(&envelope.headers);
        let properties = to_json(&envelope.properties);
        let priority = i64::from(envelope.properties.priority.unwrap_or(0));
        let body = envelope.body.clone();
        self.db
            .run(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO messages (queue, priority, visible_at, headers, properties, body, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![queue, priority, visible_at, headers, properties, body, now])
            })
            .await?;
        LOCAL_PUBLISH.notify_waiters();
        Ok(())
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let released = self.release_dead_leases().await?;
        if released > 0 {
            tracing::info!(
                released,
                "redelivering messages leased by dead processes on this host"
            );
        }
        let settler = Arc::new(SqliteSettler {
            db: self.db.clone(),
            owner: Arc::clone(&self.owner),
            outstanding: AtomicUsize::new(0),
            settled: Notify::new(),
        });
        let renewer = {
            let broker = self.clone();
            tokio::spawn(async move { broker.renew_leases().await })
        };
        Ok(Box::new(SqliteConsumer {
            broker: self.clone(),
            queues: queues.to_vec(),
            prefetch: prefetch.max(1),
            buffer: VecDeque::new(),
            settler,
            renewer,
            pending: None,
        }))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let queue = queue.to_owned();
        Ok(self
            .db
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT queue, task_id, reason, deliveries, dead_at, headers, properties, body
                     FROM dead_letters WHERE queue = ?2 ORDER BY id DESC LIMIT ?1",
                )?;
                let rows = stmt.query_map(params![limit, queue], |r| {
                    let headers: String = r.get(5)?;
                    let properties: String = r.get(6)?;
                    Ok(DeadLetter {
                        queue: r.get(0)?,
                        task_id: r.get(1)?,
                        reason: r.get(2)?,
                        delivery_count: r.get(3)?,
                        dead_at_ms: r.get(4)?,
                        envelope: Envelope {
                            headers: serde_json::from_str(&headers).unwrap_or_default(),
                            properties: serde_json::from_str(&properties).unwrap_or_default(),
                            body: r.get(7)?,
                        },
                    })
                })?;
                rows.collect()
            })
            .await?)
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let queue = queue.to_owned();
        Ok(self
            .db
            .run(move |conn| {
                conn.prepare_cached(
                    "SELECT COUNT(*) FROM messages
                     WHERE queue = ?1 AND (leased_by IS NULL OR lease_expires < ?2)",
                )?
                .query_row(params![queue, now_ms()], |r| r.get::<_, i64>(0))
            })
            .await
            .map(|n| u64::try_from(n).unwrap_or(0))?)
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let queue = queue.to_owned();
        self.db
            .run(move |conn| {
                conn.execute("DELETE FROM messages WHERE queue = ?1", params![queue])?;
                conn.execute("DELETE FROM dead_letters WHERE queue = ?1", params![queue])
            })
            .await?;
        Ok(())
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        let r = revocation.clone();
        let oldest = r.revoked_at_ms
            - i64::try_from(crate::worker::revoked::REVOKE_EXPIRES.as_millis()).unwrap_or(0);
        self.db
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO revocations (task_id, terminate, revoked_at) VALUES (?1, ?2, ?3)",
                    params![r.task_id, r.terminate, r.revoked_at_ms],
                )?;
                conn.execute(
                    "DELETE FROM revocations WHERE revoked_at < ?1",
                    params![oldest],
                )
            })
            .await?;
        Ok(())
    }

    async fn revocations(
        &self,
        _node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        // Every worker on the file reads the same table: it is the broadcast and the memory.
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        let db = self.db.clone();
        tokio::spawn(async move {
            let mut after = 0_i64;
            loop {
                let rows = db
                    .run(move |conn| {
                        let mut stmt = conn.prepare_cached(
                            "SELECT seq, task_id, terminate, revoked_at FROM revocations
                             WHERE seq > ?1 ORDER BY seq",
                        )?;
                        let rows = stmt.query_map(params![after], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                Revocation {
                                    task_id: r.get(1)?,
                                    terminate: r.get(2)?,
                                    revoked_at_ms: r.get(3)?,
                                },
                            ))
                        })?;
                        rows.collect::<Result<Vec<_>, _>>()
                    })
                    .await;
                match rows {
                    Ok(rows) => {
                        for (seq, revocation) in rows {
                            after = seq;
                            if sender.send(revocation).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot read revocations"),
                }
                tokio::select! {
                    () = tokio::time::sleep(REVOCATION_POLL) => {}
                    () = sender.closed() => return,
                }
            }
        });
        Ok(receiver)
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.db.path().display())
    }
}

/// How often workers look for new revocations in the database.
const REVOCATION_POLL: Duration = Duration::from_millis(100);

impl SqliteBroker {
    /// Keeps this process's leases alive and frees those of dead local processes.
    async fn renew_leases(&self) {
        let mut tick = tokio::time::interval(self.options.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let owner = Arc::clone(&self.owner);
            let lease = self.lease_ms();
            let renewed = self
                .db
                .run(move |conn| {
                    conn.prepare_cached(
                        "UPDATE messages SET lease_expires = ?1 WHERE leased_by = ?2",
                    )?
                    .execute(params![now_ms() + lease, owner.id])
                })
                .await;
            if let Err(error) = renewed {
                tracing::warn!(%error, "cannot renew message leases");
            }
            if let Err(error) = self.release_dead_leases().await {
                tracing::warn!(%error, "cannot release leases of dead processes");
            }
        }
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Leases up to `n` visible messages of `queues`, highest priority and oldest first.
    async fn lease(&self, queues: &[String], n: usize) -> Result<Vec<LeasedRow>, BrokerError> {
        let owner = Arc::clone(&self.owner);
        let lease = self.lease_ms();
        let queues = queues.to_vec();
        Ok(self
            .db
            .run(move |conn| {
                let now = now_ms();
                let placeholders = (0..queues.len())
                    .map(|i| format!("?{}", i + 6))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "UPDATE messages SET leased_by = ?1, leased_host = ?2, leased_pid = ?3,
                         lease_expires = ?4, deliveries = deliveries + 1
                     WHERE id IN (
                         SELECT id FROM messages
                         WHERE queue IN ({placeholders}) AND visible_at <= ?5
                           AND (leased_by IS NULL OR lease_expires < ?5)
                         ORDER BY priority DESC, visible_at, id
                         LIMIT {n})
                     RETURNING id, queue, priority, headers, properties, body, deliveries"
                );
                let mut values: Vec<rusqlite::types::Value> = vec![
                    owner.id.clone().into(),
                    owner.host.clone().into(),
                    i64::from(owner.pid).into(),
                    (now + lease).into(),
                    now.into(),
                ];
                values.extend(
                    queues
                        .iter()
                        .map(|q| rusqlite::types::Value::from(q.clone())),
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut rows: Vec<LeasedRow> = stmt
                    .query_map(params_from_iter(values), |r| {
                        Ok(LeasedRow {
                            id: r.get(0)?,
                            queue: r.get(1)?,
                            priority: r.get(2)?,
                            headers: r.get(3)?,
                            properties: r.get(4)?,
                            body: r.get(5)?,
                            deliveries: r.get(6)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                rows.sort_by_key(|row| (std::cmp::Reverse(row.priority), row.id));
                Ok(rows)
            })
            .await?)
    }
}

struct LeasedRow {
    id: i64,
    queue: String,
    priority: i64,
    headers: String,
    properties: String,
    body: Vec<u8>,
    deliveries: u32,
}

/// Settles deliveries and tracks how many are outstanding for the prefetch limit.
struct SqliteSettler {
    db: Db,
    owner: Arc<Owner>,
    outstanding: AtomicUsize,
    settled: Notify,
}

impl SqliteSettler {
    fn done(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_one();
    }

    async fn settle(
        &self,
        tag: u64,
        what: &'static str,
        sql: &'static str,
    ) -> Result<(), BrokerError> {
        let owner = Arc::clone(&self.owner);
        let id = i64::try_from(tag).unwrap_or(i64::MAX);
        let changed = self
            .db
            .run(move |conn| conn.prepare_cached(sql)?.execute(params![id, owner.id]))
            .await;
        self.done();
        if changed? == 0 {
            tracing::warn!(
                message = id,
                "{what}: this worker's lease had expired; the message was redelivered"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Settle for SqliteSettler {
    async fn ack(&self, tag: u64) -> Result<(), BrokerError> {
        self.settle(
            tag,
            "ack",
            "DELETE FROM messages WHERE id = ?1 AND leased_by = ?2",
        )
        .await
    }

    async fn dead_letter(
        &self,
        tag: u64,
        reason: &str,
        _envelope: &Envelope,
    ) -> Result<(), BrokerError> {
        let owner = Arc::clone(&self.owner);
        let id = i64::try_from(tag).unwrap_or(i64::MAX);
        let reason = reason.to_owned();
        let moved = self
            .db
            .run(move |conn| {
                // The job runs in its own savepoint: the move is atomic.
                let tx = conn;
                let row: Option<(String, String, String, Vec<u8>, u32)> = tx
                    .query_row(
                        "SELECT queue, headers, properties, body, deliveries FROM messages
                         WHERE id = ?1 AND leased_by = ?2",
                        params![id, owner.id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                let Some((queue, headers, properties, body, deliveries)) = row else {
                    return Ok(false);
                };
                let task_id = serde_json::from_str::<serde_json::Value>(&headers)
                    .ok()
                    .and_then(|h| h.get("id").and_then(|v| v.as_str()).map(str::to_owned));
                tx.execute(
                    "INSERT INTO dead_letters (queue, task_id, reason, deliveries, headers, properties, body, dead_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![queue, task_id, reason, deliveries, headers, properties, body, now_ms()],
                )?;
                tx.execute("DELETE FROM messages WHERE id = ?1", params![id])?;
                Ok(true)
            })
            .await;
        self.done();
        if !moved? {
            tracing::warn!(
                message = id,
                "dead-letter: this worker's lease had expired; the message was redelivered"
            );
        }
        Ok(())
    }

    async fn release(&self, tag: u64) -> Result<(), BrokerError> {
        self.settle(
            tag,
            "release",
            "UPDATE messages SET leased_by = NULL, leased_host = NULL, leased_pid = NULL,
                 lease_expires = NULL
             WHERE id = ?1 AND leased_by = ?2",
        )
        .await
    }
}

struct SqliteConsumer {
    broker: SqliteBroker,
    queues: Vec<String>,
    prefetch: usize,
    buffer: VecDeque<Delivery>,
    settler: Arc<SqliteSettler>,
    renewer: tokio::task::JoinHandle<()>,
    /// A lease query in flight. It runs as its own task so that dropping a `next()` future
    /// (e.g. in a `select!`) never loses rows it leased: the next call picks them up.
    pending: Option<tokio::task::JoinHandle<Result<Vec<LeasedRow>, BrokerError>>>,
}

impl SqliteConsumer {
    /// Turns leased rows into deliveries waiting to be handed out (they count against the
    /// prefetch until settled).
    fn buffer_rows(&mut self, rows: Vec<LeasedRow>) {
        self.settler
            .outstanding
            .fetch_add(rows.len(), Ordering::AcqRel);
        let settler: Arc<dyn Settle> = self.settler.clone();
        for row in rows {
            let envelope = Envelope {
                headers: serde_json::from_str(&row.headers).unwrap_or_default(),
                properties: serde_json::from_str::<Properties>(&row.properties).unwrap_or_default(),
                body: row.body,
            };
            self.buffer.push_back(Delivery::new(
                envelope,
                row.queue,
                row.deliveries,
                u64::try_from(row.id).unwrap_or(0),
                Arc::clone(&settler),
            ));
        }
    }
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[async_trait]
impl Consumer for SqliteConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        let mut idle_sleep = Duration::from_micros(500);
        loop {
            if let Some(delivery) = self.buffer.pop_front() {
                return Ok(delivery);
            }
            let free = self
                .prefetch
                .saturating_sub(self.settler.outstanding.load(Ordering::Acquire));
            if free == 0 {
                let _ = tokio::time::timeout(
                    self.broker.options.max_poll_interval,
                    self.settler.settled.notified(),
                )
                .await;
                continue;
            }
            let woken = LOCAL_PUBLISH.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let lease = self.pending.get_or_insert_with(|| {
                let broker = self.broker.clone();
                let queues = self.queues.clone();
                let n = free.min(broker.options.max_batch);
                tokio::spawn(async move { broker.lease(&queues, n).await })
            });
            let leased = lease.await;
            self.pending = None;
            let rows = leased
                .map_err(|e| BrokerError::Db(crate::sqlite::DbError::Task(e.to_string())))??;
            if rows.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(idle_sleep) => {}
                    () = &mut woken => {}
                }
                idle_sleep = (idle_sleep * 2).min(self.broker.options.max_poll_interval);
                continue;
            }
            self.buffer_rows(rows);
        }
    }

    async fn close(&mut self) {
        // Rows a dropped `next()` leased are handed back like every other prefetched one.
        if let Some(pending) = self.pending.take()
            && let Ok(Ok(rows)) = pending.await
        {
            self.buffer_rows(rows);
        }
        while let Some(delivery) = self.buffer.pop_front() {
            if let Err(error) = delivery.release().await {
                tracing::warn!(%error, "cannot release a prefetched message; it returns when its lease expires");
            }
        }
        self.renewer.abort();
    }
}
