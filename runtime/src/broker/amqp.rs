//! The AMQP broker (RabbitMQ), with lapin: the production, multi-machine broker.
//!
//! **Topology, as Celery declares it** (`celery-reference.md` §2.1): each work queue is a
//! durable classic queue bound to a durable direct exchange of the same name with the queue
//! name as routing key (`celery` → exchange `celery`); messages are published to the default
//! exchange with the queue name as routing key, persistent. A queue that already exists — say
//! declared by Python with `x-max-priority` — is used as it is (checked with a passive
//! declare first), so a mixed Python/wasmq fleet never trips over a 406.
//!
//! **Dead letters** go to `<queue>.dead` (durable), published by the worker with the reason
//! in the `x-wasmq-dead-reason` header, then the original is acked. The work queue itself
//! gets no `x-dead-letter-*` arguments: Python clients declare it without them.
//!
//! **Delays** (countdown, eta, retry backoff) never hold a message unacked: they go through
//! Celery 5.5's *native delayed delivery* topology — 28 level queues `celery_delayed_0..27`
//! that hold a message for the binary digits of its delay in whole seconds, then the topic
//! exchange `celery_delayed_delivery`, to which every work queue is bound with `#.<queue>`.
//! A delay under a second goes straight to the work queue; the worker waits out the
//! fraction using the message's `eta`. See [`delayed`] for the layout.
//!
//! **Reliability**: every publish is confirmed by the broker (publisher confirms); the
//! consumer uses per-channel QoS = prefetch; a supervisor reconnects with backoff after the
//! connection drops and resumes consuming, and [`AmqpConsumer`] reports whether it is
//! actually consuming right now.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation as AmqpConfirmation, Connection, ConnectionProperties,
    ExchangeKind,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use super::{
    Broker, BrokerError, Confirmation, Consumer, DeadLetter, Delivery, Revocation, Settle,
};
use crate::protocol::{Envelope, Properties};

pub mod delayed;

/// Header carrying why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-wasmq-dead-reason";
/// Header carrying how many times a dead-lettered message had been delivered.
pub const DEAD_DELIVERIES_HEADER: &str = "x-wasmq-deliveries";

/// The name of the dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// One live connection and its confirm-mode publishing channel.
struct Session {
    connection: Connection,
    publisher: Channel,
    /// Work queues declared (and bound for delayed delivery) on this connection.
    declared: Mutex<HashSet<String>>,
    /// Set once the delay levels are declared on this connection.
    delay_levels: tokio::sync::OnceCell<()>,
}

struct Inner {
    options: AmqpOptions,
    uri: String,
    /// The URI without credentials, for logs.
    shown: String,
    name: String,
    /// The type the delay levels are declared with (`?delayed_queue_type=` in the URI).
    delayed_queue_type: delayed::QueueType,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

/// How wasmq declares queues on RabbitMQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmqpOptions {
    /// `x-max-priority` for the work queues wasmq declares (Celery's
    /// `task_queue_max_priority`); none: plain queues, where message priority is ignored.
    pub queue_max_priority: Option<u8>,
}

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

