//! The raw Redis ceiling of `wasmq bench redis`: the messages a Celery (or wasmq) client
//! LPUSHes for a task, the fastest a minimal consumer drains them on this Redis, and the
//! fastest round trip through it with a Redis result. No wasmq, no decoding beyond the
//! delivery tag, no work.
//!
//! The wire format is kombu's Redis transport (`kombu/transport/redis.py` and
//! `transport/virtual/base.py`, as Celery 5.x writes it): a list per queue, producers
//! `LPUSH` one JSON object per message — `body` (the Celery v2 body, base64), its content
//! type and encoding, the task `headers`, and `properties` with the delivery info and a
//! `delivery_tag` of its own — and consumers `BRPOP`. A consumer must keep what it took
//! until it acks (kombu's `QoS`): on receipt `ZADD unacked_index tag now` and
//! `HSET unacked tag [message, exchange, routing_key]` in one pipeline, on ack `ZREM` and
//! `HDEL` in another. The raw consumer does exactly that.
//!
//! Like `ceiling.rs` for lapin, this file and `redis_db.rs` use the redis crate directly on
//! purpose: they measure Redis without wasmq, so they must not go through wasmq's broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::protocol::{Envelope, SendOptions, TaskMessage};

/// kombu's hash of the messages taken and not yet acked (`unacked_key`), by delivery tag.
pub(super) const UNACKED: &str = "unacked";
/// kombu's sorted set of the same tags by the time they were taken (`unacked_index_key`).
pub(super) const UNACKED_INDEX: &str = "unacked_index";

/// Messages per pipeline when pushing a backlog.
const PUSH_PIPELINE: usize = 1_000;

/// `n` messages of `task(2, 3)` (results off) for `queue` as kombu LPUSHes them: each its own
/// task id and delivery tag, the headers and body wasmq's client builds (Celery's protocol
/// 2, the same fields Python's `apply_async` writes).
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
            let tag = uuid::Uuid::new_v4().to_string();
            kombu_json(&message.encode(), queue, &tag)
        })
        .collect()
}

/// The JSON kombu LPUSHes for `envelope` published to `queue` through the default exchange.
pub(super) fn kombu_json(envelope: &Envelope, queue: &str, delivery_tag: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Message<'a> {
        body: String,
        #[serde(rename = "content-encoding")]
        content_encoding: &'a str,
        #[serde(rename = "content-type")]
        content_type: &'a str,
        headers: &'a Map<String, Value>,
        properties: Properties<'a>,
    }
    #[derive(Serialize)]
    struct Properties<'a> {
        correlation_id: &'a str,
        reply_to: &'a str,
        delivery_mode: u8,
        delivery_info: DeliveryInfo<'a>,
        priority: u8,
        body_encoding: &'a str,
        delivery_tag: &'a str,
    }
    #[derive(Serialize)]
    struct DeliveryInfo<'a> {
        exchange: &'a str,
        routing_key: &'a str,
    }
    let properties = &envelope.properties;
    let message = Message {
        body: base64(&envelope.body),
        content_encoding: properties.content_encoding.as_deref().unwrap_or("utf-8"),
        content_type: properties
            .content_type
            .as_deref()
            .unwrap_or("application/json"),
        headers: &envelope.headers,
        properties: Properties {
            correlation_id: properties.correlation_id.as_deref().unwrap_or_default(),
            reply_to: properties.reply_to.as_deref().unwrap_or_default(),
            delivery_mode: properties.delivery_mode.unwrap_or(2),
            delivery_info: DeliveryInfo {
                exchange: "",
                routing_key: queue,
            },
            priority: properties.priority.unwrap_or(0),
            body_encoding: "base64",
            delivery_tag,
        },
    };
    serde_json::to_vec(&message).expect("a kombu message always serializes")
}

/// Standard base64 with padding (RFC 4648 §4), as kombu encodes bodies.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
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
/// from `queue`: `BRPOP`, then the receipt pipeline, then the ack pipeline — for each
/// message (`ack_every` 1), or for every `ack_every`-th with the tags gathered since.
/// Returns the drain time, from the first message taken to the last ack.
///
/// # Errors
/// When Redis cannot be reached or a message has no delivery tag.
pub(super) async fn raw_drain(
    client: &redis::Client,
    queue: &str,
    n: usize,
    consumers: usize,
    ack_every: usize,
) -> anyhow::Result<Duration> {
    let taken = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let started: Arc<OnceLock<Instant>> = Arc::default();
    let finished: Arc<OnceLock<Instant>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..consumers.max(1) {
        let mut connection = connection(client).await?;
        let (queue, taken, acked) = (queue.to_owned(), Arc::clone(&taken), Arc::clone(&acked));
        let (started, finished) = (Arc::clone(&started), Arc::clone(&finished));
        tasks.push(tokio::spawn(async move {
            let mut unacked: Vec<String> = Vec::with_capacity(ack_every);
            let give_up = Instant::now() + Duration::from_secs(120);
            while taken.load(Ordering::Relaxed) < n {
                anyhow::ensure!(
                    Instant::now() < give_up,
                    "the raw drain took over 2 minutes"
                );
                let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
                    .arg(&queue)
                    .arg(0.1)
                    .query_async(&mut connection)
                    .await
                    .context("BRPOP")?;
                let Some((_, message)) = popped else {
                    continue;
                };
                started.get_or_init(Instant::now);
                taken.fetch_add(1, Ordering::Relaxed);
                let tag = delivery_tag(&message)?;
                let mut pipe = redis::pipe();
                receipt(&mut pipe, &tag, &message, &queue);
                pipe.query_async::<()>(&mut connection)
                    .await
                    .context("the receipt")?;
                unacked.push(tag);
                if unacked.len() >= ack_every || taken.load(Ordering::Relaxed) >= n {
                    let mut pipe = redis::pipe();
                    ack(&mut pipe, &unacked);
                    pipe.query_async::<()>(&mut connection)
                        .await
                        .context("the ack")?;
                    let count = unacked.len();
                    unacked.clear();
                    if acked.fetch_add(count, Ordering::Relaxed) + count >= n {
                        finished.get_or_init(Instant::now);
                    }
                }
            }
            if !unacked.is_empty() {
                let mut pipe = redis::pipe();
                ack(&mut pipe, &unacked);
                pipe.query_async::<()>(&mut connection)
                    .await
                    .context("the ack")?;
                let count = unacked.len();
                if acked.fetch_add(count, Ordering::Relaxed) + count >= n {
                    finished.get_or_init(Instant::now);
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(match (started.get(), finished.get()) {
        (Some(started), Some(finished)) => finished.duration_since(*started),
        _ => Duration::ZERO,
    })
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
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xfe]), "+//+");
    }

    #[test]
    fn messages_are_kombu_s_json() {
        let messages = task_messages("math.add", "q1", 2);
        assert_eq!(messages.len(), 2);
        let message: Value = serde_json::from_slice(&messages[0]).unwrap();
        // The body decodes to Celery's protocol-2 body, as Python's apply_async writes it.
        assert_eq!(
            message["body"],
            base64(br#"[[2,3],{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]"#)
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
