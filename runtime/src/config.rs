//! Worker configuration: raw values from a TOML file, `WASMQ_*` environment variables and
//! command-line flags, merged with precedence flags > environment > file > defaults into a
//! validated [`WorkerConfig`].
//!
//! Over 800 lines for one idea, the worker's configuration: the documented list of every
//! key below, one resolver that validates each, and the tests of its precedence and errors.
//!
//! The file is strict: an unknown key is an error that names it. Every key:
//!
//! ```toml
//! broker = "sqlite://.wasmq/wasmq.db"          # WASMQ_BROKER, --broker
//! result_backend = "sqlite://.wasmq/wasmq.db"  # WASMQ_RESULT_BACKEND, --result-backend
//! scheduler = "redis://127.0.0.1:6379/0"       # WASMQ_SCHEDULER, --scheduler (default: none,
//!                                              # the broker delays messages itself)
//! plugins = ".wasmq/plugins"                   # WASMQ_PLUGINS, --plugins
//! queues = ["celery"]                          # WASMQ_QUEUES, --queues a,b
//! concurrency = 2                              # WASMQ_CONCURRENCY, --concurrency (default: CPUs)
//! prefetch_multiplier = 64                     # WASMQ_PREFETCH_MULTIPLIER, --prefetch-multiplier
//! node_name = "wasmq@host"                     # WASMQ_NODE_NAME, --name
//! shutdown_timeout = "30s"                     # WASMQ_SHUTDOWN_TIMEOUT, --shutdown-timeout
//! result_expires = "1day"                      # WASMQ_RESULT_EXPIRES, --result-expires
//! track_started = false                        # WASMQ_TRACK_STARTED, --track-started
//! max_retries = 3                              # WASMQ_MAX_RETRIES, --max-retries
//! default_retry_delay = "3m"                   # WASMQ_DEFAULT_RETRY_DELAY, --default-retry-delay
//! cache_dir = "~/.cache/wasmq/artifacts"       # WASMQ_CACHE_DIR, --cache-dir
//! cpu_metering = "time"                        # WASMQ_CPU_METERING, --cpu-metering: how a
//!                                              # task's fuel budget is enforced: "time" (CPU
//!                                              # time, 10^10 fuel = 1 s) or "fuel" (exact)
//! max_deliveries = 10                          # WASMQ_MAX_DELIVERIES, --max-deliveries
//! queue_max_priority = 10                      # WASMQ_QUEUE_MAX_PRIORITY, --queue-max-priority
//! trusted_keys = ["ed25519:…", "keys/ops.pub"] # WASMQ_TRUSTED_KEYS, --trusted-key (keys or files)
//! require_signatures = false                   # WASMQ_REQUIRE_SIGNATURES, --require-signatures
//! plugin_store = "redis://127.0.0.1:6379/0"    # WASMQ_PLUGIN_STORE, --plugin-store: serve the
//!                                              # store's signed releases instead of the folder
//! task_events = false                          # WASMQ_TASK_EVENTS, --task-events/-E (Celery events)
//! heartbeat_interval = "2s"                    # WASMQ_HEARTBEAT_INTERVAL, --heartbeat-interval;
//!                                              # "off" (--without-heartbeat): no worker events
//! autoscale = "16,2"                           # WASMQ_AUTOSCALE, --autoscale MAX,MIN; "auto"
//!                                              # (--concurrency auto): 8 per CPU (8-64), min 1 per CPU
//! autoscale_keepalive = "30s"                  # WASMQ_AUTOSCALE_KEEPALIVE, --autoscale-keepalive
//! autoscale_memory = "4GiB"                    # WASMQ_AUTOSCALE_MEMORY, --autoscale-memory: what
//!                                              # the running tasks' memory limits may add up to
//!                                              # (default: none; with auto, half the machine's)
//!
//! [tasks."math.flaky"]   # per-task policy (Celery's task_annotations); a key may be a glob
//! autoretry_for = ["ConnectionError"]
//! max_retries = 5
//! default_retry_delay = "10s"
//! retry_backoff = "1s"
//! retry_backoff_max = "10m"
//! retry_jitter = true
//! rate_limit = "10/s"
//!
//! [routes]        # task name or glob → queue, for clients (Celery's task_routes)
//! "math.*" = "math"
//!
//! [limits]        # defaults for tasks that do not say (WASMQ_FUEL, --fuel, …)
//! fuel = 10000000000
//! memory = "128MiB"
//! timeout = "30s"
//!
//! [ceiling]       # what no task, plugin or message can exceed
//! fuel = 100000000000
//! memory = "1GiB"
//! timeout = "1h"
//!
//! [tenants.acme]  # tenants sharing the worker: see `crate::tenancy` for every key
//! broker = "amqp://acme:secret@127.0.0.1:5672/acme"
//! plugins = "/srv/wasmq/acme/plugins"
//! ```
//!
//! Longer than 400 lines for one idea, the worker's configuration: the raw layer, the merge
//! of sources and the validation stay together, with the golden tests of bad configs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::autoscale::AutoscalePolicy;
use crate::engine::{CpuMetering, Limits};
use crate::policy::{PolicyOverrides, RetryPolicy, TaskAnnotations};
use crate::routes::TaskRoutes;
use crate::signing::TrustPolicy;
use crate::tenancy::{RawTenant, TenantConfig};
pub use crate::units::RawLimits;
use crate::units::{parse_bytes, parse_duration};
use crate::worker::WorkerOptions;

