//! The Redis connection shared by the two parts of wasmq that use Redis, the result backend
//! (`results::redis`) and the delay scheduler (`broker::scheduled`): a client opened from a
//! `redis://` URL, one lazily opened [`ConnectionManager`] (which reconnects by itself),
//! the URL as logs show it (without its password), and which Redis failures are worth
//! retrying ([`is_transient`]).

use ::redis::aio::ConnectionManager;
use ::redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::OnceCell;

/// A Redis client and its shared connection.
pub(crate) struct RedisClient {
    client: ::redis::Client,
    /// `redis://host:port/db`, without credentials, for logs.
    shown: String,
    /// Opened on first use; clones share it (commands are pipelined on one socket).
    connection: OnceCell<ConnectionManager>,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl RedisClient {
    /// A client for `url` (`redis://[user:password@]host:port/db`); connects on first use.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub(crate) fn open(url: &str) -> Result<Self, RedisError> {
        let client = ::redis::Client::open(url)?;
        let info = client.get_connection_info();
        let shown = format!("redis://{}/{}", info.addr(), info.redis_settings().db());
        Ok(Self {
            client,
            shown,
            connection: OnceCell::new(),
        })
    }

    /// The URL without credentials, e.g. `redis://127.0.0.1:6379/0`.
    pub(crate) fn describe(&self) -> &str {
        &self.shown
    }

    /// The client, for connections of their own (a subscription).
    pub(crate) fn client(&self) -> &::redis::Client {
        &self.client
    }

    /// The shared connection, connecting on first use.
    ///
    /// # Errors
    /// When Redis cannot be reached the first time.
    pub(crate) async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        self.connection
            .get_or_try_init(|| ConnectionManager::new(self.client.clone()))
            .await
            .cloned()
    }
}

/// True when retrying later may succeed: Redis could not be reached, dropped the
/// connection or timed out, or answered that it is briefly unable (loading its data set,
/// a failover: `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`). A bad URL, failed
/// authentication, a script error or an unexpected reply would fail the same way again.
pub(crate) fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
            )
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_or_briefly_busy_redis_is_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::TimedOut,
        ] {
            assert!(is_transient(&std::io::Error::from(kind).into()), "{kind:?}");
        }
        let loading: RedisError = (
            ErrorKind::Server(ServerErrorKind::BusyLoading),
            "Redis is loading the dataset in memory",
        )
            .into();
        assert!(is_transient(&loading));
    }

    #[test]
    fn errors_that_would_repeat_are_permanent() {
        let script: RedisError = (
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "ERR Error running script",
        )
            .into();
        assert!(!is_transient(&script));
        let auth: RedisError = (ErrorKind::AuthenticationFailed, "WRONGPASS").into();
        assert!(!is_transient(&auth));
        assert!(!is_transient(&RedisClient::open("nope://x").unwrap_err()));
    }

    #[test]
    fn logs_never_show_the_password() {
        let client = RedisClient::open("redis://:secret@127.0.0.1:6390/3").unwrap();
        assert_eq!(client.describe(), "redis://127.0.0.1:6390/3");
        assert!(!format!("{client:?}").contains("secret"));
    }
}
