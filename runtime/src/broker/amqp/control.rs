//! Celery's remote control on RabbitMQ (kombu's pidbox): a worker consumes its own queue
//! `<node>.celery.pidbox` (exclusive, auto-delete, messages live 300 s, the queue 10 s
//! after its worker is gone, as kombu declares it) bound to the `celery.pidbox` fanout, and
//! publishes replies to the exchange and routing key each command names (`reply.celery.pidbox`,
//! direct), with the command's `ticket` as a header. Python's `app.control`, `inspect()`,
//! the `celery inspect`/`control` CLI and Flower send these commands.
//!
//! The mailbox has a connection of its own: a reply never waits behind the task traffic of
//! the broker's shared connection, so `inspect ping` answers at once even when every task
//! slot is busy and messages stream in (Celery's own worker fails that, celery#3981).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, oneshot};

use super::revoke::CELERY_PIDBOX_EXCHANGE;
use super::{AmqpBroker, lapin_error, listen_with_backoff};
use crate::broker::{BrokerError, ControlRequest};
use crate::protocol::{CONTENT_TYPE_JSON, ControlCommand, ControlReplyTo};

/// Worker `node`'s mailbox queue (kombu: `'%s.%s.pidbox' % (hostname, exchange)`).
pub fn control_queue(node: &str) -> String {
    format!("{node}.{CELERY_PIDBOX_EXCHANGE}")
}

impl AmqpBroker {
    /// Declares `node`'s mailbox and consumes it on a connection of its own until the
    /// receiver is dropped, listening again after the broker is lost (see
    /// [`crate::broker::Broker::control_requests`]).
    pub(super) async fn listen_for_control(
        &self,
        node: &str,
    ) -> Result<mpsc::Receiver<ControlRequest>, BrokerError> {
        let (sender, receiver) = mpsc::channel(64);
        // Connected before returning when the broker is up, so a command sent once this
        // returns reaches us; when it is down, the listener connects later.
        let first = match self.open_mailbox(node).await {
            Ok(mailbox) => Some(mailbox),
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "remote control: cannot reach the broker yet; listening once connected"
                );
                None
            }
        };
        let broker = self.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            let clock = Arc::new(AtomicU64::new(0));
            let mut first = first;
            let (broker, node, sender, clock) = (&broker, node.as_str(), &sender, &clock);
            listen_with_backoff("remote control", sender, || {
                let opened = first.take();
                async move {
                    let mailbox = match opened {
                        Some(mailbox) => mailbox,
                        None => broker.open_mailbox(node).await?,
                    };
                    serve_mailbox(mailbox, node, sender, clock).await
                }
            })
            .await;
        });
        Ok(receiver)
    }

    /// Connects, declares and binds `node`'s mailbox and starts consuming it.
    async fn open_mailbox(&self, node: &str) -> Result<Mailbox, BrokerError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{} (remote control)", self.inner.name).into());
        let connection = Connection::connect(&self.inner.uri, properties)
            .await
            .map_err(|e| lapin_error(&format!("cannot connect to {}", self.inner.shown), &e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        channel
            .exchange_declare(
                CELERY_PIDBOX_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error("cannot declare celery.pidbox", &e))?;
        let queue = control_queue(node);
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(10_000));
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(300_000));
        channel
            .queue_declare(
                queue.as_str().into(),
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
                queue.as_str().into(),
                CELERY_PIDBOX_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("wasmq-control-{}", uuid::Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))?;
        Ok(Mailbox {
            connection,
            channel,
            consumer,
        })
    }
}