fn lapin_error(what: &str, error: &lapin::Error) -> BrokerError {
    BrokerError::Amqp(format!("{what}: {error}"))
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
            }),
        })
    }

    /// The live session, connecting if there is none (or the last one died).
    async fn session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut guard = self.inner.session.lock().await;
        if let Some(session) = guard.as_ref()
            && session.connection.status().connected()
            && session.publisher.status().connected()
        {
            return Ok(Arc::clone(session));
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.inner.name.clone().into());
        let connection = Connection::connect(&self.inner.uri, properties)
            .await
            .map_err(|e| lapin_error(&format!("cannot connect to {}", self.inner.shown), &e))?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lapin_error("cannot enable publisher confirms", &e))?;
        let session = Arc::new(Session {
            connection,
            publisher,
            declared: Mutex::new(HashSet::new()),
            delay_levels: tokio::sync::OnceCell::new(),
        });
        *guard = Some(Arc::clone(&session));
        tracing::debug!(broker = %self.inner.shown, "connected");
        Ok(session)
    }

    /// Forgets `session` (after an error) so the next use reconnects.
    async fn invalidate(&self, session: &Arc<Session>) {
        let mut guard = self.inner.session.lock().await;
        if guard.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            *guard = None;
        }
    }

    /// Declares `queue` the way Celery does (durable queue, durable direct exchange of the
    /// same name, bound by the queue name), and its dead-letter queue, and binds it to the
    /// delayed-delivery exchange (declaring the delay levels first, once per connection). A
    /// queue that already exists with other arguments (a 406 from RabbitMQ, on a throwaway
    /// channel) is used as it is.
    async fn ensure_queue(&self, session: &Session, queue: &str) -> Result<(), BrokerError> {
        if session
            .declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(queue)
        {
            return Ok(());
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let probe = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let mut arguments = FieldTable::default();
        if let Some(max) = self.inner.options.queue_max_priority {
            arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(max));
        }
        match probe.queue_declare(queue.into(), durable, arguments).await {
            Ok(_) => {
                let exchange = probe
                    .exchange_declare(
                        queue.into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                match exchange {
                    Ok(()) => {
                        probe
                            .queue_bind(
                                queue.into(),
                                queue.into(),
                                queue.into(),
                                QueueBindOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                            .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
                        let _ = probe.close(200, "OK".into()).await;
                    }
                    // Declared by Python with another exchange type (say topic, for native
                    // delayed delivery): wasmq publishes to the default exchange anyway.
                    Err(error) => {
                        tracing::info!(queue, %error, "the exchange exists with another type; using it as it is");
                    }
                }
            }
            Err(error) => {
                tracing::info!(queue, %error, "the queue exists with other arguments; using it as it is");
            }
        }
        let dead = dead_letter_queue(queue);
        session
            .publisher
            .queue_declare(dead.as_str().into(), durable, FieldTable::default())
            .await
            .map_err(|e| lapin_error(&format!("cannot declare queue {dead}"), &e))?;
        session
            .delay_levels
            .get_or_try_init(|| {
                delayed::declare_topology(&session.connection, self.inner.delayed_queue_type)
            })
            .await?;
        delayed::bind_queue(&session.publisher, queue).await?;
        session
            .declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(queue.to_owned());
        Ok(())
    }

    /// Publishes `body` to `routing_key` on the default exchange and waits for the
    /// broker's confirmation.
    async fn publish_confirmed(
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
    async fn publish_confirmed_to(
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
            AmqpConfirmation::Nack(_) => Err(BrokerError::Amqp(format!(
                "the broker refused a message for {routing_key}"
            ))),
        }
    }

    /// Runs `attempt` with a live session, reconnecting and retrying (up to 3 times) when
    /// the connection fails.
    async fn with_session<T, F, Fut>(&self, attempt: F) -> Result<T, BrokerError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let mut last = None;
        for round in 0..3_u32 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(round))).await;
            }
            let session = match self.session().await {
                Ok(session) => session,
                Err(error) => {
                    last = Some(error);
                    continue;
                }
            };
            match attempt(Arc::clone(&session)).await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    tracing::warn!(%error, "broker operation failed; reconnecting");
                    self.invalidate(&session).await;
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or(BrokerError::Closed))
    }

    /// Publishes a raw result or reply (used by the rpc result backend): not persistent, no
    /// queue declaration.
    pub(crate) async fn publish_reply(
        &self,
        routing_key: &str,
        body: &[u8],
        correlation_id: &str,
    ) -> Result<(), BrokerError> {
        self.with_session(|session| async move {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_correlation_id(correlation_id.into())
                .with_delivery_mode(1)
                .with_priority(0)
                .with_headers(FieldTable::default());
            self.publish_confirmed(&session, routing_key, body, properties)
                .await
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

/// The value of query parameter `name` in `uri`, if given.
fn query_parameter<'a>(uri: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = uri.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// JSON header values → AMQP field values (py-amqp's typing: `I` for ints that fit 32 bits,
/// `L` beyond, `d` floats, `A` arrays, `F` tables, `V` null).
fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i32::try_from(i).map_or(AMQPValue::LongLongInt(i), AMQPValue::LongInt),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(to_table(map)),
    }
}

fn to_table(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Ok(key) = ShortString::try_new(key.as_str()) {
            table.insert(key, to_amqp(value));
        }
    }
    table
}

