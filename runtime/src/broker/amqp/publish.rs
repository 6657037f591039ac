//! Publishing with publisher confirms: every message is confirmed by RabbitMQ before a
//! publish returns (or, for [`AmqpBroker::publish_to_queue_unconfirmed`], before its
//! [`Confirmation`] resolves). Messages go to the default exchange with the queue name as
//! routing key, persistent; a delay of whole seconds goes through Celery's delay levels
//! instead (see [`super::delayed`]).
//!
//! A publish into an existing queue only ([`AmqpBroker::publish_to_existing_queue`], a
//! tenant's follow-ups) declares nothing and is `mandatory`: RabbitMQ returns a message no
//! queue takes (`basic.return`, then the confirm), which becomes
//! [`BrokerError::QueueNotFound`].

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
        publish_and_confirm(session, exchange, routing_key, body, properties, false).await
    }

    /// Publishes `body` to queue `queue` on the default exchange, `mandatory`, and waits for
    /// the broker's confirmation: [`BrokerError::QueueNotFound`] when RabbitMQ returns it
    /// (no queue of that name in the vhost).
    pub(super) async fn publish_mandatory(
        &self,
        session: &Session,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        publish_and_confirm(session, "", queue, body, properties, true).await
    }

    /// Publishes `envelope` into `queue` only if it exists there, declaring nothing (see
    /// [`crate::broker::Broker::publish_existing`]): at once as a `mandatory` message; with
    /// a delay of whole seconds through the delay levels, once the queue is found (and bound
    /// to them, as wasmq binds the queues it declares).
    pub(super) async fn publish_to_existing_queue(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let seconds = delay.map_or(0, |d| d.as_secs());
        self.with_session(|session| async move {
            if seconds == 0 {
                return self
                    .publish_mandatory(&session, queue, &envelope.body, properties_of(envelope))
                    .await;
            }
            self.bind_existing_queue(&session, queue).await?;
            self.publish_through_levels(&session, queue, envelope, seconds)
                .await
        })
        .await
    }

    /// Publishes `envelope` into the delay level chain for `seconds`, from where it reaches
    /// `queue` (which must be bound to the levels).
    async fn publish_through_levels(
        &self,
        session: &Session,
        queue: &str,
        envelope: &Envelope,
        seconds: u64,
    ) -> Result<(), BrokerError> {
        let mut held = envelope.clone();
        held.headers
            .retain(|name, _| !delayed::is_dead_letter_header(name));
        self.publish_confirmed_to(
            session,
            &delayed::entry_exchange(),
            &delayed::routing_key(seconds, queue),
            &held.body,
            properties_of(&held),
        )
        .await
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
            self.publish_through_levels(&session, queue, envelope, seconds)
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
        let written = self
            .with_session(|session| async move {
                self.ensure_queue(&session, queue).await?;
                // lapin's publish queues the frames for its I/O thread at its first poll,
                // then waits for the thread to write them. Waiting here would cost every
                // publish a round trip between the two threads (the sender's rate would
                // be bound by it, ~100 µs a message here); the write is awaited in the
                // confirmation instead, so a sender with many publishes outstanding
                // queues frame after frame and the I/O thread writes them in batches.
                let channel = session.publisher.clone();
                let (queue, body) = (queue.to_owned(), envelope.body.clone());
                let properties = properties_of(envelope);
                let mut write = Box::pin(async move {
                    let options = BasicPublishOptions::default();
                    channel
                        .basic_publish("".into(), queue.into(), options, &body, properties)
                        .await
                });
                match futures_util::poll!(write.as_mut()) {
                    // Refused before anything was queued (e.g. a closed channel): an error
                    // the session's retry may fix.
                    std::task::Poll::Ready(Err(e)) => Err(lapin_error("cannot publish", &e)),
                    std::task::Poll::Ready(Ok(confirm)) => Ok(Written::Now(confirm)),
                    std::task::Poll::Pending => Ok(Written::Later(write)),
                }
            })
            .await?;
        let queue = queue.to_owned();
        Ok(Confirmation::pending(async move {
            let confirm = match written {
                Written::Now(confirm) => confirm,
                Written::Later(write) => {
                    write.await.map_err(|e| lapin_error("cannot publish", &e))?
                }
            };
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

/// A publish whose frames lapin has queued: its confirmation to come, or first the write of
/// its frames by lapin's I/O thread (see [`AmqpBroker::publish_to_queue_unconfirmed`]).
enum Written {
    Now(lapin::PublisherConfirm),
    Later(
        std::pin::Pin<
            Box<dyn std::future::Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send>,
        >,
    ),
}

/// Publishes on `session`'s confirm channel and waits for the confirmation: a negative one
/// is [`BrokerError::Refused`]; a `mandatory` message RabbitMQ returned (it sends the
/// `basic.return` before the ack) is [`BrokerError::QueueNotFound`] — on the default
/// exchange, where the routing key is the queue's name, "no route" means no such queue.
async fn publish_and_confirm(
    session: &Session,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), BrokerError> {
    let options = BasicPublishOptions {
        mandatory,
        ..BasicPublishOptions::default()
    };
    let confirm = session
        .publisher
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await
        .map_err(|e| lapin_error("cannot publish", &e))?
        .await
        .map_err(|e| lapin_error("publish not confirmed", &e))?;
    match confirm {
        AmqpConfirmation::Ack(Some(returned)) => {
            tracing::debug!(
                queue = routing_key,
                code = returned.reply_code,
                reason = %returned.reply_text,
                "the broker returned a mandatory message"
            );
            Err(BrokerError::QueueNotFound {
                queue: routing_key.to_owned(),
            })
        }
        AmqpConfirmation::Ack(None) | AmqpConfirmation::NotRequested => Ok(()),
        AmqpConfirmation::Nack(_) => {
            Err(BrokerError::Refused(format!("a message for {routing_key}")))
        }
    }
}
