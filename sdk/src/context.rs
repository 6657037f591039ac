//! What a running task knows about its call (Celery's `self.request`) and its channel to the
//! worker: the [`TaskContext`] a task takes as its optional first parameter.
//!
//! The fields come from the host's `invocation` record once per call; the custom headers
//! (JSON text) and the message properties are decoded the first time a task asks for them,
//! so a task that never reads them never pays for them.

use std::cell::OnceCell;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::bindings::wasmq::task::{host, types as wit};

/// Severity of a log record sent to the worker's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the task recovered from.
    Warn,
    /// Something failed.
    Error,
}

impl From<Level> for wit::LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => Self::Trace,
            Level::Debug => Self::Debug,
            Level::Info => Self::Info,
            Level::Warn => Self::Warn,
            Level::Error => Self::Error,
        }
    }
}

/// The AMQP properties of the message a task serves, as its sender set them (Celery's
/// `request.properties`). It serializes as Celery's dict does, without the absent ones, so
/// a task can return it as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MessageProperties {
    /// The body's MIME type (`application/json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The body's encoding (`utf-8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// The correlation id (the task id, for Celery clients).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Where an rpc result goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// 1 = transient, 2 = persistent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    /// The message priority, 0–255.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// The per-message TTL in milliseconds, as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    /// The sender's message id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When the sender sent it (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// The sender's message type name (AMQP `type`).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// The sending application (`apply_async(app_id=…)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
}

impl From<wit::MessageProperties> for MessageProperties {
    fn from(p: wit::MessageProperties) -> Self {
        Self {
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
        }
    }
}

/// What a task knows about the call it serves (Celery's `self.request`), and its channel to
/// the worker: logging, progress reports and the soft time limit.
#[derive(Debug, Clone)]
pub struct TaskContext {
    invocation: wit::Invocation,
    /// Built from `invocation.properties` when first asked for.
    properties: OnceCell<MessageProperties>,
    /// Parsed from `invocation.headers_json` when first asked for.
    headers: OnceCell<Option<Map<String, Value>>>,
}

impl TaskContext {
    pub(crate) fn new(invocation: wit::Invocation) -> Self {
        Self {
            invocation,
            properties: OnceCell::new(),
            headers: OnceCell::new(),
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.invocation.id
    }

    /// The name this task was called by.
    pub fn task_name(&self) -> &str {
        &self.invocation.task
    }

    /// How many times this task was retried before this attempt (0 on the first attempt).
    pub fn retries(&self) -> u32 {
        self.invocation.retries
    }

    /// The id of the first task in this task's workflow, if any.
    pub fn root_id(&self) -> Option<&str> {
        self.invocation.root_id.as_deref()
    }

    /// The id of the task that sent this one, if any.
    pub fn parent_id(&self) -> Option<&str> {
        self.invocation.parent_id.as_deref()
    }

    /// The id of the group this task belongs to, if any.
    pub fn group_id(&self) -> Option<&str> {
        self.invocation.group_id.as_deref()
    }

    /// The time before which the message was not to run (Celery's `request.eta`), as
    /// ISO-8601 text in UTC, e.g. `2026-11-28T18:56:05.710508+00:00`; `None` when it was
    /// sent to run at once.
    pub fn eta(&self) -> Option<&str> {
        self.invocation.eta.as_deref()
    }

    /// The time after which the message was not to run (Celery's `request.expires`), as
    /// ISO-8601 text like [`TaskContext::eta`].
    pub fn expires(&self) -> Option<&str> {
        self.invocation.expires.as_deref()
    }

    /// The hard time limit the message asked for (Celery's `request.time_limit`); `None`
    /// when it set none. The limit in force may be lower: the task's declared limit and
    /// the worker's ceiling bound it.
    pub fn time_limit(&self) -> Option<Duration> {
        self.invocation.time_limit_ms.map(Duration::from_millis)
    }

    /// The soft time limit the message asked for (Celery's `request.soft_time_limit`);
    /// `None` when it set none. [`TaskContext::soft_time_left`] counts down the soft limit
    /// in force, which may be the task's declared one.
    pub fn soft_time_limit(&self) -> Option<Duration> {
        self.invocation
            .soft_time_limit_ms
            .map(Duration::from_millis)
    }

    /// The message priority (Celery's `request.delivery_info['priority']`), 0–255.
    pub fn priority(&self) -> Option<u8> {
        self.invocation.properties.priority
    }

    /// True when this message was delivered before (Celery's
    /// `request.delivery_info['redelivered']`): a worker died while running it, or a task
    /// requeued it with [`TaskError::requeue`](crate::TaskError::requeue).
    pub fn redelivered(&self) -> bool {
        self.invocation.redelivered
    }

    /// The message headers that are not Celery's own (Celery's `request.headers`): the
    /// ones its sender added, e.g. with `apply_async(headers={...})`. `None` when there are
    /// none. A retry keeps them.
    pub fn headers(&self) -> Option<&Map<String, Value>> {
        self.headers
            .get_or_init(|| {
                self.invocation
                    .headers_json
                    .as_deref()
                    .and_then(|json| serde_json::from_str(json).ok())
            })
            .as_ref()
    }

    /// The message's AMQP properties (Celery's `request.properties`).
    pub fn properties(&self) -> &MessageProperties {
        self.properties
            .get_or_init(|| self.invocation.properties.clone().into())
    }

    /// Writes a log record to the worker's log, tagged with this task's id.
    pub fn log(&self, level: Level, message: &str) {
        host::log(level.into(), message);
    }

    /// Logs at info level.
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    /// Reports a custom state with metadata (Celery's `update_state(state=..., meta=...)`),
    /// e.g. `ctx.update_state("PROGRESS", &json!({"done": 3, "total": 10}))`.
    pub fn update_state<M: Serialize + ?Sized>(&self, state: &str, meta: &M) {
        let meta = serde_json::to_string(meta).unwrap_or_else(|_| "null".to_owned());
        host::update_state(state, &meta);
    }

    /// Time left before the soft time limit in force (the message's, else the task's
    /// declared one), if the task has one.
    pub fn soft_time_left(&self) -> Option<Duration> {
        host::soft_time_left_ms().map(Duration::from_millis)
    }

    /// True once the soft time limit has passed: a cooperative task stops cleanly now,
    /// before the hard limit interrupts it.
    pub fn should_stop(&self) -> bool {
        self.soft_time_left().is_some_and(|left| left.is_zero())
    }
}
