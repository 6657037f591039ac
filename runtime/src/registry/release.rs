//! Release mode: the registry serves one verified release at a time. A release replaces the
//! snapshot all at once or not at all: every plugin it names (and its canary) is loaded —
//! reused when a plugin with the same digest is already loaded, else compiled on a blocking
//! thread from bytes whose digest was checked — before the swap, so no task ever runs on a
//! half-applied release, and tasks already running keep the version they started with.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{Deployed, Fingerprint, Registry, ServedCanary, Snapshot};
use crate::engine::Plugin;
use crate::releases::{Release, StoreError};
use crate::signing::{SignatureError, sha256_hex};

/// Why a release is not applied (the previous one keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The release is not newer than the one served: replayed or stale.
    #[error(
        "epoch {epoch} is not newer than epoch {serving}, which this worker serves: refused as a replay"
    )]
    Stale {
        /// The epoch offered.
        epoch: u64,
        /// The epoch served.
        serving: u64,
    },
    /// The store lists the release under one epoch, but its manifest was signed for
    /// another: an old manifest published again.
    #[error(
        "the store lists epoch {listed}, but its manifest is signed as epoch {signed}: refused as a replay"
    )]
    Misfiled {
        /// The epoch the store lists it under.
        listed: u64,
        /// The epoch signed.
        signed: u64,
    },
    /// The manifest's signature, tenant or a blob's digest is not what the tenant trusts.
    #[error("epoch {epoch}: {source}")]
    Untrusted {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: SignatureError,
    },
    /// The store lacks the bytes a release names.
    #[error("epoch {epoch}: the store has no bytes for plugin {plugin} ({digest})")]
    MissingBlob {
        /// The epoch.
        epoch: u64,
        /// The plugin.
        plugin: String,
        /// Its digest.
        digest: String,
    },
    /// A plugin of the release does not load.
    #[error("epoch {epoch}: plugin {plugin}: {reason}")]
    Plugin {
        /// The epoch.
        epoch: u64,
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// The store cannot be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReleaseError {
    /// True when trying again later may succeed (the store was unreachable); a refused or
    /// broken release stays refused until a newer one is published.
    pub fn is_transient(&self) -> bool {
        matches!(self, ReleaseError::Store(e) if e.is_transient())
    }
}

impl Registry {
    /// Serves `release`, whose manifest was verified, from `blobs` (digest → bytes) and the
    /// plugins already loaded. All or nothing: on error the previous release keeps serving.
    ///
    /// # Errors
    /// A stale epoch, a missing or altered blob, a plugin that does not load, two plugins
    /// offering one task.
    pub async fn apply_release(
        &self,
        release: &Release,
        blobs: &HashMap<String, Vec<u8>>,
    ) -> Result<(), ReleaseError> {
        let current = self.snapshot();
        if let Some(serving) = current.epoch
            && release.epoch <= serving
        {
            return Err(ReleaseError::Stale {
                epoch: release.epoch,
                serving,
            });
        }
        let mut next = Snapshot {
            epoch: Some(release.epoch),
            ..Snapshot::default()
        };
        for (name, digest) in &release.plugins {
            let plugin = self
                .plugin_of(&current, release.epoch, name, digest, blobs)
                .await?;
            let deployed = Deployed {
                plugin,
                fingerprint: Fingerprint::default(),
            };
            next.insert(PathBuf::from(name), deployed)
                .map_err(|e| ReleaseError::Plugin {
                    epoch: release.epoch,
                    plugin: name.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(canary) = &release.canary {
            let plugin = self
                .plugin_of(
                    &current,
                    release.epoch,
                    &canary.plugin,
                    &canary.sha256,
                    blobs,
                )
                .await?;
            next.canary = Some(ServedCanary {
                canary: canary.clone(),
                plugin,
            });
        }
        self.swap(next);
        Ok(())
    }

    /// The plugin `name` with bytes `digest`: the one loaded already, or loaded now.
    async fn plugin_of(
        &self,
        current: &Snapshot,
        epoch: u64,
        name: &str,
        digest: &str,
        blobs: &HashMap<String, Vec<u8>>,
    ) -> Result<Plugin, ReleaseError> {
        if let Some(plugin) = current.loaded_with_digest(digest)
            && plugin.name() == name
        {
            return Ok(plugin);
        }
        let bytes = blobs.get(digest).ok_or_else(|| ReleaseError::MissingBlob {
            epoch,
            plugin: name.to_owned(),
            digest: digest.to_owned(),
        })?;
        let found = sha256_hex(bytes);
        if found != digest {
            return Err(ReleaseError::Untrusted {
                epoch,
                source: SignatureError::DigestMismatch {
                    plugin: name.to_owned(),
                    signed: digest.to_owned(),
                    found,
                },
            });
        }
        self.load_bytes(name, bytes.clone())
            .await
            .map_err(|e| ReleaseError::Plugin {
                epoch,
                plugin: name.to_owned(),
                reason: e.to_string(),
            })
    }
}
