//! The client: send tasks (Celery's `send_task` / `apply_async`) and read their results.
//!
//! ```no_run
//! # async fn example(client: wasmq::client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use wasmq::client::SendOptions;
//!
//! let result = client
//!     .send_task("math.add", vec![2.into(), 3.into()], Default::default(), SendOptions::default())
//!     .await?;
//! assert_eq!(result.get(Duration::from_secs(10)).await?, 5);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::broker::{Broker, BrokerError, Confirmation};
use crate::protocol::TaskMessage;
use crate::results::{ExceptionInfo, ResultBackend, ResultError, ResultMeta, TaskState};

/// Options of one send, as Celery's `apply_async` keywords.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Use this task id instead of a fresh UUID.
    pub task_id: Option<String>,
    /// Run no earlier than this long from now.
    pub countdown: Option<Duration>,
    /// Run no earlier than this time (ignored when `countdown` is set).
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this long from now: the result becomes REVOKED ("expired").
    pub expires: Option<Duration>,
    /// The queue. Default: the route of the task (see [`Client::with_routes`]), else the
    /// client's default queue (`celery`).
    pub queue: Option<String>,
    /// Message priority, 0–255 (higher first).
    pub priority: Option<u8>,
    /// Hard time limit.
    pub time_limit: Option<Duration>,
    /// Soft time limit.
    pub soft_time_limit: Option<Duration>,
    /// Don't store the result.
    pub ignore_result: bool,
}

/// Errors sending a task.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The broker refused the message.
    #[error("cannot publish the task")]
    Broker(#[from] BrokerError),
    /// The result backend could not get ready (e.g. the rpc reply queue).
    #[error("cannot prepare the result backend")]
    Backend(#[from] ResultError),
}

/// Why `AsyncResult::get` has no value.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The task failed (including limits exceeded and traps).
    #[error("task {task_id} failed: {exception}")]
    Failed {
        /// The task.
        task_id: String,
        /// Celery's exception encoding.
        exception: ExceptionInfo,
    },
    /// The task was revoked or expired.
    #[error("task {task_id} was revoked: {exception}")]
    Revoked {
        /// The task.
        task_id: String,
        /// `TaskRevokedError(reason)`.
        exception: ExceptionInfo,
    },
    /// No result in time, or the backend failed.
    #[error(transparent)]
    Backend(#[from] ResultError),
    /// The task could not be sent ([`Client::call`]).
    #[error(transparent)]
    NotSent(#[from] SendError),
}

/// Sends tasks and reads their results.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    default_queue: String,
    routes: crate::config::TaskRoutes,
    origin: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker.describe())
            .field("backend", &self.backend.describe())
            .field("default_queue", &self.default_queue)
            .finish()
    }
}

