//! Release doorbells on RabbitMQ. `wasmq deploy --broker amqp://…` rings one after it has
//! published a release: a small `{tenant, epoch}` message on the durable fanout exchange
//! `wasmq.releases`. Every worker listens on an exclusive, auto-deleted queue of its own
//! bound there, and on a ring reads its tenant's latest release from the plugin store at
//! once instead of at its next poll. A ring carries no release and grants nothing: the
//! worker verifies what it reads in the store as always. A worker that was down misses
//! the ring and catches up from the store when it starts, so nothing needs a durable queue.

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;

use super::{AmqpBroker, declare_durable_fanout, lapin_error, listen_with_backoff};
use crate::broker::{BrokerError, ReleaseBell};

/// The fanout exchange release doorbells ring on.
pub(super) const RELEASE_EXCHANGE: &str = "wasmq.releases";

async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    declare_durable_fanout(channel, RELEASE_EXCHANGE).await
}

impl AmqpBroker {
    /// Publishes `bell` to every listening worker (confirmed).
    pub(super) async fn ring(&self, bell: &ReleaseBell) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(bell).map_err(|source| BrokerError::Encode {
            what: "a release doorbell",
            source,
        })?;
        self.with_session(|session| {
            let body = body.clone();
            async move {
                declare_exchange(&session.publisher).await?;
                let properties = BasicProperties::default()
                    .with_content_type(crate::protocol::CONTENT_TYPE_JSON.into());
                self.publish_confirmed_to(&session, RELEASE_EXCHANGE, "", &body, properties)
                    .await
            }
        })
        .await
    }

    /// Listens for doorbells until the receiver is dropped, again after the broker is
    /// lost.
    pub(super) async fn listen_for_bells(&self) -> mpsc::Receiver<ReleaseBell> {
        let (sender, receiver) = mpsc::channel(64);
        let broker = self.clone();
        tokio::spawn(async move {
            listen_with_backoff("release doorbells", &sender, || {
                broker.listen_for_bells_once(&sender)
            })
            .await;
        });
        receiver
    }

    async fn listen_for_bells_once(
        &self,
        sender: &mpsc::Sender<ReleaseBell>,
    ) -> Result<(), BrokerError> {
        let session = self.session().await?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        declare_exchange(&channel).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error("cannot declare a doorbell queue", &e))?;
        let name = queue.name().as_str().to_owned();
        channel
            .queue_bind(
                name.as_str().into(),
                RELEASE_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error("cannot bind the doorbell queue", &e))?;
        let mut consumer = channel
            .basic_consume(
                name.as_str().into(),
                "wasmq-release-bell".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error("cannot consume the doorbell queue", &e))?;
        loop {
            let next = tokio::select! {
                next = consumer.next() => next,
                () = sender.closed() => {
                    let _ = channel.close(200, "OK".into()).await;
                    return Ok(());
                }
            };
            let Some(delivery) = next else {
                return Err(BrokerError::Cancelled(name));
            };
            let delivery = delivery.map_err(|e| lapin_error("release doorbells", &e))?;
            match serde_json::from_slice::<ReleaseBell>(&delivery.data) {
                Ok(bell) => {
                    if sender.send(bell).await.is_err() {
                        return Ok(());
                    }
                }
                Err(error) => tracing::warn!(%error, "ignoring a malformed release doorbell"),
            }
        }
    }
}
