//! Files that are not usable plugins are rejected with the right error, never a panic.

use crate::support::MATH;
use wasmq::engine::{PluginError, Sandbox};

use crate::support::{runtime, sandbox};

async fn load(sandbox: &Sandbox, bytes: &[u8]) -> PluginError {
    sandbox
        .load_plugin_bytes("bad", bytes)
        .await
        .expect_err("a bad plugin was accepted")
}

#[test]
fn bad_plugin_files_are_rejected_with_the_right_error() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = std::fs::read(MATH).unwrap();

        let error = load(&sandbox, b"").await;
        assert!(matches!(error, PluginError::NotWasm { .. }), "{error}");
        assert_eq!(error.to_string(), "bad is not a WebAssembly file");

        let error = load(&sandbox, b"#!/bin/sh\necho not wasm\n").await;
        assert!(matches!(error, PluginError::NotWasm { .. }), "{error}");

        // The smallest core module: magic + version 1.
        let error = load(&sandbox, b"\0asm\x01\0\0\0").await;
        assert!(matches!(error, PluginError::CoreModule { .. }), "{error}");
        assert!(error.to_string().contains("--target wasm32-wasip2"));

        // A precompiled artifact (native code) is not accepted as a plugin.
        let cwasm = wasmtime_artifact(&math).await;
        let error = load(&sandbox, &cwasm).await;
        assert!(matches!(error, PluginError::Precompiled { .. }), "{error}");

        // A truncated component.
        let error = load(&sandbox, &math[..math.len() / 2]).await;
        assert!(matches!(error, PluginError::Invalid { .. }), "{error}");

        // A valid, empty component: it implements nothing.
        let error = load(&sandbox, b"\0asm\x0d\0\x01\0").await;
        assert!(matches!(error, PluginError::WrongWorld { .. }), "{error}");
        assert!(
            error.to_string().starts_with(
                "bad does not implement the wasmq:task/task-plugin world \
                     (wasmq:task@0.3.0 or @0.2.0)"
            ),
            "{error}"
        );

        let error = sandbox
            .load_plugin(std::path::Path::new("/nonexistent/plugin.wasm"))
            .await
            .unwrap_err();
        assert!(matches!(error, PluginError::Read { .. }), "{error}");

        // After all of that the sandbox still loads and runs a good plugin.
        let plugin = sandbox.load_plugin_bytes("math", &math).await.unwrap();
        assert_eq!(plugin.tasks().len(), 20);
    });
}

/// A real precompiled artifact, as the artifact cache writes them.
async fn wasmtime_artifact(component: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(wasmq::engine::SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    sandbox.load_plugin_bytes("math", component).await.unwrap();
    std::fs::read(sandbox.cached_artifact_path(component).unwrap()).unwrap()
}
