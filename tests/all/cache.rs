//! The artifact cache: reused across sandboxes, invalidated by a changed plugin or engine
//! configuration, and self-healing when an artifact is corrupt.

use std::path::Path;

use crate::support::MATH;
use wasmq::engine::{CacheStatus, CpuMetering, Sandbox, SandboxConfig};

use crate::support::{runtime, success};

fn cached_sandbox(dir: &Path, cpu_metering: CpuMetering) -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: Some(dir.to_path_buf()),
        cpu_metering,
        ..SandboxConfig::default()
    })
    .unwrap()
}

fn artifacts(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".cwasm"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `bytes` with a custom section appended: a different but equally valid component.
fn with_custom_section(bytes: &[u8]) -> Vec<u8> {
    let name = b"wasmq-test";
    let payload = b"changed";
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}

#[test]
fn artifacts_are_reused_and_invalidated_correctly() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(MATH).unwrap();

        // First load compiles and stores one artifact.
        let sandbox = cached_sandbox(dir.path(), CpuMetering::Time);
        let plugin = sandbox.load_plugin(Path::new(MATH)).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Compiled);
        let artifact = sandbox.cached_artifact_path(&bytes).unwrap();
        assert!(artifact.is_file());
        assert_eq!(artifacts(dir.path()).len(), 1);

        // A new sandbox with the same configuration loads it.
        let sandbox = cached_sandbox(dir.path(), CpuMetering::Time);
        let plugin = sandbox.load_plugin(Path::new(MATH)).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Hit);
        assert_eq!(success(&sandbox, &plugin, "math.add", "[20, 22]").await, 42);

        // A changed plugin misses and gets an artifact of its own.
        let changed = with_custom_section(&bytes);
        let plugin = sandbox.load_plugin_bytes("math", &changed).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Compiled);
        assert_ne!(
            plugin.content_hash(),
            sandbox
                .load_plugin(Path::new(MATH))
                .await
                .unwrap()
                .content_hash()
        );
        assert_eq!(success(&sandbox, &plugin, "math.add", "[1, 1]").await, 2);
        assert_eq!(artifacts(dir.path()).len(), 2);

        // A different engine configuration (fuel metering instead of CPU time: different
        // code) never loads the other's artifact.
        let plain = cached_sandbox(dir.path(), CpuMetering::Fuel);
        let plugin = plain.load_plugin(Path::new(MATH)).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Compiled);
        assert_ne!(plain.cached_artifact_path(&bytes), Some(artifact.clone()));
        assert_eq!(success(&plain, &plugin, "math.add", "[2, 2]").await, 4);
        assert_eq!(artifacts(dir.path()).len(), 3);

        // A corrupt artifact is discarded, the plugin recompiled, and the cache healed.
        std::fs::write(&artifact, b"not an artifact").unwrap();
        let sandbox = cached_sandbox(dir.path(), CpuMetering::Time);
        let plugin = sandbox.load_plugin(Path::new(MATH)).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Compiled);
        assert_eq!(success(&sandbox, &plugin, "math.add", "[3, 4]").await, 7);
        let plugin = sandbox.load_plugin(Path::new(MATH)).await.unwrap();
        assert_eq!(plugin.cache_status(), CacheStatus::Hit);
    });
}