/// AMQP field values of any type → JSON.
fn from_amqp(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10_f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(from_amqp).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(from_table(table)),
        AMQPValue::Void => Value::Null,
    }
}

fn from_table(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), from_amqp(v)))
        .collect()
}

pub(crate) fn properties_of(envelope: &Envelope) -> BasicProperties {
    let p = &envelope.properties;
    let mut properties = BasicProperties::default()
        .with_content_type(
            p.content_type
                .as_deref()
                .unwrap_or("application/json")
                .into(),
        )
        .with_content_encoding(p.content_encoding.as_deref().unwrap_or("utf-8").into())
        .with_delivery_mode(p.delivery_mode.unwrap_or(2))
        .with_priority(p.priority.unwrap_or(0))
        .with_headers(to_table(&envelope.headers));
    if let Some(id) = &p.correlation_id {
        properties = properties.with_correlation_id(id.as_str().into());
    }
    if let Some(reply_to) = &p.reply_to {
        properties = properties.with_reply_to(reply_to.as_str().into());
    }
    if let Some(expiration) = &p.expiration {
        properties = properties.with_expiration(expiration.as_str().into());
    }
    properties
}

fn envelope_of(properties: &BasicProperties, body: Vec<u8>) -> Envelope {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    Envelope {
        headers: properties
            .headers()
            .as_ref()
            .map(from_table)
            .unwrap_or_default(),
        properties: Properties {
            content_type: text(properties.content_type()),
            content_encoding: text(properties.content_encoding()),
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            priority: *properties.priority(),
            delivery_mode: *properties.delivery_mode(),
            expiration: text(properties.expiration()),
        },
        body,
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(
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

    async fn publish_unconfirmed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Confirmation, BrokerError> {
        if delay.is_some_and(|d| d.as_secs() > 0) {
            self.publish(queue, envelope, delay).await?;
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
                AmqpConfirmation::Nack(_) => Err(BrokerError::Amqp(format!(
                    "the broker refused a message for {queue}"
                ))),
            }
        }))
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let (deliveries, receiver) = mpsc::channel(prefetch.max(1) * 2);
        let (consuming, status) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let batcher: Arc<Mutex<Option<Arc<AckBatcher>>>> = Arc::default();
        let supervisor = tokio::spawn(supervise(
            self.clone(),
            queues.to_vec(),
            u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            deliveries,
            consuming,
            stopped,
            Arc::clone(&batcher),
        ));
        Ok(Box::new(AmqpConsumer {
            receiver,
            status,
            stop,
            supervisor,
            batcher,
        }))
    }

    async fn dead_letters(
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

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        self.with_session(|session| async move {
            let probe = session
                .connection
                .create_channel()
                .await
                .map_err(|e| lapin_error("cannot open a channel", &e))?;
            let declared = probe
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let count = declared.map(|q| u64::from(q.message_count())).unwrap_or(0);
            let _ = probe.close(200, "OK".into()).await;
            Ok(count)
        })
        .await
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.with_session(|session| async move {
            // The shared delay levels stay; only this queue's way out of them goes.
            let channel = session
                .connection
                .create_channel()
                .await
                .map_err(|e| lapin_error("cannot open a channel", &e))?;
            if delayed::unbind_queue(&channel, queue).await.is_ok() {
                let _ = channel.close(200, "OK".into()).await;
            }
            for name in [queue.to_owned(), dead_letter_queue(queue)] {
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error("cannot open a channel", &e))?;
                let _ = channel
                    .queue_delete(
                        name.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = channel
                    .exchange_delete(
                        name.as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
                let _ = channel.close(200, "OK".into()).await;
            }
            session
                .declared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|name| name != queue);
            Ok(())
        })
        .await
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(revocation).map_err(|e| BrokerError::Amqp(e.to_string()))?;
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
                    AmqpConfirmation::Nack(_) => Err(BrokerError::Amqp(
                        "the broker refused the revocation".into(),
                    )),
                    _ => Ok(()),
                }
            }
        })
        .await
    }

    async fn revocations(
        &self,
        node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        let (sender, receiver) = mpsc::channel(256);
        // Declared before returning when the broker is up, so a revocation made once this
        // returns reaches us; when it is down, the listener declares it once connected.
        let queue = revoke_queue(node);
        let declared = match self.session().await {
            Ok(session) => declare_revoke_queue(&session.publisher, &queue).await,
            Err(error) => Err(error),
        };
        if let Err(error) = declared {
            tracing::warn!(%error, "revocations: cannot reach the broker yet; listening once connected");
        }
        let broker = self.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match broker.listen_for_revocations(&queue, &node, &sender).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "revocations: lost the broker; listening again soon");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = sender.closed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Ok(receiver)
    }

    fn describe(&self) -> String {
        self.inner.shown.clone()
    }
}

