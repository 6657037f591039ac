//! The AMQP broker (RabbitMQ), with lapin: the production, multi-machine broker.
//! [`AmqpBroker`] is the [`Broker`] glue; each of its concerns lives in a file of its own:
//!
//! * `session` — one lazily opened connection with a confirm-mode publishing channel,
//!   reconnected when an operation fails in a way a reconnect may fix (`transient` says
//!   which failures those are);
//! * `topology` — **work queues as Celery declares them** (`celery-reference.md` §2.1): a
//!   durable queue bound to a durable direct exchange of the same name; a queue that already
//!   exists (say declared by Python with `x-max-priority`) is used as it is;
//! * `publish` — every publish confirmed by the broker (publisher confirms), to the default
//!   exchange with the queue name as routing key, persistent; a publish into an existing
//!   queue only (a tenant's follow-ups) is `mandatory` and declares nothing;
//! * [`delayed`] — **delays** (countdown, eta, retry backoff) never hold a message unacked:
//!   Celery 5.5's *native delayed delivery* topology, 28 level queues that hold a message for
//!   the binary digits of its delay in whole seconds; the worker waits out a fraction of a
//!   second using the message's `eta`;
//! * `consumer` and `acks` — [`AmqpConsumer`]: per-channel QoS = prefetch, a supervisor that
//!   reconnects with backoff and reports whether it is consuming, acks batched per channel;
//! * `dead_letters` — **dead letters** go to `<queue>.dead`, with the reason in a header;
//! * `revoke` — revocations broadcast to one durable queue per worker node, which also hears
//!   Celery's `celery.pidbox` remote control;
//! * `control` — Celery's remote control: each worker's `<node>.celery.pidbox` queue on a
//!   connection of its own (so replies never wait behind task traffic), replies on
//!   `reply.celery.pidbox`;
//! * `control_client` — the sending side of remote control (`wasmq inspect`/`control`):
//!   broadcast on `celery.pidbox`, collect the replies on a reply queue of its own;
//! * `reply` — the transport of the rpc result backend (`results::rpc`);
//! * `lock` — [`ExclusiveLock`], a mutex held as an exclusive queue, and records only its
//!   holder writes (the beat's lease on RabbitMQ alone);
//! * `codec` — envelopes ⇄ AMQP properties and field tables.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Broker, BrokerError, Confirmation, Consumer, DeadLetter, Revocation};
use crate::protocol::Envelope;

mod acks;
mod codec;
mod consumer;
mod control;
mod control_client;
mod dead_letters;
pub mod delayed;
mod events;
mod lock;
mod publish;
mod release_bell;
mod reply;
mod revoke;
mod session;
mod topology;
mod transient;

pub use self::codec::headers_to_amqp_and_back;
pub(crate) use self::codec::properties_of;
pub use self::consumer::AmqpConsumer;
pub use self::control::control_queue;
pub use self::control_client::{CELERY_REPLY_EXCHANGE, reply_queue};
pub use self::dead_letters::{DEAD_DELIVERIES_HEADER, DEAD_REASON_HEADER, dead_letter_queue};
pub use self::lock::ExclusiveLock;
pub use self::revoke::{CELERY_PIDBOX_EXCHANGE, REVOKE_EXCHANGE, revoke_queue};
use self::session::Session;
pub(crate) use self::transient::is_transient;

struct Inner {
    options: AmqpOptions,
    uri: String,
    /// The URI without credentials, for logs.
    shown: String,
    name: String,
    /// The type the delay levels are declared with (`?delayed_queue_type=` in the URI).
    delayed_queue_type: delayed::QueueType,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The connection Celery events are published on, once opened.
    events: events::EventLink,
}

/// How wasmq declares queues on RabbitMQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmqpOptions {
    /// `x-max-priority` for the work queues wasmq declares (Celery's
    /// `task_queue_max_priority`); none: plain queues, where message priority is ignored.
    pub queue_max_priority: Option<u8>,
}

/// The RabbitMQ broker. Cheap to clone; connects lazily and reconnects on demand.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("uri", &self.inner.shown)
            .finish()
    }
}

/// `error`, met while doing `what`.
/// Declares the durable fanout exchange `exchange` (revocations, release doorbells).
async fn declare_durable_fanout(
    channel: &lapin::Channel,
    exchange: &str,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..lapin::options::ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot declare the exchange {exchange}"), &e))
}

fn lapin_error(what: &str, error: &lapin::Error) -> BrokerError {
    BrokerError::Amqp {
        context: what.to_owned(),
        source: error.clone(),
    }
}

