//! A task's future result (Celery's `AsyncResult`) and a group's (`GroupResult`): waiting
//! on the result backend, and turning a stored meta into a value or the task's exception.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::GetError;
use crate::results::{ExceptionInfo, ResultBackend, ResultError, ResultMeta, TaskState};

/// A task's future result (Celery's `AsyncResult`).
#[derive(Clone)]
pub struct AsyncResult {
    /// The task id.
    pub id: String,
    backend: Arc<dyn ResultBackend>,
}

impl std::fmt::Debug for AsyncResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl AsyncResult {
    /// The result of task `id`, read from `backend`.
    pub(crate) fn new(id: &str, backend: Arc<dyn ResultBackend>) -> Self {
        Self {
            id: id.to_owned(),
            backend,
        }
    }

    /// Waits for the task to finish and returns its value.
    ///
    /// # Errors
    /// [`GetError::Failed`] or [`GetError::Revoked`] with the exception, or
    /// [`GetError::Backend`] (including a timeout).
    pub async fn get(&self, timeout: Duration) -> Result<Value, GetError> {
        let meta = self.backend.wait(&self.id, timeout).await?;
        into_value(meta)
    }

    /// The stored meta, if any.
    ///
    /// # Errors
    /// When the backend cannot be read.
    pub async fn meta(&self) -> Result<Option<ResultMeta>, ResultError> {
        self.backend.get(&self.id).await
    }

    /// The current state (PENDING when nothing is stored yet).
    ///
    /// # Errors
    /// When the backend cannot be read.
    pub async fn state(&self) -> Result<TaskState, ResultError> {
        Ok(self.meta().await?.map_or(TaskState::Pending, |m| m.status))
    }

    /// True once the task finished (SUCCESS, FAILURE or REVOKED).
    ///
    /// # Errors
    /// When the backend cannot be read.
    pub async fn ready(&self) -> Result<bool, ResultError> {
        Ok(self.state().await?.is_ready())
    }
}

/// The value of a ready meta, or its exception.
///
/// # Errors
/// [`GetError::Failed`] / [`GetError::Revoked`] for those states.
pub fn into_value(meta: ResultMeta) -> Result<Value, GetError> {
    let exception = || {
        meta.exception()
            .unwrap_or_else(|| ExceptionInfo::new("Exception", "builtins", meta.result.to_string()))
    };
    match meta.status {
        TaskState::Failure => Err(GetError::Failed {
            task_id: meta.task_id.clone(),
            exception: exception(),
        }),
        TaskState::Revoked => Err(GetError::Revoked {
            task_id: meta.task_id.clone(),
            exception: exception(),
        }),
        _ => Ok(meta.result),
    }
}

/// The results of a group's members (Celery's `GroupResult`).
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// The group id (each member's `group` header).
    pub id: String,
    /// Each member's result, in order.
    pub results: Vec<AsyncResult>,
}

impl GroupResult {
    /// Waits for every member and returns their values in order; the whole wait is bounded
    /// by `timeout`.
    ///
    /// # Errors
    /// The first member's failure, or a timeout.
    pub async fn get(&self, timeout: Duration) -> Result<Vec<Value>, GetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut values = Vec::with_capacity(self.results.len());
        for result in &self.results {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            values.push(result.get(left).await?);
        }
        Ok(values)
    }
}