impl Client {
    /// A client publishing to `broker` and reading results from `backend`.
    pub fn new(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> Self {
        Self {
            broker,
            backend,
            default_queue: "celery".into(),
            routes: crate::config::TaskRoutes::default(),
            origin: format!(
                "gen{}@{}",
                std::process::id(),
                gethostname::gethostname().to_string_lossy()
            ),
        }
    }

    /// Sends to `queue` unless a send names another. Default: `celery`.
    #[must_use]
    pub fn with_default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Routes tasks by name (Celery's `task_routes`): a send that names no queue goes to
    /// the first matching route's queue, else to the default queue.
    #[must_use]
    pub fn with_routes(mut self, routes: crate::config::TaskRoutes) -> Self {
        self.routes = routes;
        self
    }

    /// Builds the message `send_task` would publish (for tests and tools).
    pub fn build_message(
        &self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
    ) -> TaskMessage {
        let mut message = TaskMessage::new(task, args, kwargs);
        if let Some(id) = &options.task_id {
            message.id.clone_from(id);
            message.root_id = Some(id.clone());
            message.correlation_id = Some(id.clone());
        }
        let now = Utc::now();
        message.eta = match options.countdown {
            Some(countdown) => chrono::Duration::from_std(countdown).ok().map(|d| now + d),
            None => options.eta,
        };
        message.expires = options
            .expires
            .and_then(|e| chrono::Duration::from_std(e).ok())
            .map(|d| now + d);
        message.priority = options.priority;
        message.time_limit = options.time_limit.map(|t| t.as_secs_f64());
        message.soft_time_limit = options.soft_time_limit.map(|t| t.as_secs_f64());
        message.ignore_result = options.ignore_result;
        message.origin = Some(self.origin.clone());
        message
    }

    /// Sends `task` with positional `args` and keyword `kwargs`.
    ///
    /// # Errors
    /// [`SendError::Broker`] when the broker refuses the message.
    pub async fn send_task(
        &self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<AsyncResult, SendError> {
        let message = self.build_message(task, args, kwargs, &options);
        self.send_message(&message, options.queue.as_deref()).await
    }

    /// Sends `task` and waits for its value: [`Client::send_task`] then
    /// [`AsyncResult::get`], but without waiting for the broker's publish confirmation
    /// first. The confirmation is awaited alongside the result: a result that arrives proves
    /// the broker took the message, and a refusal ends the wait with
    /// [`GetError::NotSent`]. This saves the confirmation's round trip (a disk sync for a
    /// persistent message on RabbitMQ) from every call.
    ///
    /// # Errors
    /// [`GetError::NotSent`] when the task could not be sent or the broker refused it, else
    /// as [`AsyncResult::get`].
    pub async fn call(
        &self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
        timeout: Duration,
    ) -> Result<Value, GetError> {
        let (result, confirmation) = self.submit(task, args, kwargs, options).await?;
        let value = result.get(timeout);
        tokio::pin!(value);
        tokio::select! {
            biased;
            value = &mut value => value,
            confirmed = confirmation => match confirmed {
                Ok(()) => value.await,
                Err(error) => Err(GetError::NotSent(SendError::Broker(error))),
            },
        }
    }

    /// Sends `task` without waiting for the broker's confirmation, which is returned to be
    /// awaited later — say after sending a batch, so many publishes share one wait. Until
    /// the confirmation resolves, the message may still be refused or lost with the
    /// connection; [`Client::send_task`] waits for it.
    ///
    /// # Errors
    /// [`SendError`] when the message cannot be sent at all.
    pub async fn submit(
        &self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<(AsyncResult, Confirmation), SendError> {
        let message = self.build_message(task, args, kwargs, &options);
        self.submit_message(message, options.queue.as_deref()).await
    }

    /// Publishes a prepared message and waits for the broker's confirmation.
    ///
    /// # Errors
    /// [`SendError::Broker`] when the broker refuses the message.
    pub async fn send_message(
        &self,
        message: &TaskMessage,
        queue: Option<&str>,
    ) -> Result<AsyncResult, SendError> {
        let mut message = message.clone();
        let (queue, delay) = self.addressed(&mut message, queue).await?;
        self.broker.publish(queue, &message.encode(), delay).await?;
        Ok(self.result(&message.id))
    }

    /// Publishes a prepared message without waiting for the broker's confirmation.
    async fn submit_message(
        &self,
        mut message: TaskMessage,
        queue: Option<&str>,
    ) -> Result<(AsyncResult, Confirmation), SendError> {
        let (queue, delay) = self.addressed(&mut message, queue).await?;
        let confirmation = self
            .broker
            .publish_unconfirmed(queue, &message.encode(), delay)
            .await?;
        Ok((self.result(&message.id), confirmation))
    }

    /// Readies the result backend and says where `message` goes: its queue (the one
    /// asked for, else its route, else the default) and its delay.
    async fn addressed<'a>(
        &'a self,
        message: &mut TaskMessage,
        queue: Option<&'a str>,
    ) -> Result<(&'a str, Option<Duration>), SendError> {
        // Celery clients always say where rpc results go; the rpc backend also needs its
        // reply queue to exist before a worker can answer.
        self.backend.prepare().await?;
        if message.reply_to.is_none() {
            message.reply_to = self.backend.reply_to();
        }
        let delay = message.eta.and_then(|eta| (eta - Utc::now()).to_std().ok());
        let queue = queue
            .or_else(|| self.routes.queue_for(&message.task))
            .unwrap_or(&self.default_queue);
        Ok((queue, delay))
    }

    /// Revokes `task_id` on every worker (Celery's `revoke`): it will not run, and its
    /// result becomes REVOKED when a worker meets it. With `terminate`, a worker running it
    /// interrupts its sandbox.
    ///
    /// # Errors
    /// [`BrokerError`] when the broker cannot broadcast it.
    pub async fn revoke(&self, task_id: &str, terminate: bool) -> Result<(), BrokerError> {
        self.broker
            .revoke(&crate::broker::Revocation::now(task_id, terminate))
            .await
    }

    /// The result backend this client reads from.
    pub fn backend(&self) -> Arc<dyn ResultBackend> {
        Arc::clone(&self.backend)
    }

    /// The broker this client publishes to (for canvas publishing).
    pub(crate) fn broker_ref(&self) -> &dyn Broker {
        self.broker.as_ref()
    }

    /// The result backend, borrowed (for canvas publishing).
    pub(crate) fn backend_ref(&self) -> &dyn ResultBackend {
        self.backend.as_ref()
    }

    /// The queue of sends that name none.
    pub(crate) fn default_queue(&self) -> &str {
        &self.default_queue
    }

    /// This client's node name (`gen<pid>@<host>`), sent as the `origin` header.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// A handle on the result of task `id`.
    pub fn result(&self, id: &str) -> AsyncResult {
        AsyncResult {
            id: id.to_owned(),
            backend: Arc::clone(&self.backend),
        }
    }
}

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
