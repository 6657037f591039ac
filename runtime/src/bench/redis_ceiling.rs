//! The raw Redis ceiling of `wasmq bench redis`: the messages a Celery (or wasmq) client
//! LPUSHes for a task, the fastest a minimal consumer drains them on this Redis, and the
//! fastest round trip through it with a Redis result. No wasmq, no decoding beyond the
//! delivery tag, no work.
//!
//! The wire format is kombu's Redis transport (`kombu/transport/redis.py` and
//! `transport/virtual/base.py`, as Celery 5.x writes it; the messages are built by wasmq's
//! own encoder, `broker::redis::kombu`, byte for byte what wasmq LPUSHes): a list per queue, producers
//! `LPUSH` one JSON object per message — `body` (the Celery v2 body, base64), its content
//! type and encoding, the task `headers`, and `properties` with the delivery info and a
//! `delivery_tag` of its own — and consumers `BRPOP`. A consumer must keep what it took
//! until it acks (kombu's `QoS`): on receipt `ZADD unacked_index tag now` and
//! `HSET unacked tag [message, exchange, routing_key]` in one pipeline, on ack `ZREM` and
//! `HDEL` in another. The raw consumer does exactly that; a second variant takes up to 64
//! messages at a time (`RPOP` with a count), as wasmq's consumer pops a batch in one script.
//!
//! Like `ceiling.rs` for lapin, this file and `redis_db.rs` use the redis crate directly on
//! purpose: they measure Redis without wasmq, so they must not go through wasmq's broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use serde_json::{Map, json};

use crate::broker::redis::kombu;
use crate::protocol::{SendOptions, TaskMessage};

/// kombu's hash of the messages taken and not yet acked (`unacked_key`), by delivery tag.
pub(super) const UNACKED: &str = "unacked";
/// kombu's sorted set of the same tags by the time they were taken (`unacked_index_key`).
pub(super) const UNACKED_INDEX: &str = "unacked_index";

/// Messages per pipeline when pushing a backlog.
const PUSH_PIPELINE: usize = 1_000;

/// `n` messages of `task(2, 3)` (results off) for `queue`, exactly as wasmq's client and
/// Redis broker LPUSH them (`broker::redis::kombu::encode`, Celery's protocol 2 in kombu's
/// envelope, the fields Python's `apply_async` writes): each its own task id and delivery
/// tag.
pub(super) fn task_messages(task: &str, queue: &str, n: usize) -> Vec<Vec<u8>> {
    let origin = format!(
        "gen{}@{}",
        std::process::id(),
        gethostname::gethostname().to_string_lossy()
    );
    (0..n)
        .map(|_| {
            let mut message = TaskMessage::build(
                task,
                vec![json!(2), json!(3)],
                Map::new(),
                &SendOptions {
                    ignore_result: Some(true),
                    ..SendOptions::default()
                },
            );
            message.origin = Some(origin.clone());
            kombu::encode(&message.encode(), "", queue).into_bytes()
        })
        .collect()
}

/// The delivery tag of a kombu message: the one field a consumer must read to ack it.
fn delivery_tag(message: &[u8]) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct Message {
        properties: Properties,
    }
    #[derive(Deserialize)]
    struct Properties {
        delivery_tag: String,
    }
    let message: Message =
        serde_json::from_slice(message).context("a message without a delivery tag")?;
    Ok(message.properties.delivery_tag)
}

/// A connection of its own (a consumer blocked in `BRPOP` holds it), answering within 10 s.
pub(super) async fn connection(client: &redis::Client) -> anyhow::Result<MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("cannot connect to Redis")
}

