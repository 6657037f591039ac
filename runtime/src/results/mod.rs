//! Result backends: where task states and results are stored, in Celery's meta format
//! (`celery-reference.md` §2.7–2.9), and how clients wait for them.
//!
//! * [`embedded::SqliteResultBackend`], the embedded default, in the same SQLite file as the
//!   embedded broker;
//! * [`redis::RedisResultBackend`] (`redis://host:port/db`): Celery's keys
//!   `celery-task-meta-<id>`, written with SETEX and announced with PUBLISH;
//! * [`rpc::RpcResultBackend`] (`rpc://`): each result is published to the caller's reply
//!   queue, as Celery's rpc backend does.
//!
//! A stored SUCCESS is never overwritten. Results expire after a configurable time.

pub mod embedded;
mod error;
mod meta;
pub mod redis;
pub mod rpc;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use self::error::ResultError;
pub use self::meta::{ExceptionInfo, ResultMeta, TaskState};

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
    /// The header's shape as its sender saved it when it is not a flat list (Celery's
    /// `GroupResult.save()` of a header holding groups): the group's `as_tuple()`,
    /// `[[gid, parent], [member, …]]`, where a member is `[[id, parent], null]` or a nested
    /// group. The body then gets nested lists, as Celery's `join` builds them.
    pub saved_group: Option<Value>,
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

    /// Saves the shape of a chord header that holds groups (what Celery's `apply_chord`
    /// saves with `GroupResult.save()`: `{"result": group.as_tuple()}` under the group's
    /// key), so that the part completing the chord can give the body nested results.
    /// Default: nothing to save where there is no chord counter.
    ///
    /// # Errors
    /// When the backend cannot be written.
    async fn save_chord_shape(&self, group_id: &str, shape: &Value) -> Result<(), ResultError> {
        let _ = (group_id, shape);
        Ok(())
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
    poll_until_ready_or_woken(
        backend,
        task_id,
        deadline,
        timeout,
        &[],
        Duration::from_millis(5),
    )
    .await
}

/// [`poll_until_ready`] that also reads again at once whenever one of `wakes` is notified
/// (a backend's signal that a result may have been stored), and backs off to
/// `longest_pause` between reads otherwise.
///
/// # Errors
/// [`ResultError::Timeout`] at the deadline, or the backend's error.
pub async fn poll_until_ready_or_woken<B: ResultBackend + ?Sized>(
    backend: &B,
    task_id: &str,
    deadline: tokio::time::Instant,
    timeout: Duration,
    wakes: &[&tokio::sync::Notify],
    longest_pause: Duration,
) -> Result<ResultMeta, ResultError> {
    let mut pause = Duration::from_millis(1).min(longest_pause);
    loop {
        // Registered before reading, so a store between the read and the sleep is not missed.
        let mut woken: Vec<_> = wakes
            .iter()
            .map(|notify| Box::pin(notify.notified()))
            .collect();
        for notified in &mut woken {
            notified.as_mut().enable();
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
            if woken.is_empty() {
                std::future::pending::<()>().await;
            }
            futures_util::future::select_all(woken).await;
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(pause.min(deadline - now)) => {
                pause = (pause * 2).min(longest_pause);
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
    if rpc::is_rpc_url(url) {
        return Ok(Arc::new(rpc::RpcResultBackend::over_broker(
            url, broker_url,
        )?));
    }
    match crate::db::parse_url(url) {
        Some(path) => Ok(Arc::new(embedded::SqliteResultBackend::open(
            &path, expires,
        )?)),
        None => Err(ResultError::UnsupportedUrl(url.to_owned())),
    }
}
