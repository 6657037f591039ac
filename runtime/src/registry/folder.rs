//! Folder mode: the registry follows a folder of `.wasm` files. A rescan compares the folder
//! with the snapshot (size and modification time of each plugin and of its `.wasm.sig`,
//! then the content hash), checks each new or changed file against the tenant's
//! [`TrustPolicy`] — a hash and a signature check, never a compile — then compiles what
//! passes on a blocking thread and swaps the new snapshot in. A file that fails to load or
//! is refused is reported (and kept in the snapshot's `broken` list, which the status file
//! shows) and the previous version keeps serving; a deleted file undeploys its tasks; a
//! task name claimed by two files is refused, naming both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tracing::Instrument as _;

use super::{Deployed, Fingerprint, Registry, RegistryError, RescanReport, Snapshot};
use crate::engine::Sandbox;
use crate::signing::{TrustPolicy, signature_path};

impl Registry {
    /// Loads every `.wasm` file in `folder` that `trust` accepts (every file, without a
    /// policy). A file that fails to load or is refused is logged and skipped (its tasks are
    /// unknown until it is fixed); two files offering one task is an error.
    ///
    /// # Errors
    /// When the folder cannot be read, or on a duplicate task name.
    pub async fn load_folder(
        sandbox: Arc<Sandbox>,
        folder: &Path,
        trust: Option<TrustPolicy>,
    ) -> Result<Self, RegistryError> {
        let registry = Self {
            sandbox,
            folder: Some(folder.to_path_buf()),
            trust,
            tenant: None,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
        };
        let report = registry.rescan_strict(true).await?;
        for (path, why) in &report.failed {
            tracing::error!(plugin = %path.display(), "cannot load plugin: {why}");
        }
        Ok(registry)
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
            let refuse = |next: &mut Snapshot, report: &mut RescanReport, why: String| {
                next.broken
                    .insert(path.clone(), (*fingerprint, why.clone()));
                report.failed.push((path.clone(), why));
            };
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    refuse(
                        &mut next,
                        &mut report,
                        format!("cannot read {}: {error}", path.display()),
                    );
                    continue;
                }
            };
            let name = plugin_name(path);
            if let Err(why) = self.check_signature(&name, path, &bytes) {
                refuse(&mut next, &mut report, why);
                continue;
            }
            match self.load_bytes(&name, bytes).await {
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
                        Err(error) => refuse(&mut next, &mut report, error.to_string()),
                    }
                }
                Err(error) => refuse(&mut next, &mut report, error.to_string()),
            }
        }
        self.swap(next);
        Ok(report)
    }

    /// Checks a plugin file against the trust policy, if any: its bytes against its
    /// `.wasm.sig`. Nothing is compiled or run before this passes.
    fn check_signature(&self, name: &str, path: &Path, bytes: &[u8]) -> Result<(), String> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let signature = match std::fs::read_to_string(signature_path(path)) {
            Ok(text) => Some(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(format!("cannot read its signature: {error}")),
        };
        trust
            .check(name, bytes, signature.as_deref(), chrono::Utc::now())
            .map_err(|e| format!("refused: {e}"))
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
        }.in_current_span())
    }
}

/// A plugin's name: its file stem (`math` for `math.wasm`).
fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The size and modification time of a file, if it is one.
fn stat(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| (meta.len(), meta.modified().ok()))
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
        let Some((len, modified)) = stat(&path) else {
            continue;
        };
        let signature = stat(&signature_path(&path));
        files.insert(
            path,
            Fingerprint {
                len,
                modified,
                signature,
            },
        );
    }
    Ok(files)
}
