//! Revocations on RabbitMQ: a revocation is broadcast on the durable fanout exchange
//! `wasmq.revoke` to one durable queue per worker node, `wasmq.revoke.<node>`. A revocation
//! made while a worker is down waits in its queue for the retention of revocations
//! ([`REVOKE_EXPIRES`]); the queue itself expires a week after its worker was last seen, or
//! goes at once when the node is forgotten ([`AmqpBroker::delete_revoke_queue`]).
//!
//! Celery's own revocations (Python's `app.control.revoke`, `AsyncResult.revoke`) travel on
//! the transient `celery.pidbox` fanout with every other remote-control command; a live
//! worker hears them in its mailbox (`control`) and broadcasts them again here, so they
//! reach workers that are down too. The durable queue is not bound to `celery.pidbox`
//! itself: a fanout cannot pick revocations out of the rest, and a stopped worker would
//! collect every broadcast (Flower's `enable_events` every 5 s, each inspect poll) for a
//! day. A queue an older wasmq bound there is unbound when declared.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation as AmqpConfirmation, ExchangeKind};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{AmqpBroker, declare_durable_fanout, lapin_error, listen_with_backoff};
use crate::broker::{BrokerError, REVOKE_EXPIRES, Revocation};
use crate::protocol::ControlCommand;

/// The fanout exchange revocations are broadcast on.
pub const REVOKE_EXCHANGE: &str = "wasmq.revoke";

/// Celery's remote-control exchange (fanout, transient): Python's `app.control.revoke`
/// and `AsyncResult.revoke` publish there, and wasmq workers listen to it too.
pub const CELERY_PIDBOX_EXCHANGE: &str = "celery.pidbox";

/// The queue where worker `node` receives revocations: durable, so revocations made while
/// the worker is down wait for it (up to the retention of revocations).
pub fn revoke_queue(node: &str) -> String {
    format!("wasmq.revoke.{node}")
}

impl AmqpBroker {
    /// Publishes `revocation` on the revoke exchange, to every node's queue (see
    /// [`crate::broker::Broker::revoke`]).
    pub(super) async fn broadcast_revocation(
        &self,
        revocation: &Revocation,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(revocation).map_err(|source| BrokerError::Encode {
            what: "a revocation",
            source,
        })?;
        self.with_session(|session| {
            let body = body.clone();
            async move {
                declare_revoke_exchange(&session.publisher).await?;
                let confirm = session
                    .publisher
                    .basic_publish(
                        REVOKE_EXCHANGE.into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default()
                            .with_content_type(crate::protocol::CONTENT_TYPE_JSON.into())
                            .with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| lapin_error("cannot publish a revocation", &e))?
                    .await
                    .map_err(|e| lapin_error("revocation not confirmed", &e))?;
                match confirm {
                    AmqpConfirmation::Nack(_) => Err(BrokerError::Refused("the revocation".into())),
                    _ => Ok(()),
                }
            }
        })
        .await
    }

    /// Declares `node`'s revocation queue and consumes it until the receiver is dropped,
    /// listening again after the broker is lost (see [`crate::broker::Broker::revocations`]).
    pub(super) async fn listen_for_node(
        &self,
        node: &str,
    ) -> Result<mpsc::Receiver<Revocation>, BrokerError> {
        let (sender, receiver) = mpsc::channel(256);
        // Declared before returning when the broker is up, so a revocation made once this
        // returns reaches us; when it is down, the listener declares it once connected.
        let queue = revoke_queue(node);
        let declared = match self.session().await {
            Ok(session) => declare_revoke_queue(&session.publisher, &queue).await,
            Err(error) => Err(error),
        };
        if let Err(error) = declared {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "revocations: cannot reach the broker yet; listening once connected"
            );
        }
        let broker = self.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            listen_with_backoff("revocations", &sender, || {
                broker.listen_for_revocations(&queue, &node, &sender)
            })
            .await;
        });
        Ok(receiver)
    }

    /// Deletes `node`'s revocation queue (see [`crate::broker::Broker::forget_node`]). A
    /// worker of that node still listening would declare it again: call it once the node's
    /// worker has stopped.
    pub(super) async fn delete_revoke_queue(&self, node: &str) -> Result<(), BrokerError> {
        let queue = revoke_queue(node);
        self.with_session(|session| {
            let queue = queue.clone();
            async move {
                // A channel of its own: deleting can fail without closing the publisher.
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error("cannot open a channel", &e))?;
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| lapin_error(&format!("cannot delete queue {queue}"), &e))?;
                let _ = channel.close(200, "OK".into()).await;
                Ok(())
            }
        })
        .await
    }

    /// Consumes `queue` into `sender` until the receiver is dropped (`Ok`) or the connection
    /// fails (`Err`). Each revocation is acked once handed over (the worker persists it).
    async fn listen_for_revocations(
        &self,
        queue: &str,
        node: &str,
        sender: &mpsc::Sender<Revocation>,
    ) -> Result<(), BrokerError> {
        let session = self.session().await?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        declare_revoke_queue(&channel, queue).await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("wasmq-revoke-{}", uuid::Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))?;
        loop {
            let next = tokio::select! {
                next = consumer.next() => next,
                () = sender.closed() => {
                    let _ = channel.close(200, "OK".into()).await;
                    return Ok(());
                }
            };
            let Some(delivery) = next else {
                return Err(BrokerError::Cancelled(queue.to_owned()));
            };
            let delivery = delivery.map_err(|e| lapin_error("revocations", &e))?;
            match revocations_in(&delivery.data, node) {
                Ok(revocations) => {
                    for revocation in revocations {
                        if sender.send(revocation).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "ignoring a malformed revocation"),
            }
            delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| lapin_error("cannot ack a revocation", &e))?;
        }
    }
}

