//! Celery's result meta (`celery-reference.md` §2.7–2.9): a task's state with Celery's
//! names, its result or exception, and the JSON every backend stores and every Celery
//! client reads.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::protocol::format_time;

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
    /// Tasks this one started, as `AsyncResult.as_tuple()` values (Celery stores `null`
    /// when a state is stored outside a task, e.g. `backend.store_result(id, meta,
    /// "STARTED")`).
    #[serde(default, deserialize_with = "null_as_empty")]
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

/// A list stored as `null` reads as empty.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Value>, D::Error> {
    Ok(Option::<Vec<Value>>::deserialize(deserializer)?.unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_stored_outside_a_task_reads_as_celery_wrote_it() {
        // Celery 5.7's backend.store_result(id, {"hostname": "other@host"}, "STARTED").
        let stored = json!({"status": "STARTED", "result": {"hostname": "other@host"},
            "traceback": null, "children": null, "date_done": null, "task_id": "t1"});
        let meta: ResultMeta = serde_json::from_value(stored).unwrap();
        assert_eq!(meta.status, TaskState::Started);
        assert!(meta.children.is_empty());
    }

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