/// A connected mailbox: its own connection, the channel it consumes and replies on.
struct Mailbox {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

/// Hands each command addressed to `node` to `sender` and publishes its reply, until the
/// receiver is dropped (`Ok`) or the connection fails (`Err`).
async fn serve_mailbox(
    mut mailbox: Mailbox,
    node: &str,
    sender: &mpsc::Sender<ControlRequest>,
    clock: &Arc<AtomicU64>,
) -> Result<(), BrokerError> {
    loop {
        let next = tokio::select! {
            next = mailbox.consumer.next() => next,
            () = sender.closed() => {
                let _ = mailbox.connection.close(200, "OK".into()).await;
                return Ok(());
            }
        };
        let Some(delivery) = next else {
            return Err(BrokerError::Cancelled(control_queue(node)));
        };
        let delivery = delivery.map_err(|e| lapin_error("remote control", &e))?;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        if let Some(AMQPValue::LongLongInt(sent)) = headers.inner().get("clock") {
            clock.fetch_max(u64::try_from(*sent).unwrap_or(0), Ordering::Relaxed);
        }
        if is_expired(&headers) {
            tracing::debug!("remote control: ignoring an expired command");
            continue;
        }
        let command = match ControlCommand::parse(&delivery.data) {
            Ok(command) => command,
            Err(error) => {
                tracing::warn!(%error, "remote control: ignoring a malformed command");
                continue;
            }
        };
        if !command.is_for(node) {
            continue;
        }
        tracing::debug!(method = %command.method, "remote control command");
        let reply = match (&command.reply_to, &command.ticket) {
            (Some(to), ticket) => {
                let (reply, answer) = oneshot::channel();
                tokio::spawn(send_reply(
                    mailbox.channel.clone(),
                    answer,
                    to.clone(),
                    ticket.clone().unwrap_or_default(),
                    node.to_owned(),
                    Arc::clone(clock),
                ));
                Some(reply)
            }
            (None, _) => None,
        };
        if sender
            .send(ControlRequest { command, reply })
            .await
            .is_err()
        {
            let _ = mailbox.connection.close(200, "OK".into()).await;
            return Ok(());
        }
    }
}

/// Whether the command's `expires` header (Unix seconds; 0: never) has passed.
fn is_expired(headers: &FieldTable) -> bool {
    let expires = match headers.inner().get("expires") {
        Some(AMQPValue::Double(value)) => *value,
        Some(AMQPValue::Float(value)) => f64::from(*value),
        Some(AMQPValue::LongLongInt(value)) => *value as f64,
        Some(AMQPValue::LongInt(value)) => f64::from(*value),
        _ => return false,
    };
    crate::protocol::control::has_expired(expires)
}

/// Waits for the worker's answer and publishes it as kombu's `_publish_reply` does: to
/// `to`, declaring the (direct, transient) reply exchange first, with the ticket and the
/// clock as headers. Nothing is sent when the worker drops the answer (e.g. `shutdown`).
async fn send_reply(
    channel: Channel,
    answer: oneshot::Receiver<serde_json::Value>,
    to: ControlReplyTo,
    ticket: String,
    node: String,
    clock: Arc<AtomicU64>,
) {
    let Ok(reply) = answer.await else {
        return;
    };
    let body = ControlCommand::reply_body(&node, reply);
    let mut headers = FieldTable::default();
    headers.insert("ticket".into(), AMQPValue::LongString(ticket.into()));
    let now = clock.fetch_add(1, Ordering::Relaxed) + 1;
    headers.insert(
        "clock".into(),
        AMQPValue::LongLongInt(i64::try_from(now).unwrap_or(i64::MAX)),
    );
    let published = async {
        channel
            .exchange_declare(
                to.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_publish(
                to.exchange.as_str().into(),
                to.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type(CONTENT_TYPE_JSON.into())
                    .with_content_encoding("utf-8".into())
                    .with_delivery_mode(1)
                    .with_headers(headers),
            )
            .await
            .map(drop)
    };
    if let Err(error) = published.await {
        tracing::warn!(%error, exchange = %to.exchange, "remote control: cannot send a reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes_are_named_as_kombu_names_them() {
        assert_eq!(control_queue("w1@host"), "w1@host.celery.pidbox");
    }

    #[test]
    fn commands_past_their_expiry_are_skipped() {
        let mut headers = FieldTable::default();
        assert!(!is_expired(&headers), "no expiry");
        headers.insert("expires".into(), AMQPValue::Double(0.0));
        assert!(!is_expired(&headers), "0: never");
        headers.insert("expires".into(), AMQPValue::Double(1.0));
        assert!(is_expired(&headers));
        let later = chrono::Utc::now().timestamp() as f64 + 60.0;
        headers.insert("expires".into(), AMQPValue::Double(later));
        assert!(!is_expired(&headers));
    }
}
