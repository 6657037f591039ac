//! The worker's HTTP endpoints (`wasmq worker --metrics 127.0.0.1:9808`):
//!
//! * `GET /metrics` — every metric: OpenMetrics text when asked for (Prometheus asks),
//!   else Prometheus' classic text format;
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

/// The metrics in OpenMetrics text when the scraper asks for it (Prometheus does), else in
/// Prometheus' classic text format 0.0.4 (promtool, older agents, curl).
async fn metrics(
    axum::extract::State(endpoints): axum::extract::State<Endpoints>,
    headers: axum::http::HeaderMap,
) -> Response {
    let text = endpoints.metrics.encode();
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)],
            classic_text(&text),
        )
            .into_response()
    }
}

/// The content type of Prometheus' classic text format.
const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus' classic text format: a counter family is named with its
/// `_total` suffix (OpenMetrics names it without), and the `# EOF` and `# UNIT` lines go.
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total_and_drops_eof() {
        let open = "# HELP a_tasks Tasks.\n# TYPE a_tasks counter\na_tasks_total{x=\"1\"} 2\n# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            classic_text(open),
            "# HELP a_tasks_total Tasks.\n# TYPE a_tasks_total counter\na_tasks_total{x=\"1\"} 2\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
