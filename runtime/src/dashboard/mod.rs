//! `wasmq dashboard`: a web page showing the workers (online, load, running tasks, sandbox
//! limit hits), the queues with their lengths, the latest tasks (state, arguments, result
//! or error, runtime), the dead letters, and live charts of throughput and runtime.
//!
//! It is a monitor like Flower, built from what any Celery monitor can hear, so it shows
//! Python Celery workers next to wasmq's:
//!
//! * **events** ([`Broker::events_with_backlog`]): on RabbitMQ a `celeryev.<uuid>` queue of
//!   its own, as Celery's `EventReceiver`; on the embedded broker the database's `events`
//!   table, read from the newest [`EVENT_BACKLOG`] messages on, so the recent past shows
//!   after a restart. They feed the in-memory picture (`state.rs`) (bounded: the latest N tasks, two
//!   minutes of charts);
//! * **polling** (`poll.rs`): queue lengths and dead letters from the broker (the embedded
//!   file's tables, or passive declares and a look on RabbitMQ), and on RabbitMQ Celery's
//!   `inspect stats|active_queues|active` and Flower's `enable_events` broadcast;
//! * **the page** (`http.rs`): one HTML file, a stylesheet and about 200 lines of script compiled
//!   into the binary (`include_str!`), no build step and nothing fetched from elsewhere;
//!   the script polls `/api/state` every two seconds and draws tables and SVG charts.
//!
//! Sandbox limit hits are the worker's own count by limit, from `inspect stats`
//! (`wasmq.limit_hits`, the same figure as its `wasmq_sandbox_limit_exceeded_total`).
//! Between stats polls they are also inferred from task-failed events whose
//! exception wasmq's sandbox raises for a limit (`TimeLimitExceeded` for time — and fuel,
//! when its message says so —, `MemoryError`, `RecursionError` for the stack,
//! `OutputLimitExceeded`), for wasmq workers only; the larger figure per limit is shown.
//!
//! Read-only: it sends no command that changes a worker beyond `enable_events`.

mod http;
mod poll;
mod series;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::{Broker, BrokerError};

/// Event messages read back from a broker that keeps them (the embedded file) at start.
pub const EVENT_BACKLOG: usize = 20_000;

/// What the dashboard shows and how often it asks.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// Queues always shown (with those workers consume and task events name).
    pub queues: Vec<String>,
    /// How many of the latest tasks are kept.
    pub tasks_kept: usize,
    /// How often queue lengths are read; dead letters and inspect every third time.
    pub refresh: Duration,
    /// How long inspect replies are waited for.
    pub inspect_timeout: Duration,
    /// Broadcast `enable_events` as Flower does, so workers without `-E` send task events.
    pub enable_events: bool,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        Self {
            queues: vec!["celery".to_owned()],
            tasks_kept: 1000,
            refresh: Duration::from_secs(2),
            inspect_timeout: Duration::from_secs(1),
            enable_events: true,
        }
    }
}

/// Errors starting the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The address cannot be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker carries no events, so there is nothing to show workers and tasks from.
    #[error("{0} carries no events")]
    NoEvents(String),
    /// The broker cannot start listening for events.
    #[error("cannot listen for events")]
    Events(#[source] BrokerError),
}

/// Starts listening to `broker`'s events and polling it, binds `address` (port 0: any free
/// port), and returns the bound address and the server, which serves until `shutdown`
/// completes; the listener and the poller stop with it.
///
/// # Errors
/// [`DashboardError::Bind`] when the address cannot be bound; [`DashboardError::NoEvents`]
/// or [`DashboardError::Events`] when the broker's events cannot be heard.
pub async fn bind(
    address: SocketAddr,
    broker: Arc<dyn Broker>,
    options: DashboardOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send), DashboardError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DashboardError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DashboardError::Bind { address, source })?;
    let mut events = broker
        .events_with_backlog(EVENT_BACKLOG)
        .await
        .map_err(DashboardError::Events)?
        .ok_or_else(|| DashboardError::NoEvents(broker.describe()))?;
    let state = Arc::new(Mutex::new(state::State::new(
        options.tasks_kept,
        &options.queues,
    )));
    let listening = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            while let Some(message) = events.recv().await {
                let mut state = poll::lock(&state);
                for event in message.events() {
                    state.apply(&event);
                }
            }
        })
    };
    let polling = tokio::spawn(poll::run(Arc::clone(&broker), Arc::clone(&state), options));
    let app = http::router(http::Shared {
        state,
        broker: broker.describe(),
    });
    let server = async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(%error, "the dashboard stopped");
        }
        listening.abort();
        polling.abort();
    };
    Ok((bound, server))
}

/// Now, in Unix seconds (events' clock).
fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}
