//! Celery's events on RabbitMQ: the `celeryev` topic exchange, declared exactly as Python
//! declares it (durable, not auto-deleted — any other declaration is refused by RabbitMQ
//! with 406 once a Python monitor has declared it), messages transient with the node in a
//! `hostname` header, routing key the event type (`worker.heartbeat`) or `task.multi` for a
//! batch.
//!
//! Events have a connection of their own, opened on the first publish and again after it
//! is lost, and a channel without publisher confirms (Celery's events are fire-and-forget
//! too), so a burst of task events never queues behind the task traffic of the broker's
//! shared connection, nor the other way round.
//!
//! A batch of task events (`task.multi`) travels zlib-compressed, with kombu's
//! `compression` header ([`crate::protocol::compression`]): every kombu receiver reads it,
//! and RabbitMQ moves a ninth of the bytes. Receiving, a compressed message is read back
//! before anyone sees it.
//!
//! Listening (`wasmq events`) is what Celery's `EventReceiver` does: an exclusive,
//! auto-deleted queue `celeryev.<uuid>` bound with `#`, messages living 5 s and the queue
//! 60 s after its listener is gone.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;

use super::{AmqpBroker, lapin_error, listen_with_backoff};
use crate::broker::BrokerError;
use crate::protocol::CONTENT_TYPE_JSON;
use crate::protocol::compression;
use crate::protocol::events::{EVENT_EXCHANGE, EventMessage, MULTI_ROUTING_KEY};

/// The largest events message a receiver expands (a batch of 256 events with the longest
/// reprs is about 1 MiB); a larger one is dropped.
const LARGEST_EVENTS_MESSAGE: usize = 16 << 20;

/// The connection and channel events are published on, once opened.
#[derive(Default)]
pub(super) struct EventLink(tokio::sync::Mutex<Option<(Connection, Channel)>>);

async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            EVENT_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error("cannot declare the exchange celeryev", &e))
}

impl AmqpBroker {
    /// Connects the events connection and declares `celeryev`.
    async fn open_event_channel(&self, what: &str) -> Result<(Connection, Channel), BrokerError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{} ({what})", self.inner.name).into());
        let connection = Connection::connect(&self.inner.uri, properties)
            .await
            .map_err(|e| lapin_error(&format!("cannot connect to {}", self.inner.shown), &e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        declare_exchange(&channel).await?;
        Ok((connection, channel))
    }

    /// Publishes one message of events (unconfirmed, transient).
    pub(super) async fn publish_event_message(
        &self,
        message: &EventMessage,
    ) -> Result<(), BrokerError> {
        let mut link = self.inner.events.0.lock().await;
        let alive = link.as_ref().is_some_and(|(connection, channel)| {
            connection.status().connected() && channel.status().connected()
        });
        if !alive {
            *link = Some(self.open_event_channel("events").await?);
        }
        let Some((_, channel)) = link.as_ref() else {
            return Ok(());
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "hostname".into(),
            AMQPValue::LongString(message.hostname.as_str().into()),
        );
        let compressed = (message.routing_key == MULTI_ROUTING_KEY).then(|| {
            headers.insert(
                "compression".into(),
                AMQPValue::LongString(compression::ZLIB.into()),
            );
            compression::zlib(&message.body)
        });
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1)
            .with_headers(headers);
        let sent = channel
            .basic_publish(
                EVENT_EXCHANGE.into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                compressed.as_deref().unwrap_or(&message.body),
                properties,
            )
            .await;
        if let Err(error) = sent {
            // Opened again on the next publish.
            *link = None;
            return Err(lapin_error("cannot publish events", &error));
        }
        Ok(())
    }

    /// Receives every event message from now on until the receiver is dropped, again
    /// after the broker is lost.
    pub(super) fn listen_for_events(&self) -> mpsc::Receiver<EventMessage> {
        let (sender, receiver) = mpsc::channel(1024);
        let broker = self.clone();
        tokio::spawn(async move {
            listen_with_backoff("events", &sender, || broker.listen_for_events_once(&sender)).await;
        });
        receiver
    }

    async fn listen_for_events_once(
        &self,
        sender: &mpsc::Sender<EventMessage>,
    ) -> Result<(), BrokerError> {
        let (_connection, channel) = self.open_event_channel("event receiver").await?;
        let queue = format!("{EVENT_EXCHANGE}.{}", uuid::Uuid::new_v4());
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(5_000));
        arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
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
                EVENT_EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "wasmq-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))?;
        loop {
            tokio::select! {
                () = sender.closed() => return Ok(()),
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else {
                        return Err(BrokerError::Cancelled(queue));
                    };
                    let delivery =
                        delivery.map_err(|e| lapin_error("cannot receive events", &e))?;
                    let header = |name: &str| {
                        let headers = delivery.properties.headers().as_ref()?;
                        match headers.inner().get(name)? {
                            AMQPValue::LongString(text) => Some(text.to_string()),
                            AMQPValue::ShortString(text) => Some(text.to_string()),
                            _ => None,
                        }
                    };
                    let hostname = header("hostname").unwrap_or_default();
                    let body = match header("compression") {
                        None => delivery.data,
                        Some(codec) => match compression::decompress(
                            &delivery.data,
                            &codec,
                            LARGEST_EVENTS_MESSAGE,
                        ) {
                            Ok(body) => body,
                            Err(error) => {
                                tracing::debug!(
                                    error = &error as &dyn std::error::Error,
                                    hostname,
                                    "an events message cannot be read; skipped"
                                );
                                continue;
                            }
                        },
                    };
                    let message = EventMessage {
                        routing_key: delivery.routing_key.to_string(),
                        hostname,
                        body,
                    };
                    if sender.send(message).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
