//! The scheduled broker: a decorator over any broker whose delayed messages (countdown, eta,
//! retry backoff) are held outside it, in Redis, until they are due, then published to it.
//!
//! The brokers can delay messages themselves (RabbitMQ's delay levels, SQLite's visible-at
//! rows); a scheduler is for deployments that already run Redis and want delays to be exact
//! to the millisecond, independent of the broker, and visible in one place. Wrap the broker
//! in a [`ScheduledBroker`]: its delayed publishes go to the [`RedisScheduler`], everything
//! else to the broker, and each of its consumers (i.e. each worker) runs a poller that moves
//! due messages to the broker. Any number of workers share the work; see [`redis`] for how a
//! message is published once and never lost.

pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

pub use self::redis::{RedisScheduler, RedisSchedulerOptions};
use super::{Broker, BrokerError, Consumer, DeadLetter, Delivery, Revocation};
use crate::protocol::Envelope;

/// Errors from a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The scheduler URL is not understood.
    #[error("unsupported scheduler URL {0:?} (expected redis://host:port/db)")]
    UnsupportedUrl(String),
    /// Redis failed or refused.
    #[error("redis: {context}")]
    Redis {
        /// What was being done, e.g. `cannot schedule a message`.
        context: String,
        /// The Redis client's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// A message could not be encoded for storage.
    #[error("cannot encode a scheduled message")]
    Encode(#[source] serde_json::Error),
}

impl SchedulerError {
    /// True when retrying later may succeed: Redis was unreachable, dropped the connection,
    /// timed out, or is briefly unable to serve (loading its data set, a failover).
    pub fn is_transient(&self) -> bool {
        match self {
            SchedulerError::Redis { source, .. } => crate::redis_client::is_transient(source),
            SchedulerError::UnsupportedUrl(_) | SchedulerError::Encode(_) => false,
        }
    }
}

/// A broker whose delayed messages wait in a [`RedisScheduler`].
#[derive(Clone)]
pub struct ScheduledBroker {
    /// Where messages go when they are due (and undelayed ones at once).
    inner: Arc<dyn Broker>,
    /// Where delayed messages wait.
    scheduler: Arc<RedisScheduler>,
}

impl std::fmt::Debug for ScheduledBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduledBroker")
            .field("inner", &self.inner.describe())
            .field("scheduler", &self.scheduler)
            .finish()
    }
}

impl ScheduledBroker {
    /// Delayed messages published through the result go to `scheduler`, the rest to `inner`.
    pub fn new(inner: Arc<dyn Broker>, scheduler: Arc<RedisScheduler>) -> Self {
        Self { inner, scheduler }
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<RedisScheduler> {
        &self.scheduler
    }
}

/// Opens the broker at `broker_url`, wrapped in a [`ScheduledBroker`] when `scheduler_url`
/// is given (`redis://host:port/db`; keys prefixed `wasmq.scheduler`).
///
/// # Errors
/// The broker's or scheduler's URL error.
pub fn connect(
    broker_url: &str,
    scheduler_url: Option<&str>,
    amqp: super::amqp::AmqpOptions,
) -> Result<Arc<dyn Broker>, BrokerError> {
    connect_prefixed(
        broker_url,
        scheduler_url,
        &RedisSchedulerOptions::default().prefix,
        amqp,
    )
}

/// [`connect`], with the scheduler's sets under `prefix` (a tenant's own, so tenants
/// sharing one Redis never take each other's messages).
///
/// # Errors
/// As [`connect`].
pub fn connect_prefixed(
    broker_url: &str,
    scheduler_url: Option<&str>,
    prefix: &str,
    amqp: super::amqp::AmqpOptions,
) -> Result<Arc<dyn Broker>, BrokerError> {
    let broker = super::connect_with(broker_url, amqp)?;
    match scheduler_url {
        None => Ok(broker),
        Some(url) => {
            let options = RedisSchedulerOptions {
                prefix: prefix.to_owned(),
                ..RedisSchedulerOptions::default()
            };
            let scheduler = RedisScheduler::new(url, options)?;
            Ok(Arc::new(ScheduledBroker::new(broker, Arc::new(scheduler))))
        }
    }
}

#[async_trait]
impl Broker for ScheduledBroker {
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        match delay.filter(|d| !d.is_zero()) {
            Some(delay) => Ok(self.scheduler.schedule(queue, envelope, delay).await?),
            None => self.inner.publish(queue, envelope, None).await,
        }
    }

