//! The options of one send (Celery's `apply_async` keywords) and how they fill a
//! [`TaskMessage`]: the one place a sender's wishes become message headers.
//!
//! Both ways of sending go through here: the client's `send_task` (typed [`SendOptions`])
//! and the canvas, whose signatures carry the same options as a JSON dict
//! ([`SendOptions::from_signature`]). What only a workflow sets (group, links, chain, chord)
//! is added by the canvas itself.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{KNOWN_HEADERS, TaskMessage, parse_time};

/// Options of one send, as Celery's `apply_async` keywords.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    /// Use this task id instead of a fresh UUID.
    pub task_id: Option<String>,
    /// Run no earlier than this long from now.
    pub countdown: Option<Duration>,
    /// Run no earlier than this time (ignored when `countdown` is set).
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this long from now: the result becomes REVOKED ("expired").
    pub expires: Option<Duration>,
    /// Do not run after this time (ignored when `expires` is set).
    pub expires_at: Option<DateTime<Utc>>,
    /// The queue. Default: the route of the task (see `Client::with_routes`), else the
    /// sender's default queue (`celery`).
    pub queue: Option<String>,
    /// Message priority, 0–255 (higher first).
    pub priority: Option<u8>,
    /// Hard time limit.
    pub time_limit: Option<Duration>,
    /// Soft time limit.
    pub soft_time_limit: Option<Duration>,
    /// `Some(true)`: don't store the result; `Some(false)`: store it even if the task
    /// declares `ignore_result`; `None`: as the task declares (Celery's `send_task`).
    pub ignore_result: Option<bool>,
    /// Custom headers (Celery's `apply_async(headers=…)`), which the task reads as its
    /// request's headers and which its retries keep. Celery's own header names are
    /// ignored here.
    pub headers: Map<String, Value>,
}

impl SendOptions {
    /// Reads the options of a Celery signature dict (`options`): `task_id`, `countdown`
    /// (seconds), `eta` (ISO time), `expires` (seconds or ISO time), `queue`, `priority`,
    /// `time_limit`, `soft_time_limit` (seconds), `ignore_result`, and the stamps
    /// (`stamped_headers` and the values they name) as headers. Other keys are the canvas's
    /// own and are ignored here.
    pub fn from_signature(options: &Map<String, Value>) -> Self {
        let string = |key: &str| options.get(key).and_then(Value::as_str).map(str::to_owned);
        let seconds = |key: &str| {
            options
                .get(key)
                .and_then(Value::as_f64)
                .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok())
        };
        let (expires, expires_at) = match options.get("expires") {
            Some(Value::Number(n)) => (
                n.as_f64()
                    .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok()),
                None,
            ),
            Some(Value::String(text)) => (None, parse_time(text)),
            _ => (None, None),
        };
        Self {
            task_id: string("task_id"),
            countdown: seconds("countdown"),
            eta: string("eta").as_deref().and_then(parse_time),
            expires,
            expires_at,
            queue: string("queue"),
            priority: options
                .get("priority")
                .and_then(Value::as_u64)
                .and_then(|p| u8::try_from(p).ok()),
            time_limit: seconds("time_limit"),
            soft_time_limit: seconds("soft_time_limit"),
            ignore_result: options.get("ignore_result").and_then(Value::as_bool),
            headers: stamp_headers(options),
        }
    }
}

/// The stamps of a signature (Celery's `Signature.stamp`): its options list the stamped
/// header names in `stamped_headers` and hold each stamp under its name; a message carries
/// them as the headers `stamped_headers` and `stamps` (`{name: value}`), as Celery's
/// `as_task_v2` writes them. Empty when the signature is not stamped.
fn stamp_headers(options: &Map<String, Value>) -> Map<String, Value> {
    let mut headers = Map::new();
    let Some(Value::Array(stamped)) = options.get("stamped_headers") else {
        return headers;
    };
    let stamps: Map<String, Value> = stamped
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|name| options.get(name).map(|v| (name.to_owned(), v.clone())))
        .collect();
    headers.insert("stamped_headers".into(), Value::Array(stamped.clone()));
    headers.insert("stamps".into(), Value::Object(stamps));
    headers
}

