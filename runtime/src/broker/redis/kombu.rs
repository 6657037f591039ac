//! kombu's Redis layout, as Python Celery 5.x writes and reads it (`kombu/transport/redis.py`
//! and `kombu/transport/virtual/base.py`, 5.7; `docs/redis-wire.md` has the captured
//! traffic): the JSON envelope of a message (its body base64-encoded), the list a message of
//! a given priority waits in, the binding tables, and the pub/sub channel of a fanout
//! exchange. Pure functions; the broker does the I/O.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use crate::protocol::{Envelope, Properties};

/// kombu's separator between a queue's name and its priority step, and between the fields
/// of a binding (`sep`).
pub const SEP: &str = "\x06\x16";

/// kombu's default priority steps: a message of priority `p` waits in the list of the
/// largest step not above `p`; lower steps are consumed first (on Redis, 0 is the highest
/// priority, as Celery documents).
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The hash of unacknowledged messages: delivery tag → `[message, exchange, routing_key]`.
pub const UNACKED: &str = "unacked";
/// The sorted set of unacknowledged delivery tags, scored by when they were delivered
/// (Unix seconds).
pub const UNACKED_INDEX: &str = "unacked_index";
/// The lock a restorer of timed-out messages holds (redis-py's `Lock`: a token set with
/// `NX PX`).
pub const UNACKED_MUTEX: &str = "unacked_mutex";

/// The header that counts earlier deliveries of a message wasmq restored (kombu's own
/// restores only set `redelivered`).
pub const DELIVERIES_HEADER: &str = "x-wasmq-deliveries";

/// The list a message of `priority` for `queue` waits in (`_q_for_pri`).
pub fn queue_key(queue: &str, priority: u8) -> String {
    match priority_step(priority) {
        0 => queue.to_owned(),
        step => format!("{queue}{SEP}{step}"),
    }
}

/// Every list of `queue`, highest priority (step 0) first.
pub fn queue_keys(queue: &str) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .map(|&step| queue_key(queue, step))
        .collect()
}

/// The queue a list belongs to (`dest.rsplit(sep, 1)[0]`).
pub fn queue_of_key(key: &str) -> &str {
    match key.rsplit_once(SEP) {
        Some((queue, step)) if step.parse::<u8>().is_ok() => queue,
        _ => key,
    }
}

/// The priority step `priority` falls in (`bisect(steps, n) - 1`).
fn priority_step(priority: u8) -> u8 {
    PRIORITY_STEPS
        .iter()
        .copied()
        .rfind(|&step| step <= priority)
        .unwrap_or(0)
}

/// The set of bindings of `exchange` (`_kombu.binding.<exchange>`).
pub fn binding_key(exchange: &str) -> String {
    format!("_kombu.binding.{exchange}")
}

/// The set kombu 5.7 keeps beside a binding table that must never expire
/// (`_kombu.binding_permanent.<exchange>`).
pub fn permanent_binding_key(exchange: &str) -> String {
    format!("_kombu.binding_permanent.{exchange}")
}

/// A binding table's member: routing key, pattern and queue joined by [`SEP`].
pub fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{SEP}{queue}")
}

/// The queues of binding table `members` that a direct exchange delivers `routing_key` to.
pub fn bound_queues(members: &[String], routing_key: &str) -> Vec<String> {
    members
        .iter()
        .filter_map(|member| {
            let mut fields = member.split(SEP);
            let key = fields.next()?;
            let _pattern = fields.next()?;
            let queue = fields.next()?;
            (key == routing_key && !queue.is_empty()).then(|| queue.to_owned())
        })
        .collect()
}

/// The pub/sub channel a fanout exchange publishes to in database `db` (kombu's
/// `fanout_prefix` and `fanout_patterns`, both on by default): `/<db>.<exchange>`, with
/// `/<routing key>` appended when there is one.
pub fn fanout_channel(db: i64, exchange: &str, routing_key: &str) -> String {
    if routing_key.is_empty() {
        format!("/{db}.{exchange}")
    } else {
        format!("/{db}.{exchange}/{routing_key}")
    }
}

