//! Brokers: where task messages wait. A small abstraction — publish to a queue (optionally
//! delayed), consume with a prefetch limit, settle each delivery (ack, dead-letter,
//! release) — and its implementations:
//!
//! * [`embedded::SqliteBroker`], the embedded default: a SQLite file several processes on
//!   one machine share (`sqlite://.wasmq/wasmq.db`);
//! * [`amqp::AmqpBroker`], RabbitMQ (`amqp://user:pass@host:port/vhost`, `amqps://…`),
//!   compatible with Celery's topology so Python and wasmq share queues;
//! * [`redis::RedisBroker`], Redis (`redis://host:port/db`), compatible with kombu's Redis
//!   transport so Python and wasmq share queues;
//! * [`scheduled::ScheduledBroker`], a decorator over either that holds delayed messages in
//!   Redis until they are due.
//!
//! Only this module knows the queue tables. Deliveries are acknowledged late, after the
//! worker has stored the result; a delivery whose worker dies unacknowledged is delivered
//! again.

pub mod amqp;
pub mod embedded;
mod error;
mod prefetch;
pub mod redis;
pub mod scheduled;
mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::error::BrokerError;
pub use self::prefetch::PrefetchLimit;
pub use self::subscriptions::Subscriptions;
use crate::protocol::events::EventMessage;
use crate::protocol::{ControlCommand, Envelope};

/// A message handed to a consumer, to be settled exactly once.
pub struct Delivery {
    /// The message.
    pub envelope: Envelope,
    /// The queue it came from.
    pub queue: String,
    /// How many times it has been delivered, this time included (1 on first delivery).
    pub delivery_count: u32,
    tag: u64,
    settler: Arc<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("delivery_count", &self.delivery_count)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds a delivery; used by broker implementations.
    pub(crate) fn new(
        envelope: Envelope,
        queue: String,
        delivery_count: u32,
        tag: u64,
        settler: Arc<dyn Settle>,
    ) -> Self {
        Self {
            envelope,
            queue,
            delivery_count,
            tag,
            settler,
        }
    }

    /// True when the message was delivered before (its earlier consumer died or released it).
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1
    }

    /// Done with the message: remove it from the queue.
    ///
    /// # Errors
    /// When the broker cannot record the ack; the message will then be delivered again.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.settler.ack(self.tag).await
    }

    /// The message cannot be processed: move it to the dead-letter store with `reason`.
    ///
    /// # Errors
    /// When the broker cannot record it; the message will then be delivered again.
    pub async fn dead_letter(self, reason: &str) -> Result<(), BrokerError> {
        self.settler
            .dead_letter(self.tag, reason, &self.envelope)
            .await
    }

    /// Give the message back unprocessed, to be delivered again at once (e.g. at shutdown).
    ///
    /// # Errors
    /// When the broker cannot record it; the message will then be delivered again later.
    pub async fn release(self) -> Result<(), BrokerError> {
        self.settler.release(self.tag).await
    }
}

/// How a broker settles its deliveries.
/// A release doorbell: `tenant`'s latest release is now `epoch` (see
/// [`Broker::ring_release`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseBell {
    /// The tenant whose releases moved.
    pub tenant: String,
    /// Its latest epoch.
    pub epoch: u64,
}

#[async_trait]
pub(crate) trait Settle: Send + Sync {
    async fn ack(&self, tag: u64) -> Result<(), BrokerError>;
    /// Moves the delivery (whose message is `envelope`) to the dead letters.
    async fn dead_letter(
        &self,
        tag: u64,
        reason: &str,
        envelope: &Envelope,
    ) -> Result<(), BrokerError>;
    async fn release(&self, tag: u64) -> Result<(), BrokerError>;
}

/// A message that could not be processed, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The queue it came from.
    pub queue: String,
    /// The task id, when the message had one.
    pub task_id: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many times it had been delivered.
    pub delivery_count: u32,
    /// When (Unix milliseconds).
    pub dead_at_ms: i64,
    /// The message itself.
    pub envelope: Envelope,
}

/// How long a revocation is remembered (Celery keeps them 3 hours; tasks can wait longer in
/// a queue, so wasmq keeps them as long as results: one day): by the broker for workers that
/// start later, and by every worker.
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(24 * 3600);

