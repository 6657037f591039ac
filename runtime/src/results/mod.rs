//! Result backends: where task states and results are stored, in Celery's meta format
//! (`celery-reference.md` §2.7–2.9), and how clients wait for them.
//!
//! * [`sqlite::SqliteResultBackend`], the embedded default, in the same SQLite file as the
//!   embedded broker;
//! * [`redis::RedisResultBackend`] (`redis://host:port/db`): Celery's keys
//!   `celery-task-meta-<id>`, written with SETEX and announced with PUBLISH;
//! * [`rpc::RpcResultBackend`] (`rpc://`): each result is published to the caller's reply
//!   queue, as Celery's rpc backend does.
//!
//! A stored SUCCESS is never overwritten. Results expire after a configurable time.

pub mod redis;
pub mod rpc;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::protocol::format_time;

/// Errors from a result backend.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The embedded database failed.
    #[error(transparent)]
    Db(#[from] crate::sqlite::DbError),
    /// The backend URL is not understood.
    #[error(
        "unsupported result backend URL {0:?} (expected sqlite://PATH, redis://host:port/db or rpc://)"
    )]
    UnsupportedUrl(String),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(String),
    /// The broker (for rpc results) failed.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// No final state arrived in time.
    #[error("task {task_id} did not finish within {timeout:?} (state {state})")]
    Timeout {
        /// The task.
        task_id: String,
        /// How long we waited.
        timeout: Duration,
        /// Its state when we gave up.
        state: TaskState,
    },
    /// The backend has no chord counter (Celery's rpc backend has none either).
    #[error(
        "the {0} result backend cannot run chords (use redis:// or the embedded sqlite:// backend)"
    )]
    ChordsUnsupported(String),
    /// A stored meta could not be read.
    #[error("the stored result of {task_id} is not valid meta JSON: {reason}")]
    Corrupt {
        /// The task.
        task_id: String,
        /// Why.
        reason: String,
    },
}

/// A task's state, with Celery's names; `Custom` holds states set with `update_state`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Unknown or waiting.
    Pending,
    /// Running (only stored when the worker tracks starts).
    Started,
    /// Finished with a result.
    Success,
    /// Finished with an exception.
    Failure,
    /// Will be retried.
    Retry,
    /// Revoked or expired; will not run.
    Revoked,
    /// A custom state reported by the task.
    Custom(String),
}

impl TaskState {
    /// Celery's name for the state.
    pub fn as_str(&self) -> &str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Started => "STARTED",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Retry => "RETRY",
            TaskState::Revoked => "REVOKED",
            TaskState::Custom(name) => name,
        }
    }

    /// Parses Celery's name.
    pub fn parse(name: &str) -> Self {
        match name {
            "PENDING" => TaskState::Pending,
            "STARTED" => TaskState::Started,
            "SUCCESS" => TaskState::Success,
            "FAILURE" => TaskState::Failure,
            "RETRY" => TaskState::Retry,
            "REVOKED" => TaskState::Revoked,
            other => TaskState::Custom(other.to_owned()),
        }
    }

    /// True for states after which nothing changes: SUCCESS, FAILURE, REVOKED.
    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TaskState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(TaskState::parse(&String::deserialize(d)?))
    }
}

/// An exception as Celery encodes it: `{"exc_type", "exc_message", "exc_module"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// The exception class name, e.g. `ZeroDivisionError`, `TimeLimitExceeded`.
    pub exc_type: String,
    /// The exception's arguments (one message, usually).
    pub exc_message: Vec<Value>,
    /// The module that defines it, e.g. `builtins`, `billiard.exceptions`.
    pub exc_module: String,
}

impl ExceptionInfo {
    /// An exception with one message argument.
    pub fn new(exc_type: &str, module: &str, message: impl Into<Value>) -> Self {
        Self {
            exc_type: exc_type.to_owned(),
            exc_message: vec![message.into()],
            exc_module: module.to_owned(),
        }
    }

    /// The message, as text.
    pub fn message(&self) -> String {
        self.exc_message
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for ExceptionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message())
    }
}