/// A message as kombu keeps it in a list: JSON with the body base64-encoded, its delivery
/// tag and where it was published (`exchange`, `routing_key`), as `_inplace_augment_message`
/// writes it.
pub fn encode(envelope: &Envelope, exchange: &str, routing_key: &str) -> String {
    let props = &envelope.properties;
    let mut properties = Map::new();
    let mut put = |name: &str, value: Value| {
        properties.insert(name.to_owned(), value);
    };
    if let Some(id) = &props.correlation_id {
        put("correlation_id", id.as_str().into());
    }
    put(
        "reply_to",
        props.reply_to.clone().unwrap_or_default().into(),
    );
    put("delivery_mode", props.delivery_mode.unwrap_or(2).into());
    put(
        "delivery_info",
        json!({"exchange": exchange, "routing_key": routing_key}),
    );
    put("priority", props.priority.unwrap_or(0).into());
    put("body_encoding", "base64".into());
    put("delivery_tag", uuid::Uuid::new_v4().to_string().into());
    for (name, value) in [
        ("expiration", &props.expiration),
        ("message_id", &props.message_id),
        ("type", &props.message_type),
        ("app_id", &props.app_id),
    ] {
        if let Some(value) = value {
            put(name, value.as_str().into());
        }
    }
    if let Some(timestamp) = props.timestamp {
        put("timestamp", timestamp.into());
    }
    let message = json!({
        "body": BASE64.encode(&envelope.body),
        "content-encoding": props.content_encoding.as_deref().unwrap_or("utf-8"),
        "content-type": props.content_type.as_deref().unwrap_or(crate::protocol::CONTENT_TYPE_JSON),
        "headers": envelope.headers,
        "properties": properties,
    });
    message.to_string()
}

/// A message read from a list or a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The message as wasmq sees it.
    pub envelope: Envelope,
    /// kombu's delivery tag (none when the message carries none).
    pub tag: Option<String>,
    /// Whether an earlier consumer had it (kombu's restore marks it).
    pub redelivered: bool,
    /// Earlier deliveries counted by wasmq ([`DELIVERIES_HEADER`]).
    pub earlier_deliveries: Option<u32>,
}

impl Received {
    /// How many times the message has been delivered, this time included: wasmq's count
    /// when it restored the message, else 2 for a message kombu restored, else 1.
    pub fn delivery_count(&self) -> u32 {
        match self.earlier_deliveries {
            Some(earlier) => earlier.saturating_add(1),
            None if self.redelivered => 2,
            None => 1,
        }
    }
}

