//! The lease on RabbitMQ alone (no Redis, no shared database file): the broker's
//! [`ExclusiveLock`]. The lease is the exclusive queue `<prefix>.leader`, held as long as the
//! holder's connection lives, so a killed leader is replaced as soon as a follower next
//! tries (every third of the TTL), not after a whole TTL. Each try a follower makes is a
//! declare RabbitMQ refuses with 405 RESOURCE_LOCKED, which RabbitMQ logs as a channel error:
//! the price of a lease without Redis or a shared file. Each entry's last run is the one
//! message of the durable queue `<prefix>.runs.<entry>` (`x-max-length` 1).
//!
//! A claim reads the entry's record and writes the new one through the holding connection,
//! which RabbitMQ accepts only while that connection holds the lock queue — so a leader that
//! lost its connection claims nothing, and a new leader reads every record an old one wrote.
//! Only the holder writes, so the read and the write need no atomic step of their own; the
//! gap is the one [`ExclusiveLock`] documents (its queue deleted by hand mid-claim).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use serde::{Deserialize, Serialize};

use super::{Acquired, Claim, LastRun, LeaseError, LeaseStore};
use crate::beat::Occurrence;
use crate::broker::amqp::ExclusiveLock;

/// An entry's last run, as its record queue holds it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    at_ms: i64,
    task_id: String,
    runs: u64,
}

/// A lease and claims on RabbitMQ; see the module docs.
#[derive(Debug)]
pub struct AmqpLease {
    lock: ExclusiveLock,
    prefix: String,
}

impl AmqpLease {
    /// A lease on the broker at `url` under `prefix`; connects on first use.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub fn new(url: &str, prefix: &str) -> Result<Self, LeaseError> {
        Ok(Self {
            lock: ExclusiveLock::new(url, &format!("{prefix}.leader"))?,
            prefix: prefix.to_owned(),
        })
    }

    fn record_queue(&self, entry: &str) -> String {
        format!("{}.runs.{entry}", self.prefix)
    }

    async fn record(&self, entry: &str) -> Result<Option<Record>, LeaseError> {
        let body = self.lock.read_record(&self.record_queue(entry)).await?;
        Ok(body.and_then(|body| serde_json::from_slice(&body).ok()))
    }
}

#[async_trait]
impl LeaseStore for AmqpLease {
    async fn acquire(&self, _holder: &str, ttl: Duration) -> Result<Acquired, LeaseError> {
        Ok(if self.lock.try_lock().await? {
            Acquired::Held
        } else {
            // No expiry to wait for: the lock is free the moment its connection closes.
            Acquired::Busy { retry_in: ttl / 3 }
        })
    }

    async fn renew(&self, _holder: &str, _ttl: Duration) -> Result<bool, LeaseError> {
        Ok(self.lock.is_locked().await?)
    }

    async fn release(&self, _holder: &str) -> Result<(), LeaseError> {
        Ok(self.lock.unlock().await?)
    }

    async fn claim(
        &self,
        _holder: &str,
        occurrence: &Occurrence,
        task_id: &str,
    ) -> Result<Claim, LeaseError> {
        let last = self.record(&occurrence.entry).await?;
        if last
            .as_ref()
            .is_some_and(|last| last.at_ms >= occurrence.at_ms())
        {
            return Ok(Claim::Taken);
        }
        let record = Record {
            at_ms: occurrence.at_ms(),
            task_id: task_id.to_owned(),
            runs: last.map_or(0, |last| last.runs) + 1,
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        let queue = self.record_queue(&occurrence.entry);
        Ok(if self.lock.write_record(&queue, &body).await? {
            Claim::Won
        } else {
            Claim::NotHolder
        })
    }

    async fn last_runs(&self, entries: &[String]) -> Result<HashMap<String, LastRun>, LeaseError> {
        let mut runs = HashMap::new();
        for entry in entries {
            if let Some(record) = self.record(entry).await?
                && let Some(at) = DateTime::from_timestamp_millis(record.at_ms)
            {
                let last = LastRun {
                    at,
                    task_id: record.task_id,
                    runs: record.runs,
                };
                runs.insert(entry.clone(), last);
            }
        }
        Ok(runs)
    }

    async fn holder(&self) -> Result<Option<String>, LeaseError> {
        Ok(self
            .lock
            .is_held_anywhere()
            .await?
            .then(|| "a beat (RabbitMQ names no holder of an exclusive queue)".to_owned()))
    }

    fn describe(&self) -> String {
        self.lock.describe()
    }
}