/// A task's stored state: Celery's result meta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// The task id.
    pub task_id: String,
    /// Its state.
    pub status: TaskState,
    /// The return value (SUCCESS), the exception (FAILURE/RETRY/REVOKED), or custom meta.
    pub result: Value,
    /// A traceback, when there is one.
    pub traceback: Option<String>,
    /// Tasks this one started, as `AsyncResult.as_tuple()` values.
    #[serde(default)]
    pub children: Vec<Value>,
    /// When it finished (null for unfinished states).
    pub date_done: Option<String>,
    /// The group it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The task that sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The node that ran it (Celery's extended result field `worker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl ResultMeta {
    fn new(task_id: &str, status: TaskState, result: Value, done: Option<DateTime<Utc>>) -> Self {
        Self {
            task_id: task_id.to_owned(),
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done: done.as_ref().map(format_time),
            group_id: None,
            parent_id: None,
            worker: None,
        }
    }

    /// SUCCESS with `result`.
    pub fn success(task_id: &str, result: Value) -> Self {
        Self::new(task_id, TaskState::Success, result, Some(Utc::now()))
    }

    /// FAILURE with `exception`.
    pub fn failure(task_id: &str, exception: &ExceptionInfo) -> Self {
        Self::new(
            task_id,
            TaskState::Failure,
            json!(exception),
            Some(Utc::now()),
        )
    }

    /// RETRY with the exception that caused it.
    pub fn retry(task_id: &str, exception: &ExceptionInfo) -> Self {
        Self::new(task_id, TaskState::Retry, json!(exception), None)
    }

    /// REVOKED with `TaskRevokedError(reason)`.
    pub fn revoked(task_id: &str, reason: &str) -> Self {
        let exception = ExceptionInfo::new("TaskRevokedError", "celery.exceptions", reason);
        Self::new(
            task_id,
            TaskState::Revoked,
            json!(exception),
            Some(Utc::now()),
        )
    }

    /// A custom state (`update_state`) with its meta.
    pub fn custom(task_id: &str, state: &str, meta: Value) -> Self {
        Self::new(task_id, TaskState::parse(state), meta, None)
    }

    /// The exception of a FAILURE, RETRY or REVOKED meta.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        match self.status {
            TaskState::Failure | TaskState::Retry | TaskState::Revoked => {
                serde_json::from_value(self.result.clone()).ok()
            }
            _ => None,
        }
    }
}

/// Where the sender of a task waits for rpc results: the message's `reply_to` and
/// `correlation_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The reply queue.
    pub queue: String,
    /// The correlation id (the task id).
    pub correlation_id: String,
}

/// One chord header member's outcome, reported to the chord counter after its result is
/// stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    /// The chord's group id (the member's `group` header).
    pub group_id: String,
    /// The member's `group_index` (results are ordered by it; none sorts last).
    pub index: Option<u64>,
    /// The member's task id.
    pub task_id: String,
    /// Its final state.
    pub state: TaskState,
    /// Its result, or its encoded exception.
    pub result: Value,
}

/// A completed chord's header results, in `group_index` order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordResults {
    /// Each member's `(task_id, state, result)`.
    pub members: Vec<(String, TaskState, Value)>,
}

/// Where results are stored.
#[async_trait]
pub trait ResultBackend: Send + Sync {
    /// Stores `meta` (never replacing a stored SUCCESS). `reply` is where the task's sender
    /// listens, used by backends that send results to it (rpc).
    ///
    /// # Errors
    /// When the backend cannot store it.
    async fn store(&self, meta: &ResultMeta, reply: Option<&ReplyTo>) -> Result<(), ResultError>;

    /// Called by a client before it sends tasks whose results it will read (rpc declares
    /// and consumes its reply queue here).
    ///
    /// # Errors
    /// When the backend cannot get ready.
    async fn prepare(&self) -> Result<(), ResultError> {
        Ok(())
    }

    /// The `reply_to` a client puts on the messages it sends (its rpc reply queue).
    fn reply_to(&self) -> Option<String> {
        None
    }

    /// The stored meta of `task_id`, if any (and not expired).
    ///
    /// # Errors
    /// When the backend cannot be read.
    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError>;

    /// Waits until `task_id` is ready (SUCCESS, FAILURE or REVOKED) and returns its meta.
    ///
    /// # Errors
    /// [`ResultError::Timeout`] when it is not ready within `timeout`.
    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<ResultMeta, ResultError> {
        poll_until_ready(
            self,
            task_id,
            tokio::time::Instant::now() + timeout,
            timeout,
        )
        .await
    }

    /// Records that chord `group_id` has `size` header members (Celery's `set_chord_size`;
    /// the client calls it before publishing the header).
    ///
    /// # Errors
    /// [`ResultError::ChordsUnsupported`] for a backend without a chord counter.
    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), ResultError> {
        let _ = (group_id, size);
        Err(ResultError::ChordsUnsupported(self.describe()))
    }

    /// Records a header member's outcome, atomically; returns every member's result when
    /// this part completes the chord (exactly once per chord, to exactly one caller), and
    /// forgets the chord then. A part reported twice (a redelivered message) counts once.
    ///
    /// # Errors
    /// [`ResultError::ChordsUnsupported`] for a backend without a chord counter.
    async fn chord_part_return(
        &self,
        part: &ChordPart,
    ) -> Result<Option<ChordResults>, ResultError> {
        let _ = part;
        Err(ResultError::ChordsUnsupported(self.describe()))
    }

    /// Deletes expired results; returns how many.
    ///
    /// # Errors
    /// When the backend cannot be written.
    async fn purge_expired(&self) -> Result<u64, ResultError>;

    /// A description for logs.
    fn describe(&self) -> String;
}