/// Reads a kombu message. `None` when `payload` is not one (not a JSON object, or a body
/// that does not decode as its `body_encoding` says); the caller hands such a message on as
/// malformed.
pub fn decode(payload: &[u8]) -> Option<Received> {
    let Value::Object(mut message) = serde_json::from_slice::<Value>(payload).ok()? else {
        return None;
    };
    let mut properties = match message.remove("properties") {
        Some(Value::Object(properties)) => properties,
        _ => Map::new(),
    };
    let body = match message.remove("body") {
        Some(Value::String(body)) => {
            match properties.get("body_encoding").and_then(Value::as_str) {
                Some("base64") => BASE64.decode(body.as_bytes()).ok()?,
                _ => body.into_bytes(),
            }
        }
        Some(Value::Null) | None => Vec::new(),
        Some(other) => other.to_string().into_bytes(),
    };
    let mut headers = match message.remove("headers") {
        Some(Value::Object(headers)) => headers,
        _ => Map::new(),
    };
    let info_redelivered = properties
        .get("delivery_info")
        .and_then(|info| info.get("redelivered"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // kombu's restore marks the headers too; the mark is the broker's, not a header the
    // task's sender set.
    let header_redelivered = headers.remove("redelivered").and_then(|v| v.as_bool()) == Some(true);
    let redelivered = info_redelivered
        || header_redelivered
        || message.get("redelivered").and_then(Value::as_bool) == Some(true);
    let earlier_deliveries = headers
        .remove(DELIVERIES_HEADER)
        .and_then(|v| v.as_u64())
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let text = |value: Option<Value>| match value {
        Some(Value::String(text)) => Some(text),
        _ => None,
    };
    let tag = text(properties.remove("delivery_tag"));
    let envelope = Envelope {
        headers,
        properties: Properties {
            content_type: text(message.remove("content-type")),
            content_encoding: text(message.remove("content-encoding")),
            correlation_id: text(properties.remove("correlation_id")),
            reply_to: text(properties.remove("reply_to")).filter(|r| !r.is_empty()),
            priority: properties
                .get("priority")
                .and_then(Value::as_u64)
                .map(|p| u8::try_from(p).unwrap_or(u8::MAX)),
            delivery_mode: properties
                .get("delivery_mode")
                .and_then(Value::as_u64)
                .and_then(|m| u8::try_from(m).ok()),
            expiration: text(properties.remove("expiration")),
            message_id: text(properties.remove("message_id")),
            timestamp: properties.get("timestamp").and_then(Value::as_u64),
            message_type: text(properties.remove("type")),
            app_id: text(properties.remove("app_id")),
        },
        body,
    };
    Some(Received {
        envelope,
        tag,
        redelivered,
        earlier_deliveries,
    })
}

/// `payload` marked for its next delivery, as kombu's restore marks it (`redelivered` in
/// the headers and the delivery info) and with wasmq's count of deliveries so far
/// (`delivered`). `None` when `payload` is not a kombu message (it is restored unchanged).
pub fn mark_redelivered(payload: &str, delivered: u32) -> Option<String> {
    let Value::Object(mut message) = serde_json::from_str::<Value>(payload).ok()? else {
        return None;
    };
    if let Some(Value::Object(headers)) = message.get_mut("headers") {
        headers.insert("redelivered".into(), true.into());
        headers.insert(DELIVERIES_HEADER.into(), delivered.into());
    } else {
        message.insert(
            "headers".into(),
            json!({"redelivered": true, DELIVERIES_HEADER: delivered}),
        );
    }
    if let Some(Value::Object(info)) = message
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
    {
        info.insert("redelivered".into(), true.into());
    }
    Some(Value::Object(message).to_string())
}

/// The priority `payload` was published with (0 when it names none).
pub fn priority_of(payload: &str) -> u8 {
    serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|m| m.get("properties")?.get("priority")?.as_u64())
        .map_or(0, |p| u8::try_from(p).unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_fall_into_kombus_steps_with_zero_first() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 3), "celery\x06\x163");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("celery", 9), "celery\x06\x169");
        assert_eq!(queue_key("celery", 255), "celery\x06\x169");
        assert_eq!(
            queue_keys("q"),
            ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
        );
        assert_eq!(queue_of_key("q\x06\x166"), "q");
        assert_eq!(queue_of_key("q"), "q");
    }

    #[test]
    fn bindings_are_found_by_routing_key() {
        let members = [
            binding_member("celery", "celery"),
            binding_member("other", "elsewhere"),
            "abc\x06\x16\x06\x16oid.reply.celery.pidbox".to_owned(),
        ];
        assert_eq!(bound_queues(&members, "celery"), ["celery"]);
        assert_eq!(bound_queues(&members, "abc"), ["oid.reply.celery.pidbox"]);
        assert!(bound_queues(&members, "nobody").is_empty());
        assert_eq!(fanout_channel(3, "celery.pidbox", ""), "/3.celery.pidbox");
        assert_eq!(
            fanout_channel(0, "celeryev", "task.multi"),
            "/0.celeryev/task.multi"
        );
    }

    #[test]
    fn a_message_survives_the_envelope_and_a_restore() {
        let mut headers = Map::new();
        headers.insert("task".into(), "math.add".into());
        headers.insert("id".into(), "abc".into());
        let envelope = Envelope {
            headers,
            properties: Properties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                correlation_id: Some("abc".into()),
                reply_to: Some("client-reply".into()),
                priority: Some(6),
                delivery_mode: Some(2),
                ..Properties::default()
            },
            body: br#"[[2, 3], {}, {}]"#.to_vec(),
        };
        let payload = encode(&envelope, "", "celery");
        let value: Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(value["properties"]["body_encoding"], "base64");
        assert_eq!(
            value["properties"]["delivery_info"]["routing_key"],
            "celery"
        );
        assert_eq!(priority_of(&payload), 6);
        let received = decode(payload.as_bytes()).unwrap();
        assert_eq!(received.envelope, envelope);
        assert_eq!(received.delivery_count(), 1);
        let tag = received.tag.clone().unwrap();

        let restored = mark_redelivered(&payload, 1).unwrap();
        let again = decode(restored.as_bytes()).unwrap();
        assert_eq!(again.envelope, envelope, "wasmq's marks are not headers");
        assert_eq!(again.tag.as_deref(), Some(tag.as_str()));
        assert_eq!(again.delivery_count(), 2);
        let twice = mark_redelivered(&restored, 2).unwrap();
        assert_eq!(decode(twice.as_bytes()).unwrap().delivery_count(), 3);
    }

    #[test]
    fn a_message_kombu_restored_counts_as_a_second_delivery() {
        let payload = r#"{"body": "e30=", "content-type": "application/json",
            "headers": {"redelivered": true}, "properties": {"body_encoding": "base64",
            "delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}"#;
        let received = decode(payload.as_bytes()).unwrap();
        assert_eq!(received.delivery_count(), 2);
        assert_eq!(received.envelope.body, b"{}");
        assert!(received.envelope.headers.is_empty());
    }

    #[test]
    fn what_is_not_a_kombu_message_is_refused() {
        assert!(decode(b"not json").is_none());
        assert!(decode(b"[1, 2]").is_none());
        assert!(
            decode(br#"{"body": "%%% not base64", "properties": {"body_encoding": "base64"}}"#)
                .is_none()
        );
        assert!(mark_redelivered("nope", 1).is_none());
    }
}
