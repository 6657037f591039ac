//! The transport of the rpc result backend (Celery's `rpc://`, `celery-reference.md` §2.7):
//! a worker publishes each result to the sender's `reply_to` queue — transient, confirmed,
//! declaring nothing, and `mandatory` for a tenant's worker — with the task id as
//! correlation id; the sender declares its own reply queue (non-durable, auto-delete,
//! expiring after a day, as Celery's clients do) and consumes it without acks. These two
//! calls are all `results::rpc` sees of AMQP.

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::{AmqpBroker, lapin_error};
use crate::broker::BrokerError;

impl AmqpBroker {
    /// Publishes a raw result or reply (used by the rpc result backend): not persistent, no
    /// queue declaration. A `mandatory` reply RabbitMQ returns (no reply queue of that name
    /// in the vhost) is [`BrokerError::QueueNotFound`]; otherwise such a reply is dropped by
    /// RabbitMQ, as Celery's are.
    pub(crate) async fn publish_reply(
        &self,
        routing_key: &str,
        body: &[u8],
        correlation_id: &str,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        self.with_session(|session| async move {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_correlation_id(correlation_id.into())
                .with_delivery_mode(1)
                .with_priority(0)
                .with_headers(FieldTable::default());
            if mandatory {
                self.publish_mandatory(&session, routing_key, body, properties)
                    .await
            } else {
                self.publish_confirmed(&session, routing_key, body, properties)
                    .await
            }
        })
        .await
    }

    /// Declares `queue` (non-durable, auto-delete, expiring like Celery's rpc reply queues)
    /// and consumes it without acks, passing each message's correlation id and body to
    /// `sink` on the consuming task itself (no hand-off to another task: a waiting caller is
    /// woken straight from here) until `sink` returns false. Used by the rpc result backend's
    /// client side.
    pub(crate) async fn consume_replies(
        &self,
        queue: &str,
        mut sink: impl FnMut(Option<String>, &[u8]) -> bool + Send + 'static,
    ) -> Result<(), BrokerError> {
        let session = self.session().await?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(86_400_000));
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot declare reply queue {queue}"), &e))?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("wasmq-replies-{queue}").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot consume reply queue {queue}"), &e))?;
        tokio::spawn(async move {
            let _keep = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let correlation = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string());
                if !sink(correlation, &delivery.data) {
                    break;
                }
            }
        });
        Ok(())
    }
}
