//! The session: one live connection to RabbitMQ and its confirm-mode publishing channel,
//! opened lazily and shared by every publish and declaration of an [`AmqpBroker`]. When an
//! operation fails in a way a reconnect may fix, the session is dropped and the operation
//! retried on a fresh one ([`AmqpBroker::with_session`]); consumers supervise their own
//! channels (see `consumer`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use super::{AmqpBroker, lapin_error};
use crate::broker::BrokerError;

/// One live connection and its confirm-mode publishing channel.
pub(super) struct Session {
    pub(super) connection: Connection,
    /// Publishes with confirms; also used for declarations that must succeed.
    pub(super) publisher: Channel,
    /// Work queues declared (and bound for delayed delivery) on this connection.
    declared: Mutex<HashSet<String>>,
    /// Set once the delay levels are declared on this connection.
    pub(super) delay_levels: tokio::sync::OnceCell<()>,
}

impl Session {
    fn declared(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether work queue `queue` was declared (and bound) on this connection.
    pub(super) fn has_declared(&self, queue: &str) -> bool {
        self.declared().contains(queue)
    }

    /// Remembers that `queue` is declared and bound on this connection.
    pub(super) fn mark_declared(&self, queue: &str) {
        self.declared().insert(queue.to_owned());
    }

    /// Forgets `queue` (deleted), so a later publish declares it again.
    pub(super) fn forget_declared(&self, queue: &str) {
        self.declared().remove(queue);
    }
}

impl AmqpBroker {
    /// The live session, connecting if there is none (or the last one died).
    pub(super) async fn session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut guard = self.inner.session.lock().await;
        if let Some(session) = guard.as_ref()
            && session.connection.status().connected()
            && session.publisher.status().connected()
        {
            return Ok(Arc::clone(session));
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.inner.name.clone().into());
        let connection = Connection::connect(&self.inner.uri, properties)
            .await
            .map_err(|e| lapin_error(&format!("cannot connect to {}", self.inner.shown), &e))?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lapin_error("cannot enable publisher confirms", &e))?;
        let session = Arc::new(Session {
            connection,
            publisher,
            declared: Mutex::new(HashSet::new()),
            delay_levels: tokio::sync::OnceCell::new(),
        });
        *guard = Some(Arc::clone(&session));
        tracing::debug!(broker = %self.inner.shown, "connected");
        Ok(session)
    }

    /// Forgets `session` (after an error) so the next use reconnects.
    pub(super) async fn invalidate(&self, session: &Arc<Session>) {
        let mut guard = self.inner.session.lock().await;
        if guard.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            *guard = None;
        }
    }

    /// Runs `attempt` with a live session, reconnecting and retrying (up to 3 times) when
    /// it fails in a way a retry may fix ([`BrokerError::is_transient`]); any other error
    /// (a 406, a message it cannot encode) is returned at once, as retrying would only
    /// repeat it.
    pub(super) async fn with_session<T, F, Fut>(&self, attempt: F) -> Result<T, BrokerError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let mut last = None;
        for round in 0..3_u32 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(round))).await;
            }
            let session = match self.session().await {
                Ok(session) => session,
                Err(error) if error.is_transient() => {
                    last = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            match attempt(Arc::clone(&session)).await {
                Ok(value) => return Ok(value),
                // RabbitMQ returned a message or found no such queue: the session is fine.
                Err(error @ BrokerError::QueueNotFound { .. }) => return Err(error),
                Err(error) => {
                    self.invalidate(&session).await;
                    if !error.is_transient() {
                        return Err(error);
                    }
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "broker operation failed; reconnecting"
                    );
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or(BrokerError::Closed))
    }
}
