//! The plugin registry: task name → plugin, kept current by hot deploys.
//!
//! The registry holds an immutable [`Snapshot`] behind a lock that is only ever held to
//! clone or replace an `Arc`: a lookup clones the plugin (an `Arc`), so a running task keeps
//! the version it started with while a new one is swapped in. A snapshot changes in one of
//! two ways, each building the next snapshot off to the side (compiling on a blocking
//! thread) and swapping it in whole:
//!
//! * **folder mode** ([`Registry::load_folder`], `folder.rs`): the folder is rescanned, new
//!   and changed `.wasm` files are checked against the tenant's [`TrustPolicy`] (their
//!   `.wasm.sig`) *before* anything compiles them, then deployed; a file that fails to load
//!   or is refused is reported and the previous version keeps serving;
//! * **release mode** ([`Registry::for_releases`], `release.rs`): a verified release (plugin
//!   name → digest, an optional canary) replaces the snapshot all at once, or not at all.
//!
//! A release's canary is chosen per workflow ([`Registry::lookup_for`]): by a hash of the
//! task's `root_id`, the same on every worker.

mod folder;
mod release;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

pub use release::ReleaseError;

use crate::engine::{Plugin, PluginError, Sandbox};
use crate::releases::Canary;
use crate::signing::TrustPolicy;

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

/// What tells a file changed without reading it: the plugin's size and time, and its
/// signature file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    signature: Option<(u64, Option<SystemTime>)>,
}

/// A release's canary as served: the release's choice and the loaded plugin.
#[derive(Debug, Clone)]
struct ServedCanary {
    canary: Canary,
    plugin: Plugin,
}

/// One immutable view of what is deployed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Task name → the file (or release plugin name) that provides it.
    tasks: HashMap<String, PathBuf>,
    /// File → its plugin.
    files: BTreeMap<PathBuf, Deployed>,
    /// Files that failed to load or were refused, with why and the fingerprint that failed
    /// (not retried until the file changes).
    broken: BTreeMap<PathBuf, (Fingerprint, String)>,
    /// The release served, in release mode.
    epoch: Option<u64>,
    /// The release's canary.
    canary: Option<ServedCanary>,
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

    /// Files that failed to load or were refused, with the reason.
    pub fn broken(&self) -> Vec<(PathBuf, String)> {
        self.broken
            .iter()
            .map(|(p, (_, why))| (p.clone(), why.clone()))
            .collect()
    }

    /// The release epoch served, in release mode.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Plugin name → the digest served (a canary as `<name> (canary <percent>%)`).
    pub fn plugins(&self) -> BTreeMap<String, String> {
        let mut plugins: BTreeMap<String, String> = self
            .files
            .values()
            .map(|d| {
                (
                    d.plugin.name().to_owned(),
                    d.plugin.content_hash().to_owned(),
                )
            })
            .collect();
        if let Some(served) = &self.canary {
            plugins.insert(
                format!(
                    "{} (canary {}%)",
                    served.canary.plugin, served.canary.percent
                ),
                served.plugin.content_hash().to_owned(),
            );
        }
        plugins
    }

    /// True when a plugin with these bytes is loaded (so a release need not fetch it).
    pub fn serves_digest(&self, digest: &str) -> bool {
        self.files
            .values()
            .any(|d| d.plugin.content_hash() == digest)
            || self
                .canary
                .as_ref()
                .is_some_and(|c| c.plugin.content_hash() == digest)
    }

    fn loaded_with_digest(&self, digest: &str) -> Option<Plugin> {
        self.files
            .values()
            .map(|d| &d.plugin)
            .chain(self.canary.as_ref().map(|c| &c.plugin))
            .find(|p| p.content_hash() == digest)
            .cloned()
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
    /// Files that failed to load or were refused, with why (a previous version, if any,
    /// keeps serving).
    pub failed: Vec<(PathBuf, String)>,
}

/// Task name → plugin, optionally backed by a folder that is watched for changes, or by
/// releases.
pub struct Registry {
    sandbox: Arc<Sandbox>,
    folder: Option<PathBuf>,
    /// What a plugin file must carry to load (folder mode); none: anything loads.
    trust: Option<TrustPolicy>,
    /// The tenant whose releases this registry serves (release mode): the canary's hash
    /// includes it.
    tenant: Option<String>,
    snapshot: RwLock<Arc<Snapshot>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("folder", &self.folder)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Registry {
    fn with(sandbox: Arc<Sandbox>, snapshot: Snapshot) -> Self {
        Self {
            sandbox,
            folder: None,
            trust: None,
            tenant: None,
            snapshot: RwLock::new(Arc::new(snapshot)),
        }
    }

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
            snapshot.insert(
                PathBuf::from(name),
                Deployed {
                    plugin,
                    fingerprint: Fingerprint::default(),
                },
            )?;
        }
        Ok(Self::with(sandbox, snapshot))
    }

    /// A registry of the plugins bundled in this binary (math, text, hostile, grants, stamp).
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

    /// An empty registry that serves `tenant`'s releases, once [`Registry::apply_release`]
    /// gives it one.
    pub fn for_releases(sandbox: Arc<Sandbox>, tenant: &str) -> Self {
        let mut registry = Self::with(sandbox, Snapshot::default());
        registry.tenant = Some(tenant.to_owned());
        registry
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

    fn swap(&self, next: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }

    /// The plugin offering `task`, if any (a canary never: see [`Registry::lookup_for`]).
    pub fn lookup(&self, task: &str) -> Option<Plugin> {
        let snapshot = self.snapshot();
        let file = snapshot.tasks.get(task)?;
        snapshot.files.get(file).map(|d| d.plugin.clone())
    }

    /// The plugin offering `task` to the workflow `root_id`: the release's canary when its
    /// hash of the root falls in the canary's share (or only the canary offers the task),
    /// else the stable version. Every step, member and retry of one workflow shares its
    /// root, so a workflow never mixes versions, and every worker chooses alike.
    pub fn lookup_for(&self, task: &str, root_id: &str) -> Option<Plugin> {
        let snapshot = self.snapshot();
        let stable = snapshot
            .tasks
            .get(task)
            .and_then(|file| snapshot.files.get(file))
            .map(|d| d.plugin.clone());
        if let Some(served) = &snapshot.canary
            && served.plugin.task(task).is_some()
        {
            let tenant = self.tenant.as_deref().unwrap_or_default();
            if stable.is_none() || served.canary.selects(tenant, root_id) {
                return Some(served.plugin.clone());
            }
        }
        stable
    }

    /// The sandbox plugins run in.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// Compiles a plugin on a blocking thread, so the executor keeps serving tasks.
    async fn load_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<Plugin, PluginError> {
        let sandbox = Arc::clone(&self.sandbox);
        let name = name.to_owned();
        let handle = tokio::runtime::Handle::current();
        let shown = name.clone();
        tokio::task::spawn_blocking(move || {
            handle.block_on(sandbox.load_plugin_bytes(&name, &bytes))
        })
        .await
        .unwrap_or_else(|e| {
            Err(PluginError::Describe {
                name: shown,
                outcome: format!("loading panicked: {e}"),
            })
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
