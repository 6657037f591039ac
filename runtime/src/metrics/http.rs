//! The worker's HTTP endpoints (`wasmq worker --metrics 127.0.0.1:9808`):
//!
//! * `GET /metrics` — every metric, OpenMetrics text (Prometheus scrapes it);
//! * `GET /healthz` — 200 while the process answers (liveness);
//! * `GET /readyz` — 200 only while every worker of the process consumes from its broker,
//!   503 otherwise (reconnecting, shutting down), with the status as JSON: the same rule
//!   as `wasmq status`, so a worker that is alive but consumes nothing fails its probe;
//! * `GET /status` — the status JSON the status file holds.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{CONTENT_TYPE, Metrics};

/// What the endpoints read: the metrics, and the worker's status now.
#[derive(Clone)]
pub struct Endpoints {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The status now, and whether the process is ready (consuming).
    pub status: Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>,
}

/// Errors starting the endpoints.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address cannot be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `address` (port 0: any free port) and returns the bound address and the server,
/// which serves until `shutdown` completes.
///
/// # Errors
/// [`HttpError::Bind`] when the address cannot be bound.
pub async fn bind(
    address: SocketAddr,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send), HttpError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| HttpError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { address, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(endpoints);
    let server = async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    };
    Ok((bound, server))
}

async fn metrics(axum::extract::State(endpoints): axum::extract::State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        endpoints.metrics.encode(),
    )
        .into_response()
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value}\n"),
    )
        .into_response()
}

async fn readyz(axum::extract::State(endpoints): axum::extract::State<Endpoints>) -> Response {
    let (ready, status) = (endpoints.status)();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &status)
}

async fn status(axum::extract::State(endpoints): axum::extract::State<Endpoints>) -> Response {
    json(StatusCode::OK, &(endpoints.status)().1)
}