impl TaskMessage {
    /// The message `apply_async(args, kwargs, **options)` sends for `task`: a fresh id
    /// unless the options name one (which is then also its `root_id` and correlation id),
    /// the eta and expiry resolved against now, priority, time limits and `ignore_result`.
    pub fn build(
        task: impl Into<String>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
    ) -> Self {
        let mut message = TaskMessage::new(task, args, kwargs);
        if let Some(id) = &options.task_id {
            message.id.clone_from(id);
            message.root_id = Some(id.clone());
            message.correlation_id = Some(id.clone());
        }
        let now = Utc::now();
        let after = |wait: Duration| chrono::Duration::from_std(wait).ok().map(|d| now + d);
        message.eta = match options.countdown {
            Some(countdown) => after(countdown),
            None => options.eta,
        };
        message.expires = match options.expires {
            Some(expires) => after(expires),
            None => options.expires_at,
        };
        message.priority = options.priority;
        message.time_limit = options.time_limit.map(|t| t.as_secs_f64());
        message.soft_time_limit = options.soft_time_limit.map(|t| t.as_secs_f64());
        message.ignore_result = options.ignore_result;
        message.extra_headers.extend(
            options
                .headers
                .iter()
                .filter(|(name, _)| !KNOWN_HEADERS.contains(&name.as_str()))
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        message
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn signature_options_read_as_apply_async_keywords() {
        let options = json!({
            "task_id": "T1", "countdown": 2.5, "expires": "2030-01-01T00:00:00+00:00",
            "queue": "reports", "priority": 7, "time_limit": 1.5, "ignore_result": true,
            "link": [], "group_id": "G"
        });
        let parsed = SendOptions::from_signature(options.as_object().unwrap());
        assert_eq!(parsed.task_id.as_deref(), Some("T1"));
        assert_eq!(parsed.countdown, Some(Duration::from_millis(2500)));
        assert_eq!(parsed.expires, None);
        assert_eq!(parsed.expires_at, parse_time("2030-01-01T00:00:00+00:00"));
        assert_eq!(parsed.queue.as_deref(), Some("reports"));
        assert_eq!(parsed.priority, Some(7));
        assert_eq!(parsed.time_limit, Some(Duration::from_millis(1500)));
        assert_eq!(parsed.ignore_result, Some(true));
        assert_eq!(
            SendOptions::from_signature(&Map::new()).ignore_result,
            None,
            "not said: the task's declaration decides"
        );
        let relative = SendOptions::from_signature(json!({"expires": 60}).as_object().unwrap());
        assert_eq!(relative.expires, Some(Duration::from_secs(60)));
        assert!(parsed.headers.is_empty(), "not stamped");
    }

    #[test]
    fn stamped_signatures_send_their_stamps_as_celery_does() {
        let options = json!({"stamped_headers": ["monitoring_id"], "monitoring_id": "M1",
            "queue": "q"});
        let parsed = SendOptions::from_signature(options.as_object().unwrap());
        let message = TaskMessage::build("math.add", vec![], Map::new(), &parsed);
        assert_eq!(
            message.extra_headers.get("stamped_headers"),
            Some(&json!(["monitoring_id"]))
        );
        assert_eq!(
            message.extra_headers.get("stamps"),
            Some(&json!({"monitoring_id": "M1"}))
        );
    }

    #[test]
    fn a_message_is_built_from_the_options() {
        let options = SendOptions {
            task_id: Some("T1".into()),
            countdown: Some(Duration::from_secs(10)),
            eta: parse_time("2000-01-01T00:00:00Z"),
            expires_at: parse_time("2030-01-01T00:00:00Z"),
            time_limit: Some(Duration::from_millis(500)),
            ..SendOptions::default()
        };
        let message = TaskMessage::build("math.add", vec![json!(1)], Map::new(), &options);
        assert_eq!(message.id, "T1");
        assert_eq!(message.root_id.as_deref(), Some("T1"));
        assert_eq!(message.correlation_id.as_deref(), Some("T1"));
        let eta = message.eta.unwrap();
        assert!(
            eta > Utc::now() + chrono::Duration::seconds(9),
            "countdown beats eta"
        );
        assert_eq!(message.expires, options.expires_at);
        assert_eq!(message.time_limit, Some(0.5));
        assert_eq!(message.soft_time_limit, None);
    }
}
