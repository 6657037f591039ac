//! Celery's rpc result backend (`celery-reference.md` §2.7): the worker publishes each
//! state to the sender's `reply_to` queue with the task id as `correlation_id`, transient,
//! with exactly Celery 5.6's body (`task_id`, `status`, `result`, `traceback`, `children`).
//!
//! The sender side declares its own reply queue (non-durable, auto-delete, expiring after a
//! day, as Celery's clients do), consumes it without acks, and keeps what arrives for the
//! tasks it sent. Results are one-shot messages: only the process that sent a task can read
//! its result, and a worker that sees no `reply_to` has nowhere to send it.
//!
//! A reply to a queue that does not exist is dropped by RabbitMQ, as Celery's are — except
//! from a tenant's worker ([`RpcResultBackend::for_tenant`]), whose replies are `mandatory`:
//! one RabbitMQ returns (a `reply_to` naming no queue of the tenant's vhost, say another
//! tenant's reply queue) is logged as a warning naming the queue, the task and the tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{Notify, OnceCell};

use super::{ReplyTo, ResultBackend, ResultError, ResultMeta, TaskState};
use crate::broker::BrokerError;
use crate::broker::amqp::AmqpBroker;

/// True for the rpc backend's URL (`rpc://`, or `rpc` as Celery also accepts).
pub fn is_rpc_url(url: &str) -> bool {
    url == "rpc://" || url == "rpc"
}

/// Results that arrived on this client's reply queue.
#[derive(Default)]
struct Inbox {
    results: Mutex<HashMap<String, ResultMeta>>,
    arrived: Notify,
}

/// The rpc result backend over an AMQP broker.
pub struct RpcResultBackend {
    broker: AmqpBroker,
    reply_queue: String,
    inbox: Arc<Inbox>,
    consuming: OnceCell<()>,
    /// The tenant whose worker publishes through this backend: its replies are `mandatory`
    /// and a returned one is logged. None: Celery's behaviour (a reply nobody can take is
    /// dropped by RabbitMQ).
    tenant: Option<String>,
}

impl std::fmt::Debug for RpcResultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcResultBackend")
            .field("reply_queue", &self.reply_queue)
            .finish_non_exhaustive()
    }
}

impl RpcResultBackend {
    /// An rpc backend over `broker`, with a fresh reply queue name for this client.
    pub fn new(broker: AmqpBroker) -> Self {
        Self {
            broker,
            reply_queue: uuid::Uuid::new_v4().to_string(),
            inbox: Arc::default(),
            consuming: OnceCell::new(),
            tenant: None,
        }
    }

    /// This backend stores the results of tenant `name`'s worker: each reply is published
    /// `mandatory`, and a reply RabbitMQ returns — its `reply_to` names no queue in the
    /// tenant's vhost — is logged as a warning instead of vanishing. The task is not failed
    /// for it: the reply is the only copy of its result, and its sender asked for it there.
    #[must_use]
    pub fn for_tenant(mut self, name: impl Into<String>) -> Self {
        self.tenant = Some(name.into());
        self
    }

    /// An rpc backend (configured as `url`) over the AMQP broker at `broker_url`: rpc results
    /// travel over the broker, as Celery's do.
    ///
    /// # Errors
    /// [`ResultError::UnsupportedUrl`] when the broker is not RabbitMQ, or the broker's error
    /// for a URL it cannot parse.
    pub fn over_broker(url: &str, broker_url: &str) -> Result<Self, ResultError> {
        if !(broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://")) {
            return Err(ResultError::UnsupportedUrl(format!(
                "{url} (rpc results travel over an AMQP broker; the broker is {broker_url})"
            )));
        }
        Ok(Self::new(AmqpBroker::new(broker_url)?))
    }

    /// Celery 5.6's rpc body: exactly these five keys.
    fn body(meta: &ResultMeta) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "task_id": meta.task_id,
            "status": meta.status,
            "result": meta.result,
            "traceback": meta.traceback,
            "children": meta.children,
        }))
        .expect("meta serializes")
    }
}

#[async_trait]
impl ResultBackend for RpcResultBackend {
    async fn store(&self, meta: &ResultMeta, reply: Option<&ReplyTo>) -> Result<(), ResultError> {
        let Some(reply) = reply else {
            tracing::debug!(task_id = %meta.task_id, "no reply_to: the rpc result has nowhere to go");
            return Ok(());
        };
        let published = self
            .broker
            .publish_reply(
                &reply.queue,
                &Self::body(meta),
                &reply.correlation_id,
                self.tenant.is_some(),
            )
            .await;
        match published {
            Err(BrokerError::QueueNotFound { queue }) => {
                let tenant = self.tenant.as_deref().unwrap_or("-");
                tracing::warn!(
                    task_id = %meta.task_id,
                    reply_to = %queue,
                    tenant,
                    state = ?meta.status,
                    "the rpc reply of task {} was not delivered: reply queue {queue:?} does not exist in tenant {tenant}'s broker",
                    meta.task_id
                );
                Ok(())
            }
            other => Ok(other?),
        }
    }

    async fn prepare(&self) -> Result<(), ResultError> {
        self.consuming
            .get_or_try_init(|| async {
                let inbox = Arc::downgrade(&self.inbox);
                self.broker
                    .consume_replies(&self.reply_queue, move |correlation, body| {
                        // The backend is gone: stop consuming.
                        let Some(inbox) = inbox.upgrade() else {
                            return false;
                        };
                        let Ok(mut meta) = serde_json::from_slice::<ResultMeta>(body) else {
                            tracing::warn!("ignoring an unreadable rpc result");
                            return true;
                        };
                        if let Some(id) = correlation.filter(|c| *c != meta.task_id) {
                            meta.task_id = id;
                        }
                        let mut results = inbox
                            .results
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let keep = results
                            .get(&meta.task_id)
                            .is_none_or(|old| old.status != TaskState::Success);
                        if keep {
                            results.insert(meta.task_id.clone(), meta);
                        }
                        drop(results);
                        inbox.arrived.notify_waiters();
                        true
                    })
                    .await?;
                Ok::<(), ResultError>(())
            })
            .await
            .map(|_| ())
    }

    fn reply_to(&self) -> Option<String> {
        Some(self.reply_queue.clone())
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError> {
        self.prepare().await?;
        Ok(self
            .inbox
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(task_id)
            .cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<ResultMeta, ResultError> {
        self.prepare().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.inbox.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let meta = self.get(task_id).await?;
            if let Some(meta) = &meta
                && meta.status.is_ready()
            {
                return Ok(meta.clone());
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(ResultError::Timeout {
                    task_id: task_id.to_owned(),
                    timeout,
                    state: meta.map_or(TaskState::Pending, |m| m.status),
                });
            }
        }
    }

    async fn purge_expired(&self) -> Result<u64, ResultError> {
        Ok(0)
    }

    fn describe(&self) -> String {
        format!(
            "rpc:// over {}",
            crate::broker::Broker::describe(&self.broker)
        )
    }
}
