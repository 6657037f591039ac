//! [`BrokerError`]: every way a broker operation fails, each keeping its cause, and the one
//! question callers ask of it — is this worth retrying later ([`BrokerError::is_transient`])?

/// Errors from a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The embedded database failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// RabbitMQ failed or refused an operation.
    #[error("AMQP: {context}")]
    Amqp {
        /// What was being done, e.g. `cannot declare queue celery`.
        context: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A Redis broker command failed.
    #[error("Redis: {context}")]
    Redis {
        /// What the broker was doing.
        context: String,
        /// Redis's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// RabbitMQ did not take a message (a negative publisher confirm), e.g. while a
    /// resource alarm blocks publishing.
    #[error("AMQP: the broker refused {0}")]
    Refused(String),
    /// RabbitMQ cancelled a consumer of this queue (the queue was deleted, or its node
    /// went down).
    #[error("AMQP: the broker cancelled the consumer of {0}")]
    Cancelled(String),
    /// RabbitMQ did not answer within the time the caller allows.
    #[error("AMQP: no answer to {what} within {waited:?}")]
    NoAnswer {
        /// What was asked.
        what: String,
        /// How long the caller waited.
        waited: std::time::Duration,
    },
    /// A message could not be encoded.
    #[error("cannot encode {what}")]
    Encode {
        /// What, e.g. `a revocation`.
        what: &'static str,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The broker URL is not understood.
    #[error(
        "unsupported broker URL {0:?} (expected sqlite://PATH, amqp://user:pass@host:port/vhost or redis://host:port/db)"
    )]
    UnsupportedUrl(String),
    /// The consumer was closed.
    #[error("the consumer is closed")]
    Closed,
    /// A publish that may not create its queue ([`Broker::publish_existing`]) named a queue
    /// that does not exist in this broker: RabbitMQ returned the message as unroutable (or a
    /// passive declare found no such queue), or the embedded file never declared it. Nothing
    /// was published, and publishing again would fail the same way.
    ///
    /// [`Broker::publish_existing`]: super::Broker::publish_existing
    #[error("queue {queue:?} does not exist")]
    QueueNotFound {
        /// The queue the message was for.
        queue: String,
    },
    /// A broker option in the URL has a value it cannot take.
    #[error("invalid broker option {option}={value:?} (expected a positive number of seconds)")]
    InvalidOption {
        /// The option.
        option: String,
        /// The value given.
        value: String,
    },
    /// This broker carries no remote control (Celery's pidbox), e.g. `inspect` against a
    /// broker that has no mailbox for it.
    #[error("{0} carries no remote control")]
    NoRemoteControl(String),
    /// The scheduler holding delayed messages failed.
    #[error(transparent)]
    Scheduler(#[from] super::scheduled::SchedulerError),
}

impl BrokerError {
    /// True when retrying the operation later (after reconnecting) may succeed: the
    /// connection or channel was lost, the broker timed out, refused for a passing reason
    /// (a soft error such as a missing queue, a negative confirm) or is restarting. False when
    /// a retry would fail the same way: an unsupported URL, a 406 precondition failure, a
    /// message that cannot be encoded, a consumer closed on purpose, a publish that may not
    /// create its queue naming one that does not exist.
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Db(error) => error.is_transient(),
            BrokerError::Amqp { source, .. } => super::amqp::is_transient(source),
            BrokerError::Redis { source, .. } => crate::redis_client::is_transient(source),
            BrokerError::Refused(_) | BrokerError::Cancelled(_) | BrokerError::NoAnswer { .. } => {
                true
            }
            BrokerError::Encode { .. }
            | BrokerError::UnsupportedUrl(_)
            | BrokerError::Closed
            | BrokerError::NoRemoteControl(_)
            | BrokerError::InvalidOption { .. }
            | BrokerError::QueueNotFound { .. } => false,
            BrokerError::Scheduler(error) => error.is_transient(),
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    use super::*;
    use crate::db::DbError;

    fn amqp(source: lapin::Error) -> BrokerError {
        BrokerError::Amqp {
            context: "cannot publish".into(),
            source,
        }
    }

    fn sqlite(code: std::ffi::c_int) -> BrokerError {
        BrokerError::Db(DbError::Sqlite {
            path: "wasmq.db".into(),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        })
    }

    #[test]
    fn lost_connections_busy_databases_and_refusals_are_transient() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(amqp(reset.into()).is_transient());
        let not_found = AMQPError::new(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), "".into());
        assert!(amqp(lapin::ErrorKind::ProtocolError(not_found).into()).is_transient());
        assert!(BrokerError::Refused("a message for celery".into()).is_transient());
        assert!(BrokerError::Cancelled("celery".into()).is_transient());
        assert!(sqlite(rusqlite::ffi::SQLITE_BUSY).is_transient());
        let redis_down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let scheduler = super::super::scheduled::SchedulerError::Redis {
            context: "cannot schedule a message".into(),
            source: redis_down.into(),
        };
        assert!(BrokerError::from(scheduler).is_transient());
    }

    #[test]
    fn what_would_fail_again_is_permanent() {
        let precondition = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "inequivalent arg 'x-max-priority'".into(),
        );
        let error = amqp(lapin::ErrorKind::ProtocolError(precondition).into());
        assert!(!error.is_transient());
        // The cause is kept, not flattened into the message.
        assert_eq!(error.to_string(), "AMQP: cannot publish");
        let cause = std::error::Error::source(&error).expect("a source");
        assert!(cause.to_string().contains("PRECONDITION-FAILED"), "{cause}");

        assert!(!BrokerError::UnsupportedUrl("kafka://x".into()).is_transient());
        assert!(!BrokerError::Closed.is_transient());
        let missing = BrokerError::QueueNotFound {
            queue: "work-b".into(),
        };
        assert!(!missing.is_transient());
        assert_eq!(missing.to_string(), r#"queue "work-b" does not exist"#);
        let encode = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert!(
            !BrokerError::Encode {
                what: "a revocation",
                source: encode
            }
            .is_transient()
        );
        assert!(!sqlite(rusqlite::ffi::SQLITE_CONSTRAINT).is_transient());
    }
}