    /// At once: the broker's own check. Delayed: held by the scheduler once the broker says
    /// the queue exists; when it is due the poller publishes it as it publishes every due
    /// message (a queue deleted meanwhile is declared again then).
    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        match delay.filter(|d| !d.is_zero()) {
            Some(delay) => {
                if !self.inner.queue_exists(queue).await? {
                    return Err(BrokerError::QueueNotFound {
                        queue: queue.to_owned(),
                    });
                }
                Ok(self.scheduler.schedule(queue, envelope, delay).await?)
            }
            None => self.inner.publish_existing(queue, envelope, None).await,
        }
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError> {
        self.inner.queue_exists(queue).await
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let inner = self.inner.consume(queues, prefetch).await?;
        let (stop, mut stopped) = watch::channel(false);
        let scheduler = Arc::clone(&self.scheduler);
        let broker = Arc::clone(&self.inner);
        tracing::info!(scheduler = %scheduler.describe(), "publishing due messages");
        let poller = tokio::spawn(async move {
            scheduler
                .run(&*broker, async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
        });
        Ok(Box::new(ScheduledConsumer {
            inner,
            stop,
            _poller: poller,
        }))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(queue, limit).await
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let ready = self.inner.queue_length(queue).await?;
        Ok(ready + self.scheduler.pending(queue).await?)
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.scheduler.forget_queue(queue).await?;
        self.inner.delete_queue(queue).await
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        self.inner.revoke(revocation).await
    }

    async fn revocations(
        &self,
        node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        self.inner.revocations(node).await
    }

    async fn control_requests(
        &self,
        node: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<crate::broker::ControlRequest>>, BrokerError>
    {
        self.inner.control_requests(node).await
    }

    async fn broadcast_control(
        &self,
        broadcast: &crate::broker::ControlBroadcast,
    ) -> Result<Vec<crate::broker::ControlReply>, BrokerError> {
        self.inner.broadcast_control(broadcast).await
    }

    async fn ring_release(&self, bell: &crate::broker::ReleaseBell) -> Result<(), BrokerError> {
        self.inner.ring_release(bell).await
    }

    async fn release_bells(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<crate::broker::ReleaseBell>>, BrokerError> {
        self.inner.release_bells().await
    }

    async fn publish_events(
        &self,
        message: &crate::protocol::events::EventMessage,
    ) -> Result<(), BrokerError> {
        self.inner.publish_events(message).await
    }

    async fn events(
        &self,
    ) -> Result<
        Option<tokio::sync::mpsc::Receiver<crate::protocol::events::EventMessage>>,
        BrokerError,
    > {
        self.inner.events().await
    }

    async fn events_with_backlog(
        &self,
        backlog: usize,
    ) -> Result<
        Option<tokio::sync::mpsc::Receiver<crate::protocol::events::EventMessage>>,
        BrokerError,
    > {
        self.inner.events_with_backlog(backlog).await
    }

    async fn known_queues(&self) -> Result<Vec<String>, BrokerError> {
        self.inner.known_queues().await
    }

    async fn forget_node(&self, node: &str) -> Result<(), BrokerError> {
        self.inner.forget_node(node).await
    }

    fn describe(&self) -> String {
        format!(
            "{} (delays: {})",
            self.inner.describe(),
            self.scheduler.describe()
        )
    }
}

/// The broker's consumer, plus the poller that publishes due messages while it lives.
struct ScheduledConsumer {
    inner: Box<dyn Consumer>,
    /// Asks the poller to stop after its current round.
    stop: watch::Sender<bool>,
    /// The poller; it stops by itself once asked.
    _poller: tokio::task::JoinHandle<()>,
}

impl Drop for ScheduledConsumer {
    fn drop(&mut self) {
        // Let the poller finish its round (publishing what it claimed), then stop.
        let _ = self.stop.send(true);
    }
}

#[async_trait]
impl Consumer for ScheduledConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.inner.next().await
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.inner.close().await;
    }

    fn consuming(&self) -> Option<watch::Receiver<bool>> {
        self.inner.consuming()
    }

    async fn flush_acks(&mut self) {
        self.inner.flush_acks().await;
    }

    fn subscriptions(&self) -> Option<crate::broker::Subscriptions> {
        self.inner.subscriptions()
    }
}
