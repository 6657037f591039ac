//! The plugin registry: task name → plugin, with hot deploy from a folder.
//!
//! The registry holds an immutable [`Snapshot`] behind a lock that is only ever held to
//! clone or replace an `Arc`: a lookup clones the plugin (an `Arc`), so a running task keeps
//! the version it started with while a new one is swapped in. [`Registry::rescan`] compares
//! the folder with the snapshot (size, modification time, then content hash), compiles new
//! or changed files on a blocking thread (off the executor), and swaps in the new snapshot
//! atomically. A file that fails to load is reported and the previous version keeps
//! serving; a deleted file undeploys its tasks; a task name claimed by two files is refused,
//! naming both.
//!
//! Just over 400 lines for one idea, the registry: lookups and hot deploy share one
//! snapshot, so they stay together.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::engine::{Plugin, PluginError, Sandbox};

/// Errors building a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The plugin folder cannot be read.
    #[error("cannot read the plugin folder {path}")]
    Folder {
        /// The folder.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plugin cannot be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Two plugins claim the same task name.
    #[error("task {task} is offered by both {first} and {second}")]
    Duplicate {
        /// The task name.
        task: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
}

/// A loaded plugin file.
#[derive(Debug, Clone)]
struct Deployed {
    plugin: Plugin,
    fingerprint: Fingerprint,
}

/// What tells a file changed without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

/// One immutable view of what is deployed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Task name → the file that provides it.
    tasks: HashMap<String, PathBuf>,
    /// File → its plugin.
    files: BTreeMap<PathBuf, Deployed>,
    /// Files that failed to load, with why and the fingerprint that failed (not retried
    /// until the file changes).
    broken: BTreeMap<PathBuf, (Fingerprint, String)>,
}

impl Snapshot {
    /// Every deployed task with the file providing it, sorted by name.
    pub fn tasks(&self) -> Vec<(String, PathBuf)> {
        let mut tasks: Vec<(String, PathBuf)> = self
            .tasks
            .iter()
            .map(|(t, f)| (t.clone(), f.clone()))
            .collect();
        tasks.sort();
        tasks
    }

    /// Files that failed to load, with the reason.
    pub fn broken(&self) -> Vec<(PathBuf, String)> {
        self.broken
            .iter()
            .map(|(p, (_, why))| (p.clone(), why.clone()))
            .collect()
    }

    fn insert(&mut self, path: PathBuf, deployed: Deployed) -> Result<(), RegistryError> {
        for task in deployed.plugin.tasks() {
            if let Some(other) = self.tasks.get(&task.name)
                && other != &path
            {
                return Err(RegistryError::Duplicate {
                    task: task.name.clone(),
                    first: other.display().to_string(),
                    second: path.display().to_string(),
                });
            }
        }
        self.remove(&path);
        for task in deployed.plugin.tasks() {
            self.tasks.insert(task.name.clone(), path.clone());
        }
        self.broken.remove(&path);
        self.files.insert(path, deployed);
        Ok(())
    }

    fn remove(&mut self, path: &Path) {
        if let Some(old) = self.files.remove(path) {
            for task in old.plugin.tasks() {
                if self.tasks.get(&task.name).is_some_and(|p| p == path) {
                    self.tasks.remove(&task.name);
                }
            }
        }
    }
}

/// What a rescan changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RescanReport {
    /// Files deployed for the first time.
    pub added: Vec<PathBuf>,
    /// Files whose new version replaced the old.
    pub replaced: Vec<PathBuf>,
    /// Files removed, with their tasks.
    pub removed: Vec<PathBuf>,
    /// Files that failed to load, with why (a previous version, if any, keeps serving).
    pub failed: Vec<(PathBuf, String)>,
}

/// Task name → plugin, optionally backed by a folder that is watched for changes.
pub struct Registry {
    sandbox: Arc<Sandbox>,
    folder: Option<PathBuf>,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("folder", &self.folder)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry of the given in-memory plugins (no folder, no hot deploy).
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when two plugins offer the same task.
    pub fn from_plugins(
        sandbox: Arc<Sandbox>,
        plugins: Vec<(String, Plugin)>,
    ) -> Result<Self, RegistryError> {
        let mut snapshot = Snapshot::default();
        for (name, plugin) in plugins {
            let fingerprint = Fingerprint {
                len: 0,
                modified: None,
            };
            snapshot.insert(
                PathBuf::from(name),
                Deployed {
                    plugin,
                    fingerprint,
                },
            )?;
        }
        Ok(Self {
            sandbox,
            folder: None,
            snapshot: RwLock::new(Arc::new(snapshot)),
        })
    }

    /// A registry of the plugins bundled in this binary (math, text, hostile, grants).
    ///
    /// # Errors
    /// When a bundled plugin cannot be loaded (a broken build).
    pub async fn bundled(sandbox: Arc<Sandbox>) -> Result<Self, RegistryError> {
        let mut plugins = Vec::new();
        for (name, bytes) in crate::bundled::ALL {
            plugins.push((
                (*name).to_owned(),
                sandbox.load_plugin_bytes(name, bytes).await?,
            ));
        }
        Self::from_plugins(sandbox, plugins)
    }