/// The embedded default broker and result backend.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://.wasmq/wasmq.db";
/// The default plugin folder.
pub const DEFAULT_PLUGIN_FOLDER: &str = ".wasmq/plugins";

/// Configuration as said by one source; `None` means "not said here".
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Broker URL.
    pub broker: Option<String>,
    /// Result backend URL.
    pub result_backend: Option<String>,
    /// Redis URL of the scheduler holding delayed messages (none: the broker holds them).
    pub scheduler: Option<String>,
    /// Plugin folder.
    pub plugins: Option<PathBuf>,
    /// Queues to consume.
    pub queues: Option<Vec<String>>,
    /// Tasks run at once.
    pub concurrency: Option<usize>,
    /// Prefetch per slot.
    pub prefetch_multiplier: Option<usize>,
    /// Node name.
    pub node_name: Option<String>,
    /// Graceful shutdown timeout.
    pub shutdown_timeout: Option<String>,
    /// Result retention.
    pub result_expires: Option<String>,
    /// Store STARTED states.
    pub track_started: Option<bool>,
    /// Retries before MaxRetriesExceededError.
    pub max_retries: Option<u32>,
    /// Retry delay when a task gives none.
    pub default_retry_delay: Option<String>,
    /// Artifact cache folder.
    pub cache_dir: Option<PathBuf>,
    /// How a task's CPU budget is enforced: `time` or `fuel`.
    pub cpu_metering: Option<String>,
    /// Default task limits.
    pub limits: Option<RawLimits>,
    /// Ceiling limits.
    pub ceiling: Option<RawLimits>,
    /// Deliveries of one message before it is dead-lettered as poison.
    pub max_deliveries: Option<u32>,
    /// `x-max-priority` for queues wasmq declares on RabbitMQ.
    pub queue_max_priority: Option<u8>,
    /// Per-task policies by task name or glob.
    pub tasks: Option<BTreeMap<String, PolicyOverrides>>,
    /// Task routes: task name or glob → queue.
    pub routes: Option<BTreeMap<String, String>>,
    /// Tenants by id (none: one implicit tenant, the top-level keys).
    pub tenants: Option<BTreeMap<String, RawTenant>>,
    /// Keys (`ed25519:…`) or files of keys trusted to sign the implicit tenant's plugins
    /// and releases.
    pub trusted_keys: Option<Vec<String>>,
    /// Refuse plugin files without a valid `.wasm.sig`.
    pub require_signatures: Option<bool>,
    /// The plugin store whose releases the worker serves (`sqlite://…`, `redis://…`);
    /// tenants inherit it unless they name their own.
    pub plugin_store: Option<String>,
    /// Send task events (Celery's `-E`).
    pub task_events: Option<bool>,
    /// The worker heartbeat interval (`2s`), or `off` for no worker events.
    pub heartbeat_interval: Option<String>,
    /// Autoscaling bounds, `MAX,MIN` (or `MAX`), or `auto`.
    pub autoscale: Option<String>,
    /// How long the demand must stay lower before the autoscaler shrinks.
    pub autoscale_keepalive: Option<String>,
    /// What the running tasks' memory limits may add up to while autoscaling.
    pub autoscale_memory: Option<String>,
}

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid (unknown key, wrong type…).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's explanation, naming the key.
        message: String,
    },
    /// A tenant's table is not valid.
    #[error(transparent)]
    Tenant(#[from] crate::tenancy::TenantError),
    /// A value is not valid.
    #[error("{key}: {message}")]
    Invalid {
        /// The option.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl RawConfig {
    /// Reads a strict TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`] (naming an unknown key).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses strict TOML text.
    ///
    /// # Errors
    /// toml's message (which names an unknown key).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().trim().to_owned())
    }

    /// Fills what `self` leaves unset from `lower` (a lower-precedence source).
    #[must_use]
    pub fn or(self, lower: RawConfig) -> RawConfig {
        RawConfig {
            broker: self.broker.or(lower.broker),
            result_backend: self.result_backend.or(lower.result_backend),
            scheduler: self.scheduler.or(lower.scheduler),
            plugins: self.plugins.or(lower.plugins),
            queues: self.queues.or(lower.queues),
            concurrency: self.concurrency.or(lower.concurrency),
            prefetch_multiplier: self.prefetch_multiplier.or(lower.prefetch_multiplier),
            node_name: self.node_name.or(lower.node_name),
            shutdown_timeout: self.shutdown_timeout.or(lower.shutdown_timeout),
            result_expires: self.result_expires.or(lower.result_expires),
            track_started: self.track_started.or(lower.track_started),
            max_retries: self.max_retries.or(lower.max_retries),
            default_retry_delay: self.default_retry_delay.or(lower.default_retry_delay),
            cache_dir: self.cache_dir.or(lower.cache_dir),
            cpu_metering: self.cpu_metering.or(lower.cpu_metering),
            limits: merge_limits(self.limits, lower.limits),
            ceiling: merge_limits(self.ceiling, lower.ceiling),
            max_deliveries: self.max_deliveries.or(lower.max_deliveries),
            queue_max_priority: self.queue_max_priority.or(lower.queue_max_priority),
            tasks: merge_maps(self.tasks, lower.tasks),
            routes: merge_maps(self.routes, lower.routes),
            tenants: merge_maps(self.tenants, lower.tenants),
            trusted_keys: self.trusted_keys.or(lower.trusted_keys),
            require_signatures: self.require_signatures.or(lower.require_signatures),
            plugin_store: self.plugin_store.or(lower.plugin_store),
            task_events: self.task_events.or(lower.task_events),
            heartbeat_interval: self.heartbeat_interval.or(lower.heartbeat_interval),
            autoscale: self.autoscale.or(lower.autoscale),
            autoscale_keepalive: self.autoscale_keepalive.or(lower.autoscale_keepalive),
            autoscale_memory: self.autoscale_memory.or(lower.autoscale_memory),
        }
    }
}