/// Declares the fanout exchange revocations are broadcast on.
async fn declare_revoke_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            REVOKE_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error("cannot declare the revoke exchange", &e))
}

/// Declares a worker's revocation queue and binds it to the revoke exchange. Its messages
/// live as long as revocations are remembered; the queue itself goes away after a week
/// without its worker.
async fn declare_revoke_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    declare_revoke_exchange(channel).await?;
    // As kombu declares it, so Python clients and wasmq agree on its arguments.
    channel
        .exchange_declare(
            CELERY_PIDBOX_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error("cannot declare celery.pidbox", &e))?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(
            i64::try_from(crate::worker::revoked::REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX),
        ),
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
    channel
        .queue_bind(
            queue.into(),
            CELERY_PIDBOX_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))
}

/// The revocations in a message of the revoke queue: wasmq's own JSON, or a Celery
/// remote-control `revoke` command addressed to everyone or to `node` (other commands are
/// not for this queue and yield nothing).
fn revocations_in(body: &[u8], node: &str) -> Result<Vec<Revocation>, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    if value.get("method").is_none() {
        return Ok(vec![serde_json::from_value(value)?]);
    }
    if value.get("method").and_then(Value::as_str) != Some("revoke") {
        return Ok(Vec::new());
    }
    let addressed = match value.get("destination") {
        Some(Value::Array(nodes)) => nodes.iter().any(|n| n.as_str() == Some(node)),
        _ => true,
    };
    let arguments = value.get("arguments").cloned().unwrap_or(Value::Null);
    let terminate = arguments
        .get("terminate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ids = match arguments.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(if addressed {
        ids.into_iter()
            .map(|id| Revocation::now(id, terminate))
            .collect()
    } else {
        Vec::new()
    })
}

