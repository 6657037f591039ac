//! [`ResultError`]: every way storing or reading a result fails, each keeping its cause,
//! and whether retrying later may help ([`ResultError::is_transient`]).

use std::time::Duration;

use super::TaskState;

/// Errors from a result backend.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The embedded database failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The backend URL is not understood.
    #[error(
        "unsupported result backend URL {0:?} (expected sqlite://PATH, redis://host:port/db or rpc://)"
    )]
    UnsupportedUrl(String),
    /// Redis failed.
    #[error("redis: {context}")]
    Redis {
        /// What was being done, e.g. `cannot store a result`.
        context: String,
        /// The Redis client's error.
        #[source]
        source: ::redis::RedisError,
    },
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

impl ResultError {
    /// True when retrying later may succeed: the store was unreachable or busy (Redis or
    /// RabbitMQ lost, SQLite locked by another process), or the task has not finished yet
    /// ([`ResultError::Timeout`]). False when a retry would fail the same way: an
    /// unsupported URL, a backend without chords, a stored result that cannot be read.
    pub fn is_transient(&self) -> bool {
        match self {
            ResultError::Db(error) => error.is_transient(),
            ResultError::Redis { source, .. } => crate::redis_client::is_transient(source),
            ResultError::Broker(error) => error.is_transient(),
            ResultError::Timeout { .. } => true,
            ResultError::UnsupportedUrl(_)
            | ResultError::ChordsUnsupported(_)
            | ResultError::Corrupt { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_stores_and_unfinished_tasks_are_transient() {
        let dropped = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let redis = ResultError::Redis {
            context: "cannot store a result".into(),
            source: dropped.into(),
        };
        assert!(redis.is_transient());
        // The cause is kept, not flattened into the message.
        assert_eq!(redis.to_string(), "redis: cannot store a result");
        assert!(std::error::Error::source(&redis).is_some());
        let timeout = ResultError::Timeout {
            task_id: "t".into(),
            timeout: Duration::from_secs(1),
            state: TaskState::Pending,
        };
        assert!(timeout.is_transient());
        let lost = crate::broker::BrokerError::Amqp {
            context: "cannot publish".into(),
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe).into(),
        };
        assert!(ResultError::from(lost).is_transient());
    }

    #[test]
    fn what_would_fail_again_is_permanent() {
        let script: ::redis::RedisError = (
            ::redis::ErrorKind::Server(::redis::ServerErrorKind::ResponseError),
            "ERR Error running script",
        )
            .into();
        let redis = ResultError::Redis {
            context: "cannot count a chord part".into(),
            source: script,
        };
        assert!(!redis.is_transient());
        assert!(!ResultError::UnsupportedUrl("memcache://".into()).is_transient());
        assert!(!ResultError::ChordsUnsupported("rpc://".into()).is_transient());
        let corrupt = ResultError::Corrupt {
            task_id: "t".into(),
            reason: "not JSON".into(),
        };
        assert!(!corrupt.is_transient());
    }
}
