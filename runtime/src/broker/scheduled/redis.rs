//! The Redis sorted-set scheduler: delayed messages wait in Redis, not in the broker. One
//! idea, the claim protocol below, with its Lua scripts and the record format it stores;
//! hence the file's length.
//!
//! **Keys** (under a prefix, `wasmq.scheduler` by default): `<prefix>:due`, a sorted set
//! whose members are the waiting messages — a JSON record of the target queue and the
//! envelope, with a fresh id so two equal messages stay two members — scored by their due
//! time in Unix milliseconds; and `<prefix>:claimed`, the same members while a scheduler is
//! publishing them, scored by the deadline of that scheduler's lease.
//!
//! **One round** of [`RedisScheduler::publish_due`]: one Lua script atomically claims up to
//! `batch` members — first claims whose lease has expired (their scheduler died between
//! claim and publish), then due members, moving them from `due` to `claimed` with a new
//! lease — and returns the earliest due time still waiting. Each claimed message is then
//! published to the broker (with publisher confirms on RabbitMQ) and its claim removed. Two
//! schedulers never claim the same member, so in the normal path nothing is published twice;
//! a scheduler that dies mid-round leaves claims that another one publishes once the lease
//! expires, so nothing is lost. (A scheduler that stalls longer than its lease between claim
//! and publish can cause a duplicate: delivery is at-least-once, like the broker's own.)
//! A message the broker refuses goes back to `due`, retried a second later.
//!
//! Times come from the clocks of the processes involved: the publisher's clock sets the due
//! time (as it sets the message's `eta`), the scheduler's decides when it is due.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::SchedulerError;
use crate::broker::Broker;
use crate::protocol::{Envelope, Properties};
use crate::redis_client::RedisClient;

/// Claims expired leases, then due members, up to a limit; returns them with the earliest
/// due score still waiting.
/// KEYS: due, claimed. ARGV: now (ms), lease deadline (ms), limit.
const CLAIM_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
local taken = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(stale) do
  redis.call('ZADD', KEYS[2], ARGV[2], member)
  taken[#taken + 1] = member
end
if #taken < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit - #taken)
  for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2], ARGV[2], member)
    taken[#taken + 1] = member
  end
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {taken, next_due[2] or ''}
";

/// Puts a claimed member back among the due ones (the broker refused it).
/// KEYS: due, claimed. ARGV: member, new due score.
const RELEASE_SCRIPT: &str = r"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 1
";

/// Removes (ARGV[2] = '1') or counts the members of both sets bound for queue ARGV[1].
const FOR_QUEUE_SCRIPT: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local ok, record = pcall(cjson.decode, member)
    if ok and type(record) == 'table' and record['queue'] == ARGV[1] then
      n = n + 1
      if ARGV[2] == '1' then redis.call('ZREM', key, member) end
    end
  end
end
return n
";

/// How a [`RedisScheduler`] behaves.
#[derive(Debug, Clone)]
pub struct RedisSchedulerOptions {
    /// Key prefix: the sets are `<prefix>:due` and `<prefix>:claimed`. Schedulers sharing a
    /// prefix share the work. Default: `wasmq.scheduler`.
    pub prefix: String,
    /// How long a claim is held before another scheduler may take it over; longer than any
    /// publish takes. Default: 30 s.
    pub lease: Duration,
    /// The longest sleep between rounds; messages scheduled by other processes are seen
    /// within it. Default: 100 ms.
    pub poll_interval: Duration,
    /// The most messages claimed in one round. Default: 100.
    pub batch: usize,
}

impl Default for RedisSchedulerOptions {
    fn default() -> Self {
        Self {
            prefix: "wasmq.scheduler".into(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            batch: 100,
        }
    }
}

/// A message waiting in Redis: where it goes and what it is.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Makes each scheduled message a distinct member.
    id: String,
    queue: String,
    headers: Map<String, Value>,
    properties: Properties,
    body: Body,
}

/// Task bodies are JSON text; anything else is kept as bytes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Body {
    Text(String),
    Bytes(Vec<u8>),
}

impl Record {
    fn new(queue: &str, envelope: &Envelope) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            queue: queue.to_owned(),
            headers: envelope.headers.clone(),
            properties: envelope.properties.clone(),
            body: match std::str::from_utf8(&envelope.body) {
                Ok(text) => Body::Text(text.to_owned()),
                Err(_) => Body::Bytes(envelope.body.clone()),
            },
        }
    }

    fn into_envelope(self) -> (String, Envelope) {
        let body = match self.body {
            Body::Text(text) => text.into_bytes(),
            Body::Bytes(bytes) => bytes,
        };
        (
            self.queue,
            Envelope {
                headers: self.headers,
                properties: self.properties,
                body,
            },
        )
    }
}