/// Entries of `high` replace those of `low` with the same key.
fn merge_maps<V>(
    high: Option<BTreeMap<String, V>>,
    low: Option<BTreeMap<String, V>>,
) -> Option<BTreeMap<String, V>> {
    match (high, low) {
        (Some(high), Some(mut low)) => {
            low.extend(high);
            Some(low)
        }
        (h, l) => h.or(l),
    }
}

fn merge_limits(high: Option<RawLimits>, low: Option<RawLimits>) -> Option<RawLimits> {
    match (high, low) {
        (Some(h), Some(l)) => Some(RawLimits {
            fuel: h.fuel.or(l.fuel),
            memory: h.memory.or(l.memory),
            timeout: h.timeout.or(l.timeout),
        }),
        (h, l) => h.or(l),
    }
}

/// The validated configuration of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker URL.
    pub broker: String,
    /// Result backend URL.
    pub result_backend: String,
    /// Redis URL of the scheduler holding delayed messages (`None`: the broker holds them).
    pub scheduler: Option<String>,
    /// Plugin folder.
    pub plugins: PathBuf,
    /// Result retention.
    pub result_expires: Duration,
    /// Artifact cache folder (`None`: the user's cache directory).
    pub cache_dir: Option<PathBuf>,
    /// How a task's CPU budget is enforced.
    pub cpu_metering: CpuMetering,
    /// Default task limits.
    pub limits: Limits,
    /// Ceiling limits.
    pub ceiling: Limits,
    /// `x-max-priority` for queues declared on RabbitMQ (none: no priority queues).
    pub queue_max_priority: Option<u8>,
    /// Task routes, for clients (`wasmq send --config`) and for the tasks a worker publishes
    /// to continue a workflow (also in `worker.routes`).
    pub routes: TaskRoutes,
    /// Worker behaviour.
    pub worker: WorkerOptions,
    /// The tenants sharing this worker's slots (empty: one implicit tenant, the top-level
    /// broker, backend, queues and plugins, as before tenants existed).
    pub tenants: Vec<TenantConfig>,
    /// What the implicit tenant's plugins must carry (tenant `default`).
    pub trust: TrustPolicy,
    /// The plugin store whose releases the implicit tenant serves (none: the folder).
    pub plugin_store: Option<String>,
}

