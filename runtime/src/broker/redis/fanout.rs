//! Broadcasts on Redis: kombu's fanout exchanges are pub/sub channels (see
//! [`kombu::fanout_channel`]), so Celery's remote control (`celery.pidbox`, replies through
//! the `reply.celery.pidbox` binding table into a list per client) and its events
//! (`celeryev`, which Celery turns into a fanout on Redis) reach Python and wasmq alike.
//! wasmq's own broadcasts — revocations and release doorbells — are channels of their own
//! beside them, with plain JSON messages.
//!
//! Pub/sub keeps nothing: a listener hears what is published while it is subscribed. That is
//! Celery's contract for remote control and events; revocations are also kept in the
//! `wasmq.revoked` sorted set, which a listener reads each time it (re)subscribes.

use std::future::Future;
use std::time::Duration;

use ::redis::AsyncCommands;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::kombu;
use super::{REVOKED, RedisBroker, redis_error};
use crate::broker::{
    BrokerError, ControlBroadcast, ControlReply, ControlRequest, REVOKE_EXPIRES, ReleaseBell,
    Revocation,
};
use crate::protocol::events::EventMessage;
use crate::protocol::{CONTENT_TYPE_JSON, ControlCommand, ControlReplyTo, Envelope, Properties};

/// Celery's remote-control exchange (fanout).
const PIDBOX: &str = "celery.pidbox";
/// Where remote-control replies are published (direct; each client binds its own queue).
const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// Celery's event exchange (a fanout on Redis).
const EVENTS: &str = "celeryev";

/// wasmq's revocation channel in database `db`.
pub(super) fn revoke_channel(db: i64) -> String {
    format!("/{db}.wasmq.revoke")
}

/// wasmq's release doorbell channel in database `db`.
pub(super) fn release_channel(db: i64) -> String {
    format!("/{db}.wasmq.releases")
}