impl AmqpBroker {
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
                return Err(BrokerError::Amqp(
                    "the revocation consumer was cancelled".into(),
                ));
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

/// Consumes `queues` for as long as the consumer lives, reconnecting with backoff.
async fn supervise(
    broker: AmqpBroker,
    queues: Vec<String>,
    prefetch: u16,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
    consuming: watch::Sender<bool>,
    mut stopped: watch::Receiver<bool>,
    batcher: Arc<Mutex<Option<Arc<AckBatcher>>>>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stopped.borrow() {
            return;
        }
        match consume_once(
            &broker,
            &queues,
            prefetch,
            &deliveries,
            &consuming,
            &mut stopped,
            &batcher,
        )
        .await
        {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost) => backoff = Duration::from_millis(250),
            Err(error) => tracing::warn!(%error, "cannot consume; retrying in {backoff:?}"),
        }
        let _ = consuming.send(false);
        if deliveries.is_closed() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

enum Ended {
    /// Asked to stop.
    Stopped,
    /// The channel or connection went away.
    Lost,
}

async fn consume_once(
    broker: &AmqpBroker,
    queues: &[String],
    prefetch: u16,
    deliveries: &mpsc::Sender<Result<Delivery, BrokerError>>,
    consuming: &watch::Sender<bool>,
    stopped: &mut watch::Receiver<bool>,
    current_batcher: &Mutex<Option<Arc<AckBatcher>>>,
) -> Result<Ended, BrokerError> {
    let session = broker.session().await?;
    for queue in queues {
        if let Err(error) = broker.ensure_queue(&session, queue).await {
            broker.invalidate(&session).await;
            return Err(error);
        }
    }
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(|e| lapin_error("cannot open a channel", &e))?;
    channel
        // One queue: per-consumer QoS, the same limit, and the only kind quorum queues (e.g.
        // declared by Celery for native delayed delivery) accept. Several queues: one limit
        // for the channel, as Celery sets it.
        .basic_qos(
            prefetch,
            BasicQosOptions {
                global: queues.len() > 1,
            },
        )
        .await
        .map_err(|e| lapin_error("cannot set QoS", &e))?;
    let mut streams = Vec::new();
    let mut tags = Vec::new();
    for queue in queues {
        let tag = format!(
            "wasmq-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))?;
        let queue = queue.clone();
        streams.push(consumer.map(move |d| (queue.clone(), d)).boxed());
        tags.push(tag);
    }
    let _ = consuming.send(true);
    tracing::info!(broker = %broker.describe(), queues = %queues.join(","), "consuming");
    let mut merged = futures_util::stream::select_all(streams);
    let batcher = AckBatcher::new(channel.clone(), prefetch);
    *current_batcher
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&batcher));
    tokio::spawn(send_acks(
        Arc::downgrade(&batcher),
        Arc::clone(&batcher.due),
    ));
    loop {
        tokio::select! {
            next = merged.next() => match next {
                Some((queue, Ok(delivery))) => {
                    let mut envelope = envelope_of(&delivery.properties, delivery.data);
                    // Quorum queues count deliveries; classic queues only say "redelivered",
                    // so wasmq carries the count in the message itself (see below).
                    let quorum_count = envelope.headers.get("x-delivery-count").and_then(Value::as_u64);
                    let earlier = envelope.headers.get(DEAD_DELIVERIES_HEADER).and_then(Value::as_u64).unwrap_or(0);
                    let delivery_count = quorum_count
                        .map_or(earlier + 1, |n| n + 1);
                    let delivery_count = u32::try_from(delivery_count).unwrap_or(u32::MAX);
                    let recount = delivery.redelivered && quorum_count.is_none();
                    let settler = Arc::new(AmqpSettler {
                        acker: delivery.acker,
                        tag: delivery.delivery_tag,
                        batcher: Arc::clone(&batcher),
                        broker: broker.clone(),
                        queue: queue.clone(),
                        delivery_count,
                    });
                    if recount {
                        // A classic-queue redelivery (its worker died or released it): publish
                        // the message again carrying how many deliveries it has had, and ack
                        // this copy, so a message that kills every worker is recognised after
                        // `max_deliveries` and dead-lettered instead of looping forever.
                        envelope.headers.insert(DEAD_DELIVERIES_HEADER.into(), u64::from(delivery_count).into());
                        // Inline, not spawned: the ack must reach the channel before this
                        // consumer can close, or both copies would come back.
                        match broker.publish(&queue, &envelope, None).await {
                            Ok(()) => {
                                let _ = Settle::ack(settler.as_ref(), 0).await;
                                let _ = batcher.flush().await;
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot count a redelivery; releasing the message");
                                let _ = Settle::release(settler.as_ref(), 0).await;
                            }
                        }
                        continue;
                    }
                    let ours = Delivery::new(envelope, queue, delivery_count, delivery.delivery_tag, settler);
                    if let Err(mpsc::error::SendError(unsent)) = deliveries.send(Ok(ours)).await {
                        // The consumer is closing: give it back and stop consuming, or the
                        // broker keeps delivering to a consumer nobody reads.
                        if let Ok(unsent) = unsent {
                            let _ = unsent.release().await;
                        }
                        for tag in &tags {
                            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                        }
                        let _ = consuming.send(false);
                        return Ok(Ended::Stopped);
                    }
                }
                Some((queue, Err(error))) => {
                    tracing::warn!(%error, queue, "lost the broker connection; reconnecting");
                    broker.invalidate(&session).await;
                    return Ok(Ended::Lost);
                }
                None => {
                    tracing::warn!("the broker cancelled consumption; reconnecting");
                    broker.invalidate(&session).await;
                    return Ok(Ended::Lost);
                }
            },
            _ = stopped.changed() => {
                for tag in &tags {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                let _ = consuming.send(false);
                // Deliveries already handed out may still be settled: `send_acks` keeps
                // acking them until the last of them is gone.
                return Ok(Ended::Stopped);
            }
        }
    }
}

/// Acknowledges a channel's deliveries in batches: `basic.ack` with `multiple` up to the
/// highest delivery tag below which every delivery is settled. Deliveries finish out of order
/// (tasks run concurrently), so settled tags wait in a set until the prefix is contiguous.
///
/// Settling only records the tag; one task per channel ([`send_acks`]) writes the acks, so
/// neither a finishing task nor the consuming loop waits for lapin's I/O thread. An ack goes
/// out as soon as half the prefetch (at most 64) is pending, else [`ACK_DELAY`] after the
/// first pending settlement: late acks stay late (a delivery is only settled after its result
/// is stored), and a crash redelivers at most those few messages.
struct AckBatcher {
    channel: Channel,
    state: Mutex<AckState>,
    /// Woken when the first settlement is pending and when a batch is full.
    due: Arc<tokio::sync::Notify>,
}

impl Drop for AckBatcher {
    /// The last holder is gone (the consumer loop has ended and every delivery is settled):
    /// send what is still pending before the channel closes, or those messages would be
    /// redelivered. lapin queues the frame when the call is first polled, ahead of the
    /// channel's close, so one poll is enough.
    fn drop(&mut self) {
        let pending = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(tag) = pending {
            let _ = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .now_or_never();
        }
    }
}

/// What a settlement asks of the ack writer.
#[derive(Debug, PartialEq, Eq)]
enum AckDue {
    /// Nothing new: an ack is already due.
    Nothing,
    /// The first pending settlement: ack within [`ACK_DELAY`].
    Soon,
    /// A full batch: ack now.
    Now,
}

#[derive(Default)]
struct AckState {
    /// Every tag below this one is settled (tags start at 1).
    contiguous_below: u64,
    /// Settled tags above `contiguous_below`, each with whether it needs a `basic.ack`
    /// (false: it was released with its own `basic.nack`).
    settled: BTreeMap<u64, bool>,
    /// Highest tag of the settled prefix that needs an ack and has not been acked on the
    /// wire. Never a released tag: RabbitMQ closes the channel on an ack naming a tag it no
    /// longer holds ("unknown delivery tag"), which would requeue every message in flight
    /// on it. A `multiple` ack up to this tag covers released tags below it harmlessly.
    unacked_upto: Option<u64>,
    pending: u64,
    /// Settled deliveries that trigger an ack at once: at most half the prefetch, or the
    /// broker would stop delivering while the acks wait for the timer.
    batch: u64,
}

/// The largest ack batch.
const ACK_BATCH: u64 = 64;

/// The longest an ack waits for its batch to fill.
const ACK_DELAY: Duration = Duration::from_millis(1);

impl AckState {
    /// Records `tag` as settled; `acked` says whether it still needs a `basic.ack` (a
    /// released delivery was nacked on its own). Says when the ack writer should act.
    fn settle(&mut self, tag: u64, acked: bool) -> AckDue {
        if tag == self.contiguous_below {
            if acked {
                self.unacked_upto = Some(tag);
            }
            self.contiguous_below += 1;
            while let Some(needs_ack) = self.settled.remove(&self.contiguous_below) {
                if needs_ack {
                    self.unacked_upto = Some(self.contiguous_below);
                }
                self.contiguous_below += 1;
            }
        } else if tag > self.contiguous_below {
            self.settled.insert(tag, acked);
        }
        let first = self.pending == 0;
        if acked {
            self.pending += 1;
        }
        if self.pending >= self.batch {
            AckDue::Now
        } else if first {
            AckDue::Soon
        } else {
            AckDue::Nothing
        }
    }

