//! `--metrics ADDR`: the worker process's Prometheus endpoint with its health and readiness
//! probes (see [`crate::metrics::http`]), for a worker serving one tenant or several.

use std::sync::Arc;

use super::exit::Failure;
use crate::metrics::Metrics;

/// Serves `metrics` with `/healthz`, `/readyz` and `/status` (from `status`: whether the
/// process is ready, and its status JSON) on `address`, until the returned task is aborted;
/// nothing without an address.
pub(super) async fn serve(
    address: Option<std::net::SocketAddr>,
    metrics: Option<Arc<Metrics>>,
    status: impl Fn() -> (bool, serde_json::Value) + Send + Sync + 'static,
) -> Result<Option<tokio::task::JoinHandle<()>>, Failure> {
    let (Some(address), Some(metrics)) = (address, metrics) else {
        return Ok(None);
    };
    let endpoints = crate::metrics::http::Endpoints {
        metrics,
        status: Arc::new(status),
    };
    let (bound, server) = crate::metrics::http::bind(address, endpoints, std::future::pending())
        .await
        .map_err(|e| Failure::bad_input(format!("--metrics: {e:#}")))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz and /status");
    Ok(Some(tokio::spawn(server)))
}
