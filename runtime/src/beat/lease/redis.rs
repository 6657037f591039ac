//! The Redis lease store. Keys under a prefix (`wasmq.beat` by default):
//!
//! - `<prefix>:leader` — the lease: the holder's token, set with `SET NX PX <ttl>`, renewed
//!   and released by scripts that first compare the token (so nobody extends or deletes
//!   someone else's lease, redbeat#127);
//! - `<prefix>:last_run`, `<prefix>:last_id`, `<prefix>:runs` — hashes by entry name: the
//!   last claimed instant (Unix ms), its task id, and the count of claimed runs.
//!
//! The claim script checks the lease token and compares the entry's last instant in one
//! atomic step; Redis's own clock expires the lease.

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use async_trait::async_trait;
use chrono::DateTime;

use super::{Acquired, Claim, LastRun, LeaseError, LeaseStore, duration_ms, millis};
use crate::beat::Occurrence;
use crate::redis_client::RedisClient;

/// Takes the lease if free or already the caller's. KEYS: leader. ARGV: holder, ttl ms.
/// Returns {1, 0} when held, else {0, remaining ms}.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
";

/// Extends the lease if the caller holds it. KEYS: leader. ARGV: holder, ttl ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease if the caller holds it. KEYS: leader. ARGV: holder.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Claims an occurrence: -1 not the holder, 0 taken, 1 won.
/// KEYS: leader, last_run, last_id, runs. ARGV: holder, entry, instant ms, task id.
const CLAIM: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '-1')
if last >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
return 1
";

/// A lease and claims in Redis; see the module docs.
pub struct RedisLease {
    redis: RedisClient,
    prefix: String,
    leader: String,
    last_run: String,
    last_id: String,
    runs: String,
    acquire: ::redis::Script,
    renew: ::redis::Script,
    release: ::redis::Script,
    claim: ::redis::Script,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn error(context: &'static str) -> impl FnOnce(::redis::RedisError) -> LeaseError {
    move |source| LeaseError::Redis { context, source }
}

impl RedisLease {
    /// A store on `url` under `prefix`; connects on first use and reconnects by itself.
    ///
    /// # Errors
    /// [`LeaseError::UnsupportedUrl`] when the URL does not parse.
    pub fn new(url: &str, prefix: &str) -> Result<Self, LeaseError> {
        let redis = RedisClient::open(url)
            .map_err(|e| LeaseError::UnsupportedUrl(format!("{url} ({e})")))?;
        Ok(Self {
            redis,
            prefix: prefix.to_owned(),
            leader: format!("{prefix}:leader"),
            last_run: format!("{prefix}:last_run"),
            last_id: format!("{prefix}:last_id"),
            runs: format!("{prefix}:runs"),
            acquire: ::redis::Script::new(ACQUIRE),
            renew: ::redis::Script::new(RENEW),
            release: ::redis::Script::new(RELEASE),
            claim: ::redis::Script::new(CLAIM),
        })
    }

    /// The key holding the lease (tests delete it to steal the lease).
    pub fn leader_key(&self) -> &str {
        &self.leader
    }

    async fn connection(&self) -> Result<ConnectionManager, LeaseError> {
        self.redis
            .connection()
            .await
            .map_err(error("cannot connect"))
    }
}

#[async_trait]
impl LeaseStore for RedisLease {
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<Acquired, LeaseError> {
        let mut connection = self.connection().await?;
        let (held, remaining): (i64, i64) = self
            .acquire
            .key(&self.leader)
            .arg(holder)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(error("cannot take the beat lease"))?;
        Ok(if held == 1 {
            Acquired::Held
        } else {
            Acquired::Busy {
                retry_in: duration_ms(remaining),
            }
        })
    }

    async fn renew(&self, holder: &str, ttl: Duration) -> Result<bool, LeaseError> {
        let mut connection = self.connection().await?;
        let renewed: i64 = self
            .renew
            .key(&self.leader)
            .arg(holder)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(error("cannot renew the beat lease"))?;
        Ok(renewed == 1)
    }

    async fn release(&self, holder: &str) -> Result<(), LeaseError> {
        let mut connection = self.connection().await?;
        let _: i64 = self
            .release
            .key(&self.leader)
            .arg(holder)
            .invoke_async(&mut connection)
            .await
            .map_err(error("cannot release the beat lease"))?;
        Ok(())
    }

    async fn claim(
        &self,
        holder: &str,
        occurrence: &Occurrence,
        task_id: &str,
    ) -> Result<Claim, LeaseError> {
        let mut connection = self.connection().await?;
        let claimed: i64 = self
            .claim
            .key(&self.leader)
            .key(&self.last_run)
            .key(&self.last_id)
            .key(&self.runs)
            .arg(holder)
            .arg(&occurrence.entry)
            .arg(occurrence.at_ms())
            .arg(task_id)
            .invoke_async(&mut connection)
            .await
            .map_err(error("cannot claim a beat occurrence"))?;
        Ok(match claimed {
            1 => Claim::Won,
            0 => Claim::Taken,
            _ => Claim::NotHolder,
        })
    }

    async fn last_runs(&self, _entries: &[String]) -> Result<HashMap<String, LastRun>, LeaseError> {
        let mut connection = self.connection().await?;
        let (at, ids, runs): (
            HashMap<String, i64>,
            HashMap<String, String>,
            HashMap<String, u64>,
        ) = ::redis::pipe()
            .hgetall(&self.last_run)
            .hgetall(&self.last_id)
            .hgetall(&self.runs)
            .query_async(&mut connection)
            .await
            .map_err(error("cannot read the beat's last runs"))?;
        Ok(at
            .into_iter()
            .filter_map(|(entry, ms)| {
                let last = LastRun {
                    at: DateTime::from_timestamp_millis(ms)?,
                    task_id: ids.get(&entry).cloned().unwrap_or_default(),
                    runs: runs.get(&entry).copied().unwrap_or_default(),
                };
                Some((entry, last))
            })
            .collect())
    }

    async fn holder(&self) -> Result<Option<String>, LeaseError> {
        let mut connection = self.connection().await?;
        ::redis::cmd("GET")
            .arg(&self.leader)
            .query_async(&mut connection)
            .await
            .map_err(error("cannot read the beat lease"))
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.redis.describe(), self.prefix)
    }
}