/// Messages claimed in one call of [`RedisScheduler::claim`], with their lease.
#[derive(Debug)]
pub struct Claimed {
    /// The claimed members, as stored.
    pub members: Vec<String>,
    /// The earliest due time still waiting (Unix ms), if any.
    pub next_due_ms: Option<i64>,
}

/// What one round of [`RedisScheduler::publish_due`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Messages handed to the broker.
    pub published: usize,
    /// Whether the round claimed a full batch (more may be due).
    pub full: bool,
    /// The earliest due time still waiting (Unix ms), if any.
    pub next_due_ms: Option<i64>,
}

/// Holds delayed messages in a Redis sorted set until they are due; see the module docs.
pub struct RedisScheduler {
    redis: RedisClient,
    options: RedisSchedulerOptions,
    due_key: String,
    claimed_key: String,
    claim: ::redis::Script,
    release: ::redis::Script,
    for_queue: ::redis::Script,
    /// Wakes this process's poller when it schedules a message due before the next round.
    wake: Notify,
}

impl std::fmt::Debug for RedisScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisScheduler")
            .field("url", &self.redis.describe())
            .field("prefix", &self.options.prefix)
            .finish_non_exhaustive()
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `error`, met while doing `what`.
fn redis_error(what: &str, error: ::redis::RedisError) -> SchedulerError {
    SchedulerError::Redis {
        context: what.to_owned(),
        source: error,
    }
}

impl RedisScheduler {
    /// A scheduler on `url` (`redis://host:port/db`); connects on first use and reconnects
    /// by itself.
    ///
    /// # Errors
    /// [`SchedulerError::UnsupportedUrl`] when the URL does not parse.
    pub fn new(url: &str, options: RedisSchedulerOptions) -> Result<Self, SchedulerError> {
        let redis = RedisClient::open(url)
            .map_err(|e| SchedulerError::UnsupportedUrl(format!("{url} ({e})")))?;
        Ok(Self {
            redis,
            due_key: format!("{}:due", options.prefix),
            claimed_key: format!("{}:claimed", options.prefix),
            options,
            claim: ::redis::Script::new(CLAIM_SCRIPT),
            release: ::redis::Script::new(RELEASE_SCRIPT),
            for_queue: ::redis::Script::new(FOR_QUEUE_SCRIPT),
            wake: Notify::new(),
        })
    }

    /// The options it runs with.
    pub fn options(&self) -> &RedisSchedulerOptions {
        &self.options
    }

