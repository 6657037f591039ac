//! The embedded broker: queues in a SQLite file that several processes on one machine share.
//!
//! A message is a row of `messages` with a `visible_at` time (delayed messages are simply
//! rows that become visible later) and a priority; publishing inserts one. Consumers lease
//! rows and settle them (see `leases`). Dead letters are rows of `dead_letters`, and
//! revocations rows of `revocations`: one table that is both the broadcast and the memory,
//! read by every worker on the file. Celery's events are rows of `events` (see `events`).
//! Remote control (`wasmq inspect`/`control`) is rows of `control_commands`, which every
//! worker polls, and `control_replies`, which the sender polls (see `control`).
//!
//! Which queues exist — what a tenant's follow-ups may be published into — is `queues`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;
use tokio::sync::Notify;

mod control;
mod events;
mod leases;
mod queues;

use self::leases::SqliteConsumer;
use super::{
    Broker, BrokerError, Confirmation, Consumer, ControlBroadcast, ControlReply, ControlRequest,
    DeadLetter, REVOKE_EXPIRES, Revocation,
};
use crate::db::{Db, PollEvery, now_ms};
use crate::protocol::Envelope;

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
CREATE TABLE IF NOT EXISTS queues (
    name        TEXT    PRIMARY KEY,
    declared_at INTEGER NOT NULL
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
    /// Longest sleep between polls of an idle queue where the file has no watcher (then other
    /// processes' messages are found only by polling; this process's own publishes wake
    /// consumers at once). Default: 5 ms.
    pub max_poll_interval: Duration,
    /// Longest sleep between polls of an idle queue while the file's watcher wakes consumers
    /// on other processes' commits: a wake-up the watcher misses costs at most this.
    /// Default: 100 ms.
    pub watched_poll_interval: Duration,
    /// Most rows fetched by one lease query. Default: 64.
    pub max_batch: usize,
}

impl Default for SqliteBrokerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            max_poll_interval: Duration::from_millis(5),
            watched_poll_interval: Duration::from_millis(100),
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
    /// Queues this broker has declared in the file, so a publish declares its queue once.
    declared: Arc<Mutex<HashSet<String>>>,
}

impl SqliteBroker {
    /// Longest sleep between polls of an idle queue: short without a watcher on the file,
    /// long with one (a commit by any process wakes consumers at once).
    fn idle_poll_ceiling(&self) -> Duration {
        if self.db.sees_commits() {
            self.options.watched_poll_interval
        } else {
            self.options.max_poll_interval
        }
    }

    /// Opens (creating if needed) the broker in the database file at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or initialised.
    pub fn open(path: &Path, options: SqliteBrokerOptions) -> Result<Self, BrokerError> {
        let db = Db::open(path, SCHEMA)?;
        Db::open(path, events::SCHEMA)?;
        Db::open(path, control::SCHEMA)?;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        let id = format!("{host}:{pid}:{}", uuid::Uuid::new_v4().simple());
        Ok(Self {
            db,
            owner: Arc::new(Owner { id, host, pid }),
            options,
            declared: Arc::default(),
        })
    }
}

/// A message row to insert.
struct Row {
    queue: String,
    priority: i64,
    visible_at: i64,
    headers: String,
    properties: String,
    body: Vec<u8>,
    created_at: i64,
}

