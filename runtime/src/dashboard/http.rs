//! The dashboard's HTTP side: the page and its two assets, compiled into the binary, and
//! the JSON the page polls.
//!
//! * `GET /` — the page (`assets/index.html`);
//! * `GET /app.js`, `GET /style.css` — its script (tables and SVG charts, no library) and
//!   style;
//! * `GET /api/state?tasks=N&search=TEXT` — the whole picture as JSON, with the newest N
//!   tasks (default 100), only those with TEXT in their id, name, state, worker, arguments,
//!   result or error when a search is given;
//! * `GET /healthz` — 200 while the process answers.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State as With;
use axum::http::{Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::now;
use super::poll::lock;
use super::state::State;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// What the handlers read.
#[derive(Clone)]
pub(super) struct Shared {
    /// The picture.
    pub(super) state: Arc<Mutex<State>>,
    /// The broker, as the page names it (no credentials).
    pub(super) broker: String,
}

/// The router.
pub(super) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/api/state", get(api_state))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn api_state(With(shared): With<Shared>, uri: Uri) -> Response {
    let parameter = |name: &str| {
        uri.query()
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .map(percent_decoded)
    };
    let tasks = parameter("tasks")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let search = parameter("search").filter(|text| !text.is_empty());
    let mut snapshot = lock(&shared.state).snapshot(now(), tasks, search.as_deref());
    if let serde_json::Value::Object(map) = &mut snapshot {
        map.insert("broker".into(), shared.broker.clone().into());
        map.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    }
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        snapshot.to_string(),
    )
        .into_response()
}

/// A query-string value decoded: `+` is a space, `%XX` a byte (invalid UTF-8 replaced).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|b| char::from(*b).to_digit(16))
                .map(|d| d as u8)
        };
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if hex(i + 1).is_some() && hex(i + 2).is_some() => {
                out.push(hex(i + 1).unwrap_or(0) * 16 + hex(i + 2).unwrap_or(0));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decoded;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decoded("wasmq%40host+1"), "wasmq@host 1");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%C3%A9"), "é");
    }
}
