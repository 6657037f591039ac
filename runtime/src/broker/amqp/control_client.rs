//! The client side of Celery's remote control on RabbitMQ (kombu's `Mailbox` with
//! `reply=True`, as `app.control.broadcast` and the `celery inspect`/`control` CLI use it):
//! declare an exclusive reply queue `<oid>.reply.celery.pidbox` bound to the
//! `reply.celery.pidbox` direct exchange with routing key `<oid>`, publish the command to
//! the `celery.pidbox` fanout with a fresh ticket and `reply_to`, then collect the replies
//! carrying that ticket until the timeout passes or the limit is reached.
//!
//! It runs on a channel of the broker's session and deletes its reply queue when done
//! (RabbitMQ would drop it anyway: exclusive, auto-delete, `x-expires` 10 s).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

use super::revoke::CELERY_PIDBOX_EXCHANGE;
use super::{AmqpBroker, lapin_error};
use crate::broker::{BrokerError, ControlBroadcast, ControlReply};
use crate::protocol::{CONTENT_TYPE_JSON, ControlReplyTo};

/// The exchange replies come back on (kombu: `'reply.%s.pidbox' % exchange`).
pub const CELERY_REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// The reply queue of client `oid` (kombu's `get_reply_queue`).
pub fn reply_queue(oid: &str) -> String {
    format!("{oid}.{CELERY_REPLY_EXCHANGE}")
}

impl AmqpBroker {
    /// Broadcasts `broadcast` and collects the replies (see
    /// [`crate::broker::Broker::broadcast_control`]).
    pub(super) async fn broadcast(
        &self,
        broadcast: &ControlBroadcast,
    ) -> Result<Vec<ControlReply>, BrokerError> {
        let session = self.session().await?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let mut command = broadcast.command.clone();
        let oid = uuid::Uuid::new_v4().to_string();
        let queue = reply_queue(&oid);
        let replies = if broadcast.reply {
            let ticket = uuid::Uuid::new_v4().to_string();
            command.ticket = Some(ticket.clone());
            command.reply_to = Some(ControlReplyTo {
                exchange: CELERY_REPLY_EXCHANGE.to_owned(),
                routing_key: oid.clone(),
            });
            Some((ticket, listen(&channel, &queue, &oid).await?))
        } else {
            None
        };
        channel
            .exchange_declare(
                CELERY_PIDBOX_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error("cannot declare celery.pidbox", &e))?;
        let mut headers = FieldTable::default();
        headers.insert("clock".into(), AMQPValue::LongLongInt(1));
        let expires =
            chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + broadcast.timeout.as_secs_f64();
        headers.insert("expires".into(), AMQPValue::Double(expires));
        channel
            .basic_publish(
                CELERY_PIDBOX_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                &command.body(),
                BasicProperties::default()
                    .with_content_type(CONTENT_TYPE_JSON.into())
                    .with_content_encoding("utf-8".into())
                    .with_delivery_mode(1)
                    .with_headers(headers),
            )
            .await
            .map_err(|e| lapin_error("cannot publish to celery.pidbox", &e))?;
        let Some((ticket, consumer)) = replies else {
            let _ = channel.close(200, "OK".into()).await;
            return Ok(Vec::new());
        };
        let collected = collect(consumer, &ticket, broadcast.timeout, broadcast.limit).await;
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, "OK".into()).await;
        collected
    }
}

/// Declares the reply exchange and client `oid`'s reply queue, and consumes it.
async fn listen(
    channel: &lapin::Channel,
    queue: &str,
    oid: &str,
) -> Result<lapin::Consumer, BrokerError> {
    channel
        .exchange_declare(
            CELERY_REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error("cannot declare reply.celery.pidbox", &e))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(10_000));
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(300_000));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot declare queue {queue}"), &e))?;
    channel
        .queue_bind(
            queue.into(),
            CELERY_REPLY_EXCHANGE.into(),
            oid.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
    channel
        .basic_consume(
            queue.into(),
            format!("wasmq-inspect-{oid}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))
}

/// The replies carrying `ticket` that arrive within `timeout`, stopping at `limit` nodes.
async fn collect(
    mut consumer: lapin::Consumer,
    ticket: &str,
    timeout: Duration,
    limit: Option<usize>,
) -> Result<Vec<ControlReply>, BrokerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut replies = Vec::new();
    while limit.is_none_or(|limit| replies.len() < limit) {
        let next = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(next)) => next.map_err(|e| lapin_error("remote-control replies", &e))?,
        };
        let headers = next.properties.headers().clone().unwrap_or_default();
        let ours = match headers.inner().get("ticket") {
            Some(AMQPValue::LongString(sent)) => sent.as_bytes() == ticket.as_bytes(),
            Some(AMQPValue::ShortString(sent)) => sent.as_str() == ticket,
            _ => false,
        };
        if !ours {
            continue;
        }
        replies.extend(ControlReply::parse_body(&next.data));
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reply_queues_are_named_as_kombu_names_them() {
        assert_eq!(reply_queue("abc"), "abc.reply.celery.pidbox");
    }

    #[test]
    fn reply_bodies_name_their_node() {
        assert_eq!(
            ControlReply::parse_body(br#"{"w@h": {"ok": "pong"}}"#),
            [ControlReply {
                node: "w@h".into(),
                reply: json!({"ok": "pong"})
            }]
        );
        assert!(ControlReply::parse_body(b"[1]").is_empty());
        assert!(ControlReply::parse_body(b"nope").is_empty());
    }
}
