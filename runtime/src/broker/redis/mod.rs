//! Redis as a broker, wire-compatible with Celery's (kombu's Redis transport): a Python
//! Celery client, a Python worker and a wasmq worker can share one Redis database.
//!
//! The layout is kombu's ([`kombu`], `docs/redis-wire.md`):
//!
//! * a queue is a list per priority step (`celery`, `celery\x06\x163`, …); producers `LPUSH`,
//!   consumers pop from the right, the lists of the highest priority (step 0) first;
//! * a message is kombu's JSON envelope, its body base64-encoded, with a `delivery_tag`;
//! * a delivered, unacknowledged message is kept in the `unacked` hash (tag →
//!   `[message, exchange, routing_key]`) and the `unacked_index` sorted set (tag → when);
//!   acknowledging removes both; a message unacknowledged for the visibility timeout is put
//!   back (`restore_visible`, under the `unacked_mutex` lock), by any worker, Python or wasmq;
//! * queues are declared in kombu's binding tables (`_kombu.binding.<exchange>`), fanout
//!   exchanges (`celery.pidbox` for remote control and Celery's revocations, `celeryev` for
//!   events) are pub/sub channels `/<db>.<exchange>[/<routing key>]` ([`fanout`]).
//!
//! What wasmq adds, invisible to Python:
//!
//! * **Atomic delivery.** A consumer pops and records a message in one script (kombu pops
//!   with `BRPOP` and records it in a second command, so a worker killed in between loses
//!   the message); only an idle consumer waits in `BRPOP` (timeout 1 s) and records what it
//!   gets at once ([`consumer`]).
//! * **Recovery by lease** ([`upkeep`]): every consumer keeps a lease in `wasmq.consumers`
//!   (renewed every second) and the tags it holds in `wasmq.held.<consumer>`. When a lease
//!   lapses (the worker was killed), the first wasmq worker to notice puts its messages back
//!   within seconds, not a visibility timeout (an hour by default) later. A live consumer
//!   also keeps its messages' `unacked_index` scores fresh, so a task that runs longer than
//!   the visibility timeout is never restored under it (and run twice) by anyone.
//! * **Delays in a sorted set** (the seed's design): a message published with a delay waits
//!   in `wasmq.delayed.<queue>`, scored by when it is due, and a consumer of the queue moves
//!   it to its list when due, atomically; nothing holds it meanwhile, so a two-hour
//!   countdown runs once whatever the visibility timeout. A Python client's countdown arrives
//!   in the list with an `eta`; the worker hands it back to the delay set and acknowledges it.
//! * **Dead letters** in `wasmq.dead.<queue>` (newest first, the newest 10,000), and
//!   revocations in `wasmq.revoked` (scored by when, kept a day), so a worker that starts
//!   later still refuses a revoked task.

mod consumer;
mod fanout;
pub mod kombu;
mod unacked;
mod upkeep;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::AsyncCommands;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::{
    Broker, BrokerError, Consumer, ControlBroadcast, ControlReply, ControlRequest, DeadLetter,
    REVOKE_EXPIRES, ReleaseBell, Revocation,
};
use crate::protocol::Envelope;
use crate::protocol::events::EventMessage;

/// How a Redis broker behaves; the defaults are kombu's where kombu has one.
#[derive(Debug, Clone)]
pub struct RedisBrokerOptions {
    /// How long a delivered message may stay unacknowledged before any worker puts it back
    /// (kombu's `visibility_timeout`, an hour). wasmq's own consumers keep their messages
    /// fresh, so this only matters for messages whose consumer is not a live wasmq one.
    pub visibility_timeout: Duration,
    /// How long a consumer's lease lasts unrenewed: a wasmq worker that dies has its
    /// messages put back this long after its last renewal.
    pub lease: Duration,
    /// How often a consumer renews its lease, looks for lapsed ones and timed-out messages.
    pub heartbeat: Duration,
}

impl Default for RedisBrokerOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            lease: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// How many dead letters a queue keeps (the newest).
const DEAD_LETTERS_KEPT: isize = 10_000;

/// The broker at a `redis://` (or `rediss://`) URL. Clones share one connection.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: ::redis::Client,
    /// `redis://host:port/db`, without credentials.
    shown: String,
    /// The database number (part of kombu's fanout channel names).
    db: i64,
    options: RedisBrokerOptions,
    connection: OnceCell<ConnectionManager>,
    /// Queues this process has declared (bound in kombu's tables), so it binds each once.
    declared: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.shown)
    }
}

