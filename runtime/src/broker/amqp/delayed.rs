//! Native delayed delivery: Celery 5.5's wire layout for delays on RabbitMQ (kombu's
//! `kombu/transport/native_delayed_delivery.py`), so a Python Celery client and wasmq share
//! one set of delay queues and each reaches the other's work queues.
//!
//! There are 28 **levels**. Level `L` is a topic exchange and a durable queue, both named
//! `celery_delayed_<L>`; the queue holds every message for exactly 2^L seconds
//! (`x-message-ttl`) and then dead-letters it to the exchange of level `L - 1`, or, from
//! level 0, to the topic exchange `celery_delayed_delivery`. A delayed message is published
//! to `celery_delayed_27` with the routing key `b27.b26.….b0.<queue>`: the 28 binary digits
//! of its delay in whole seconds, then the work queue's routing key. At level `L` the digit
//! `bL` decides: `1` routes the message into the level's queue (binding `*.….1.#`, with
//! `27 - L` leading `*`), `0` straight on to the next exchange (exchange-to-exchange binding
//! `*.….0.#`). Every work queue is bound to `celery_delayed_delivery` with `#.<queue>`, where
//! the message arrives after the sum of its levels' TTLs, i.e. its delay.
//!
//! Why this and not one queue per delay value: the number of queues is fixed (28) whatever
//! the delays, and since every message in a level queue has the same TTL, a queue's head is
//! always the first to expire — a long delay never holds a short one back.
//!
//! **Granularity.** The levels carry the whole seconds of a delay, rounded down; delays
//! beyond 2^28 - 1 s (about 8.5 years) are capped and simply delayed again when they arrive.
//! So the levels never make a message late, at most under a second early, and the worker,
//! reading the message's `eta`, waits out the rest. A delay under a second is not routed
//! through the levels at all.
//!
//! **Queue type.** Celery declares the level queues as quorum queues by default
//! (`broker_native_delayed_delivery_queue_type`); wasmq declares them classic unless asked
//! for quorum, because classic queues work on every RabbitMQ and a quorum queue needs a
//! cluster to be worth it. Level queues that already exist with other arguments (say, quorum
//! ones declared by a Python Celery worker) are used as they are.
//!
//! **Caveat** inherited from Celery's layout: a queue whose name is a dot-separated suffix of
//! another's (`b` and `a.b`) also matches the other's delayed messages (`#.b` matches
//! `….a.b`), so such a pair of queues would both receive them.

use std::str::FromStr;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::lapin_error;
use crate::broker::BrokerError;

/// The number of levels, i.e. of binary digits in a delayed routing key.
pub const LEVELS: u32 = 28;
/// The longest delay the levels carry, in seconds (2^28 - 1, about 8.5 years).
pub const MAX_DELAY_SECS: u64 = (1 << LEVELS) - 1;
/// The topic exchange messages reach when they leave level 0.
pub const DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// The name of level `level`'s exchange and queue, `celery_delayed_<level>`.
pub fn level_name(level: u32) -> String {
    format!("celery_delayed_{level}")
}

/// The exchange a delayed message is published to: the highest level.
pub fn entry_exchange() -> String {
    level_name(LEVELS - 1)
}

/// The routing key that delays a message for `seconds` (capped at [`MAX_DELAY_SECS`]) on its
/// way to `routing_key`: 28 binary digits, most significant first, joined by dots, then
/// `.<routing_key>` (kombu's `calculate_routing_key`).
///
/// # Examples
/// ```
/// use wasmq::broker::amqp::delayed::routing_key;
/// assert_eq!(
///     routing_key(5, "celery"),
///     "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.celery"
/// );
/// ```
pub fn routing_key(seconds: u64, routing_key: &str) -> String {
    let seconds = seconds.min(MAX_DELAY_SECS);
    let mut key = String::with_capacity(2 * LEVELS as usize + routing_key.len());
    for level in (0..LEVELS).rev() {
        key.push(if (seconds >> level) & 1 == 1 {
            '1'
        } else {
            '0'
        });
        key.push('.');
    }
    key.push_str(routing_key);
    key
}

/// The binding key that binds a work queue to [`DELIVERY_EXCHANGE`].
pub fn delivery_binding(queue: &str) -> String {
    format!("#.{queue}")
}

/// `*.` repeated `27 - level` times then `digit.#`: matches routing keys whose digit for
/// `level` is `digit`.
fn level_binding(level: u32, digit: char) -> String {
    let mut key = "*.".repeat((LEVELS - 1 - level) as usize);
    key.push(digit);
    key.push_str(".#");
    key
}

/// The type of the level queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic durable queues (the default).
    #[default]
    Classic,
    /// Quorum queues, with at-least-once dead-lettering.
    Quorum,
}

impl QueueType {
    /// `classic` or `quorum`, as `x-queue-type` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "unknown delayed queue type {other:?} (expected classic or quorum)"
            )),
        }
    }
}

/// Level `level`'s queue arguments, exactly as kombu declares them.
fn level_arguments(level: u32, queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    // py-amqp's typing: 32 bits while it fits, 64 beyond (RabbitMQ compares the class only).
    let ttl_ms = (1_i64 << level) * 1000;
    arguments.insert(
        "x-message-ttl".into(),
        i32::try_from(ttl_ms).map_or(AMQPValue::LongLongInt(ttl_ms), AMQPValue::LongInt),
    );
    let dead_letter_exchange = if level > 0 {
        level_name(level - 1)
    } else {
        DELIVERY_EXCHANGE.to_owned()
    };
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dead_letter_exchange.as_str().into()),
    );
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
    }
    arguments
}

