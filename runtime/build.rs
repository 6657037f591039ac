//! Builds every plugin in `plugins/` for `wasm32-wasip2` and writes `bundled_plugins.rs`,
//! which embeds each `.wasm` component in the `wasmq` binary (`wasmq::bundled`: the demo
//! and `wasmq plugins export` need no separate build step) and records the folder holding
//! them (`WASMQ_BUNDLED_PLUGINS_DIR`, for tests and benches), so no test hard-codes a path
//! and `cargo test` from a fresh clone builds the plugins by itself (the pattern of
//! wasmtime's `crates/test-programs/artifacts`).
//!
//! The nested cargo uses its own target directory under OUT_DIR: sharing the outer build's
//! would wait forever on its lock.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .join("..")
        .canonicalize()
        .expect("the repository root");
    let plugins_dir = root.join("plugins");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("plugins-target");

    let plugins = plugin_crates(&plugins_dir);
    for path in [
        plugins_dir.join("Cargo.toml"),
        plugins_dir.join("Cargo.lock"),
        root.join("wit"),
        root.join("sdk/Cargo.toml"),
        root.join("sdk/src"),
        root.join("sdk/wit"),
        root.join("sdk/macros/Cargo.toml"),
        root.join("sdk/macros/src"),
        root.join("bench/cpu-workloads/Cargo.toml"),
        root.join("bench/cpu-workloads/src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for name in &plugins {
        println!(
            "cargo:rerun-if-changed={}",
            plugins_dir.join(name).join("Cargo.toml").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            plugins_dir.join(name).join("src").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            plugins_dir.join(name).join("build.rs").display()
        );
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(&plugins_dir)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(plugins_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("cannot run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the bundled plugins for wasm32-wasip2 failed (see above). \
             If the target is missing, run: rustup target add wasm32-wasip2"
        );
    }

    let wasm_dir = target_dir.join("wasm32-wasip2").join("release");
    let mut code = String::new();
    let mut all = String::new();
    for name in &plugins {
        let wasm = wasm_dir.join(format!("{name}.wasm"));
        assert!(wasm.is_file(), "{} was not built", wasm.display());
        let constant = name.to_uppercase().replace('-', "_");
        writeln!(
            code,
            "/// The `{name}` plugin component (built from `plugins/{name}`)."
        )
        .unwrap();
        writeln!(
            code,
            "pub const {constant}: &[u8] = include_bytes!({:?});",
            wasm.display().to_string()
        )
        .unwrap();
        if !BENCH_ONLY.contains(&name.as_str()) {
            writeln!(all, "    ({name:?}, {constant}),").unwrap();
        }
    }
    writeln!(
        code,
        "/// Every bundled plugin but the benchmarks' own, as (name, component bytes)."
    )
    .unwrap();
    writeln!(code, "pub const ALL: &[(&str, &[u8])] = &[\n{all}];").unwrap();
    std::fs::write(out_dir.join("bundled_plugins.rs"), code).expect("write bundled_plugins.rs");
    println!(
        "cargo:rustc-env=WASMQ_BUNDLED_PLUGINS_DIR={}",
        wasm_dir.display()
    );
}

/// Plugins built and embedded for the benchmarks only: not in `ALL`, so the demo, `plugins
/// export` and bundled registries never load them.
const BENCH_ONLY: &[&str] = &["cpu"];

/// The plugin crates: subfolders of `plugins/` with a Cargo.toml.
fn plugin_crates(plugins_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(plugins_dir)
        .expect("read plugins/")
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("Cargo.toml").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