fn duration(
    key: &'static str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    text.map_or(Ok(default), |t| {
        parse_duration(&t).map_err(|e| ConfigError::Invalid {
            key,
            message: e.to_string(),
        })
    })
}

fn limits(
    key: &'static str,
    raw: Option<RawLimits>,
    default: Limits,
) -> Result<Limits, ConfigError> {
    let raw = raw.unwrap_or_default();
    Ok(Limits {
        fuel: raw.fuel.unwrap_or(default.fuel),
        memory_bytes: match raw.memory {
            Some(text) => parse_bytes(&text).map_err(|e| ConfigError::Invalid {
                key,
                message: e.to_string(),
            })?,
            None => default.memory_bytes,
        },
        timeout: duration(key, raw.timeout, default.timeout)?,
    })
}

/// The autoscaling policy `autoscale` (`MAX,MIN`, `MAX` or `auto`) asks for, with its
/// keepalive and memory budget; none without `autoscale`.
fn autoscale(
    text: Option<&str>,
    keepalive: Option<String>,
    memory: Option<String>,
) -> Result<Option<AutoscalePolicy>, ConfigError> {
    let Some(text) = text.map(str::trim) else {
        return Ok(None);
    };
    let invalid = |message: String| ConfigError::Invalid {
        key: "autoscale",
        message,
    };
    let auto = text.eq_ignore_ascii_case("auto");
    let mut policy = if auto {
        AutoscalePolicy::auto()
    } else {
        let number = |part: &str| {
            part.trim().parse::<usize>().map_err(|_| {
                invalid(format!(
                    "expected MAX,MIN (e.g. 10,3), MAX or auto, not {text:?}"
                ))
            })
        };
        let (max, min) = match text.split_once(',') {
            Some((max, min)) => (number(max)?, number(min)?),
            None => (number(text)?, 1),
        };
        if max == 0 || min > max {
            return Err(invalid(format!(
                "the maximum must be at least 1 and at least the minimum, not {text:?}"
            )));
        }
        AutoscalePolicy::new(max, min)
    };
    policy.keepalive = duration("autoscale_keepalive", keepalive, policy.keepalive)?;
    if let Some(text) = memory {
        policy.memory_budget = Some(parse_bytes(&text).map_err(|e| ConfigError::Invalid {
            key: "autoscale_memory",
            message: e.to_string(),
        })?);
    }
    Ok(Some(policy))
}

