//! The client: send tasks (Celery's `send_task` / `apply_async`), start workflows, and read
//! results.
//!
//! * this file — [`Client`]: addressing (routes, default queue), the three ways to send;
//! * [`result`] — [`AsyncResult`], a task's future result, and [`GroupResult`];
//! * [`apply`] — starting a canvas (`chain(...).apply(&client)`).
//! * [`pipeline`] — many sends with a window of unconfirmed publishes ([`Pipeline`]).
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

mod apply;
mod pipeline;
mod result;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Map, Value};

pub use self::pipeline::{DEFAULT_CONFIRM_WINDOW, Pipeline};
pub use self::result::{AsyncResult, GroupResult, into_value};
use crate::broker::{Broker, BrokerError, Confirmation};
pub use crate::protocol::SendOptions;
use crate::protocol::TaskMessage;
use crate::results::{ExceptionInfo, ResultBackend, ResultError};
use crate::routes::TaskRoutes;

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
    routes: TaskRoutes,
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
            routes: TaskRoutes::default(),
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
    pub fn with_routes(mut self, routes: TaskRoutes) -> Self {
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
        let mut message = TaskMessage::build(task, args, kwargs, options);
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
        let queue = self
            .routes
            .resolve(&message.task, queue, &self.default_queue);
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

    /// A handle on the result of task `id`.
    pub fn result(&self, id: &str) -> AsyncResult {
        AsyncResult::new(id, Arc::clone(&self.backend))
    }
}
