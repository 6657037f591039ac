//! Where messages and results live, from the shell: the `--broker`, `--result-backend`,
//! `--scheduler` and `--config` flags every queue command shares ([`Endpoints`]), merged over
//! the configuration file and connected.

use std::path::PathBuf;
use std::sync::Arc;

use super::exit::Failure;
use crate::broker::Broker;
use crate::client::Client;
use crate::config::{DEFAULT_DATABASE_URL, RawConfig, WorkerConfig};

/// Where messages and results live; shared by worker, send and result.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct Endpoints {
    /// Broker URL. Default: sqlite://.wasmq/wasmq.db (the embedded broker).
    #[arg(long, env = "WASMQ_BROKER")]
    broker: Option<String>,
    /// Result backend URL. Default: sqlite://.wasmq/wasmq.db (the embedded backend).
    #[arg(long, env = "WASMQ_RESULT_BACKEND")]
    result_backend: Option<String>,
    /// Hold delayed messages (countdown, eta, retries) in Redis until due, e.g.
    /// redis://127.0.0.1:6379/0, instead of in the broker. Default: in the broker.
    #[arg(long, env = "WASMQ_SCHEDULER")]
    scheduler: Option<String>,
    /// A strict TOML configuration file (see the README); flags and WASMQ_* variables
    /// override it. Clients read `broker`, `result_backend`, `scheduler`, `routes` and
    /// `queue_max_priority` from it.
    #[arg(long, env = "WASMQ_CONFIG")]
    config: Option<PathBuf>,
}

impl Endpoints {
    /// The configuration: these flags over the file.
    pub(super) fn resolve(&self, flags: RawConfig) -> Result<WorkerConfig, Failure> {
        let mut raw = RawConfig {
            broker: self.broker.clone(),
            result_backend: self.result_backend.clone(),
            scheduler: self.scheduler.clone(),
            ..flags
        };
        if let Some(file) = &self.config {
            let from_file =
                RawConfig::from_file(file).map_err(|e| Failure::bad_input(format!("{e:#}")))?;
            raw = raw.or(from_file);
        }
        WorkerConfig::resolve(raw).map_err(Failure::bad_input)
    }

    /// A client on the configured broker and result backend, following the configured
    /// routes.
    pub(super) fn client(&self) -> Result<Client, Failure> {
        let config = self.resolve(RawConfig::default())?;
        let broker = connect_broker(&config)?;
        let backend = crate::results::connect(
            &config.result_backend,
            crate::results::DEFAULT_RESULT_EXPIRES,
            &config.broker,
        )
        .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
        Ok(Client::new(broker, backend).with_routes(config.routes))
    }

    /// The `--broker` flag (or `WASMQ_BROKER`) alone, else the embedded default; the
    /// configuration file is not read.
    pub(super) fn broker_flag(&self) -> &str {
        self.broker.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }
}

/// The configured broker, behind the Redis delay scheduler when one is configured.
pub(super) fn connect_broker(config: &WorkerConfig) -> Result<Arc<dyn Broker>, Failure> {
    let options = crate::broker::amqp::AmqpOptions {
        queue_max_priority: config.queue_max_priority,
    };
    crate::broker::scheduled::connect(&config.broker, config.scheduler.as_deref(), options)
        .map_err(|e| Failure::bad_input(format!("{e:#}")))
}
