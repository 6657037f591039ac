//! `wasmq plugins`: inspect a plugin file, list a worker's plugin folder, export the bundled
//! plugins.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Subcommand;

use super::args::{EngineArgs, sandbox};
use super::exit::{ExitStatus, Failure};
use crate::engine::{CacheStatus, Plugin};
use crate::registry::Registry;
use crate::units::{format_bytes, format_duration};

#[derive(Debug, Subcommand)]
pub(super) enum PluginsCommand {
    /// List the tasks a plugin offers, with their parameters, default limits and docs.
    Inspect {
        /// The plugin file (a wasm32-wasip2 component).
        plugin: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// List what a worker's plugin folder holds: each file, its tasks, and files that fail
    /// to load.
    List {
        /// The plugin folder.
        #[arg(default_value = crate::config::DEFAULT_PLUGIN_FOLDER, env = "WASMQ_PLUGINS")]
        folder: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Write the plugins bundled in this binary (math, text, hostile, grants) into a folder.
    Export {
        /// The folder (created if needed).
        #[arg(default_value = crate::config::DEFAULT_PLUGIN_FOLDER)]
        folder: PathBuf,
    },
}

pub(super) async fn run(command: PluginsCommand) -> Result<(), Failure> {
    match command {
        PluginsCommand::Inspect { plugin, engine } => inspect(&plugin, &engine).await,
        PluginsCommand::List { folder, engine } => list(&folder, &engine).await,
        PluginsCommand::Export { folder } => {
            for path in export_bundled(&folder).map_err(Failure::internal)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
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

async fn list(folder: &Path, engine: &EngineArgs) -> Result<(), Failure> {
    let sandbox = Arc::new(sandbox(engine, 4)?);
    let registry = Registry::load_folder(sandbox, folder)
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
    let plugin = sandbox.load_plugin(path).await?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    print!("{}", describe_plugin(&plugin, path, size));
    Ok(())
}

/// The text `wasmq plugins inspect` prints.
pub(super) fn describe_plugin(plugin: &Plugin, path: &Path, size: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: plugin {} (wasmq:task@{}, {}, sha256 {}, {})",
        path.display(),
        plugin.name(),
        plugin.contract_version(),
        format_bytes(size),
        &plugin.content_hash()[..16],
        match plugin.cache_status() {
            CacheStatus::Hit => "loaded from the artifact cache",
            CacheStatus::Compiled => "compiled",
        }
    );
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
