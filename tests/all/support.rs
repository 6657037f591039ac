//! Helpers shared by the test modules.

use std::path::Path;

use wasmq::engine::{CallReport, CallRequest, Outcome, Plugin, Sandbox, SandboxConfig};

/// The bundled plugins, built from `plugins/` by `runtime/build.rs`.
pub(crate) const MATH: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/math.wasm");
/// See [`MATH`].
pub(crate) const TEXT: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/text.wasm");
/// See [`MATH`].
pub(crate) const HOSTILE: &str = concat!(env!("WASMQ_BUNDLED_PLUGINS_DIR"), "/hostile.wasm");

/// A sandbox with no artifact cache (tests that exercise the cache make their own).
pub(crate) fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: None,
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

/// Loads a plugin from its path.
pub(crate) async fn load(sandbox: &Sandbox, path: &str) -> Plugin {
    sandbox
        .load_plugin(Path::new(path))
        .await
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

/// Calls `task` with positional `args` and returns the report.
pub(crate) async fn call(sandbox: &Sandbox, plugin: &Plugin, task: &str, args: &str) -> CallReport {
    sandbox
        .call(plugin, CallRequest::new(task, args))
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"))
}

/// Calls `task` and returns its JSON result, panicking on any other outcome.
pub(crate) async fn success(
    sandbox: &Sandbox,
    plugin: &Plugin,
    task: &str,
    args: &str,
) -> serde_json::Value {
    match call(sandbox, plugin, task, args).await.outcome {
        Outcome::Success(json) => serde_json::from_str(&json).expect("result is JSON"),
        other => panic!("{task}({args}) did not succeed: {other}"),
    }
}

/// A multi-threaded runtime like the worker's.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