    /// True when a full batch waits.
    fn full(&self) -> bool {
        self.pending >= self.batch
    }

    /// The tag to ack up to now, if any.
    fn take(&mut self) -> Option<u64> {
        self.pending = 0;
        self.unacked_upto.take()
    }
}

impl AckBatcher {
    fn new(channel: Channel, prefetch: u16) -> Arc<Self> {
        Arc::new(Self {
            channel,
            state: Mutex::new(AckState {
                contiguous_below: 1,
                batch: (u64::from(prefetch) / 2).clamp(1, ACK_BATCH),
                ..AckState::default()
            }),
            due: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Records `tag` as settled and wakes the ack writer when an ack becomes due.
    fn settle(&self, tag: u64, acked: bool) {
        let due = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .settle(tag, acked);
        if due != AckDue::Nothing {
            self.due.notify_one();
        }
    }

    fn full(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .full()
    }

    /// The tag to ack up to now, if any.
    fn take(&self) -> Option<u64> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    async fn ack_upto(&self, tag: u64) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| lapin_error("cannot ack", &e))
    }

    /// Sends the pending ack, if any.
    async fn flush(&self) -> Result<(), BrokerError> {
        match self.take() {
            Some(tag) => self.ack_upto(tag).await,
            None => Ok(()),
        }
    }
}

/// Writes a channel's batched acks (see [`AckBatcher`]) while anything else holds the
/// batcher. It holds only a weak reference, so the channel closes as soon as the consumer
/// loop has ended and every delivery it handed out is settled (the batcher's `Drop` sends
/// the last ack).
async fn send_acks(batcher: std::sync::Weak<AckBatcher>, due: Arc<tokio::sync::Notify>) {
    loop {
        // Wait for a pending settlement; look every 100 ms whether the batcher is gone.
        tokio::select! {
            () = due.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let Some(batcher) = batcher.upgrade() else {
            return;
        };
        if !batcher.full() {
            // Give the batch a moment to fill, unless it fills first.
            tokio::select! {
                () = due.notified() => {}
                () = tokio::time::sleep(ACK_DELAY) => {}
            }
        }
        if let Err(error) = batcher.flush().await {
            tracing::warn!(%error, "cannot ack; the messages will be redelivered");
        }
    }
}

/// Settles one AMQP delivery; keeps its channel open (through the batcher) until settled.
struct AmqpSettler {
    acker: lapin::Acker,
    tag: u64,
    batcher: Arc<AckBatcher>,
    broker: AmqpBroker,
    queue: String,
    delivery_count: u32,
}

#[async_trait]
impl Settle for AmqpSettler {
    async fn ack(&self, _tag: u64) -> Result<(), BrokerError> {
        self.batcher.settle(self.tag, true);
        Ok(())
    }

    async fn dead_letter(
        &self,
        _tag: u64,
        reason: &str,
        envelope: &Envelope,
    ) -> Result<(), BrokerError> {
        let mut envelope = envelope.clone();
        envelope
            .headers
            .insert(DEAD_REASON_HEADER.into(), reason.into());
        envelope
            .headers
            .insert(DEAD_DELIVERIES_HEADER.into(), self.delivery_count.into());
        envelope
            .headers
            .insert("x-wasmq-dead-at".into(), crate::sqlite::now_ms().into());
        let dead = dead_letter_queue(&self.queue);
        let broker = &self.broker;
        broker
            .with_session(|session| {
                let (dead, envelope) = (dead.clone(), envelope.clone());
                async move {
                    broker.ensure_queue(&session, &self.queue).await?;
                    broker
                        .publish_confirmed(
                            &session,
                            &dead,
                            &envelope.body,
                            properties_of(&envelope),
                        )
                        .await
                }
            })
            .await?;
        self.ack(0).await
    }

    async fn release(&self, _tag: u64) -> Result<(), BrokerError> {
        let released = self
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map(drop)
            .map_err(|e| lapin_error("cannot release", &e));
        self.batcher.settle(self.tag, false);
        released
    }
}

/// Deliveries from a supervised AMQP consumer.
pub struct AmqpConsumer {
    receiver: mpsc::Receiver<Result<Delivery, BrokerError>>,
    status: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    supervisor: tokio::task::JoinHandle<()>,
    /// The current channel's ack batcher, to flush before the worker exits.
    batcher: Arc<Mutex<Option<Arc<AckBatcher>>>>,
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.receiver
            .recv()
            .await
            .unwrap_or(Err(BrokerError::Closed))
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.receiver.close();
        // Deliveries received but not handed out go back to the queue.
        while let Ok(delivery) = self.receiver.try_recv() {
            if let Ok(delivery) = delivery {
                let _ = delivery.release().await;
            }
        }
        // Let the supervisor cancel its consumers: aborted in the middle of starting one
        // (dropped right after a quick stop), it would leave a consumer on a connection that
        // lives on (shared with a client), holding the messages it is sent unacked.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.supervisor).await;
    }

    fn consuming(&self) -> Option<watch::Receiver<bool>> {
        Some(self.status.clone())
    }

    async fn flush_acks(&mut self) {
        let batcher = self
            .batcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(batcher) = batcher
            && let Err(error) = batcher.flush().await
        {
            tracing::warn!(%error, "cannot send the last acks; those messages will be redelivered");
        }
    }
}

/// Header names and values as a sorted map, for tests and tools.
pub fn headers_to_amqp_and_back(headers: &Map<String, Value>) -> BTreeMap<String, Value> {
    from_table(&to_table(headers)).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn acks_cover_only_contiguous_settled_tags() {
        let mut state = AckState {
            contiguous_below: 1,
            batch: ACK_BATCH,
            ..AckState::default()
        };
        // 2 and 3 finish before 1: nothing can be acked yet (the writer is woken once).
        assert_eq!(state.settle(2, true), AckDue::Soon);
        assert_eq!(state.settle(3, true), AckDue::Nothing);
        assert_eq!(state.take(), None);
        // 1 finishes: everything up to 3 can go in one multiple ack.
        assert_eq!(state.settle(1, true), AckDue::Soon);
        assert_eq!(state.take(), Some(3));
        assert_eq!(state.take(), None);
        // A released (nacked) delivery does not block the ones after it.
        state.settle(4, false);
        state.settle(5, true);
        assert_eq!(state.take(), Some(5));
        // ...and is never the tag an ack names: RabbitMQ no longer holds it, and would
        // close the channel ("unknown delivery tag"), requeueing everything on it.
        state.settle(6, true);
        state.settle(7, false);
        assert_eq!(state.take(), Some(6));
        state.settle(8, false);
        assert_eq!(state.take(), None);
        // A full batch asks to be flushed at once.
        let mut dues = Vec::new();
        for tag in 9..9 + ACK_BATCH {
            dues.push(state.settle(tag, true));
        }
        assert_eq!(dues.first(), Some(&AckDue::Soon));
        assert_eq!(dues.last(), Some(&AckDue::Now));
        assert!(state.full());
        assert_eq!(state.take(), Some(8 + ACK_BATCH));
        assert!(!state.full());
    }

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

    #[test]
    fn every_header_type_decodes_to_json() {
        let mut table = FieldTable::default();
        table.insert("void".into(), AMQPValue::Void);
        table.insert("int32".into(), AMQPValue::LongInt(-5));
        table.insert("int64".into(), AMQPValue::LongLongInt(1 << 40));
        table.insert("double".into(), AMQPValue::Double(1.5));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("short".into(), AMQPValue::ShortString("s".into()));
        table.insert("long".into(), AMQPValue::LongString("l".into()));
        table.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongInt(30),
            ])),
        );
        let mut nested = FieldTable::default();
        nested.insert("k".into(), AMQPValue::ShortShortUInt(7));
        table.insert("table".into(), AMQPValue::FieldTable(nested));
        assert_eq!(
            Value::Object(from_table(&table)),
            json!({"void": null, "int32": -5, "int64": 1_i64 << 40, "double": 1.5, "flag": true,
                   "short": "s", "long": "l", "array": [null, 30], "table": {"k": 7}})
        );
        // The captured Celery header set survives a round trip.
        let headers = json!({"task": "proj.tasks.add", "timelimit": [30, 20.5], "group": null,
                             "stamps": {}, "retries": 3_000_000_000_i64, "ignore_result": false});
        let map = headers.as_object().unwrap();
        assert_eq!(
            headers_to_amqp_and_back(map),
            map.clone().into_iter().collect()
        );
    }
}