/// A task that must not run (Celery's `revoke`): broadcast to every worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked task's id.
    pub task_id: String,
    /// Also interrupt the task if it is running.
    pub terminate: bool,
    /// When it was revoked (Unix milliseconds).
    pub revoked_at_ms: i64,
}

impl Revocation {
    /// A revocation of `task_id` made now.
    pub fn now(task_id: impl Into<String>, terminate: bool) -> Self {
        Self {
            task_id: task_id.into(),
            terminate,
            revoked_at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

/// A remote-control command addressed to this worker (Celery's `inspect`/`control`), with
/// the way back to its sender when it wants a reply.
#[derive(Debug)]
pub struct ControlRequest {
    /// The command.
    pub command: ControlCommand,
    /// Send the reply here (the broker publishes it to the sender); none: a cast, which
    /// wants no reply. Dropping it sends nothing.
    pub reply: Option<tokio::sync::oneshot::Sender<serde_json::Value>>,
}

/// A stream of deliveries from one or more queues.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery, waiting for one. Never more than the prefetch limit are
    /// outstanding (delivered and not yet settled).
    ///
    /// # Errors
    /// When the broker fails; the caller may retry.
    async fn next(&mut self) -> Result<Delivery, BrokerError>;

    /// Stops consuming and gives back every message fetched but not yet handed out.
    /// Deliveries already handed out can still be settled.
    async fn close(&mut self);

    /// Whether the consumer is actually consuming, as it changes (false while it reconnects
    /// to a broker). `None` for consumers that cannot lose their broker (embedded).
    fn consuming(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// Sends any acknowledgements still batched (the worker calls it before exiting).
    async fn flush_acks(&mut self) {}

    /// The queues this consumer consumes, to change while it runs (Celery's
    /// `add_consumer`/`cancel_consumer`); `None` when its queues are fixed.
    fn subscriptions(&self) -> Option<Subscriptions> {
        None
    }

    /// The consumer's prefetch window, to change while it runs (the worker's autoscaler);
    /// `None` when it is fixed for the consumer's life (RabbitMQ applies a new `basic.qos`
    /// only to consumers started after it).
    fn prefetch_limit(&self) -> Option<PrefetchLimit> {
        None
    }
}

/// A remote-control broadcast to send with [`Broker::broadcast_control`]: what to run, on
/// which nodes, and how long to wait for replies.
#[derive(Debug, Clone)]
pub struct ControlBroadcast {
    /// The command: its method, arguments and destination (the broker fills in the ticket
    /// and where replies go).
    pub command: ControlCommand,
    /// Whether replies are wanted (false: a cast, nothing is waited for).
    pub reply: bool,
    /// How long to collect replies.
    pub timeout: Duration,
    /// Stop collecting once this many nodes replied (Celery: `len(destination)`).
    pub limit: Option<usize>,
}

/// One node's reply to a broadcast command.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlReply {
    /// The node that replied.
    pub node: String,
    /// Its reply.
    pub reply: serde_json::Value,
}

impl ControlReply {
    /// The `{"<node>": reply}` entries of a reply body, as every broker carries them
    /// (nothing when it is not a JSON object).
    pub fn parse_body(body: &[u8]) -> Vec<Self> {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(entries)) => entries
                .into_iter()
                .map(|(node, reply)| Self { node, reply })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The broker's answer to a publish, still to come (see [`Broker::publish_unconfirmed`]).
#[must_use = "a confirmation says whether the broker took the message"]
pub struct Confirmation(
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BrokerError>> + Send>>,
);

impl Confirmation {
    /// A confirmation whose answer is known.
    pub fn settled(answer: Result<(), BrokerError>) -> Self {
        Self(Box::pin(std::future::ready(answer)))
    }

    /// A confirmation that resolves with `answer`.
    pub fn pending(
        answer: impl std::future::Future<Output = Result<(), BrokerError>> + Send + 'static,
    ) -> Self {
        Self(Box::pin(answer))
    }
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmation")
    }
}

impl std::future::Future for Confirmation {
    type Output = Result<(), BrokerError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// A message broker.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Publishes `envelope` to `queue`, visible after `delay` (none: at once).
    ///
    /// # Errors
    /// When the broker cannot take the message; it was not published.
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError>;

    /// Publishes like [`Broker::publish`] but returns once the message is on its way, with
    /// the broker's confirmation still to come: awaiting the [`Confirmation`] says whether
    /// the broker took it. Lets a caller overlap the confirmation with other waiting (a
    /// caller waiting for the task's result anyway) or pipeline many publishes. Default:
    /// publishes with [`Broker::publish`] and returns a settled confirmation.
    ///
    /// # Errors
    /// When the message cannot be sent at all.
    async fn publish_unconfirmed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Confirmation, BrokerError> {
        self.publish(queue, envelope, delay).await?;
        Ok(Confirmation::settled(Ok(())))
    }

    /// Publishes like [`Broker::publish`], but only into a queue that already exists in this
    /// broker, declaring nothing. A tenant's worker publishes its tasks' follow-ups
    /// (callbacks, chain steps, chord bodies, errbacks) this way to every queue but its own,
    /// so a signature naming a queue its tenant does not have can neither create one nor
    /// vanish silently. What "exists" means is each broker's:
    ///
    /// * RabbitMQ: a queue of that name in the vhost. The message is published `mandatory`
    ///   and RabbitMQ returns it when no queue takes it; a delayed one (which the delay
    ///   levels could not return) is published only after a passive declare finds its queue.
    /// * Embedded: a queue declared in the file — by any consumer of it or any publish that
    ///   may declare (see [`embedded`]).
    ///
    /// # Errors
    /// [`BrokerError::QueueNotFound`] when the queue does not exist (nothing was published);
    /// otherwise as [`Broker::publish`].
    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError>;

    /// Whether `queue` exists in this broker, by the rule of [`Broker::publish_existing`];
    /// declares nothing.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError>;

    /// Starts consuming `queues`, with at most `prefetch` unsettled deliveries.
    ///
    /// # Errors
    /// When the broker cannot start a consumer.
    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError>;

    /// The messages dead-lettered from `queue`, newest first.
    ///
    /// # Errors
    /// When the broker cannot list them.
    async fn dead_letters(&self, queue: &str, limit: usize)
    -> Result<Vec<DeadLetter>, BrokerError>;

    /// Messages waiting in `queue` (ready or delayed, not counting those being processed).
    ///
    /// # Errors
    /// When the broker cannot count them.
    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Deletes `queue` and its dead letters (tests and demos clean up with it).
    ///
    /// # Errors
    /// When the broker cannot delete them.
    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError>;

    /// Broadcasts `revocation` to every worker, including workers that are down now and
    /// start later (within the retention of revocations).
    ///
    /// # Errors
    /// When the broker cannot take it.
    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError>;

    /// The revocations worker `node` must know: those the broker still holds for it, then
    /// new ones as they are made, until the receiver is dropped.
    ///
    /// # Errors
    /// When the broker cannot start listening.
    async fn revocations(
        &self,
        node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError>;

    /// The remote-control commands addressed to worker `node` from now on (RabbitMQ: its
    /// `<node>.celery.pidbox` queue on `celery.pidbox`, where Python's `inspect()` and
    /// `control` and the `celery` CLI send them; embedded: the file's `control_commands`
    /// table, polled), until the receiver is dropped; `None` when this broker carries no
    /// remote control.
    ///
    /// # Errors
    /// When the broker cannot start listening.
    async fn control_requests(
        &self,
        node: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<ControlRequest>>, BrokerError> {
        let _ = node;
        Ok(None)
    }

    /// Broadcasts a remote-control command as Celery's `app.control.broadcast` does and
    /// collects the replies that arrive within its timeout (or until its limit), in arrival
    /// order; replies to other commands are ignored. RabbitMQ and the embedded broker carry
    /// it (see [`embedded`] for how the file does).
    ///
    /// # Errors
    /// [`BrokerError::NoRemoteControl`] when this broker carries none; otherwise when the
    /// broker cannot take the command.
    async fn broadcast_control(
        &self,
        broadcast: &ControlBroadcast,
    ) -> Result<Vec<ControlReply>, BrokerError> {
        let _ = broadcast;
        Err(BrokerError::NoRemoteControl(self.describe()))
    }

    /// Rings the release doorbell: tells every worker listening on this broker that a
    /// tenant's releases moved (RabbitMQ: the `wasmq.releases` fanout). A hint, never a
    /// release: a worker reads and verifies the release in its plugin store. Default:
    /// nothing to ring (the embedded broker's workers read the release table itself).
    ///
    /// # Errors
    /// When the broker cannot take it.
    async fn ring_release(&self, bell: &ReleaseBell) -> Result<(), BrokerError> {
        let _ = bell;
        Ok(())
    }

    /// Release doorbells from now on, until the receiver is dropped; `None` when this
    /// broker carries none.
    ///
    /// # Errors
    /// When the broker cannot start listening.
    async fn release_bells(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<ReleaseBell>>, BrokerError> {
        Ok(None)
    }

    /// Publishes a message of Celery events (see [`crate::protocol::events`]): on RabbitMQ
    /// to the `celeryev` topic exchange, where Flower, `celery events` and celery-exporter
    /// listen; on the embedded broker into its `events` table, which `wasmq events` tails.
    /// Events are transient: with nobody listening they are dropped (RabbitMQ) or kept for
    /// a short while (embedded). Default: nowhere to publish them.
    ///
    /// # Errors
    /// When the broker cannot take it; the caller drops the events and counts them.
    async fn publish_events(&self, message: &EventMessage) -> Result<(), BrokerError> {
        let _ = message;
        Ok(())
    }

    /// The event messages published from now on, by every worker and client on this broker,
    /// until the receiver is dropped; `None` when this broker carries no events.
    ///
    /// # Errors
    /// When the broker cannot start listening.
    async fn events(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<EventMessage>>, BrokerError> {
        Ok(None)
    }

    /// Like [`Broker::events`], but first the newest `backlog` event messages the broker
    /// still keeps, oldest first, so a monitor started late (`wasmq dashboard`) sees the
    /// recent past: the embedded file's `events` table keeps the newest 100,000; RabbitMQ
    /// keeps none (events live only in the queues of the receivers listening). Default: no
    /// backlog.
    ///
    /// # Errors
    /// When the broker cannot start listening.
    async fn events_with_backlog(
        &self,
        backlog: usize,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<EventMessage>>, BrokerError> {
        let _ = backlog;
        self.events().await
    }

    /// The work queues this broker knows of, for monitors: on the embedded file, every
    /// queue declared in it; none on RabbitMQ, which lists its queues only through the
    /// management plugin (a monitor learns them from the workers instead). Default: none.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    async fn known_queues(&self) -> Result<Vec<String>, BrokerError> {
        Ok(Vec::new())
    }

    /// Drops what the broker holds for worker `node` (on RabbitMQ its revocation queue,
    /// where revocations would otherwise wait for it for a week; nothing on the embedded
    /// broker, whose revocations are one table every worker reads). For a node that is gone
    /// for good, e.g. a test's worker; revocations made afterwards no longer wait for it.
    /// Call it once the node's worker has stopped: a worker still listening keeps (or
    /// declares again) what it needs.
    ///
    /// # Errors
    /// When the broker cannot remove it.
    async fn forget_node(&self, node: &str) -> Result<(), BrokerError>;

    /// A description for logs, e.g. `sqlite://.wasmq/wasmq.db`.
    fn describe(&self) -> String;
}

/// Opens the broker at `url`.
///
/// # Errors
/// [`BrokerError::UnsupportedUrl`] for an unknown scheme, or the broker's own error.
pub fn connect(url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    connect_with(url, amqp::AmqpOptions::default())
}

/// Opens the broker at `url`; RabbitMQ queues are declared as `amqp` says (the embedded
/// broker always honours priorities).
///
/// # Errors
/// [`BrokerError::UnsupportedUrl`] for an unknown scheme, or the broker's own error.
pub fn connect_with(url: &str, amqp: amqp::AmqpOptions) -> Result<Arc<dyn Broker>, BrokerError> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        return Ok(Arc::new(amqp::AmqpBroker::with_options(url, amqp)?));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let (url, options) = redis::RedisBrokerOptions::from_url(url)?;
        return Ok(Arc::new(redis::RedisBroker::new(&url, options)?));
    }
    match crate::db::parse_url(url) {
        Some(path) => Ok(Arc::new(embedded::SqliteBroker::open(
            &path,
            embedded::SqliteBrokerOptions::default(),
        )?)),
        None => Err(BrokerError::UnsupportedUrl(url.to_owned())),
    }
}
