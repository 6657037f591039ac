//! Publishing with publisher confirms: every message is confirmed by RabbitMQ before a
//! publish returns (or, for [`AmqpBroker::publish_to_queue_unconfirmed`], before its
//! [`Confirmation`] resolves). Messages go to the default exchange with the queue name as
//! routing key, persistent; a delay of whole seconds goes through Celery's delay levels
//! instead (see [`super::delayed`]).

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation as AmqpConfirmation};

use super::codec::properties_of;
use super::session::Session;
use super::{AmqpBroker, delayed, lapin_error};
use crate::broker::{BrokerError, Confirmation};
use crate::protocol::Envelope;

impl AmqpBroker {
    /// Publishes `body` to `routing_key` on the default exchange and waits for the
    /// broker's confirmation.
    pub(super) async fn publish_confirmed(
        &self,
        session: &Session,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.publish_confirmed_to(session, "", routing_key, body, properties)
            .await
    }

    /// Publishes `body` to `exchange` with `routing_key` and waits for the broker's
    /// confirmation.
    pub(super) async fn publish_confirmed_to(
        &self,
        session: &Session,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = session
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(|e| lapin_error("cannot publish", &e))?
            .await
            .map_err(|e| lapin_error("publish not confirmed", &e))?;
        match confirm {
            AmqpConfirmation::Ack(_) | AmqpConfirmation::NotRequested => Ok(()),
            AmqpConfirmation::Nack(_) => {
                Err(BrokerError::Refused(format!("a message for {routing_key}")))
            }
        }
    }

    /// Publishes `envelope` to work queue `queue`, through the delay levels when `delay` has
    /// whole seconds (see [`crate::broker::Broker::publish`]).
    pub(super) async fn publish_to_queue(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        // The levels carry whole seconds; the worker waits out a fraction (see `delayed`).
        let seconds = delay.map_or(0, |d| d.as_secs());
        self.with_session(|session| async move {
            self.ensure_queue(&session, queue).await?;
            if seconds == 0 {
                return self
                    .publish_confirmed(&session, queue, &envelope.body, properties_of(envelope))
                    .await;
            }
            let mut held = envelope.clone();
            held.headers
                .retain(|name, _| !delayed::is_dead_letter_header(name));
            self.publish_confirmed_to(
                &session,
                &delayed::entry_exchange(),
                &delayed::routing_key(seconds, queue),
                &held.body,
                properties_of(&held),
            )
            .await
        })
        .await
    }

    /// Publishes like [`AmqpBroker::publish_to_queue`], returning before the broker's
    /// confirmation (see [`crate::broker::Broker::publish_unconfirmed`]).
    pub(super) async fn publish_to_queue_unconfirmed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Confirmation, BrokerError> {
        if delay.is_some_and(|d| d.as_secs() > 0) {
            self.publish_to_queue(queue, envelope, delay).await?;
            return Ok(Confirmation::settled(Ok(())));
        }
        let confirm = self
            .with_session(|session| async move {
                self.ensure_queue(&session, queue).await?;
                session
                    .publisher
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &envelope.body,
                        properties_of(envelope),
                    )
                    .await
                    .map_err(|e| lapin_error("cannot publish", &e))
            })
            .await?;
        let queue = queue.to_owned();
        Ok(Confirmation::pending(async move {
            match confirm
                .await
                .map_err(|e| lapin_error("publish not confirmed", &e))?
            {
                AmqpConfirmation::Ack(_) | AmqpConfirmation::NotRequested => Ok(()),
                AmqpConfirmation::Nack(_) => {
                    Err(BrokerError::Refused(format!("a message for {queue}")))
                }
            }
        }))
    }
}
