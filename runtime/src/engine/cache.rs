//! The on-disk cache of precompiled plugin artifacts.
//!
//! Compiling a component with Cranelift takes a fraction of a second per plugin; loading a
//! precompiled artifact takes a fraction of a millisecond. Artifacts are keyed by the SHA-256
//! of the plugin's bytes *and* a hash of the engine's compatibility fingerprint (wasmtime
//! version, compiler settings, fuel/epoch instrumentation), so a changed plugin, a changed
//! engine configuration or a new wasmtime never loads a stale artifact: it simply misses.
//!
//! Only files this cache wrote are ever deserialized (deserializing is `unsafe` because an
//! artifact is native code). A file that fails to load is removed and recompiled.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a plugin's compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Loaded from a cached artifact.
    Hit,
    /// Compiled now (and stored, when a cache directory is configured).
    Compiled,
}

/// A directory of precompiled artifacts for one engine configuration.
#[derive(Debug, Clone)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_fingerprint: String,
}

/// The hex SHA-256 of a plugin's bytes: its identity everywhere in wasmq.
pub(crate) fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        use std::fmt::Write as _;
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// A stable fingerprint of what makes artifacts of `engine` loadable.
pub(crate) fn engine_fingerprint(engine: &Engine) -> String {
    // SipHasher with its fixed zero keys is deterministic across processes. Should a new
    // toolchain ever change it, the cache merely misses.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

impl ArtifactCache {
    /// A cache in `dir` (created on first store) for artifacts of `engine`.
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> Self {
        Self {
            dir,
            engine_fingerprint: engine_fingerprint(engine),
        }
    }

    /// The directory holding the artifacts.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The artifact path for a plugin with content hash `hash`.
    pub(crate) fn path_for(&self, hash: &str) -> PathBuf {
        self.dir
            .join(format!("{hash}-{}.cwasm", self.engine_fingerprint))
    }

    /// Loads the artifact for `hash` if one exists and is loadable.
    pub(crate) fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path_for(hash);
        // Read into memory rather than mapping the file: a mapped artifact that someone
        // truncates or rewrites in place would kill the whole process with SIGBUS.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: the file is at a path only this cache writes (content hash + engine
        // fingerprint), written by `store` from `Component::serialize` of the same engine
        // configuration; wasmtime additionally checks the header and engine compatibility.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize(engine, &bytes) };
        match loaded {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"),
                    "discarding an unloadable cached artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the compiled form of `component` for `hash`; failures are logged, not fatal
    /// (the cache is an optimisation).
    pub(crate) fn store(&self, hash: &str, component: &Component) {
        if let Err(error) = self.try_store(hash, component) {
            tracing::warn!(dir = %self.dir.display(), %error, "could not write a cached artifact");
        }
    }

    fn try_store(&self, hash: &str, component: &Component) -> std::io::Result<()> {
        let bytes = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        std::fs::create_dir_all(&self.dir)?;
        // Write to a unique temporary file, then rename: readers never see a partial file,
        // and concurrent writers of the same artifact do not interfere.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.path_for(hash)).map_err(|e| e.error)?;
        Ok(())
    }
}