impl AmqpBroker {
    /// A broker for `uri` (`amqp://user:pass@host:port/vhost` or `amqps://…`). Nothing is
    /// connected until first use. The query parameter `delayed_queue_type=quorum` declares
    /// the delay levels as quorum queues (default `classic`; see [`delayed`]).
    ///
    /// # Errors
    /// [`BrokerError::UnsupportedUrl`] when the URI does not parse.
    pub fn new(uri: &str) -> Result<Self, BrokerError> {
        Self::with_options(uri, AmqpOptions::default())
    }

    /// A broker for `uri` declaring queues as `options` say.
    ///
    /// # Errors
    /// [`BrokerError::UnsupportedUrl`] when the URI cannot be parsed.
    pub fn with_options(uri: &str, options: AmqpOptions) -> Result<Self, BrokerError> {
        let parsed: lapin::uri::AMQPUri = uri
            .parse()
            .map_err(|e| BrokerError::UnsupportedUrl(format!("{uri} ({e})")))?;
        let delayed_queue_type = match query_parameter(uri, "delayed_queue_type") {
            Some(value) => value
                .parse()
                .map_err(|e| BrokerError::UnsupportedUrl(format!("{uri} ({e})")))?,
            None => delayed::QueueType::default(),
        };
        let shown = format!(
            "{}://{}:{}/{}",
            if uri.starts_with("amqps") {
                "amqps"
            } else {
                "amqp"
            },
            parsed.authority.host,
            parsed.authority.port,
            parsed.vhost
        );
        Ok(Self {
            inner: Arc::new(Inner {
                options,
                uri: uri.to_owned(),
                shown,
                name: format!(
                    "wasmq {}@{}",
                    std::process::id(),
                    gethostname::gethostname().to_string_lossy()
                ),
                delayed_queue_type,
                session: tokio::sync::Mutex::new(None),
                events: events::EventLink::default(),
            }),
        })
    }
}

/// Runs `listen` until it returns `Ok` (its receiver was dropped), starting it again after
/// each failure (a lost broker) with a backoff from 100 ms doubling to 5 s, and giving up
/// once `sender`'s receiver is dropped. The supervision of the long-lived listeners
/// (revocations, remote control); `what` names them in the log.
async fn listen_with_backoff<T, F, Fut>(
    what: &str,
    sender: &tokio::sync::mpsc::Sender<T>,
    mut listen: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen().await {
            Ok(()) => return,
            Err(error) => tracing::warn!(
                error = &error as &dyn std::error::Error,
                "{what}: lost the broker; listening again soon"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = sender.closed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The value of query parameter `name` in `uri`, if given.
fn query_parameter<'a>(uri: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = uri.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.publish_to_queue(queue, envelope, delay).await
    }

    async fn publish_unconfirmed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Confirmation, BrokerError> {
        self.publish_to_queue_unconfirmed(queue, envelope, delay)
            .await
    }

    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.publish_to_existing_queue(queue, envelope, delay).await
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError> {
        self.with_session(|session| async move { self.queue_exists_on(&session, queue).await })
            .await
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(AmqpConsumer::start(self, queues, prefetch)))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        self.read_dead_letters(queue, limit).await
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        self.count_messages(queue).await
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.remove_queue(queue).await
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        self.broadcast_revocation(revocation).await
    }

    async fn revocations(
        &self,
        node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        self.listen_for_node(node).await
    }

    async fn control_requests(
        &self,
        node: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<super::ControlRequest>>, BrokerError> {
        self.listen_for_control(node).await.map(Some)
    }

    async fn ring_release(&self, bell: &super::ReleaseBell) -> Result<(), BrokerError> {
        self.ring(bell).await
    }

    async fn broadcast_control(
        &self,
        broadcast: &super::ControlBroadcast,
    ) -> Result<Vec<super::ControlReply>, BrokerError> {
        self.broadcast(broadcast).await
    }

    async fn release_bells(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<super::ReleaseBell>>, BrokerError> {
        Ok(Some(self.listen_for_bells().await))
    }

    async fn publish_events(
        &self,
        message: &crate::protocol::events::EventMessage,
    ) -> Result<(), BrokerError> {
        self.publish_event_message(message).await
    }

    async fn events(
        &self,
    ) -> Result<
        Option<tokio::sync::mpsc::Receiver<crate::protocol::events::EventMessage>>,
        BrokerError,
    > {
        Ok(Some(self.listen_for_events()))
    }

    async fn forget_node(&self, node: &str) -> Result<(), BrokerError> {
        self.delete_revoke_queue(node).await
    }

    fn describe(&self) -> String {
        self.inner.shown.clone()
    }
}