/// LPUSHes `messages` to `queue`, one `LPUSH` each as a producer sends them, pipelined a
/// thousand at a time; returns the time it took.
pub(super) async fn push(
    client: &redis::Client,
    queue: &str,
    messages: &[Vec<u8>],
) -> anyhow::Result<Duration> {
    let mut connection = connection(client).await?;
    let started = Instant::now();
    for chunk in messages.chunks(PUSH_PIPELINE) {
        let mut pipe = redis::pipe();
        for message in chunk {
            pipe.lpush(queue, message.as_slice()).ignore();
        }
        pipe.query_async::<()>(&mut connection)
            .await
            .context("LPUSH")?;
    }
    Ok(started.elapsed())
}

/// Records a message taken from `queue` as kombu's `QoS.append` does: one pipeline of
/// `ZADD unacked_index` and `HSET unacked` (the message with its exchange and routing key).
fn receipt(pipe: &mut redis::Pipeline, tag: &str, message: &[u8], queue: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    // `[message, "", queue]`: the message is JSON already, so it is not encoded again.
    let mut held = Vec::with_capacity(message.len() + queue.len() + 8);
    held.push(b'[');
    held.extend_from_slice(message);
    held.extend_from_slice(b", \"\", ");
    held.extend_from_slice(&serde_json::to_vec(queue).unwrap_or_default());
    held.push(b']');
    pipe.zadd(UNACKED_INDEX, tag, now)
        .ignore()
        .hset(UNACKED, tag, held)
        .ignore();
}

/// Acks `tags` as kombu's `QoS.ack` does (`ZREM` and `HDEL`, one pipeline for them all).
fn ack(pipe: &mut redis::Pipeline, tags: &[String]) {
    pipe.zrem(UNACKED_INDEX, tags)
        .ignore()
        .hdel(UNACKED, tags)
        .ignore();
}

/// `consumers` raw consumers, each on a connection of its own, drain `n` queued messages
/// from `queue`. With `pop` 1 each takes one message at a time with `BRPOP`, as kombu does;
/// with more it takes up to `pop` at once with `RPOP queue pop` (falling back to `BRPOP`
/// when the list is empty). What it took is recorded in one receipt pipeline, and acked in
/// one pipeline once `ack_every` tags are gathered (or the drain is done). Returns the drain
/// time, from the first message taken to the last ack.
///
/// # Errors
/// When Redis cannot be reached or a message has no delivery tag.
pub(super) async fn raw_drain(
    client: &redis::Client,
    queue: &str,
    n: usize,
    consumers: usize,
    pop: usize,
    ack_every: usize,
) -> anyhow::Result<Duration> {
    let shared = Arc::new(Drain {
        queue: queue.to_owned(),
        n,
        pop,
        ack_every,
        taken: AtomicUsize::new(0),
        acked: AtomicUsize::new(0),
        started: OnceLock::new(),
        finished: OnceLock::new(),
    });
    let mut tasks = Vec::new();
    for _ in 0..consumers.max(1) {
        let connection = connection(client).await?;
        tasks.push(tokio::spawn(Arc::clone(&shared).consume(connection)));
    }
    for task in tasks {
        task.await??;
    }
    Ok(match (shared.started.get(), shared.finished.get()) {
        (Some(started), Some(finished)) => finished.duration_since(*started),
        _ => Duration::ZERO,
    })
}

/// One raw drain, shared by its consumers.
struct Drain {
    queue: String,
    n: usize,
    pop: usize,
    ack_every: usize,
    /// Messages taken so far, by every consumer.
    taken: AtomicUsize,
    /// Messages acked so far.
    acked: AtomicUsize,
    /// When the first message was taken.
    started: OnceLock<Instant>,
    /// When the last was acked.
    finished: OnceLock<Instant>,
}