impl Row {
    fn new(queue: &str, envelope: &Envelope, delay: Option<Duration>) -> Self {
        let now = now_ms();
        Self {
            queue: queue.to_owned(),
            priority: i64::from(envelope.properties.priority.unwrap_or(0)),
            visible_at: now
                + delay.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)),
            headers: to_json(&envelope.headers),
            properties: to_json(&envelope.properties),
            body: envelope.body.clone(),
            created_at: now,
        }
    }

    fn insert(&self, conn: &rusqlite::Connection) -> rusqlite::Result<usize> {
        conn.prepare_cached(
            "INSERT INTO messages (queue, priority, visible_at, headers, properties, body, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            self.queue,
            self.priority,
            self.visible_at,
            self.headers,
            self.properties,
            self.body,
            self.created_at
        ])
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
        self.publish_unconfirmed(queue, envelope, delay)
            .await?
            .await
    }

    async fn publish_unconfirmed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Confirmation, BrokerError> {
        // The commit is awaited in the confirmation (`publish` awaits it at once), so a
        // sender's pipelined publishes share the database thread's transactions.
        let row = Row::new(queue, envelope, delay);
        // A publish declares its queue, as on RabbitMQ: once per queue and broker.
        let declares = !self.declared().contains(queue);
        let committed = self.db.run_soon(move |conn| {
            if declares {
                queues::declare(conn, &row.queue, row.created_at)?;
            }
            row.insert(conn)
        })?;
        // Until the declare commits, later publishes declare the queue again (idempotent).
        let declared = declares.then(|| (Arc::clone(&self.declared), queue.to_owned()));
        Ok(Confirmation::pending(async move {
            committed.await?;
            if let Some((set, queue)) = declared {
                set.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(queue);
            }
            LOCAL_PUBLISH.notify_waiters();
            Ok(())
        }))
    }

    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let row = Row::new(queue, envelope, delay);
        // Looked up and inserted in one transaction: the queue cannot go in between.
        let published = self
            .db
            .run(move |conn| {
                if !queues::exists(conn, &row.queue)? {
                    return Ok(false);
                }
                row.insert(conn).map(|_| true)
            })
            .await?;
        if !published {
            return Err(BrokerError::QueueNotFound {
                queue: queue.to_owned(),
            });
        }
        LOCAL_PUBLISH.notify_waiters();
        Ok(())
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError> {
        let queue = queue.to_owned();
        Ok(self
            .db
            .run(move |conn| queues::exists(conn, &queue))
            .await?)
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(
            SqliteConsumer::start(self, queues, prefetch).await?,
        ))
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
            .read(move |conn| {
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
        let name = queue.to_owned();
        self.db
            .run(move |conn| {
                conn.execute("DELETE FROM messages WHERE queue = ?1", params![name])?;
                conn.execute("DELETE FROM queues WHERE name = ?1", params![name])?;
                conn.execute("DELETE FROM dead_letters WHERE queue = ?1", params![name])
            })
            .await?;
        self.declared().remove(queue);
        Ok(())
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        let r = revocation.clone();
        let oldest = r.revoked_at_ms - i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(0);
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
                let committed = db.watch_commits();
                let rows = db
                    .read(move |conn| {
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
                    () = committed.wait(REVOCATION_POLL, LOOK_SPACING) => {}
                    () = sender.closed() => return,
                }
            }
        });
        Ok(receiver)
    }

    async fn control_requests(
        &self,
        node: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<ControlRequest>>, BrokerError> {
        control::listen(&self.db, node).await.map(Some)
    }

    async fn broadcast_control(
        &self,
        broadcast: &ControlBroadcast,
    ) -> Result<Vec<ControlReply>, BrokerError> {
        control::broadcast(&self.db, broadcast).await
    }

    async fn publish_events(
        &self,
        message: &crate::protocol::events::EventMessage,
    ) -> Result<(), BrokerError> {
        events::publish(&self.db, message).await
    }

    async fn events(
        &self,
    ) -> Result<
        Option<tokio::sync::mpsc::Receiver<crate::protocol::events::EventMessage>>,
        BrokerError,
    > {
        events::listen(&self.db, 0).await.map(Some)
    }

    async fn events_with_backlog(
        &self,
        backlog: usize,
    ) -> Result<
        Option<tokio::sync::mpsc::Receiver<crate::protocol::events::EventMessage>>,
        BrokerError,
    > {
        events::listen(&self.db, backlog).await.map(Some)
    }

    async fn known_queues(&self) -> Result<Vec<String>, BrokerError> {
        Ok(self
            .db
            .run(|conn| {
                let mut stmt = conn.prepare_cached("SELECT name FROM queues ORDER BY name")?;
                let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
                names.collect::<Result<Vec<_>, _>>()
            })
            .await?)
    }

    async fn forget_node(&self, _node: &str) -> Result<(), BrokerError> {
        // Nothing is held per node: every worker reads the one table of revocations.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.db.path().display())
    }
}

/// How often workers look for new revocations when nothing wakes them (see [`PollEvery`]).
const REVOCATION_POLL: PollEvery = PollEvery {
    unwatched: Duration::from_millis(100),
    watched: Duration::from_millis(1_000),
};

/// Where the file's watcher reports commits, the shortest time between two looks at a table
/// other processes append to (revocations, events): on a busy file commits come by the
/// thousand a second, and each look is a query on the database thread.
pub(super) const LOOK_SPACING: Duration = Duration::from_millis(10);
