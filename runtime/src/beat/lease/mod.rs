//! Where beats agree: a **lease** (one leader at a time, with a time to live the leader keeps
//! renewing) and a **compare-and-set per occurrence** (the first holder to claim an entry's
//! instant sends it; nobody can claim that instant, or an earlier one, again).
//!
//! The lease keeps followers from doing the work twice; the claim is the fence. A claim
//! succeeds only while the claimer still holds the lease *and* the entry's last claimed
//! instant is earlier, in one atomic step of the store (a Lua script in Redis, one
//! `INSERT … ON CONFLICT … WHERE` in SQLite). So two processes that both believe they lead —
//! a paused leader whose lease expired, a lease key deleted by hand — can never both send one
//! occurrence: the fencing is in the data, not in the lock.
//!
//! The store also remembers each entry's last claimed run (instant, task id, count), which a
//! new leader starts from (a missed run fires once) and `wasmq beat --list` shows.
//!
//! * [`redis`] — `SET NX PX` + a compare script, `wasmq.beat:leader` and three hashes;
//! * [`embedded`] — two tables in the embedded database file;
//! * [`amqp`] — RabbitMQ alone: an exclusive queue, and each entry's last run as the one
//!   message of a queue only the lock's connection writes.

pub mod amqp;
pub mod embedded;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::Occurrence;

/// The default key prefix (Redis) and lease name (SQLite): beats sharing it elect one leader.
pub const DEFAULT_PREFIX: &str = "wasmq.beat";

/// Errors from a lease store.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store URL is not understood.
    #[error("unsupported beat lease store {0:?} (expected redis://host:port/db or sqlite://path)")]
    UnsupportedUrl(String),
    /// Redis failed or refused.
    #[error("redis: {context}")]
    Redis {
        /// What was being done.
        context: &'static str,
        /// The Redis client's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// The embedded database failed.
    #[error("beat lease store")]
    Db(#[from] crate::db::DbError),
    /// RabbitMQ failed (the exclusive-queue lease).
    #[error("beat lease store")]
    Amqp(#[from] crate::broker::BrokerError),
}

impl LeaseError {
    /// True when trying again later may succeed (the store was unreachable or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Redis { source, .. } => crate::redis_client::is_transient(source),
            LeaseError::Db(error) => error.is_transient(),
            LeaseError::Amqp(error) => error.is_transient(),
            LeaseError::UnsupportedUrl(_) => false,
        }
    }
}

/// The answer to [`LeaseStore::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The caller holds the lease now.
    Held,
    /// Another holder has it, for about this much longer.
    Busy {
        /// When to try again.
        retry_in: Duration,
    },
}

/// The answer to [`LeaseStore::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller claimed the occurrence: it, and only it, sends it.
    Won,
    /// This instant (or a later one) was claimed already.
    Taken,
    /// The caller does not hold the lease (any more): nothing was claimed.
    NotHolder,
}

/// An entry's last claimed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRun {
    /// Its scheduled instant.
    pub at: DateTime<Utc>,
    /// The id it was sent with.
    pub task_id: String,
    /// Runs claimed so far.
    pub runs: u64,
}

/// A lease and per-occurrence claims, shared by every beat of one schedule.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes the lease for `holder` for `ttl` when it is free (or already `holder`'s).
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<Acquired, LeaseError>;

    /// Extends `holder`'s lease to `ttl` from now; false when `holder` no longer holds it.
    async fn renew(&self, holder: &str, ttl: Duration) -> Result<bool, LeaseError>;

    /// Gives the lease up if `holder` holds it, so a follower takes over at once.
    async fn release(&self, holder: &str) -> Result<(), LeaseError>;

    /// Claims `occurrence` for `holder`: won only while `holder` holds the lease and no
    /// instant at or after it was claimed for the entry. Records it as the entry's last run.
    async fn claim(
        &self,
        holder: &str,
        occurrence: &Occurrence,
        task_id: &str,
    ) -> Result<Claim, LeaseError>;

    /// The last claimed run of each of `entries` that has one, by entry name.
    async fn last_runs(&self, entries: &[String]) -> Result<HashMap<String, LastRun>, LeaseError>;

    /// Who holds the lease now, if anyone.
    async fn holder(&self) -> Result<Option<String>, LeaseError>;

    /// The store, for logs (no credentials).
    fn describe(&self) -> String;
}

/// Opens the lease store at `url` (`redis://…`, `sqlite://PATH` or `amqp://…`) under
/// `prefix`.
///
/// # Errors
/// [`LeaseError::UnsupportedUrl`], or the database cannot be opened.
pub fn connect(url: &str, prefix: &str) -> Result<Arc<dyn LeaseStore>, LeaseError> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(redis::RedisLease::new(url, prefix)?));
    }
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        return Ok(Arc::new(amqp::AmqpLease::new(url, prefix)?));
    }
    if let Some(path) = crate::db::parse_url(url) {
        return Ok(Arc::new(embedded::EmbeddedLease::open(&path, prefix)?));
    }
    Err(LeaseError::UnsupportedUrl(url.to_owned()))
}

/// Milliseconds as a duration (negative: zero).
fn duration_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration in milliseconds, at least one.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}