impl Drain {
    /// One consumer's loop, until every message was taken; acks what it still holds.
    async fn consume(self: Arc<Self>, mut connection: MultiplexedConnection) -> anyhow::Result<()> {
        let mut unacked: Vec<String> = Vec::with_capacity(self.ack_every.max(self.pop));
        let give_up = Instant::now() + Duration::from_secs(120);
        while self.taken.load(Ordering::Relaxed) < self.n {
            anyhow::ensure!(
                Instant::now() < give_up,
                "the raw drain took over 2 minutes"
            );
            let messages = self.take(&mut connection).await?;
            if messages.is_empty() {
                continue;
            }
            self.started.get_or_init(Instant::now);
            self.taken.fetch_add(messages.len(), Ordering::Relaxed);
            let mut pipe = redis::pipe();
            for message in &messages {
                let tag = delivery_tag(message)?;
                receipt(&mut pipe, &tag, message, &self.queue);
                unacked.push(tag);
            }
            pipe.query_async::<()>(&mut connection)
                .await
                .context("the receipt")?;
            if unacked.len() >= self.ack_every || self.taken.load(Ordering::Relaxed) >= self.n {
                self.ack(&mut connection, &mut unacked).await?;
            }
        }
        self.ack(&mut connection, &mut unacked).await
    }

    /// Up to `pop` messages: `BRPOP` (0.1 s) for one, else `RPOP` with a count, then
    /// `BRPOP` when the list is empty.
    async fn take(&self, connection: &mut MultiplexedConnection) -> anyhow::Result<Vec<Vec<u8>>> {
        if self.pop > 1 {
            let popped: Option<Vec<Vec<u8>>> = redis::cmd("RPOP")
                .arg(&self.queue)
                .arg(self.pop)
                .query_async(connection)
                .await
                .context("RPOP")?;
            if let Some(messages) = popped.filter(|m| !m.is_empty()) {
                return Ok(messages);
            }
        }
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg(&self.queue)
            .arg(0.1)
            .query_async(connection)
            .await
            .context("BRPOP")?;
        Ok(popped.map(|(_, message)| vec![message]).unwrap_or_default())
    }

    /// Acks the tags gathered, in one pipeline, and notes when the last was acked.
    async fn ack(
        &self,
        connection: &mut MultiplexedConnection,
        unacked: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if unacked.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        ack(&mut pipe, unacked);
        pipe.query_async::<()>(connection)
            .await
            .context("the ack")?;
        let count = unacked.len();
        unacked.clear();
        if self.acked.fetch_add(count, Ordering::Relaxed) + count >= self.n {
            self.finished.get_or_init(Instant::now);
        }
        Ok(())
    }
}

