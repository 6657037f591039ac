//! Loading a plugin: from bytes to a ready-to-instantiate, described [`Plugin`].
//!
//! Loading checks, in order, that the file is WebAssembly, that it is a component (not a
//! core module or a precompiled artifact), compiles it (or loads the cached artifact), links
//! it against WASI p2 and the `host` interface, checks that it exports the `wasmq:task`
//! world, and calls its `describe` in a sandbox of its own. Each step fails with its own
//! [`PluginError`] and a message a person can act on.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::Component;

use super::cache::{CacheStatus, content_hash};
use super::contract::{self, PluginPre};
use super::limits::{LimitOverrides, Limits};
use super::{CallError, Outcome, Sandbox};

/// A task a plugin offers, as its `describe` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Full task name, e.g. `math.add`.
    pub name: String,
    /// Documentation.
    pub doc: String,
    /// Parameter names in positional order.
    pub params: Vec<String>,
    /// Default limits the plugin asks for.
    pub limits: LimitOverrides,
    /// The soft time limit the plugin declares (Celery's `soft_time_limit` task
    /// attribute), used when a message sets none.
    pub soft_timeout: Option<std::time::Duration>,
    /// Celery's `ignore_result` task attribute: a message that does not say whether to
    /// store its result follows this.
    pub ignore_result: bool,
    /// Default retry and rate-limit policy the plugin declares.
    pub policy: crate::policy::PolicyOverrides,
}

/// Why a plugin file cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not WebAssembly at all.
    #[error("{name} is not a WebAssembly file")]
    NotWasm {
        /// The plugin's name.
        name: String,
    },
    /// A core module, not a component.
    #[error(
        "{name} is a core wasm module, not a component: build the plugin with `--target wasm32-wasip2`"
    )]
    CoreModule {
        /// The plugin's name.
        name: String,
    },
    /// A precompiled artifact (`.cwasm`); only components are accepted.
    #[error("{name} is a precompiled artifact; give wasmq the .wasm component instead")]
    Precompiled {
        /// The plugin's name.
        name: String,
    },
    /// The component does not compile (invalid or uses unsupported features).
    #[error("{name} is not a valid component: {reason}")]
    Invalid {
        /// The plugin's name.
        name: String,
        /// wasmtime's explanation.
        reason: String,
    },
    /// The component imports something wasmq does not provide, or does not export the
    /// `wasmq:task/plugin` interface of a version this worker serves.
    #[error("{name} does not implement the wasmq:task/task-plugin world ({served}): {reason}", served = contract::SERVED)]
    WrongWorld {
        /// The plugin's name.
        name: String,
        /// What is missing.
        reason: String,
    },
    /// `describe` failed, trapped or hit a limit.
    #[error("{name}: describe {outcome}")]
    Describe {
        /// The plugin's name.
        name: String,
        /// How describe ended.
        outcome: String,
    },
    /// `describe` returned something unusable (no tasks, duplicates, bad names).
    #[error("{name}: {reason}")]
    BadDescription {
        /// The plugin's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// A compiled, described plugin, ready to be instantiated for each call. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    name: String,
    content_hash: String,
    tasks: Vec<TaskInfo>,
    pre: PluginPre,
    cache_status: CacheStatus,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("content_hash", &self.inner.content_hash)
            .field("tasks", &self.inner.tasks)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's name (its file stem, e.g. `math` for `math.wasm`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The hex SHA-256 of the plugin's bytes.
    pub fn content_hash(&self) -> &str {
        &self.inner.content_hash
    }

    /// The tasks the plugin offers.
    pub fn tasks(&self) -> &[TaskInfo] {
        &self.inner.tasks
    }

    /// The task named `name`, if the plugin offers it.
    pub fn task(&self, name: &str) -> Option<&TaskInfo> {
        self.inner.tasks.iter().find(|t| t.name == name)
    }

    /// The version of the WIT contract the plugin was built for (`0.3.0`, or `0.2.0` for a
    /// plugin built with the previous SDK, which the worker still serves).
    pub fn contract_version(&self) -> &'static str {
        self.inner.pre.version()
    }

    /// Whether the compiled code came from the artifact cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.inner.cache_status
    }

    pub(crate) fn instance_pre(&self) -> &PluginPre {
        &self.inner.pre
    }
}

/// Component binary header: `\0asm`, then version 0x0d and layer 1.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
const COMPONENT_VERSION_LAYER: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// The limits `describe` runs under: it must be quick and small.
const DESCRIBE_LIMITS: Limits = Limits {
    fuel: 1_000_000_000,
    memory_bytes: 64 << 20,
    timeout: std::time::Duration::from_secs(5),
};

