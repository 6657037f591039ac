//! Work-queue topology, as Celery declares it (`celery-reference.md` §2.1): each work queue
//! is a durable classic queue bound to a durable direct exchange of the same name with the
//! queue name as routing key (`celery` → exchange `celery`), with its dead-letter queue
//! `<queue>.dead` beside it and a binding to the delayed-delivery exchange. A queue that
//! already exists — say declared by Python with `x-max-priority` — is used as it is
//! (declared on a throwaway channel first), so a mixed Python/wasmq fleet never trips over a
//! 406. Declarations are remembered per connection, so publishing declares nothing twice.
//! A queue a publish may not create (a tenant's follow-up to a queue not its own) is only
//! looked up, passively, and bound to the delay levels when it exists.

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};

use super::dead_letters::dead_letter_queue;
use super::session::Session;
use super::{AmqpBroker, delayed, lapin_error};
use crate::broker::BrokerError;

impl AmqpBroker {
    /// Declares `queue` the way Celery does (durable queue, durable direct exchange of the
    /// same name, bound by the queue name), and its dead-letter queue, and binds it to the
    /// delayed-delivery exchange (declaring the delay levels first, once per connection). A
    /// queue that already exists with other arguments (a 406 from RabbitMQ, on a throwaway
    /// channel) is used as it is.
    pub(super) async fn ensure_queue(
        &self,
        session: &Session,
        queue: &str,
    ) -> Result<(), BrokerError> {
        if session.has_declared(queue) {
            return Ok(());
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let probe = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let mut arguments = FieldTable::default();
        if let Some(max) = self.inner.options.queue_max_priority {
            arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(max));
        }
        match probe.queue_declare(queue.into(), durable, arguments).await {
            Ok(_) => {
                let exchange = probe
                    .exchange_declare(
                        queue.into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                match exchange {
                    Ok(()) => {
                        probe
                            .queue_bind(
                                queue.into(),
                                queue.into(),
                                queue.into(),
                                QueueBindOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                            .map_err(|e| lapin_error(&format!("cannot bind queue {queue}"), &e))?;
                        let _ = probe.close(200, "OK".into()).await;
                    }
                    // Declared by Python with another exchange type (say topic, for native
                    // delayed delivery): wasmq publishes to the default exchange anyway.
                    Err(error) => {
                        tracing::info!(queue, %error, "the exchange exists with another type; using it as it is");
                    }
                }
            }
            Err(error) => {
                tracing::info!(queue, %error, "the queue exists with other arguments; using it as it is");
            }
        }
        let dead = dead_letter_queue(queue);
        session
            .publisher
            .queue_declare(dead.as_str().into(), durable, FieldTable::default())
            .await
            .map_err(|e| lapin_error(&format!("cannot declare queue {dead}"), &e))?;
        session
            .delay_levels
            .get_or_try_init(|| {
                delayed::declare_topology(&session.connection, self.inner.delayed_queue_type)
            })
            .await?;
        delayed::bind_queue(&session.publisher, queue).await?;
        session.mark_declared(queue);
        Ok(())
    }

    /// Whether `queue` exists in the vhost: a passive declare on a throwaway channel (which
    /// RabbitMQ closes with a 404 when there is no such queue).
    pub(super) async fn queue_exists_on(
        &self,
        session: &Session,
        queue: &str,
    ) -> Result<bool, BrokerError> {
        let probe = session
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match probe
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => {
                let _ = probe.close(200, "OK".into()).await;
                Ok(true)
            }
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(lapin_error(
                &format!("cannot look up queue {queue}"),
                &error,
            )),
        }
    }

    /// Binds `queue`, which must already exist, to the delay levels (declaring them first,
    /// once per connection) and declares nothing else: [`BrokerError::QueueNotFound`] when
    /// there is no such queue. A queue declared on this connection is bound already.
    pub(super) async fn bind_existing_queue(
        &self,
        session: &Session,
        queue: &str,
    ) -> Result<(), BrokerError> {
        if session.has_declared(queue) {
            return Ok(());
        }
        if !self.queue_exists_on(session, queue).await? {
            return Err(BrokerError::QueueNotFound {
                queue: queue.to_owned(),
            });
        }
        session
            .delay_levels
            .get_or_try_init(|| {
                delayed::declare_topology(&session.connection, self.inner.delayed_queue_type)
            })
            .await?;
        delayed::bind_queue(&session.publisher, queue).await
    }

    /// Messages ready in `queue`; 0 when it does not exist (see
    /// [`crate::broker::Broker::queue_length`]).
    pub(super) async fn count_messages(&self, queue: &str) -> Result<u64, BrokerError> {
        self.with_session(|session| async move {
            let probe = session
                .connection
                .create_channel()
                .await
                .map_err(|e| lapin_error("cannot open a channel", &e))?;
            let declared = probe
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let count = declared.map(|q| u64::from(q.message_count())).unwrap_or(0);
            let _ = probe.close(200, "OK".into()).await;
            Ok(count)
        })
        .await
    }

    /// Deletes `queue`, its exchange and its dead letters, and unbinds it from the delay
    /// levels (see [`crate::broker::Broker::delete_queue`]).
    pub(super) async fn remove_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.with_session(|session| async move {
            // The shared delay levels stay; only this queue's way out of them goes.
            let channel = session
                .connection
                .create_channel()
                .await
                .map_err(|e| lapin_error("cannot open a channel", &e))?;
            if delayed::unbind_queue(&channel, queue).await.is_ok() {
                let _ = channel.close(200, "OK".into()).await;
            }
            for name in [queue.to_owned(), dead_letter_queue(queue)] {
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error("cannot open a channel", &e))?;
                let _ = channel
                    .queue_delete(
                        name.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = channel
                    .exchange_delete(
                        name.as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
                let _ = channel.close(200, "OK".into()).await;
            }
            session.forget_declared(queue);
            Ok(())
        })
        .await
    }
}

/// True for RabbitMQ's 404 NOT_FOUND (a passive declare of a queue that does not exist).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(refusal)
            if matches!(refusal.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    #[test]
    fn only_a_404_says_the_queue_does_not_exist() {
        let refusal = |soft| -> lapin::Error {
            lapin::ErrorKind::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(soft), "".into()))
                .into()
        };
        assert!(is_not_found(&refusal(AMQPSoftError::NOTFOUND)));
        assert!(!is_not_found(&refusal(AMQPSoftError::ACCESSREFUSED)));
        assert!(!is_not_found(&refusal(AMQPSoftError::RESOURCELOCKED)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!is_not_found(&reset.into()));
    }
}