/// Declares the fanout exchange revocations are broadcast on.
async fn declare_revoke_exchange(channel: &Channel) -> Result<(), BrokerError> {
    declare_durable_fanout(channel, REVOKE_EXCHANGE).await
}

/// Declares a worker's revocation queue and binds it to the revoke exchange (only: see the
/// module comment). Its messages live as long as revocations are remembered; the queue
/// itself goes away after a week without its worker.
async fn declare_revoke_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    declare_revoke_exchange(channel).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX)),
    );
    arguments.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(7 * 24 * 3600 * 1000),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot declare queue {queue}"), &e))?;
    channel
        .queue_bind(
            queue.into(),
            REVOKE_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
    // Queues declared by wasmq before remote control were also bound to celery.pidbox.
    // Unbinding is idempotent, but needs the exchange to exist (declared as kombu does).
    channel
        .exchange_declare(
            CELERY_PIDBOX_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error("cannot declare celery.pidbox", &e))?;
    channel
        .queue_unbind(
            queue.into(),
            CELERY_PIDBOX_EXCHANGE.into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot unbind queue {queue}"), &e))
}

/// The revocations in a message of the revoke queue: wasmq's own JSON, or a Celery
/// remote-control `revoke` command addressed to everyone or to `node` (other commands are
/// not for this queue and yield nothing).
fn revocations_in(body: &[u8], node: &str) -> Result<Vec<Revocation>, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    if value.get("method").is_none() {
        return Ok(vec![serde_json::from_value(value)?]);
    }
    let command: ControlCommand = serde_json::from_value(value)?;
    if command.method != "revoke" || !command.is_for(node) {
        return Ok(Vec::new());
    }
    let terminate = command
        .arguments
        .get("terminate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ids = match command.arguments.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(ids
        .into_iter()
        .map(|id| Revocation::now(id, terminate))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_remote_control_revokes_are_understood() {
        let ours = serde_json::to_vec(&Revocation::now("a", true)).unwrap();
        let parsed = revocations_in(&ours, "w1").unwrap();
        assert_eq!(
            (parsed[0].task_id.as_str(), parsed[0].terminate),
            ("a", true)
        );
        let celery = br#"{"method":"revoke","arguments":{"task_id":"b","terminate":false,"signal":"SIGTERM"},"destination":null,"pattern":null,"matcher":null}"#;
        let parsed = revocations_in(celery, "w1").unwrap();
        assert_eq!(
            (parsed[0].task_id.as_str(), parsed[0].terminate),
            ("b", false)
        );
        let many = br#"{"method":"revoke","arguments":{"task_id":["c","d"],"terminate":true},"destination":["w1"]}"#;
        assert_eq!(revocations_in(many, "w1").unwrap().len(), 2);
        assert!(
            revocations_in(many, "w2").unwrap().is_empty(),
            "addressed to another node"
        );
        let ping = br#"{"method":"ping","arguments":{},"destination":null}"#;
        assert!(revocations_in(ping, "w1").unwrap().is_empty());
        assert!(revocations_in(b"not json", "w1").is_err());
    }
}