impl WorkerConfig {
    /// Validates merged raw configuration, applying defaults.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the option.
    pub fn resolve(raw: RawConfig) -> Result<Self, ConfigError> {
        let defaults = WorkerOptions::default();
        let concurrency = raw.concurrency.unwrap_or(defaults.concurrency);
        if concurrency == 0 {
            return Err(ConfigError::Invalid {
                key: "concurrency",
                message: "must be at least 1".into(),
            });
        }
        let autoscale = autoscale(
            raw.autoscale.as_deref(),
            raw.autoscale_keepalive,
            raw.autoscale_memory,
        )?;
        // Autoscaling: the worker's slots are the maximum's.
        let concurrency = autoscale.as_ref().map_or(concurrency, |policy| policy.max);
        let queues_said = raw.queues.is_some();
        let queues = raw.queues.unwrap_or(defaults.queues);
        if queues.is_empty() || queues.iter().any(|q| q.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                key: "queues",
                message: "must name at least one non-empty queue".into(),
            });
        }
        let sandbox = crate::engine::SandboxConfig::default();
        if raw.max_deliveries == Some(0) {
            return Err(ConfigError::Invalid {
                key: "max_deliveries",
                message: "must be at least 1".into(),
            });
        }
        if raw.queue_max_priority.is_some_and(|p| p == 0) {
            return Err(ConfigError::Invalid {
                key: "queue_max_priority",
                message: "must be between 1 and 255".into(),
            });
        }
        if let Some((pattern, _)) = raw
            .routes
            .iter()
            .flatten()
            .find(|(p, q)| p.is_empty() || q.trim().is_empty())
        {
            return Err(ConfigError::Invalid {
                key: "routes",
                message: format!("route {pattern:?} needs a task pattern and a queue"),
            });
        }
        let routes = TaskRoutes::new(raw.routes.unwrap_or_default());
        let ceiling = limits("ceiling", raw.ceiling, sandbox.ceiling)?;
        let tenants = raw
            .tenants
            .unwrap_or_default()
            .into_iter()
            .map(|(name, tenant)| {
                TenantConfig::resolve(
                    &name,
                    tenant,
                    concurrency,
                    ceiling,
                    raw.plugin_store.as_deref(),
                    raw.scheduler.as_deref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !tenants.is_empty() && autoscale.is_some() {
            return Err(ConfigError::Invalid {
                key: "autoscale",
                message: "tenants share fixed slots; autoscaling a worker with [tenants] is not supported yet".into(),
            });
        }
        if !tenants.is_empty() {
            let top_level = [
                ("broker", raw.broker.is_some()),
                ("result_backend", raw.result_backend.is_some()),
                ("plugins", raw.plugins.is_some()),
                ("queues", queues_said),
                ("trusted_keys", raw.trusted_keys.is_some()),
                ("require_signatures", raw.require_signatures.is_some()),
            ];
            if let Some((key, _)) = top_level.iter().find(|(_, said)| *said) {
                return Err(ConfigError::Invalid {
                    key,
                    message: "with [tenants] each tenant names its own; remove the worker-wide one"
                        .into(),
                });
            }
        }
        let trust = TrustPolicy::from_config(
            crate::signing::IMPLICIT_TENANT,
            raw.trusted_keys.as_deref().unwrap_or_default(),
            raw.require_signatures.unwrap_or(false),
            raw.plugin_store.is_some() && tenants.is_empty(),
        )
        .map_err(|e| ConfigError::Invalid {
            key: "trusted_keys",
            message: e.to_string(),
        })?;
        let reserved: usize = tenants.iter().map(|t| t.reserved).sum();
        if reserved > concurrency {
            return Err(ConfigError::Invalid {
                key: "tenants.reserved",
                message: format!(
                    "the tenants reserve {reserved} slots, more than the worker's concurrency {concurrency}"
                ),
            });
        }
        Ok(Self {
            broker: raw.broker.unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            result_backend: raw
                .result_backend
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            scheduler: raw.scheduler,
            plugins: raw.plugins.unwrap_or_else(|| DEFAULT_PLUGIN_FOLDER.into()),
            result_expires: duration(
                "result_expires",
                raw.result_expires,
                crate::results::DEFAULT_RESULT_EXPIRES,
            )?,
            cache_dir: raw.cache_dir,
            cpu_metering: raw.cpu_metering.as_deref().map_or(
                Ok(CpuMetering::default()),
                |text| {
                    CpuMetering::parse(text, false).map_err(|message| ConfigError::Invalid {
                        key: "cpu_metering",
                        message,
                    })
                },
            )?,
            limits: limits("limits", raw.limits, Limits::DEFAULT)?,
            ceiling,
            queue_max_priority: raw.queue_max_priority,
            routes: routes.clone(),
            worker: WorkerOptions {
                queues,
                concurrency,
                prefetch_multiplier: raw
                    .prefetch_multiplier
                    .unwrap_or(defaults.prefetch_multiplier)
                    .max(1),
                shutdown_timeout: duration(
                    "shutdown_timeout",
                    raw.shutdown_timeout,
                    defaults.shutdown_timeout,
                )?,
                retry: RetryPolicy {
                    max_retries: raw.max_retries.unwrap_or(defaults.retry.max_retries),
                    default_delay: duration(
                        "default_retry_delay",
                        raw.default_retry_delay,
                        defaults.retry.default_delay,
                    )?,
                    ..RetryPolicy::default()
                },
                task_policies: TaskAnnotations::new(raw.tasks.unwrap_or_default()),
                max_deliveries: raw.max_deliveries.unwrap_or(defaults.max_deliveries),
                track_started: raw.track_started.unwrap_or(defaults.track_started),
                node_name: raw.node_name.unwrap_or(defaults.node_name),
                routes,
                status_file: None,
                state_file: None,
                prefetch: None,
                tenant: None,
                task_events: raw.task_events.unwrap_or(defaults.task_events),
                heartbeat: match raw.heartbeat_interval.as_deref() {
                    Some("off") => None,
                    Some(_) => Some(duration(
                        "heartbeat_interval",
                        raw.heartbeat_interval,
                        Duration::ZERO,
                    )?)
                    .filter(|every| !every.is_zero()),
                    None => defaults.heartbeat,
                },
                metrics: None,
                hooks: crate::worker::Hooks::default(),
                autoscale,
            },
            tenants,
            trust,
            plugin_store: raw.plugin_store,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_a_plugin_store_need_a_trusted_key() {
        let resolve = |text: &str| WorkerConfig::resolve(RawConfig::from_toml(text).unwrap());
        let key = crate::signing::SigningKey::generate().unwrap().public();
        let error = resolve("require_signatures = true")
            .unwrap_err()
            .to_string();
        assert!(error.contains("trusted_keys"), "{error}");
        let error = resolve("plugin_store = \"sqlite://x.db\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs at least one trusted key"), "{error}");
        let error = resolve("trusted_keys = [\"ed25519:12\"]")
            .unwrap_err()
            .to_string();
        assert!(error.contains("64 hex digits"), "{error}");
        let config = resolve(&format!(
            "trusted_keys = [\"{key}\"]\nrequire_signatures = true\nplugin_store = \"sqlite://x.db\""
        ))
        .unwrap();
        assert_eq!(config.trust.tenant, "default");
        assert!(config.trust.require_signatures && config.trust.keys.find(&key.key_id()).is_some());
        // With tenants, keys are each tenant's own; the store is inherited.
        let tenants = format!(
            "plugin_store = \"sqlite://x.db\"\n[tenants.acme]\nbroker = \"sqlite://a.db\"\n\
             trusted_keys = [\"{key}\"]\n"
        );
        let config = resolve(&tenants).unwrap();
        assert_eq!(
            config.tenants[0].plugin_store.as_deref(),
            Some("sqlite://x.db")
        );
        assert_eq!(config.tenants[0].trust.tenant, "acme");
        let error = resolve(&format!("trusted_keys = [\"{key}\"]\n{tenants}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("trusted_keys"), "{error}");
        let error = resolve(
            "plugin_store = \"sqlite://x.db\"\n[tenants.acme]\nbroker = \"sqlite://a.db\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("trusted key"), "{error}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let error = RawConfig::from_toml("concurency = 4").unwrap_err();
        assert!(error.contains("unknown field `concurency`"), "{error}");
        let error = RawConfig::from_toml("[limits]\nfule = 1").unwrap_err();
        assert!(error.contains("unknown field `fule`"), "{error}");
        let error = RawConfig::from_toml("concurrency = \"four\"").unwrap_err();
        assert!(error.contains("invalid type"), "{error}");
    }

    #[test]
    fn precedence_flags_env_file_defaults() {
        let file = RawConfig::from_toml(
            "concurrency = 3\nqueues = [\"a\"]\nbroker = \"sqlite://file.db\"\n[limits]\nmemory = \"64MiB\"\ntimeout = \"5s\"",
        )
        .unwrap();
        let env = RawConfig {
            concurrency: Some(5),
            limits: Some(RawLimits {
                timeout: Some("7s".into()),
                ..RawLimits::default()
            }),
            ..RawConfig::default()
        };
        let flags = RawConfig {
            concurrency: Some(9),
            ..RawConfig::default()
        };
        let config = WorkerConfig::resolve(flags.or(env).or(file)).unwrap();
        assert_eq!(config.worker.concurrency, 9, "flag beats env and file");
        assert_eq!(
            config.limits.timeout,
            Duration::from_secs(7),
            "env beats file"
        );
        assert_eq!(config.limits.memory_bytes, 64 << 20, "file beats default");
        assert_eq!(
            config.limits.fuel,
            Limits::DEFAULT.fuel,
            "default fills the rest"
        );
        assert_eq!(config.worker.queues, ["a"]);
        assert_eq!(config.broker, "sqlite://file.db");
        assert_eq!(config.result_backend, DEFAULT_DATABASE_URL);
    }

    #[test]
    fn task_policies_and_routes_come_from_tables() {
        let file = RawConfig::from_toml(
            r#"
            max_deliveries = 4
            [tasks."math.*"]
            max_retries = 1
            [tasks."math.flaky"]
            autoretry_for = ["ConnectionError"]
            retry_backoff = "1s"
            rate_limit = "10/m"
            [routes]
            "math.*" = "math"
            "math.fib" = "cpu"
            "*" = "default"
            "#,
        )
        .unwrap();
        let flags = RawConfig::from_toml(
            "[routes]
\"text.*\" = \"text\"",
        )
        .unwrap();
        let config = WorkerConfig::resolve(flags.or(file)).unwrap();
        assert_eq!(config.worker.max_deliveries, 4);
        let routes = &config.routes;
        assert_eq!(
            routes.queue_for("math.fib"),
            Some("cpu"),
            "exact beats glob"
        );
        assert_eq!(routes.queue_for("math.add"), Some("math"));
        assert_eq!(routes.queue_for("text.slugify"), Some("text"), "merged");
        assert_eq!(routes.queue_for("other"), Some("default"));
        let policies = &config.worker.task_policies;
        let flaky = policies.resolve(&config.worker.retry, None, "math.flaky");
        assert_eq!(flaky.retry.autoretry_for, ["ConnectionError"]);
        assert_eq!(flaky.retry.backoff, Some(Duration::from_secs(1)));
        assert_eq!(flaky.rate_limit.unwrap().interval, Duration::from_secs(6));
        assert_eq!(
            policies
                .resolve(&config.worker.retry, None, "math.add")
                .retry
                .max_retries,
            1
        );
        let error = RawConfig::from_toml("[tasks.x]\nrate_limit = \"fast\"").unwrap_err();
        assert!(error.contains("not a rate limit"), "{error}");
        let error = RawConfig::from_toml("[tasks.x]\nretries = 2").unwrap_err();
        assert!(error.contains("unknown field `retries`"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_option() {
        let raw = RawConfig {
            shutdown_timeout: Some("soon".into()),
            ..RawConfig::default()
        };
        let error = WorkerConfig::resolve(raw).unwrap_err().to_string();
        assert_eq!(
            error,
            "shutdown_timeout: `soon` is not a duration (try 2s, 500ms or 1m)"
        );
        let raw = RawConfig {
            concurrency: Some(0),
            ..RawConfig::default()
        };
        assert_eq!(
            WorkerConfig::resolve(raw).unwrap_err().to_string(),
            "concurrency: must be at least 1"
        );
    }

    #[test]
    fn cpu_metering_is_time_unless_the_file_or_a_flag_says_fuel() {
        let default = WorkerConfig::resolve(RawConfig::default()).unwrap();
        assert_eq!(default.cpu_metering, CpuMetering::Time);
        let file = RawConfig::from_toml("cpu_metering = \"fuel\"").unwrap();
        assert_eq!(
            WorkerConfig::resolve(file.clone()).unwrap().cpu_metering,
            CpuMetering::Fuel
        );
        let flag = RawConfig {
            cpu_metering: Some("time".into()),
            ..RawConfig::default()
        };
        assert_eq!(
            WorkerConfig::resolve(flag.or(file)).unwrap().cpu_metering,
            CpuMetering::Time,
            "the flag beats the file"
        );
        // "off" is for benchmarks only: a worker always enforces its CPU budgets.
        let off = RawConfig::from_toml("cpu_metering = \"off\"").unwrap();
        assert_eq!(
            WorkerConfig::resolve(off).unwrap_err().to_string(),
            "cpu_metering: unknown CPU metering \"off\" (expected \"time\" or \"fuel\")"
        );
    }

    #[test]
    fn autoscale_takes_celerys_bounds_or_auto() {
        let resolve = |autoscale: &str| {
            WorkerConfig::resolve(RawConfig {
                concurrency: Some(3),
                autoscale: Some(autoscale.into()),
                autoscale_keepalive: Some("5s".into()),
                ..RawConfig::default()
            })
        };
        let config = resolve("10,3").unwrap();
        let policy = config.worker.autoscale.clone().unwrap();
        assert_eq!((policy.max, policy.min), (10, 3));
        assert_eq!(policy.keepalive, Duration::from_secs(5));
        assert_eq!(policy.memory_budget, None);
        assert_eq!(config.worker.concurrency, 10, "the slots of the maximum");
        let policy = resolve("6").unwrap().worker.autoscale.unwrap();
        assert_eq!((policy.max, policy.min), (6, 1));
        let policy = resolve("auto").unwrap().worker.autoscale.unwrap();
        assert!(policy.max >= 8 && policy.min >= 1 && policy.min <= policy.max);
        if cfg!(target_os = "linux") {
            assert!(
                policy.memory_budget.is_some(),
                "auto: half the machine's memory"
            );
        }
        for bad in ["", "0", "2,5", "ten", "4,x"] {
            let error = resolve(bad).unwrap_err().to_string();
            assert!(error.starts_with("autoscale: "), "{bad:?}: {error}");
        }
        let budget = WorkerConfig::resolve(RawConfig {
            autoscale: Some("4,1".into()),
            autoscale_memory: Some("1GiB".into()),
            ..RawConfig::default()
        })
        .unwrap();
        assert_eq!(
            budget.worker.autoscale.unwrap().memory_budget,
            Some(1 << 30)
        );
    }
}