/// Reads `task_id` until it is ready or `deadline` passes (1 ms, backing off to 5 ms).
///
/// # Errors
/// [`ResultError::Timeout`] at the deadline, or the backend's error.
pub async fn poll_until_ready<B: ResultBackend + ?Sized>(
    backend: &B,
    task_id: &str,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<ResultMeta, ResultError> {
    poll_until_ready_or_woken(backend, task_id, deadline, timeout, None).await
}

/// [`poll_until_ready`] that also reads again at once whenever `wake` is notified (a
/// backend's signal that this process just stored a result).
///
/// # Errors
/// [`ResultError::Timeout`] at the deadline, or the backend's error.
pub async fn poll_until_ready_or_woken<B: ResultBackend + ?Sized>(
    backend: &B,
    task_id: &str,
    deadline: tokio::time::Instant,
    timeout: Duration,
    wake: Option<&tokio::sync::Notify>,
) -> Result<ResultMeta, ResultError> {
    let mut pause = Duration::from_millis(1);
    loop {
        // Registered before reading, so a store between the read and the sleep is not missed.
        let mut woken = wake.map(|notify| Box::pin(notify.notified()));
        if let Some(woken) = woken.as_mut() {
            woken.as_mut().enable();
        }
        let meta = backend.get(task_id).await?;
        if let Some(meta) = &meta
            && meta.status.is_ready()
        {
            return Ok(meta.clone());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(ResultError::Timeout {
                task_id: task_id.to_owned(),
                timeout,
                state: meta.map_or(TaskState::Pending, |m| m.status),
            });
        }
        let woken = async {
            match woken.as_mut() {
                Some(woken) => woken.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(pause.min(deadline - now)) => {
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    }
}

/// How long results are kept by default: one day, as Celery's `result_expires`.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(24 * 3600);

/// Opens the result backend at `url`; `rpc://` uses the AMQP broker at `broker_url`.
///
/// # Errors
/// [`ResultError::UnsupportedUrl`] for an unknown scheme (or rpc without an AMQP broker),
/// or the backend's own error.
pub fn connect(
    url: &str,
    expires: Duration,
    broker_url: &str,
) -> Result<Arc<dyn ResultBackend>, ResultError> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(redis::RedisResultBackend::new(url, expires)?));
    }
    if url == "rpc://" || url == "rpc" {
        if !(broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://")) {
            return Err(ResultError::UnsupportedUrl(format!(
                "{url} (rpc results travel over an AMQP broker; the broker is {broker_url})"
            )));
        }
        let broker = crate::broker::amqp::AmqpBroker::new(broker_url)?;
        return Ok(Arc::new(rpc::RpcResultBackend::new(broker)));
    }
    match crate::sqlite::parse_url(url) {
        Some(path) => Ok(Arc::new(sqlite::SqliteResultBackend::open(&path, expires)?)),
        None => Err(ResultError::UnsupportedUrl(url.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_json_matches_celery() {
        let meta = ResultMeta::failure(
            "t1",
            &ExceptionInfo::new("TimeLimitExceeded", "billiard.exceptions", 1),
        );
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["status"], "FAILURE");
        assert_eq!(
            json["result"],
            json!({"exc_type": "TimeLimitExceeded", "exc_message": [1], "exc_module": "billiard.exceptions"})
        );
        assert_eq!(json["traceback"], Value::Null);
        assert_eq!(json["children"], json!([]));
        assert!(json["date_done"].as_str().unwrap().ends_with("+00:00"));
        assert!(json.get("group_id").is_none());
        let back: ResultMeta = serde_json::from_value(json).unwrap();
        assert_eq!(back, meta);
        assert_eq!(
            back.exception().unwrap().to_string(),
            "TimeLimitExceeded: 1"
        );

        let revoked = serde_json::to_value(ResultMeta::revoked("t2", "expired")).unwrap();
        assert_eq!(
            revoked["result"],
            json!({"exc_type": "TaskRevokedError", "exc_message": ["expired"], "exc_module": "celery.exceptions"})
        );
        assert_eq!(
            TaskState::parse("PROGRESS"),
            TaskState::Custom("PROGRESS".into())
        );
    }
}