/// Listens on `pattern` until the receiver is dropped, subscribing again (with backoff)
/// whenever the subscription is lost. `on_subscribed` runs after each subscription and
/// returns what to hand out first (a backlog); `handle` turns a message (channel, payload)
/// into what to hand out.
async fn listen<T, B, Fut>(
    broker: &RedisBroker,
    pattern: String,
    what: &'static str,
    on_subscribed: B,
    handle: impl Fn(&str, &[u8]) -> Vec<T> + Send + 'static,
) -> Result<mpsc::Receiver<T>, BrokerError>
where
    T: Send + 'static,
    B: Fn(RedisBroker) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<T>, BrokerError>> + Send,
{
    let (sender, receiver) = mpsc::channel(1024);
    // Subscribed before returning when Redis is up, so what is published once this
    // returns is heard; when it is down, the listener subscribes once it can.
    let first = match subscribe(broker, &pattern).await {
        Ok(subscription) => Some(subscription),
        Err(error) => {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "Redis broker: cannot listen for {what} yet; listening once connected"
            );
            None
        }
    };
    let broker = broker.clone();
    tokio::spawn(async move {
        let mut pubsub = first;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut subscription = match pubsub.take() {
                Some(subscription) => subscription,
                None => match subscribe(&broker, &pattern).await {
                    Ok(subscription) => subscription,
                    Err(error) => {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            retry_in = ?backoff,
                            "Redis broker: cannot listen for {what}; retrying"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = sender.closed() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            match on_subscribed(broker.clone()).await {
                Ok(backlog) => {
                    for item in backlog {
                        if sender.send(item).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "Redis broker: cannot read the backlog of {what}"
                ),
            }
            let mut messages = subscription.on_message();
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    () = sender.closed() => return,
                };
                let Some(message) = message else {
                    tracing::warn!(
                        "Redis broker: the subscription to {what} was lost; subscribing again"
                    );
                    break;
                };
                for item in handle(message.get_channel_name(), message.get_payload_bytes()) {
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(receiver)
}

async fn subscribe(
    broker: &RedisBroker,
    pattern: &str,
) -> Result<::redis::aio::PubSub, BrokerError> {
    let mut pubsub = broker
        .inner
        .client
        .get_async_pubsub()
        .await
        .map_err(|e| redis_error("cannot subscribe", e))?;
    pubsub
        .psubscribe(pattern)
        .await
        .map_err(|e| redis_error("cannot subscribe", e))?;
    Ok(pubsub)
}

async fn no_backlog<T>(_: RedisBroker) -> Result<Vec<T>, BrokerError> {
    Ok(Vec::new())
}

/// Revocations: those kept in `wasmq.revoked` (within their retention) each time the
/// listener subscribes, then each one broadcast.
pub(super) async fn listen_for_revocations(
    broker: &RedisBroker,
) -> Result<mpsc::Receiver<Revocation>, BrokerError> {
    listen(
        broker,
        revoke_channel(broker.db()),
        "revocations",
        |broker: RedisBroker| async move {
            let oldest =
                crate::db::now_ms() - i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
            let mut connection = broker.connection().await?;
            let kept: Vec<String> = connection
                .zrangebyscore(REVOKED, oldest, "+inf")
                .await
                .map_err(|e| redis_error("cannot read revocations", e))?;
            Ok(kept
                .iter()
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect())
        },
        |_, payload| serde_json::from_slice(payload).ok().into_iter().collect(),
    )
    .await
}

/// Release doorbells.
pub(super) async fn listen_for_bells(
    broker: &RedisBroker,
) -> Result<mpsc::Receiver<ReleaseBell>, BrokerError> {
    listen(
        broker,
        release_channel(broker.db()),
        "release doorbells",
        no_backlog,
        |_, payload| serde_json::from_slice(payload).ok().into_iter().collect(),
    )
    .await
}

/// Publishes a message of Celery events as Celery's event dispatcher does on Redis.
pub(super) async fn publish_events(
    broker: &RedisBroker,
    message: &EventMessage,
) -> Result<(), BrokerError> {
    let mut headers = Map::new();
    headers.insert("hostname".into(), message.hostname.as_str().into());
    let envelope = Envelope {
        headers,
        properties: json_properties(1),
        body: message.body.clone(),
    };
    let payload = kombu::encode(&envelope, EVENTS, &message.routing_key);
    let mut connection = broker.connection().await?;
    connection
        .publish::<_, _, ()>(
            kombu::fanout_channel(broker.db(), EVENTS, &message.routing_key),
            payload,
        )
        .await
        .map_err(|e| redis_error("cannot publish events", e))
}

/// Every event message published from now on (`celery events` and Flower subscribe the
/// same way: `/<db>.celeryev/*`).
pub(super) async fn listen_for_events(
    broker: &RedisBroker,
) -> Result<mpsc::Receiver<EventMessage>, BrokerError> {
    let pattern = kombu::fanout_channel(broker.db(), EVENTS, "*");
    listen(broker, pattern, "events", no_backlog, |channel, payload| {
        let Some(received) = kombu::decode(payload) else {
            return Vec::new();
        };
        let routing_key = channel
            .split_once('/')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or_else(String::new, |(_, key)| key.to_owned());
        let hostname = received
            .envelope
            .headers
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        vec![EventMessage {
            routing_key,
            hostname,
            body: received.envelope.body,
        }]
    })
    .await
}

/// The remote-control commands addressed to `node`, each with the way back for its reply.
pub(super) async fn listen_for_control(
    broker: &RedisBroker,
    node: &str,
) -> Result<mpsc::Receiver<ControlRequest>, BrokerError> {
    let node = node.to_owned();
    let replier = broker.clone();
    listen(
        broker,
        kombu::fanout_channel(broker.db(), PIDBOX, ""),
        "remote control",
        no_backlog,
        move |_, payload| {
            let Some(received) = kombu::decode(payload) else {
                tracing::warn!("remote control: ignoring a message that is not kombu's");
                return Vec::new();
            };
            if is_expired(&received.envelope.headers) {
                return Vec::new();
            }
            let command = match ControlCommand::parse(&received.envelope.body) {
                Ok(command) => command,
                Err(error) => {
                    tracing::warn!(%error, "remote control: ignoring a malformed command");
                    return Vec::new();
                }
            };
            if !command.is_for(&node) {
                return Vec::new();
            }
            let reply = command.reply_to.clone().map(|to| {
                let (reply, answer) = oneshot::channel();
                tokio::spawn(send_reply(
                    replier.clone(),
                    answer,
                    to,
                    command.ticket.clone().unwrap_or_default(),
                    node.clone(),
                ));
                reply
            });
            vec![ControlRequest { command, reply }]
        },
    )
    .await
}

/// Whether a command's `expires` header has passed.
fn is_expired(headers: &Map<String, Value>) -> bool {
    headers
        .get("expires")
        .and_then(Value::as_f64)
        .is_some_and(crate::protocol::control::has_expired)
}

fn json_properties(delivery_mode: u8) -> Properties {
    Properties {
        content_type: Some(CONTENT_TYPE_JSON.into()),
        content_encoding: Some("utf-8".into()),
        delivery_mode: Some(delivery_mode),
        ..Properties::default()
    }
}

/// Waits for the worker's answer and pushes it, as kombu's `_publish_reply` does, into
/// the list of every queue bound to the reply exchange with the command's routing key.
async fn send_reply(
    broker: RedisBroker,
    answer: oneshot::Receiver<Value>,
    to: ControlReplyTo,
    ticket: String,
    node: String,
) {
    let Ok(reply) = answer.await else {
        return;
    };
    let mut headers = Map::new();
    headers.insert("ticket".into(), ticket.into());
    headers.insert("clock".into(), 1.into());
    let envelope = Envelope {
        headers,
        properties: json_properties(1),
        body: ControlCommand::reply_body(&node, reply),
    };
    let sent = async {
        let queues = broker.bound(&to.exchange, &to.routing_key).await?;
        let payload = kombu::encode(&envelope, &to.exchange, &to.routing_key);
        let mut connection = broker.connection().await?;
        for queue in queues {
            connection
                .lpush::<_, _, ()>(queue, &payload)
                .await
                .map_err(|e| redis_error("cannot send a reply", e))?;
        }
        Ok::<_, BrokerError>(())
    };
    if let Err(error) = sent.await {
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            "remote control: cannot send a reply"
        );
    }
}

/// Broadcasts a command as Celery's `app.control.broadcast` does on Redis and collects the
/// replies pushed to this client's reply queue.
pub(super) async fn broadcast(
    broker: &RedisBroker,
    broadcast: &ControlBroadcast,
) -> Result<Vec<ControlReply>, BrokerError> {
    let mut command = broadcast.command.clone();
    let oid = uuid::Uuid::new_v4().to_string();
    let queue = format!("{oid}.{REPLY_EXCHANGE}");
    let member = kombu::binding_member(&oid, &queue);
    let ticket = uuid::Uuid::new_v4().to_string();
    let mut connection = broker.connection().await?;
    if broadcast.reply {
        command.ticket = Some(ticket.clone());
        command.reply_to = Some(ControlReplyTo {
            exchange: REPLY_EXCHANGE.to_owned(),
            routing_key: oid.clone(),
        });
        connection
            .sadd::<_, _, ()>(kombu::binding_key(REPLY_EXCHANGE), &member)
            .await
            .map_err(|e| redis_error("cannot bind a reply queue", e))?;
    }
    let mut headers = Map::new();
    headers.insert("clock".into(), 1.into());
    let expires = crate::db::now_ms() as f64 / 1000.0 + broadcast.timeout.as_secs_f64();
    headers.insert("expires".into(), expires.into());
    let envelope = Envelope {
        headers,
        properties: json_properties(1),
        body: command.body(),
    };
    let published = connection
        .publish::<_, _, ()>(
            kombu::fanout_channel(broker.db(), PIDBOX, ""),
            kombu::encode(&envelope, PIDBOX, ""),
        )
        .await
        .map_err(|e| redis_error("cannot publish to celery.pidbox", e));
    let collected = match published {
        Ok(()) if broadcast.reply => collect(broker, &queue, &ticket, broadcast).await,
        Ok(()) => Ok(Vec::new()),
        Err(error) => Err(error),
    };
    if broadcast.reply {
        let _: Result<(), _> = ::redis::pipe()
            .srem(kombu::binding_key(REPLY_EXCHANGE), &member)
            .ignore()
            .del(&queue)
            .ignore()
            .query_async(&mut connection)
            .await;
    }
    collected
}

/// The replies to `ticket` pushed to `queue` until the broadcast's timeout or limit.
async fn collect(
    broker: &RedisBroker,
    queue: &str,
    ticket: &str,
    broadcast: &ControlBroadcast,
) -> Result<Vec<ControlReply>, BrokerError> {
    let config = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(broadcast.timeout + Duration::from_secs(10)));
    let mut waiting = broker
        .inner
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| redis_error("cannot connect to Redis", e))?;
    let deadline = tokio::time::Instant::now() + broadcast.timeout;
    let mut replies = Vec::new();
    loop {
        if broadcast.limit.is_some_and(|limit| replies.len() >= limit) {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // BRPOP's timeout is in seconds with a fraction (Redis 6); at least 10 ms.
        let wait = left.as_secs_f64().max(0.01);
        let popped: Option<(String, Vec<u8>)> = ::redis::cmd("BRPOP")
            .arg(queue)
            .arg(wait)
            .query_async(&mut waiting)
            .await
            .map_err(|e| redis_error("cannot wait for replies", e))?;
        let Some((_, payload)) = popped else {
            break;
        };
        let Some(received) = kombu::decode(&payload) else {
            continue;
        };
        if received
            .envelope
            .headers
            .get("ticket")
            .and_then(Value::as_str)
            != Some(ticket)
        {
            continue;
        }
        replies.extend(ControlReply::parse_body(&received.envelope.body));
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_past_their_expiry_are_skipped() {
        let mut headers = Map::new();
        assert!(!is_expired(&headers));
        headers.insert("expires".into(), 0.0.into());
        assert!(!is_expired(&headers), "0: never");
        headers.insert("expires".into(), 1.0.into());
        assert!(is_expired(&headers));
        headers.insert(
            "expires".into(),
            (chrono::Utc::now().timestamp() as f64 + 60.0).into(),
        );
        assert!(!is_expired(&headers));
    }

    #[test]
    fn channels_are_kombus() {
        assert_eq!(revoke_channel(2), "/2.wasmq.revoke");
        assert_eq!(kombu::fanout_channel(0, PIDBOX, ""), "/0.celery.pidbox");
        assert_eq!(kombu::fanout_channel(0, EVENTS, "*"), "/0.celeryev/*");
    }
}