    /// Loads every `.wasm` file in `folder`. A file that fails to load is logged and skipped
    /// (its tasks are unknown until it is fixed); two files offering one task is an error.
    ///
    /// # Errors
    /// When the folder cannot be read, or on a duplicate task name.
    pub async fn load_folder(sandbox: Arc<Sandbox>, folder: &Path) -> Result<Self, RegistryError> {
        let registry = Self {
            sandbox,
            folder: Some(folder.to_path_buf()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
        };
        let report = registry.rescan_strict(true).await?;
        for (path, why) in &report.failed {
            tracing::error!(plugin = %path.display(), "cannot load plugin: {why}");
        }
        Ok(registry)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .snapshot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The plugin offering `task`, if any.
    pub fn lookup(&self, task: &str) -> Option<Plugin> {
        let snapshot = self.snapshot();
        let file = snapshot.tasks.get(task)?;
        snapshot.files.get(file).map(|d| d.plugin.clone())
    }

    /// The sandbox plugins run in.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// Brings the registry in line with the folder: deploys new and changed files, undeploys
    /// deleted ones. Problems are reported, never fatal: the previous version keeps serving.
    pub async fn rescan(&self) -> RescanReport {
        match self.rescan_strict(false).await {
            Ok(report) => report,
            Err(error) => RescanReport {
                failed: vec![(self.folder.clone().unwrap_or_default(), error.to_string())],
                ..RescanReport::default()
            },
        }
    }

    async fn rescan_strict(
        &self,
        duplicates_are_fatal: bool,
    ) -> Result<RescanReport, RegistryError> {
        let Some(folder) = &self.folder else {
            return Ok(RescanReport::default());
        };
        let mut report = RescanReport::default();
        let current = self.snapshot();
        let mut next = (*current).clone();
        let on_disk = wasm_files(folder)?;

        for path in current.files.keys() {
            if !on_disk.contains_key(path) {
                next.remove(path);
                report.removed.push(path.clone());
            }
        }
        next.broken.retain(|path, _| on_disk.contains_key(path));

        for (path, fingerprint) in &on_disk {
            let known = current.files.get(path);
            if known.is_some_and(|d| d.fingerprint == *fingerprint) {
                continue;
            }
            if current
                .broken
                .get(path)
                .is_some_and(|(f, _)| f == fingerprint)
            {
                continue;
            }
            let loaded = self.load_file(path).await;
            match loaded {
                Ok(plugin) => {
                    if known.is_some_and(|d| d.plugin.content_hash() == plugin.content_hash()) {
                        // Touched but unchanged: just remember the new fingerprint.
                        if let Some(d) = next.files.get_mut(path) {
                            d.fingerprint = *fingerprint;
                        }
                        continue;
                    }
                    let deployed = Deployed {
                        plugin,
                        fingerprint: *fingerprint,
                    };
                    match next.insert(path.clone(), deployed) {
                        Ok(()) if known.is_some() => report.replaced.push(path.clone()),
                        Ok(()) => report.added.push(path.clone()),
                        Err(error) if duplicates_are_fatal => return Err(error),
                        Err(error) => {
                            next.broken
                                .insert(path.clone(), (*fingerprint, error.to_string()));
                            report.failed.push((path.clone(), error.to_string()));
                        }
                    }
                }
                Err(error) => {
                    next.broken
                        .insert(path.clone(), (*fingerprint, error.to_string()));
                    report.failed.push((path.clone(), error.to_string()));
                }
            }
        }
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        Ok(report)
    }

    /// Compiles a plugin file on a blocking thread, so the executor keeps serving tasks.
    async fn load_file(&self, path: &Path) -> Result<Plugin, PluginError> {
        let sandbox = Arc::clone(&self.sandbox);
        let path = path.to_path_buf();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(sandbox.load_plugin(&path)))
            .await
            .unwrap_or_else(|e| {
                Err(PluginError::Describe {
                    name: "plugin".into(),
                    outcome: format!("loading panicked: {e}"),
                })
            })
    }

    /// Rescans the folder every `interval` until the returned task is aborted, logging each
    /// deploy, replacement, removal and failure.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let report = registry.rescan().await;
                for path in &report.added {
                    tracing::info!(plugin = %path.display(), tasks = %registry.task_names(path), "deployed");
                }
                for path in &report.replaced {
                    tracing::info!(plugin = %path.display(), tasks = %registry.task_names(path), "replaced");
                }
                for path in &report.removed {
                    tracing::info!(plugin = %path.display(), "undeployed");
                }
                for (path, why) in &report.failed {
                    tracing::error!(plugin = %path.display(), "not deployed, the previous version (if any) keeps serving: {why}");
                }
            }
        })
    }

    fn task_names(&self, path: &Path) -> String {
        let snapshot = self.snapshot();
        snapshot
            .files
            .get(path)
            .map(|d| {
                d.plugin
                    .tasks()
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }
}

/// The `.wasm` files directly in `folder`, with their fingerprints.
fn wasm_files(folder: &Path) -> Result<BTreeMap<PathBuf, Fingerprint>, RegistryError> {
    let entries = std::fs::read_dir(folder).map_err(|source| RegistryError::Folder {
        path: folder.display().to_string(),
        source,
    })?;
    let mut files = BTreeMap::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        files.insert(
            path,
            Fingerprint {
                len: meta.len(),
                modified: meta.modified().ok(),
            },
        );
    }
    Ok(files)
}