impl Sandbox {
    /// Loads the plugin at `path`; its name is the file stem.
    ///
    /// This compiles the component (or loads its cached artifact): call it off the hot path,
    /// e.g. in `spawn_blocking`, and share the result.
    ///
    /// # Errors
    /// A [`PluginError`] naming the file and what is wrong with it.
    pub async fn load_plugin(&self, path: &Path) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        self.load_plugin_bytes(&name, &bytes).await
    }

    /// Loads a plugin from its bytes under the given name.
    ///
    /// # Errors
    /// A [`PluginError`] naming the plugin and what is wrong with it.
    pub async fn load_plugin_bytes(&self, name: &str, bytes: &[u8]) -> Result<Plugin, PluginError> {
        let name = name.to_owned();
        if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
            if wasmtime::Engine::detect_precompiled(bytes).is_some() {
                return Err(PluginError::Precompiled { name });
            }
            return Err(PluginError::NotWasm { name });
        }
        if bytes[4..8] != COMPONENT_VERSION_LAYER {
            return Err(PluginError::CoreModule { name });
        }
        let hash = content_hash(bytes);
        let (component, cache_status) = self.compile(&name, &hash, bytes)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::WrongWorld {
                name: name.clone(),
                reason: format!("{e:#}"),
            })?;
        let pre = PluginPre::new(pre).map_err(|e| PluginError::WrongWorld {
            name: name.clone(),
            reason: format!("{e:#}"),
        })?;
        if !matches!(pre, PluginPre::Current(_)) {
            tracing::warn!(
                plugin = %name,
                "built for wasmq:task@{}: served, but rebuild it with the current SDK for \
                 exception arguments and retry(exc=…)",
                pre.version()
            );
        }
        let tasks = self.describe(&name, &pre).await?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name,
                content_hash: hash,
                tasks,
                pre,
                cache_status,
            }),
        })
    }

    fn compile(
        &self,
        name: &str,
        hash: &str,
        bytes: &[u8],
    ) -> Result<(Component, CacheStatus), PluginError> {
        if let Some(cache) = &self.cache
            && let Some(component) = cache.load(&self.engine, hash)
        {
            tracing::debug!(plugin = name, "loaded the cached artifact");
            return Ok((component, CacheStatus::Hit));
        }
        let started = Instant::now();
        self.compiled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Invalid {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        tracing::debug!(plugin = name, elapsed = ?started.elapsed(), "compiled");
        if let Some(cache) = &self.cache {
            cache.store(hash, &component);
            tracing::debug!(plugin = name, dir = %cache.dir().display(), "cached the artifact");
        }
        Ok((component, CacheStatus::Compiled))
    }

    async fn describe(&self, name: &str, pre: &PluginPre) -> Result<Vec<TaskInfo>, PluginError> {
        let failed = |outcome: String| PluginError::Describe {
            name: name.to_owned(),
            outcome,
        };
        let limits = DESCRIBE_LIMITS;
        let (mut store, captured) = self
            .new_store(
                &limits,
                "describe",
                &format!("{name}.describe"),
                &super::Grants::default(),
                None,
                None,
                None,
            )
            .map_err(|e: CallError| failed(e.to_string()))?;
        let result = async {
            let instance = pre.instantiate(&mut store).await?;
            instance.describe(&mut store).await
        }
        .await;
        captured.forward_to_log("describe", name, &[]);
        let described = match result {
            Ok(described) => described,
            Err(error) => {
                let outcome: Outcome = self.classify(&error, &store, &captured, &limits);
                return Err(failed(outcome.to_string()));
            }
        };
        let bad = |reason: String| PluginError::BadDescription {
            name: name.to_owned(),
            reason,
        };
        if described.is_empty() {
            return Err(bad("the plugin exports no tasks".to_owned()));
        }
        let mut tasks: Vec<TaskInfo> = Vec::with_capacity(described.len());
        for task in described {
            if task.name.is_empty()
                || task.name.len() > 256
                || task.name.chars().any(char::is_whitespace)
            {
                return Err(bad(format!("invalid task name {:?}", task.name)));
            }
            if tasks.iter().any(|t| t.name == task.name) {
                return Err(bad(format!("task {} is declared twice", task.name)));
            }
            let declared = task.policy;
            let rate_limit = match declared.rate_limit.as_deref() {
                Some(text) => Some(crate::policy::RateLimit::parse(text).map_err(|e| {
                    bad(format!(
                        "task {} declares an invalid rate limit: {e}",
                        task.name
                    ))
                })?),
                None => None,
            };
            let ms = |v: Option<u64>| v.map(std::time::Duration::from_millis);
            let policy = crate::policy::PolicyOverrides {
                autoretry_for: Some(declared.autoretry_for).filter(|k| !k.is_empty()),
                max_retries: declared.max_retries,
                default_retry_delay: ms(declared.default_retry_delay_ms),
                retry_backoff: ms(declared.retry_backoff_ms),
                retry_backoff_max: ms(declared.retry_backoff_max_ms),
                retry_jitter: declared.retry_jitter,
                rate_limit,
            };
            tasks.push(TaskInfo {
                policy,
                name: task.name,
                doc: task.doc,
                params: task.params,
                limits: LimitOverrides {
                    fuel: task.limits.fuel,
                    memory_bytes: task.limits.memory_bytes,
                    timeout: ms(task.limits.timeout_ms),
                },
                soft_timeout: ms(task.limits.soft_timeout_ms),
                ignore_result: task.ignore_result,
            });
        }
        Ok(tasks)
    }
}