/// A Redis error at one step of the broker.
pub(crate) fn redis_error(context: &str, source: ::redis::RedisError) -> BrokerError {
    BrokerError::Redis {
        context: context.to_owned(),
        source,
    }
}

impl RedisBrokerOptions {
    /// Splits the broker's own options off `url`'s query (`visibility_timeout` and `lease`,
    /// in seconds, as kombu's `broker_transport_options` name the first): the URL Redis
    /// sees, and the options.
    ///
    /// # Errors
    /// [`BrokerError::InvalidOption`] for a value that is not a positive number of seconds.
    pub fn from_url(url: &str) -> Result<(String, Self), BrokerError> {
        let mut options = Self::default();
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), options));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let target = match name {
                "visibility_timeout" => &mut options.visibility_timeout,
                "lease" => &mut options.lease,
                _ => {
                    kept.push(pair);
                    continue;
                }
            };
            *target = value
                .parse::<f64>()
                .ok()
                .filter(|secs| secs.is_finite() && *secs > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| BrokerError::InvalidOption {
                    option: name.to_owned(),
                    value: value.to_owned(),
                })?;
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, options))
    }
}

impl RedisBroker {
    /// The broker at `url` (`redis://[user:password@]host:port/db`); connects on first use.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub fn new(url: &str, options: RedisBrokerOptions) -> Result<Self, BrokerError> {
        let client = ::redis::Client::open(url).map_err(|e| redis_error("invalid Redis URL", e))?;
        let info = client.get_connection_info();
        let db = info.redis_settings().db();
        let scheme = if url.starts_with("rediss://") {
            "rediss"
        } else {
            "redis"
        };
        let shown = format!("{scheme}://{}/{db}", info.addr());
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                shown,
                db,
                options,
                connection: OnceCell::new(),
                declared: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The shared connection (commands from every task are pipelined on it), connecting on
    /// first use. It reconnects by itself; a reply may take up to 10 s (a script moving a
    /// batch of messages on a loaded server) before the command counts as failed.
    async fn connection(&self) -> Result<ConnectionManager, BrokerError> {
        self.inner
            .connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(10)));
                ConnectionManager::new_with_config(self.inner.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(|e| redis_error("cannot connect to Redis", e))
    }

    /// Binds `queue` as Celery declares a queue of its name (exchange and routing key named
    /// after it), once per process, so Python publishers find it and
    /// [`Broker::publish_existing`] knows it.
    async fn declare(&self, queue: &str) -> Result<(), BrokerError> {
        if self
            .inner
            .declared
            .lock()
            .expect("declared")
            .contains(queue)
        {
            return Ok(());
        }
        let member = kombu::binding_member(queue, queue);
        let mut connection = self.connection().await?;
        ::redis::pipe()
            .sadd(kombu::binding_key(queue), &member)
            .ignore()
            .sadd(kombu::permanent_binding_key(queue), &member)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| redis_error(&format!("cannot declare queue {queue}"), e))?;
        self.inner
            .declared
            .lock()
            .expect("declared")
            .insert(queue.to_owned());
        Ok(())
    }

    /// Puts `envelope` into `queue`'s list for its priority, or into the queue's delay set
    /// when it is due later.
    async fn push(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let payload = kombu::encode(envelope, "", queue);
        let key = kombu::queue_key(queue, envelope.properties.priority.unwrap_or(0));
        let mut connection = self.connection().await?;
        match delay.filter(|d| !d.is_zero()) {
            None => connection
                .lpush::<_, _, ()>(&key, payload)
                .await
                .map_err(|e| redis_error(&format!("cannot publish to {queue}"), e)),
            Some(delay) => {
                let due = crate::db::now_ms()
                    .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                connection
                    .zadd::<_, _, _, ()>(delayed_key(queue), format!("{key}\n{payload}"), due)
                    .await
                    .map_err(|e| redis_error(&format!("cannot delay a message for {queue}"), e))
            }
        }
    }

    /// The queues bound to direct `exchange` with `routing_key` in kombu's binding table.
    async fn bound(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, BrokerError> {
        let mut connection = self.connection().await?;
        let members: Vec<String> = connection
            .smembers(kombu::binding_key(exchange))
            .await
            .map_err(|e| redis_error("cannot read a binding table", e))?;
        Ok(kombu::bound_queues(&members, routing_key))
    }

    /// The database number, as kombu's channel names carry it.
    fn db(&self) -> i64 {
        self.inner.db
    }
}

