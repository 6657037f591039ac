//! Leases: how the embedded broker hands messages to consumers. Consuming *leases* rows: a
//! single `UPDATE … RETURNING` marks up to the free prefetch slots as held by this process
//! until `lease_expires`. A background task renews the leases of live processes every
//! [`renew_every`](super::SqliteBrokerOptions::renew_every); a process that dies stops renewing, so its rows
//! become visible again after at most the [`lease`](super::SqliteBrokerOptions::lease) — and at once when a
//! consumer on the same host sees that the holder's process no longer exists (a restarted
//! worker finding its predecessor's stale leases). Nothing is lost, and every delivery
//! counts its attempts (`deliveries`), which feeds poison-message protection.
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

use super::{LOCAL_PUBLISH, Owner, SqliteBroker};
use crate::broker::{BrokerError, Consumer, Delivery, PrefetchLimit, Settle, Subscriptions};
use crate::db::{Db, now_ms};
use crate::protocol::{Envelope, Properties};

/// Whether a process with this pid exists on this (Linux) host. Elsewhere, leases simply
/// expire.
fn process_exists(pid: i64) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

impl SqliteBroker {
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
        if queues.is_empty() {
            return Ok(Vec::new());
        }
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

pub(super) struct SqliteConsumer {
    broker: SqliteBroker,
    /// The queues leased from, as `subscriptions` last said.
    queues: Vec<String>,
    /// The queues to consume, changeable while it runs (declared when added).
    subscriptions: Subscriptions,
    wanted: tokio::sync::watch::Receiver<Vec<String>>,
    /// At most this many unsettled deliveries (changeable while it runs).
    prefetch: PrefetchLimit,
    buffer: VecDeque<Delivery>,
    settler: Arc<SqliteSettler>,
    renewer: tokio::task::JoinHandle<()>,
    /// A lease query in flight. It runs as its own task so that dropping a `next()` future
    /// (e.g. in a `select!`) never loses rows it leased: the next call picks them up.
    pending: Option<tokio::task::JoinHandle<Result<Vec<LeasedRow>, BrokerError>>>,
}

impl SqliteConsumer {
    /// Starts consuming `queues` of `broker` with at most `prefetch` unsettled deliveries,
    /// first freeing the leases of dead processes on this host.
    pub(super) async fn start(
        broker: &SqliteBroker,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Self, BrokerError> {
        broker.declare_queues(queues).await?;
        let released = broker.release_dead_leases().await?;
        if released > 0 {
            tracing::info!(
                released,
                "redelivering messages leased by dead processes on this host"
            );
        }
        let settler = Arc::new(SqliteSettler {
            db: broker.db.clone(),
            owner: Arc::clone(&broker.owner),
            outstanding: AtomicUsize::new(0),
            settled: Notify::new(),
        });
        let renewer = {
            let broker = broker.clone();
            tokio::spawn(async move { broker.renew_leases().await })
        };
        let subscriptions = Subscriptions::new(queues);
        Ok(Self {
            broker: broker.clone(),
            queues: subscriptions.current(),
            wanted: subscriptions.watch(),
            subscriptions,
            prefetch: PrefetchLimit::new(prefetch),
            buffer: VecDeque::new(),
            settler,
            renewer,
            pending: None,
        })
    }

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
                .get()
                .saturating_sub(self.settler.outstanding.load(Ordering::Acquire));
            if free == 0 {
                let _ = tokio::time::timeout(
                    self.broker.options.max_poll_interval,
                    self.settler.settled.notified(),
                )
                .await;
                continue;
            }
            if self.pending.is_none() && self.wanted.has_changed().unwrap_or(false) {
                let wanted = self.wanted.borrow_and_update().clone();
                self.broker.declare_queues(&wanted).await?;
                self.queues = wanted;
            }
            // Both registered before the lease query, so a publish (here or by another
            // process) between the query and the sleep is not missed.
            let woken = LOCAL_PUBLISH.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let db = self.broker.db.clone();
            let committed = db.changed().notified();
            tokio::pin!(committed);
            committed.as_mut().enable();
            let lease = self.pending.get_or_insert_with(|| {
                let broker = self.broker.clone();
                let queues = self.queues.clone();
                let n = free.min(broker.options.max_batch);
                tokio::spawn(async move { broker.lease(&queues, n).await })
            });
            let leased = lease.await;
            self.pending = None;
            let rows =
                leased.map_err(|e| BrokerError::Db(crate::db::DbError::Task(e.to_string())))??;
            if rows.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(idle_sleep) => {}
                    () = &mut woken => {}
                    () = &mut committed => {}
                }
                idle_sleep = (idle_sleep * 2).min(self.broker.idle_poll_ceiling());
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

    fn subscriptions(&self) -> Option<Subscriptions> {
        Some(self.subscriptions.clone())
    }

    fn prefetch_limit(&self) -> Option<PrefetchLimit> {
        Some(self.prefetch.clone())
    }
}
