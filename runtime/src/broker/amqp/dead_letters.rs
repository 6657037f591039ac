//! Dead letters on RabbitMQ: a message the worker gives up on is published to
//! `<queue>.dead` (durable, declared with its work queue) carrying the reason, its delivery
//! count and the time in `x-wasmq-*` headers, then the original is acked. The work queue
//! itself gets no `x-dead-letter-*` arguments: Python clients declare it without them.
//! Listing them is only a look: each is read with `basic.get` and given back.

use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde_json::Value;

use super::codec::{envelope_of, properties_of};
use super::{AmqpBroker, lapin_error};
use crate::broker::{BrokerError, DeadLetter};
use crate::protocol::Envelope;

/// Header carrying why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-wasmq-dead-reason";
/// Header carrying how many times a dead-lettered message had been delivered.
pub const DEAD_DELIVERIES_HEADER: &str = "x-wasmq-deliveries";

/// The name of the dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

impl AmqpBroker {
    /// The dead letters of `queue`, newest first, at most `limit` (see [`crate::broker::Broker::dead_letters`]).
    pub(super) async fn read_dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let dead = dead_letter_queue(queue);
        self.with_session(|session| {
            let dead = dead.clone();
            async move {
                self.ensure_queue(&session, queue).await?;
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error("cannot open a channel", &e))?;
                let mut letters = Vec::new();
                let mut tags = Vec::new();
                while letters.len() < limit {
                    let got = channel
                        .basic_get(dead.as_str().into(), BasicGetOptions::default())
                        .await
                        .map_err(|e| lapin_error(&format!("cannot read {dead}"), &e))?;
                    let Some(message) = got else { break };
                    let delivery = message.delivery;
                    tags.push(delivery.delivery_tag);
                    let envelope = envelope_of(&delivery.properties, delivery.data);
                    let header =
                        |name: &str| envelope.headers.get(name).cloned().unwrap_or(Value::Null);
                    letters.push(DeadLetter {
                        queue: queue.to_owned(),
                        task_id: envelope
                            .headers
                            .get("id")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        reason: header(DEAD_REASON_HEADER).as_str().unwrap_or("").to_owned(),
                        delivery_count: u32::try_from(
                            header(DEAD_DELIVERIES_HEADER).as_u64().unwrap_or(1),
                        )
                        .unwrap_or(u32::MAX),
                        dead_at_ms: header("x-wasmq-dead-at").as_i64().unwrap_or(0),
                        envelope,
                    });
                }
                // Only a look: give them all back.
                if let Some(last) = tags.last() {
                    let _ = channel
                        .basic_nack(
                            *last,
                            BasicNackOptions {
                                multiple: true,
                                requeue: true,
                            },
                        )
                        .await;
                }
                let _ = channel.close(200, "OK".into()).await;
                letters.reverse();
                Ok(letters)
            }
        })
        .await
    }

    /// Publishes `envelope`, delivered `delivery_count` times from `queue`, to the queue's
    /// dead letters with `reason` (the caller then acks the original).
    pub(super) async fn publish_dead_letter(
        &self,
        queue: &str,
        envelope: &Envelope,
        reason: &str,
        delivery_count: u32,
    ) -> Result<(), BrokerError> {
        let mut envelope = envelope.clone();
        envelope
            .headers
            .insert(DEAD_REASON_HEADER.into(), reason.into());
        envelope
            .headers
            .insert(DEAD_DELIVERIES_HEADER.into(), delivery_count.into());
        envelope
            .headers
            .insert("x-wasmq-dead-at".into(), crate::db::now_ms().into());
        let dead = dead_letter_queue(queue);
        self.with_session(|session| {
            let (dead, envelope) = (dead.clone(), envelope.clone());
            async move {
                self.ensure_queue(&session, queue).await?;
                self.publish_confirmed(&session, &dead, &envelope.body, properties_of(&envelope))
                    .await
            }
        })
        .await
    }
}