/// Where the messages for `queue` that are due later wait (member `<list key>\n<message>`,
/// scored by when they are due, Unix ms).
fn delayed_key(queue: &str) -> String {
    format!("wasmq.delayed.{queue}")
}

/// Where `queue`'s dead letters are kept, newest first.
fn dead_key(queue: &str) -> String {
    format!("wasmq.dead.{queue}")
}

/// Revocations, scored by when they were made (Unix ms).
const REVOKED: &str = "wasmq.revoked";

/// One dead letter as kept in Redis.
fn dead_letter_json(
    queue: &str,
    payload: &str,
    task_id: Option<&str>,
    reason: &str,
    delivery_count: u32,
) -> String {
    json!({
        "queue": queue,
        "task_id": task_id,
        "reason": reason,
        "delivery_count": delivery_count,
        "dead_at_ms": crate::db::now_ms(),
        "message": payload,
    })
    .to_string()
}

fn parse_dead_letter(json: &str) -> Option<DeadLetter> {
    let value: Value = serde_json::from_str(json).ok()?;
    let payload = value.get("message")?.as_str()?;
    let envelope = kombu::decode(payload.as_bytes()).map_or_else(
        || Envelope {
            headers: serde_json::Map::new(),
            properties: crate::protocol::Properties::default(),
            body: payload.as_bytes().to_vec(),
        },
        |received| received.envelope,
    );
    Some(DeadLetter {
        queue: value.get("queue")?.as_str()?.to_owned(),
        task_id: value
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        reason: value.get("reason")?.as_str()?.to_owned(),
        delivery_count: value
            .get("delivery_count")
            .and_then(Value::as_u64)
            .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        dead_at_ms: value.get("dead_at_ms").and_then(Value::as_i64).unwrap_or(0),
        envelope,
    })
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.declare(queue).await?;
        self.push(queue, envelope, delay).await
    }

    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        if !self.queue_exists(queue).await? {
            return Err(BrokerError::QueueNotFound {
                queue: queue.to_owned(),
            });
        }
        self.push(queue, envelope, delay).await
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError> {
        let mut connection = self.connection().await?;
        let mut pipe = ::redis::pipe();
        pipe.sismember(
            kombu::binding_key(queue),
            kombu::binding_member(queue, queue),
        );
        for key in kombu::queue_keys(queue) {
            pipe.exists(key);
        }
        let found: Vec<bool> = pipe
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error(&format!("cannot look for queue {queue}"), e))?;
        Ok(found.into_iter().any(|found| found))
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        // Declared by the fetcher before its first pop (and again after Redis comes back):
        // a worker started while Redis is down starts, reports not-consuming and retries.
        Ok(Box::new(
            consumer::RedisConsumer::start(self.clone(), queues, prefetch).await,
        ))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        let kept: Vec<String> = connection
            .lrange(dead_key(queue), 0, stop)
            .await
            .map_err(|e| redis_error("cannot list dead letters", e))?;
        Ok(kept
            .iter()
            .filter_map(|json| parse_dead_letter(json))
            .collect())
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut connection = self.connection().await?;
        let mut pipe = ::redis::pipe();
        for key in kombu::queue_keys(queue) {
            pipe.llen(key);
        }
        pipe.zcard(delayed_key(queue));
        let lengths: Vec<u64> = pipe
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error(&format!("cannot count queue {queue}"), e))?;
        Ok(lengths.iter().sum())
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let mut connection = self.connection().await?;
        let member = kombu::binding_member(queue, queue);
        let mut keys = kombu::queue_keys(queue);
        keys.push(delayed_key(queue));
        keys.push(dead_key(queue));
        ::redis::pipe()
            .del(keys)
            .ignore()
            .srem(kombu::binding_key(queue), &member)
            .ignore()
            .srem(kombu::permanent_binding_key(queue), &member)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| redis_error(&format!("cannot delete queue {queue}"), e))?;
        self.inner.declared.lock().expect("declared").remove(queue);
        Ok(())
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        let json = serde_json::to_string(revocation).map_err(|source| BrokerError::Encode {
            what: "a revocation",
            source,
        })?;
        let oldest =
            crate::db::now_ms() - i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
        let mut connection = self.connection().await?;
        ::redis::pipe()
            .atomic()
            .zadd(REVOKED, &json, revocation.revoked_at_ms)
            .ignore()
            .zrembyscore(REVOKED, "-inf", oldest)
            .ignore()
            .publish(fanout::revoke_channel(self.db()), &json)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| redis_error("cannot revoke a task", e))
    }

    async fn revocations(
        &self,
        _node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        fanout::listen_for_revocations(self).await
    }

    async fn control_requests(
        &self,
        node: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<ControlRequest>>, BrokerError> {
        fanout::listen_for_control(self, node).await.map(Some)
    }

    async fn broadcast_control(
        &self,
        broadcast: &ControlBroadcast,
    ) -> Result<Vec<ControlReply>, BrokerError> {
        fanout::broadcast(self, broadcast).await
    }

    async fn ring_release(&self, bell: &ReleaseBell) -> Result<(), BrokerError> {
        let json = serde_json::to_string(bell).map_err(|source| BrokerError::Encode {
            what: "a release bell",
            source,
        })?;
        let mut connection = self.connection().await?;
        connection
            .publish::<_, _, ()>(fanout::release_channel(self.db()), json)
            .await
            .map_err(|e| redis_error("cannot ring the release bell", e))
    }

    async fn release_bells(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<ReleaseBell>>, BrokerError> {
        fanout::listen_for_bells(self).await.map(Some)
    }

    async fn publish_events(&self, message: &EventMessage) -> Result<(), BrokerError> {
        fanout::publish_events(self, message).await
    }

    async fn events(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<EventMessage>>, BrokerError> {
        fanout::listen_for_events(self).await.map(Some)
    }

    async fn forget_node(&self, _node: &str) -> Result<(), BrokerError> {
        // Revocations are one sorted set every worker reads; nothing waits per node.
        Ok(())
    }

    fn describe(&self) -> String {
        self.inner.shown.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_keep_the_message_and_the_reason() {
        let envelope = Envelope {
            headers: serde_json::Map::from_iter([("id".to_owned(), json!("t1"))]),
            properties: crate::protocol::Properties::default(),
            body: b"[[], {}, {}]".to_vec(),
        };
        let payload = kombu::encode(&envelope, "", "q");
        let json = dead_letter_json("q", &payload, Some("t1"), "poison", 4);
        let dead = parse_dead_letter(&json).unwrap();
        assert_eq!(dead.queue, "q");
        assert_eq!(dead.task_id.as_deref(), Some("t1"));
        assert_eq!(dead.reason, "poison");
        assert_eq!(dead.delivery_count, 4);
        assert_eq!(dead.envelope.body, envelope.body);
        let garbage = dead_letter_json("q", "not json", None, "malformed", 1);
        assert_eq!(
            parse_dead_letter(&garbage).unwrap().envelope.body,
            b"not json"
        );
    }

    #[test]
    fn the_brokers_options_come_from_the_url_query() {
        let (url, options) = RedisBrokerOptions::from_url(
            "redis://h:6379/2?visibility_timeout=7200&protocol=resp3&lease=2.5",
        )
        .unwrap();
        assert_eq!(url, "redis://h:6379/2?protocol=resp3");
        assert_eq!(options.visibility_timeout, Duration::from_secs(7200));
        assert_eq!(options.lease, Duration::from_millis(2500));
        let (url, options) = RedisBrokerOptions::from_url("redis://h/0").unwrap();
        assert_eq!(url, "redis://h/0");
        assert_eq!(options.visibility_timeout, Duration::from_secs(3600));
        let error = RedisBrokerOptions::from_url("redis://h/0?lease=soon").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid broker option lease=\"soon\" (expected a positive number of seconds)"
        );
        assert!(RedisBrokerOptions::from_url("redis://h/0?visibility_timeout=0").is_err());
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        let broker = RedisBroker::new(
            "redis://:secret@127.0.0.1:6390/3",
            RedisBrokerOptions::default(),
        )
        .unwrap();
        assert_eq!(broker.describe(), "redis://127.0.0.1:6390/3");
        assert_eq!(broker.db(), 3);
        assert!(RedisBroker::new("nope://x", RedisBrokerOptions::default()).is_err());
    }
}
