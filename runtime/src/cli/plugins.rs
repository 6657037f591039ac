//! `wasmq plugins`: build a plugin from Python (`plugin_build.rs`), inspect a plugin file,
//! list a worker's plugin folder, export the bundled plugins, sign and verify.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Subcommand;

use super::args::{EngineArgs, sandbox};
use super::exit::{ExitStatus, Failure};
use super::plugin_build::{self, BuildArgs};
use crate::engine::{CacheStatus, Plugin};
use crate::registry::Registry;
use crate::signing::{PluginSignature, SigningKey, TrustPolicy, signature_path};
use crate::units::{format_bytes, format_duration};

#[derive(Debug, Subcommand)]
pub(super) enum PluginsCommand {
    /// Build a plugin from a Python module of `@task` functions (the wasmq-sdk package,
    /// sdk-python/): installs componentize-py on first use into $WASMQ_TOOLCHAIN_DIR (else
    /// $XDG_CACHE_HOME/wasmq/toolchains, else ~/.cache/wasmq/toolchains), and a
    /// requirements.txt beside the module into the plugin.
    Build(BuildArgs),
    /// List the tasks a plugin offers, with their parameters, default limits and docs.
    Inspect {
        /// The plugin file (a wasm32-wasip2 component).
        plugin: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// List what a worker's plugin folder holds: each file, its tasks, and files that fail
    /// to load (or, with --trusted-key / --require-signatures, that a worker with the same
    /// policy refuses).
    List {
        /// The plugin folder.
        #[arg(default_value = crate::config::DEFAULT_PLUGIN_FOLDER, env = "WASMQ_PLUGINS")]
        folder: PathBuf,
        /// A trusted public key (ed25519:…) or a file holding one; repeat for several.
        #[arg(long = "trusted-key", value_delimiter = ',')]
        trusted_keys: Vec<String>,
        /// Refuse files without a valid .wasm.sig, as such a worker would.
        #[arg(long)]
        require_signatures: bool,
        /// The tenant whose folder it is.
        #[arg(long, default_value = crate::signing::IMPLICIT_TENANT)]
        tenant: String,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Write the plugins bundled in this binary (math, text, hostile, grants, stamp) into a
    /// folder.
    Export {
        /// The folder (created if needed).
        #[arg(default_value = crate::config::DEFAULT_PLUGIN_FOLDER)]
        folder: PathBuf,
    },
    /// Sign a plugin for a tenant: writes PLUGIN.wasm.sig beside it (the .wasm bytes are not
    /// changed).
    Sign {
        /// The plugin file.
        plugin: PathBuf,
        /// The private key (from `wasmq keys generate`).
        #[arg(long, env = "WASMQ_SIGNING_KEY")]
        key: PathBuf,
        /// The tenant it is signed for (a worker without [tenants] is tenant "default").
        #[arg(long, default_value = crate::signing::IMPLICIT_TENANT)]
        tenant: String,
        /// How long the signature is valid, e.g. 90days.
        #[arg(long, default_value = "365days")]
        expires: String,
    },
    /// Check a plugin's signature as a worker would, without compiling it: exit 0 when
    /// it would load, 4 with the reason when it would be refused.
    Verify {
        /// The plugin file (its signature is PLUGIN.wasm.sig).
        plugin: PathBuf,
        /// A trusted public key (ed25519:…) or a file holding one; repeat for several.
        #[arg(long = "trusted-key", required = true, value_delimiter = ',')]
        trusted_keys: Vec<String>,
        /// The tenant loading it.
        #[arg(long, default_value = crate::signing::IMPLICIT_TENANT)]
        tenant: String,
    },
}

pub(super) async fn run(command: PluginsCommand) -> Result<(), Failure> {
    match command {
        PluginsCommand::Build(args) => plugin_build::run(args),
        PluginsCommand::Inspect { plugin, engine } => inspect(&plugin, &engine).await,
        PluginsCommand::List {
            folder,
            trusted_keys,
            require_signatures,
            tenant,
            engine,
        } => {
            let trust = TrustPolicy::from_config(&tenant, &trusted_keys, require_signatures, false)
                .map_err(Failure::bad_input)?;
            list(&folder, trust.is_active().then_some(trust), &engine).await
        }
        PluginsCommand::Sign {
            plugin,
            key,
            tenant,
            expires,
        } => sign(&plugin, &key, &tenant, &expires),
        PluginsCommand::Verify {
            plugin,
            trusted_keys,
            tenant,
        } => verify(&plugin, &trusted_keys, &tenant),
        PluginsCommand::Export { folder } => {
            for path in export_bundled(&folder).map_err(Failure::internal)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// A plugin's bytes and name (its file stem), or bad input naming the file.
fn read_plugin(path: &Path) -> Result<(Vec<u8>, String), Failure> {
    let bytes = std::fs::read(path).map_err(|e| {
        Failure::new(
            ExitStatus::BadPlugin,
            anyhow::anyhow!("cannot read {}: {e}", path.display()),
        )
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((bytes, name))
}

fn sign(plugin: &Path, key: &Path, tenant: &str, expires: &str) -> Result<(), Failure> {
    let key = SigningKey::read(key).map_err(Failure::bad_input)?;
    let valid_for = crate::units::parse_duration(expires)
        .map_err(|e| Failure::bad_input(format!("--expires: {e}")))?;
    let not_after = chrono::Utc::now()
        + chrono::Duration::from_std(valid_for)
            .map_err(|e| Failure::bad_input(format!("--expires: {e}")))?;
    let (bytes, name) = read_plugin(plugin)?;
    let signature = PluginSignature::sign(&key, tenant, &name, &bytes, not_after)
        .map_err(Failure::bad_input)?;
    let path = signature_path(plugin);
    std::fs::write(&path, signature.to_json())
        .map_err(|e| Failure::bad_input(format!("cannot write {}: {e}", path.display())))?;
    println!(
        "{}: plugin {name} signed for tenant {tenant} by key {} until {} (sha256 {})",
        path.display(),
        signature.key_id,
        signature.not_after,
        &signature.sha256[..16]
    );
    Ok(())
}

fn verify(plugin: &Path, trusted_keys: &[String], tenant: &str) -> Result<(), Failure> {
    let trust =
        TrustPolicy::from_config(tenant, trusted_keys, true, false).map_err(Failure::bad_input)?;
    let (bytes, name) = read_plugin(plugin)?;
    let sig_path = signature_path(plugin);
    let signature = std::fs::read_to_string(&sig_path).ok();
    trust
        .check(&name, &bytes, signature.as_deref(), chrono::Utc::now())
        .map_err(|e| {
            Failure::new(
                ExitStatus::BadPlugin,
                anyhow::anyhow!("{}: refused: {e}", plugin.display()),
            )
        })?;
    let signature = PluginSignature::parse(
        &sig_path.display().to_string(),
        &signature.unwrap_or_default(),
    )
    .map_err(Failure::bad_input)?;
    println!(
        "{}: ok: plugin {name} for tenant {tenant}, signed by key {}, valid until {}",
        plugin.display(),
        signature.key_id,
        signature.not_after
    );
    Ok(())
}

/// Writes the bundled plugins into `folder`; returns the files written.
///
/// # Errors
/// When the folder or a file cannot be written.
pub(super) fn export_bundled(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(folder)?;
    let mut written = Vec::new();
    for (name, bytes) in crate::bundled::ALL {
        let path = folder.join(format!("{name}.wasm"));
        std::fs::write(&path, bytes)?;
        written.push(path);
    }
    Ok(written)
}

async fn list(
    folder: &Path,
    trust: Option<TrustPolicy>,
    engine: &EngineArgs,
) -> Result<(), Failure> {
    let sandbox = Arc::new(sandbox(engine, 4)?);
    let registry = Registry::load_folder(sandbox, folder, trust)
        .await
        .map_err(|e| Failure::new(ExitStatus::BadPlugin, e))?;
    let snapshot = registry.snapshot();
    let mut last_file = None;
    for (task, file) in snapshot.tasks() {
        if last_file.as_ref() != Some(&file) {
            println!("{}", file.display());
            last_file = Some(file.clone());
        }
        println!("  {task}");
    }
    let broken = snapshot.broken();
    for (file, why) in &broken {
        println!("{} (not loadable: {why})", file.display());
    }
    if snapshot.tasks().is_empty() && broken.is_empty() {
        println!("{}: no plugins", folder.display());
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            ExitStatus::BadPlugin,
            anyhow::anyhow!(
                "{} plugin file(s) in {} cannot be loaded",
                broken.len(),
                folder.display()
            ),
        ))
    }
}

async fn inspect(path: &Path, engine: &EngineArgs) -> Result<(), Failure> {
    let sandbox = sandbox(engine, 4)?;
    let started = std::time::Instant::now();
    let plugin = sandbox.load_plugin(path).await?;
    let loaded_in = started.elapsed();
    let bytes = std::fs::read(path).unwrap_or_default();
    let artifact = sandbox
        .cached_artifact_path(&bytes)
        .and_then(|artifact| std::fs::metadata(artifact).ok())
        .map(|m| m.len());
    let sizes = Sizes {
        component: bytes.len() as u64,
        artifact,
        loaded_in,
        language: language(&bytes),
    };
    print!("{}", describe_plugin(&plugin, path, &sizes));
    Ok(())
}

/// What `inspect` says about a plugin file besides its tasks.
pub(super) struct Sizes {
    /// The component file's size.
    pub(super) component: u64,
    /// The compiled artifact's size in the cache, when caching is on.
    pub(super) artifact: Option<u64>,
    /// How long loading took (a compile, or a read from the artifact cache).
    pub(super) loaded_in: std::time::Duration,
    /// The language the plugin was written in, from [`language`].
    pub(super) language: &'static str,
}

/// The language a component was written in, from what its toolchain leaves in it:
/// componentize-py's name in the `producers` section (with the CPython it embeds) for
/// Python; a `producers` section naming Rust, or rustc's paths in panic locations (release
/// builds strip `producers`), for Rust.
pub(super) fn language(component: &[u8]) -> &'static str {
    let has = |needle: &[u8]| component.windows(needle.len()).any(|w| w == needle);
    if has(b"componentize-py") || has(b"libpython3.") {
        "Python"
    } else if has(b"\x08language\x01\x04Rust") || has(b"/rustc/") {
        "Rust"
    } else {
        "unknown language"
    }
}

/// A load time as worth reading: to the millisecond from a second, else to the microsecond.
fn rounded(duration: std::time::Duration) -> std::time::Duration {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    if micros >= 1_000_000 {
        std::time::Duration::from_millis(micros / 1000)
    } else {
        std::time::Duration::from_micros(micros)
    }
}

/// The text `wasmq plugins inspect` prints.
pub(super) fn describe_plugin(plugin: &Plugin, path: &Path, sizes: &Sizes) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: plugin {} (wasmq:task@{}, {}, {}, sha256 {}, {} in {})",
        path.display(),
        plugin.name(),
        plugin.contract_version(),
        sizes.language,
        format_bytes(sizes.component),
        &plugin.content_hash()[..16],
        match plugin.cache_status() {
            CacheStatus::Hit => "loaded from the artifact cache",
            CacheStatus::Compiled => "compiled",
        },
        format_duration(rounded(sizes.loaded_in)),
    );
    if let Some(artifact) = sizes.artifact {
        let _ = writeln!(out, "  compiled artifact: {}", format_bytes(artifact));
    }
    for task in plugin.tasks() {
        let _ = writeln!(out, "\n  {}({})", task.name, task.params.join(", "));
        let mut limits = Vec::new();
        if let Some(fuel) = task.limits.fuel {
            limits.push(format!("fuel {fuel}"));
        }
        if let Some(memory) = task.limits.memory_bytes {
            limits.push(format!("memory {}", format_bytes(memory)));
        }
        if let Some(timeout) = task.limits.timeout {
            limits.push(format!("timeout {}", format_duration(timeout)));
        }
        if !limits.is_empty() {
            let _ = writeln!(out, "      default limits: {}", limits.join(", "));
        }
        for line in task.doc.lines() {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}