/// A channel for declarations that reopens itself after a channel error (a 406 closes it).
struct Declarer<'a> {
    connection: &'a Connection,
    channel: Channel,
}

impl<'a> Declarer<'a> {
    async fn new(connection: &'a Connection) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        Ok(Self {
            connection,
            channel,
        })
    }

    async fn reopen(&mut self) -> Result<(), BrokerError> {
        self.channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        Ok(())
    }

    async fn topic_exchange(&self, name: &str) -> Result<(), BrokerError> {
        self.channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot declare exchange {name}"), &e))
    }

    async fn close(self) {
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// Declares the whole topology: the 28 level exchanges and queues with their bindings, and
/// the delivery exchange. Idempotent; level queues that exist with other arguments are kept.
///
/// # Errors
/// When RabbitMQ refuses an exchange or a binding, or the connection fails.
pub(super) async fn declare_topology(
    connection: &Connection,
    queue_type: QueueType,
) -> Result<(), BrokerError> {
    let mut declarer = Declarer::new(connection).await?;
    for level in (0..LEVELS).rev() {
        let name = level_name(level);
        declarer.topic_exchange(&name).await?;
        let declared = declarer
            .channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                level_arguments(level, queue_type),
            )
            .await;
        if let Err(error) = declared {
            tracing::info!(queue = %name, %error, "the delay level exists with other arguments; using it as it is");
            declarer.reopen().await?;
        }
        declarer
            .channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                level_binding(level, '1').as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot bind queue {name}"), &e))?;
    }
    declarer.topic_exchange(DELIVERY_EXCHANGE).await?;
    for level in (0..LEVELS).rev() {
        let next = if level > 0 {
            level_name(level - 1)
        } else {
            DELIVERY_EXCHANGE.to_owned()
        };
        declarer
            .channel
            .exchange_bind(
                next.as_str().into(),
                level_name(level).as_str().into(),
                level_binding(level, '0').as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_error(&format!("cannot bind exchange {next}"), &e))?;
    }
    declarer.close().await;
    tracing::debug!(
        queue_type = queue_type.as_str(),
        "declared the delay levels"
    );
    Ok(())
}

/// Binds `queue` to the delivery exchange, so delayed messages for it arrive there.
///
/// # Errors
/// When RabbitMQ refuses the binding.
pub(super) async fn bind_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            queue.into(),
            DELIVERY_EXCHANGE.into(),
            delivery_binding(queue).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot bind {queue} for delayed delivery"), &e))
}

/// Removes `queue`'s binding to the delivery exchange (the shared levels stay).
///
/// # Errors
/// When RabbitMQ refuses (e.g. the queue is gone already).
pub(super) async fn unbind_queue(channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    channel
        .queue_unbind(
            queue.into(),
            DELIVERY_EXCHANGE.into(),
            delivery_binding(queue).as_str().into(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot unbind {queue}"), &e))
}

/// Headers RabbitMQ adds when it dead-letters a message through the levels; dropped when a
/// message is delayed again so they do not pile up.
pub(super) fn is_dead_letter_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_spell_the_whole_seconds_in_binary() {
        let zeros = |n: usize| "0.".repeat(n);
        assert_eq!(routing_key(1, "celery"), format!("{}1.celery", zeros(27)));
        assert_eq!(routing_key(2, "q"), format!("{}1.0.q", zeros(26)));
        assert_eq!(routing_key(3, "q"), format!("{}1.1.q", zeros(26)));
        assert_eq!(
            routing_key(3600, "a.b"),
            format!("{}1.1.1.0.0.0.0.1.0.0.0.0.a.b", zeros(16))
        );
        assert_eq!(
            routing_key(MAX_DELAY_SECS, "q"),
            format!("{}q", "1.".repeat(28))
        );
        assert_eq!(
            routing_key(u64::MAX, "q"),
            routing_key(MAX_DELAY_SECS, "q"),
            "capped"
        );
        // 28 digits, then the routing key: 55 characters and a dot before it, like kombu.
        assert_eq!(routing_key(12_345, "x").len(), 56 + 1);
    }

    #[test]
    fn bindings_select_one_digit() {
        assert_eq!(level_binding(27, '1'), "1.#");
        assert_eq!(level_binding(26, '0'), "*.0.#");
        assert_eq!(level_binding(0, '1'), format!("{}1.#", "*.".repeat(27)));
        assert_eq!(delivery_binding("celery"), "#.celery");
    }

    #[test]
    fn level_arguments_match_kombu() {
        let arguments = level_arguments(27, QueueType::Quorum);
        let get = |k: &str| arguments.inner().get(k).cloned();
        assert_eq!(
            get("x-message-ttl"),
            Some(AMQPValue::LongLongInt(134_217_728_000))
        );
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("celery_delayed_26".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        let arguments = level_arguments(0, QueueType::Classic);
        let get = |k: &str| arguments.inner().get(k).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongInt(1000)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString(DELIVERY_EXCHANGE.into()))
        );
        assert_eq!(get("x-dead-letter-strategy"), None);
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
    }
}
