//! What a task is told about the call it serves (Celery's `self.request`): the WIT
//! `invocation` record, built from a [`CallRequest`](super::CallRequest).
//!
//! Beyond the ids and the retry count, a caller may describe the message the call serves
//! ([`MessageInfo`]): its eta and expiry, the time limits it asked for, whether it was
//! delivered before, its custom headers and its properties. The engine knows no message
//! format, so these arrive as plain values and are passed on unchanged.

use std::time::Duration;

use serde_json::{Map, Value};

use super::CallRequest;
use super::bindings::types as wit;

/// What a task can read about the message its call serves. Everything is optional: a call
/// that serves no message (`wasmq call`) leaves it empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageInfo {
    /// Not before this time, ISO-8601 in UTC (Celery's `request.eta`).
    pub eta: Option<String>,
    /// Not after this time, ISO-8601 in UTC (Celery's `request.expires`).
    pub expires: Option<String>,
    /// The hard time limit the message asked for (Celery's `request.time_limit`), whatever
    /// limit is in force.
    pub time_limit: Option<Duration>,
    /// The soft time limit the message asked for (Celery's `request.soft_time_limit`).
    pub soft_time_limit: Option<Duration>,
    /// Delivered before (Celery's `delivery_info['redelivered']`).
    pub redelivered: bool,
    /// The headers that are not Celery's own (Celery's `request.headers`); empty when
    /// there are none.
    pub headers: Map<String, Value>,
    /// The message's properties.
    pub properties: MessageProperties,
}

/// The AMQP properties of a message (Celery's `request.properties`), as its sender set
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// The body's MIME type.
    pub content_type: Option<String>,
    /// The body's encoding.
    pub content_encoding: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// Where an rpc result goes.
    pub reply_to: Option<String>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// The message priority (Celery's `delivery_info['priority']`).
    pub priority: Option<u8>,
    /// The per-message TTL in milliseconds, as text.
    pub expiration: Option<String>,
    /// The sender's message id.
    pub message_id: Option<String>,
    /// When it was sent (Unix seconds).
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// The sending application.
    pub app_id: Option<String>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The `invocation` record for `request`, whose message info moves into it.
pub(super) fn invocation(request: &mut CallRequest) -> wit::Invocation {
    let message = std::mem::take(&mut request.message);
    let p = message.properties;
    wit::Invocation {
        id: request.id.clone(),
        task: request.task.clone(),
        retries: request.retries,
        root_id: request.root_id.clone(),
        parent_id: request.parent_id.clone(),
        group_id: request.group_id.clone(),
        eta: message.eta,
        expires: message.expires,
        time_limit_ms: message.time_limit.map(millis),
        soft_time_limit_ms: message.soft_time_limit.map(millis),
        redelivered: message.redelivered,
        // Celery's `request.headers` is None, not {}, when a message has no custom header.
        headers_json: (!message.headers.is_empty())
            .then(|| Value::Object(message.headers).to_string()),
        properties: wit::MessageProperties {
            content_type: p.content_type,
            content_encoding: p.content_encoding,
            correlation_id: p.correlation_id,
            reply_to: p.reply_to,
            delivery_mode: p.delivery_mode,
            priority: p.priority,
            expiration: p.expiration,
            message_id: p.message_id,
            timestamp: p.timestamp,
            message_type: p.message_type,
            app_id: p.app_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_message_reaches_the_invocation_as_celery_exposes_it() {
        let bare = invocation(&mut CallRequest::new("math.add", "[1, 2]"));
        assert_eq!(bare.headers_json, None, "no custom header: None, as Celery");
        assert_eq!((bare.time_limit_ms, bare.redelivered), (None, false));

        let mut request = CallRequest::new("math.add", "[1, 2]");
        request.message = MessageInfo {
            eta: Some("2026-11-28T18:56:05.710508+00:00".into()),
            time_limit: Some(Duration::from_secs(30)),
            soft_time_limit: Some(Duration::from_millis(1500)),
            redelivered: true,
            headers: json!({"x-test-header": "test-value"})
                .as_object()
                .unwrap()
                .clone(),
            properties: MessageProperties {
                priority: Some(7),
                app_id: Some("1234".into()),
                ..MessageProperties::default()
            },
            ..MessageInfo::default()
        };
        let told = invocation(&mut request);
        assert_eq!(
            told.eta.as_deref(),
            Some("2026-11-28T18:56:05.710508+00:00")
        );
        assert_eq!(told.time_limit_ms, Some(30_000));
        assert_eq!(told.soft_time_limit_ms, Some(1500));
        assert!(told.redelivered);
        assert_eq!(
            told.headers_json.as_deref(),
            Some(r#"{"x-test-header":"test-value"}"#)
        );
        assert_eq!(told.properties.priority, Some(7));
        assert_eq!(told.properties.app_id.as_deref(), Some("1234"));
    }
}