/// The raw Redis round trip with a Redis result: the asker LPUSHes a message and waits on a
/// channel it subscribed to once; an answerer (its own connection) takes it with `BRPOP`,
/// writes the receipt, then in one pipeline stores a result (`SET … EX 3600`), publishes it
/// on the channel and acks — the broker's and the result store's part of a task round trip,
/// with no decoding and no work. Sends `messages` (the first warms up and is not counted)
/// and returns the round trips in milliseconds, sorted.
///
/// # Errors
/// When Redis cannot be reached, or an answer takes over 10 s.
pub(super) async fn raw_round_trips(
    client: &redis::Client,
    queue: &str,
    messages: &[Vec<u8>],
) -> anyhow::Result<Vec<f64>> {
    let channel = format!("{queue}.result");
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .context("cannot subscribe")?;
    pubsub.subscribe(&channel).await.context("SUBSCRIBE")?;
    let mut answers = pubsub.on_message();

    let answerer = tokio::spawn(answer(
        connection(client).await?,
        queue.to_owned(),
        channel.clone(),
    ));
    let mut asker = connection(client).await?;
    let mut samples = Vec::with_capacity(messages.len());
    let outcome = async {
        for (i, message) in messages.iter().enumerate() {
            let started = Instant::now();
            redis::cmd("LPUSH")
                .arg(queue)
                .arg(message.as_slice())
                .query_async::<()>(&mut asker)
                .await
                .context("LPUSH")?;
            match tokio::time::timeout(Duration::from_secs(10), answers.next()).await {
                Ok(Some(_)) => {}
                _ => anyhow::bail!("Redis round trip: no answer in 10 s"),
            }
            if i > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        anyhow::Ok(())
    }
    .await;
    answerer.abort();
    outcome?;
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// The answerer of [`raw_round_trips`]: takes each message from `requests`, writes its
/// receipt, then stores, publishes on `results` and acks its result in one pipeline; until
/// aborted.
async fn answer(
    mut connection: MultiplexedConnection,
    requests: String,
    results: String,
) -> anyhow::Result<()> {
    loop {
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg(&requests)
            .arg(1)
            .query_async(&mut connection)
            .await
            .context("BRPOP")?;
        let Some((_, message)) = popped else {
            continue;
        };
        let tag = delivery_tag(&message)?;
        let mut pipe = redis::pipe();
        receipt(&mut pipe, &tag, &message, &requests);
        pipe.query_async::<()>(&mut connection)
            .await
            .context("the receipt")?;
        let meta = format!(
            r#"{{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": null, "task_id": "{tag}"}}"#
        );
        let mut pipe = redis::pipe();
        pipe.set_ex(format!("{results}-meta-{tag}"), &meta, 3600)
            .ignore()
            .publish(&results, &meta)
            .ignore();
        ack(&mut pipe, std::slice::from_ref(&tag));
        pipe.query_async::<()>(&mut connection)
            .await
            .context("the result")?;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn messages_are_kombu_s_json() {
        let messages = task_messages("math.add", "q1", 2);
        assert_eq!(messages.len(), 2);
        let message: Value = serde_json::from_slice(&messages[0]).unwrap();
        // The body is Celery's protocol-2 body, as Python's apply_async writes it, in base64.
        assert_eq!(
            message["body"],
            "W1syLDNdLHt9LHsiY2FsbGJhY2tzIjpudWxsLCJlcnJiYWNrcyI6bnVsbCwiY2hhaW4iOm51bGwsImNob3JkIjpudWxsfV0="
        );
        assert_eq!(message["content-encoding"], "utf-8");
        assert_eq!(message["content-type"], "application/json");
        let headers = &message["headers"];
        assert_eq!(headers["task"], "math.add");
        assert_eq!(headers["lang"], "py");
        assert_eq!(headers["ignore_result"], true);
        assert_eq!(headers["root_id"], headers["id"]);
        assert!(headers["origin"].as_str().unwrap().starts_with("gen"));
        let properties = &message["properties"];
        assert_eq!(properties["correlation_id"], headers["id"]);
        assert_eq!(properties["delivery_mode"], 2);
        assert_eq!(
            properties["delivery_info"],
            json!({"exchange": "", "routing_key": "q1"})
        );
        assert_eq!(properties["priority"], 0);
        assert_eq!(properties["body_encoding"], "base64");
        let tag = delivery_tag(&messages[0]).unwrap();
        assert_eq!(properties["delivery_tag"], tag.as_str());
        // Each message is its own task with its own tag.
        let other: Value = serde_json::from_slice(&messages[1]).unwrap();
        assert_ne!(other["headers"]["id"], headers["id"]);
        assert_ne!(delivery_tag(&messages[1]).unwrap(), tag);
    }

    #[test]
    fn the_receipt_and_the_ack_are_kombu_s_commands() {
        let message = br#"{"properties":{"delivery_tag":"t1"}}"#;
        let mut pipe = redis::pipe();
        receipt(&mut pipe, "t1", message, "q1");
        ack(&mut pipe, &["t1".to_owned(), "t2".to_owned()]);
        let commands = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
        for expected in [
            "ZADD\r\n$13\r\nunacked_index",
            "HSET\r\n$7\r\nunacked\r\n$2\r\nt1",
            r#"[{"properties":{"delivery_tag":"t1"}}, "", "q1"]"#,
            "ZREM\r\n$13\r\nunacked_index\r\n$2\r\nt1\r\n$2\r\nt2",
            "HDEL\r\n$7\r\nunacked\r\n$2\r\nt1\r\n$2\r\nt2",
        ] {
            assert!(commands.contains(expected), "{expected} in {commands}");
        }
    }
}