    /// A description for logs, e.g. `redis://127.0.0.1:6379/0 (wasmq.scheduler)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.redis.describe(), self.options.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, SchedulerError> {
        self.redis
            .connection()
            .await
            .map_err(|e| redis_error(&format!("cannot connect to {}", self.redis.describe()), e))
    }

    /// Holds `envelope` for `queue` until `delay` from now.
    ///
    /// # Errors
    /// When Redis does not take it; it was not scheduled.
    pub async fn schedule(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Duration,
    ) -> Result<(), SchedulerError> {
        let member =
            serde_json::to_string(&Record::new(queue, envelope)).map_err(SchedulerError::Encode)?;
        let due = now_ms().saturating_add(millis(delay));
        let mut connection = self.connection().await?;
        let _: i64 = ::redis::cmd("ZADD")
            .arg(&self.due_key)
            .arg(due)
            .arg(member)
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot schedule a message", e))?;
        if delay < self.options.poll_interval {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Claims up to `limit` messages — expired claims first, then due messages — for
    /// `lease`. Public for tests and tools; [`RedisScheduler::publish_due`] is the normal
    /// way to use it.
    ///
    /// # Errors
    /// When Redis fails; nothing was claimed.
    pub async fn claim(&self, limit: usize, lease: Duration) -> Result<Claimed, SchedulerError> {
        let now = now_ms();
        let mut connection = self.connection().await?;
        let (members, next_due): (Vec<String>, String) = self
            .claim
            .key(&self.due_key)
            .key(&self.claimed_key)
            .arg(now)
            .arg(now.saturating_add(millis(lease)))
            .arg(limit.max(1))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot claim due messages", e))?;
        Ok(Claimed {
            members,
            next_due_ms: next_due.parse::<f64>().ok().map(|ms| ms as i64),
        })
    }

    /// Claims what is due and publishes it to `broker`, removing each claim once the broker
    /// has confirmed the message.
    ///
    /// # Errors
    /// When Redis fails (claims already made are published by a later round once their
    /// lease expires).
    pub async fn publish_due(&self, broker: &dyn Broker) -> Result<Round, SchedulerError> {
        let claimed = self.claim(self.options.batch, self.options.lease).await?;
        let full = claimed.members.len() >= self.options.batch;
        let published = futures_util::future::join_all(
            claimed
                .members
                .into_iter()
                .map(|member| self.publish_one(broker, member)),
        )
        .await;
        let published = published.into_iter().collect::<Result<Vec<bool>, _>>()?;
        Ok(Round {
            published: published.into_iter().filter(|p| *p).count(),
            full,
            next_due_ms: claimed.next_due_ms,
        })
    }

    /// Publishes one claimed member; true when the broker took it.
    async fn publish_one(
        &self,
        broker: &dyn Broker,
        member: String,
    ) -> Result<bool, SchedulerError> {
        let mut connection = self.connection().await?;
        let record: Record = match serde_json::from_str(&member) {
            Ok(record) => record,
            Err(error) => {
                let shown: String = member.chars().take(200).collect();
                tracing::error!(%error, member = %shown, "dropping an unreadable scheduled message");
                self.unclaim(&mut connection, &member).await?;
                return Ok(false);
            }
        };
        let (queue, envelope) = record.into_envelope();
        match broker.publish(&queue, &envelope, None).await {
            Ok(()) => {
                self.unclaim(&mut connection, &member).await?;
                Ok(true)
            }
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    queue,
                    "cannot publish a due message; retrying in a second"
                );
                let _: i64 = self
                    .release
                    .key(&self.due_key)
                    .key(&self.claimed_key)
                    .arg(&member)
                    .arg(now_ms().saturating_add(1000))
                    .invoke_async(&mut connection)
                    .await
                    .map_err(|e| redis_error("cannot release a claim", e))?;
                Ok(false)
            }
        }
    }

    async fn unclaim(
        &self,
        connection: &mut ConnectionManager,
        member: &str,
    ) -> Result<(), SchedulerError> {
        let _: i64 = ::redis::cmd("ZREM")
            .arg(&self.claimed_key)
            .arg(member)
            .query_async(connection)
            .await
            .map_err(|e| redis_error("cannot remove a claim", e))?;
        Ok(())
    }

    /// Publishes due messages to `broker` until `stopped` completes: a round, then a sleep
    /// until the earliest due time or the poll interval, whichever is sooner (or until this
    /// process schedules something sooner). Redis errors are logged and retried with backoff.
    pub async fn run(&self, broker: &dyn Broker, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut backoff = Duration::from_millis(100);
        loop {
            let pause = match self.publish_due(broker).await {
                Ok(round) if round.full => Duration::ZERO,
                Ok(round) => {
                    backoff = Duration::from_millis(100);
                    let until_due = round.next_due_ms.map_or(self.options.poll_interval, |due| {
                        Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
                    });
                    until_due.min(self.options.poll_interval)
                }
                Err(error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "the scheduler cannot reach Redis; retrying in {backoff:?}"
                    );
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    pause
                }
            };
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Messages waiting (or being published) for `queue`. Scans every member: meant for
    /// status and tests, not for hot paths.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn pending(&self, queue: &str) -> Result<u64, SchedulerError> {
        self.for_queue(queue, false).await
    }

    /// Drops every message waiting for `queue`; returns how many.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn forget_queue(&self, queue: &str) -> Result<u64, SchedulerError> {
        self.for_queue(queue, true).await
    }

    async fn for_queue(&self, queue: &str, remove: bool) -> Result<u64, SchedulerError> {
        let mut connection = self.connection().await?;
        self.for_queue
            .key(&self.due_key)
            .key(&self.claimed_key)
            .arg(queue)
            .arg(if remove { "1" } else { "0" })
            .invoke_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot scan scheduled messages", e))
    }

    /// Deletes both sets (tests clean up with it).
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn clear(&self) -> Result<(), SchedulerError> {
        let mut connection = self.connection().await?;
        let _: i64 = ::redis::cmd("DEL")
            .arg(&self.due_key)
            .arg(&self.claimed_key)
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot delete the scheduler's keys", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_text_bodies_readable_and_bytes_exact() {
        let envelope = Envelope {
            body: br#"[[2,3],{},{}]"#.to_vec(),
            ..Envelope::default()
        };
        let json = serde_json::to_string(&Record::new("q", &envelope)).unwrap();
        assert!(json.contains(r#""body":"[[2,3],{},{}]""#), "{json}");
        let record: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(record.into_envelope(), ("q".to_owned(), envelope));
        let binary = Envelope {
            body: vec![0xff, 0, 1],
            ..Envelope::default()
        };
        let json = serde_json::to_string(&Record::new("q", &binary)).unwrap();
        let record: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(record.into_envelope().1, binary);
        // Two equal messages are two members.
        assert_ne!(
            serde_json::to_string(&Record::new("q", &binary)).unwrap(),
            json
        );
    }
}
