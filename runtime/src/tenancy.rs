//! Tenants: several customers served by one worker, each in its own world.
//!
//! A tenant is configured as a `[tenants.<id>]` table of the worker's file. It brings its own
//! broker (a RabbitMQ vhost or an SQLite file), result backend (with a Redis key prefix), queues
//! and plugin folder — its own task namespace: two tenants may both ship `math.add`, and each
//! runs its own. The worker serves each tenant with its own consumer and prefetch window, so
//! everything a tenant's messages can reach (queues, results, revocations, remote control,
//! canvas follow-ups, rpc replies) stays in that tenant's vhost or file: the tenant of a
//! message is where it came from, never a header a client sets, so unmodified Celery clients
//! need no change. A tenant's worker declares only the tenant's `queues`; a follow-up naming
//! a queue its broker lacks fails for its sender (`QueueNotFound`) instead of creating one,
//! and an rpc reply to a queue its vhost lacks is logged (see `worker::continuation`).
//!
//! What tenants share is the worker's task slots, handed out fairly by [`crate::fair`]
//! (`weight`, `max_concurrency`, `reserved`, `memory_budget`), the sandbox engine and the
//! content-addressed artifact cache, which only the worker writes.
//!
//! Beyond its own message, a task reaches only what its tenant grants it by task name
//! (`[tenants.<id>.grants."<glob>"]`): folders the tenant declares (`dirs`, read-only unless
//! `mode = "rw"`), the tenant's network allow-list (`network`), and named variables and
//! secrets given through `wasi:config` (never the environment, never logged). Limits layer
//! message → plugin → tenant `[limits]` → worker `[limits]`, clamped to the lower of the
//! tenant's and the worker's `[ceiling]`.
//!
//! ```toml
//! [tenants.acme]
//! broker = "amqp://acme:secret@127.0.0.1:5672/acme"   # one vhost per tenant
//! result_backend = "redis://acme:secret@127.0.0.1:6379/0"
//! result_prefix = "acme:"                  # Redis keys under acme: (Celery's global_keyprefix)
//! queues = ["celery"]
//! plugins = "/srv/wasmq/acme/plugins"      # its own task namespace
//! weight = 2.0                             # share of the slots under contention
//! max_concurrency = 3                      # never more slots than this
//! reserved = 1                             # slots it gets first when it has work
//! prefetch = 16                            # messages held unsettled by its consumer
//! memory_budget = "512MiB"                 # sum of the memory limits of its running tasks
//! trusted_keys = ["ed25519:…"]            # who may sign its plugins and releases
//! require_signatures = true               # refuse a plugin file without a valid .wasm.sig
//! plugin_store = "redis://127.0.0.1:6379/0"  # serve its signed releases (default: the
//!                                          # worker's plugin_store; none: its folder)
//! scheduler = "redis://127.0.0.1:6379/0"   # its delayed messages wait in Redis under
//!                                          # wasmq.scheduler.acme (default: the worker's
//!                                          # scheduler; none: its broker holds them)
//! [tenants.acme.limits]                    # defaults for its tasks
//! timeout = "10s"
//! [tenants.acme.ceiling]                   # never exceeded (nor is the worker's)
//! memory = "256MiB"
//! [tenants.acme.dirs]                      # folders its tasks may be granted
//! "/data" = { host = "/srv/acme/data" }                  # read-only
//! "/scratch" = { host = "/srv/acme/scratch", mode = "rw" }
//! [tenants.acme.network]
//! allow = ["10.20.0.0/24:5432", "203.0.113.7:443"]     # IPs, CIDRs or host names, and a port or *
//! dns = false
//! [tenants.acme.variables]
//! api_url = "https://api.acme.example"
//! [tenants.acme.secrets]
//! api_token = { env = "ACME_API_TOKEN" }   # or { file = "/run/secrets/acme_token" }
//! [tenants.acme.grants."billing.*"]        # what tasks matching the glob may reach
//! dirs = ["/data"]
//! network = true
//! variables = ["api_url", "api_token"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use crate::engine::{DirGrant, Grants, LimitOverrides, Limits, NetworkGrant, NetworkRule};
use crate::policy::glob_matches;
use crate::signing::TrustPolicy;
use crate::units::{RawLimits, parse_bytes, parse_duration};

/// A tenant's table that is not valid, naming the tenant and the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: tenant {tenant:?}: {message}")]
pub struct TenantError {
    /// The tenant's id.
    pub tenant: String,
    /// The key, e.g. `tenants.reserved`.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

/// A `[tenants.<id>]` table as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Its broker URL (one RabbitMQ vhost, or one SQLite file, per tenant).
    pub broker: Option<String>,
    /// Its result backend URL. Default: its broker's file for SQLite; required otherwise.
    pub result_backend: Option<String>,
    /// A prefix before every Redis result key (Celery's `global_keyprefix`).
    pub result_prefix: Option<String>,
    /// Queues consumed for it. Default: `["celery"]`.
    pub queues: Option<Vec<String>>,
    /// Its plugin folder (its task namespace).
    pub plugins: Option<PathBuf>,
    /// Its share of the slots under contention. Default: 1.
    pub weight: Option<f64>,
    /// The most slots it may use at once. Default: all.
    pub max_concurrency: Option<usize>,
    /// Slots it gets before any tenant above its own reservation. Default: 0.
    pub reserved: Option<usize>,
    /// Messages its consumer holds unsettled. Default: 16 per slot it may use (a quarter of a
    /// single-tenant worker's window): small enough that a flood stays in the broker, large
    /// enough that acks are batched (a window of 2 made RabbitMQ ack every message, which
    /// cost the other tenant's p99 on a 2-core machine: BENCHMARKS.md).
    pub prefetch: Option<usize>,
    /// The most memory its running tasks may be limited to, together, e.g. `512MiB`.
    pub memory_budget: Option<String>,
    /// Defaults for its tasks.
    pub limits: Option<RawLimits>,
    /// What its tasks never exceed (nor the worker's ceiling).
    pub ceiling: Option<RawLimits>,
    /// Folders its tasks may be granted: the path a task sees → the host folder.
    pub dirs: Option<BTreeMap<String, RawDir>>,
    /// Where its tasks may connect when granted the network.
    pub network: Option<RawNetwork>,
    /// Named values its tasks may be granted.
    pub variables: Option<BTreeMap<String, String>>,
    /// Named secrets its tasks may be granted, read by the worker when it starts.
    pub secrets: Option<BTreeMap<String, RawSecret>>,
    /// What tasks may reach, by task name or glob.
    pub grants: Option<BTreeMap<String, RawGrant>>,
    /// Keys (`ed25519:…`) or files of keys trusted to sign its plugins and releases.
    pub trusted_keys: Option<Vec<String>>,
    /// Refuse plugin files without a valid `.wasm.sig` signed for this tenant.
    pub require_signatures: Option<bool>,
    /// The plugin store whose releases it serves (default: the worker's `plugin_store`;
    /// none: its folder).
    pub plugin_store: Option<String>,
    /// Redis URL of the scheduler holding its delayed messages, under its own key prefix
    /// (default: the worker's `scheduler`; none: its broker holds them).
    pub scheduler: Option<String>,
}

/// A folder a tenant may grant.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawDir {
    /// The host folder.
    pub host: PathBuf,
    /// `ro` (default) or `rw`.
    pub mode: Option<String>,
}

/// A tenant's network allow-list.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// Rules `ip:port`, `cidr:port`, `[v6]:port`, `host:port`, with `*` for any port.
    pub allow: Vec<String>,
    /// Whether granted tasks may resolve names. Default: false.
    pub dns: Option<bool>,
}

/// Where a secret comes from: a variable of the worker's environment, or a file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    /// The worker's environment variable holding it.
    pub env: Option<String>,
    /// A file holding it (a trailing newline is dropped).
    pub file: Option<PathBuf>,
}

/// What the tasks matching one glob may reach.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// Folders (as the task sees them, keys of the tenant's `dirs`).
    pub dirs: Option<Vec<String>>,
    /// The tenant's network allow-list.
    pub network: Option<bool>,
    /// Variables and secrets, by name.
    pub variables: Option<Vec<String>>,
}

/// What one glob of task names is granted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TaskGrant {
    dirs: Vec<String>,
    network: bool,
    variables: Vec<String>,
}

/// A validated tenant. Its `Debug` names its variables and secrets, never their values.
#[derive(Clone)]
pub struct TenantConfig {
    /// Its id (the `<id>` of `[tenants.<id>]`).
    pub name: String,
    /// Its broker URL.
    pub broker: String,
    /// Its result backend URL.
    pub result_backend: String,
    /// Its Redis result key prefix, if any.
    pub result_prefix: Option<String>,
    /// Its queues.
    pub queues: Vec<String>,
    /// Its plugin folder.
    pub plugins: PathBuf,
    /// Its weight.
    pub weight: f64,
    /// The most slots it may use (at most the worker's concurrency).
    pub max_concurrency: usize,
    /// Its reserved slots.
    pub reserved: usize,
    /// Its consumer's prefetch.
    pub prefetch: usize,
    /// Its memory budget in bytes, if any.
    pub memory_budget: Option<u64>,
    /// Its tasks' default limits (under the plugin's, over the worker's).
    pub limits: LimitOverrides,
    /// Its ceiling (already the lower of its own and the worker's).
    pub ceiling: Limits,
    /// What its plugins must carry, and the keys its releases are checked with.
    pub trust: TrustPolicy,
    /// The plugin store whose releases it serves (none: its plugin folder).
    pub plugin_store: Option<String>,
    /// Redis URL of the scheduler holding its delayed messages (none: its broker holds
    /// them), under [`TenantConfig::scheduler_prefix`].
    pub scheduler: Option<String>,
    dirs: BTreeMap<String, DirGrant>,
    network: NetworkGrant,
    /// Variables and secrets, resolved.
    values: BTreeMap<String, String>,
    /// Which of `values` are secrets (never shown).
    secrets: BTreeSet<String>,
    grants: Vec<(String, TaskGrant)>,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig")
            .field("name", &self.name)
            .field("broker", &"…")
            .field("queues", &self.queues)
            .field("plugins", &self.plugins)
            .field("weight", &self.weight)
            .field("max_concurrency", &self.max_concurrency)
            .field("reserved", &self.reserved)
            .field("prefetch", &self.prefetch)
            .field("memory_budget", &self.memory_budget)
            .field("variables", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn invalid(key: &'static str, tenant: &str, message: impl std::fmt::Display) -> TenantError {
    TenantError {
        tenant: tenant.to_owned(),
        key,
        message: message.to_string(),
    }
}

fn overrides(
    key: &'static str,
    tenant: &str,
    raw: Option<RawLimits>,
) -> Result<LimitOverrides, TenantError> {
    let raw = raw.unwrap_or_default();
    Ok(LimitOverrides {
        fuel: raw.fuel,
        memory_bytes: raw
            .memory
            .map(|m| parse_bytes(&m).map_err(|e| invalid(key, tenant, e)))
            .transpose()?,
        timeout: raw
            .timeout
            .map(|t| parse_duration(&t).map_err(|e| invalid(key, tenant, e)))
            .transpose()?,
    })
}

impl TenantConfig {
    /// The Redis key prefix of its delayed messages in the scheduler:
    /// `wasmq.scheduler.<id>`, so tenants sharing one Redis never take each other's (and a
    /// Redis ACL user can be fenced to `wasmq.scheduler.<id>:*`).
    pub fn scheduler_prefix(&self) -> String {
        format!("wasmq.scheduler.{}", self.name)
    }

    /// Validates tenant `name` of a worker with `concurrency` slots and the given `ceiling`.
    ///
    /// # Errors
    /// [`TenantError`] naming the tenant and the key: a missing broker or plugin
    /// folder, a bad size or rule, a grant naming a folder or variable the tenant does not
    /// declare, a secret that cannot be read.
    pub fn resolve(
        name: &str,
        raw: RawTenant,
        concurrency: usize,
        ceiling: Limits,
        worker_plugin_store: Option<&str>,
        worker_scheduler: Option<&str>,
    ) -> Result<Self, TenantError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(invalid(
                "tenants",
                name,
                "a tenant id is letters, digits, - and _",
            ));
        }
        let broker = raw
            .broker
            .ok_or_else(|| invalid("tenants.broker", name, "needs a broker URL"))?;
        let result_backend = match raw.result_backend {
            Some(url) => url,
            None if broker.starts_with("sqlite:") => broker.clone(),
            None => {
                return Err(invalid(
                    "tenants.result_backend",
                    name,
                    "needs a result backend URL (only an SQLite broker keeps results itself)",
                ));
            }
        };
        if raw.result_prefix.is_some() && !result_backend.starts_with("redis") {
            return Err(invalid(
                "tenants.result_prefix",
                name,
                "a key prefix applies to a Redis result backend only",
            ));
        }
        let queues = raw.queues.unwrap_or_else(|| vec!["celery".to_owned()]);
        if queues.is_empty() || queues.iter().any(|q| q.trim().is_empty()) {
            return Err(invalid(
                "tenants.queues",
                name,
                "must name at least one non-empty queue",
            ));
        }
        let plugin_store = raw
            .plugin_store
            .or_else(|| worker_plugin_store.map(str::to_owned));
        let plugins = match (raw.plugins, &plugin_store) {
            (Some(folder), _) => folder,
            // Served from the store's releases: no folder is read.
            (None, Some(_)) => PathBuf::new(),
            (None, None) => {
                return Err(invalid(
                    "tenants.plugins",
                    name,
                    "needs its own plugin folder (or a plugin_store to follow)",
                ));
            }
        };
        let trust = TrustPolicy::from_config(
            name,
            raw.trusted_keys.as_deref().unwrap_or_default(),
            raw.require_signatures.unwrap_or(false),
            plugin_store.is_some(),
        )
        .map_err(|e| invalid("tenants.trusted_keys", name, e))?;
        let weight = raw.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(invalid("tenants.weight", name, "must be a positive number"));
        }
        let max_concurrency = raw.max_concurrency.unwrap_or(concurrency).min(concurrency);
        if max_concurrency == 0 {
            return Err(invalid(
                "tenants.max_concurrency",
                name,
                "must be at least 1",
            ));
        }
        let reserved = raw.reserved.unwrap_or(0);
        if reserved > max_concurrency {
            return Err(invalid(
                "tenants.reserved",
                name,
                format!("{reserved} reserved slots exceed its max_concurrency {max_concurrency}"),
            ));
        }
        let prefetch = raw.prefetch.unwrap_or(16 * max_concurrency).max(1);
        let memory_budget = raw
            .memory_budget
            .map(|m| parse_bytes(&m).map_err(|e| invalid("tenants.memory_budget", name, e)))
            .transpose()?;
        let limits = overrides("tenants.limits", name, raw.limits)?;
        let own_ceiling = overrides("tenants.ceiling", name, raw.ceiling)?;
        // What the tenant says, else the worker's ceiling; never above the worker's.
        let ceiling = Limits::resolve(own_ceiling, ceiling, ceiling);

        let mut dirs = BTreeMap::new();
        for (guest, dir) in raw.dirs.unwrap_or_default() {
            if !guest.starts_with('/') {
                return Err(invalid(
                    "tenants.dirs",
                    name,
                    format!("{guest:?}: the path a task sees must be absolute"),
                ));
            }
            let writable = match dir.mode.as_deref() {
                None | Some("ro") => false,
                Some("rw") => true,
                Some(other) => {
                    return Err(invalid(
                        "tenants.dirs",
                        name,
                        format!("{guest:?}: mode {other:?} is neither \"ro\" nor \"rw\""),
                    ));
                }
            };
            dirs.insert(
                guest.clone(),
                DirGrant {
                    host: dir.host,
                    guest,
                    writable,
                },
            );
        }
        let raw_network = raw.network.unwrap_or_default();
        let network = NetworkGrant {
            allow: raw_network
                .allow
                .iter()
                .map(|rule| {
                    rule.parse::<NetworkRule>()
                        .map_err(|e| invalid("tenants.network", name, format!("{rule:?}: {e}")))
                })
                .collect::<Result<_, _>>()?,
            dns: raw_network.dns.unwrap_or(false),
        };
        let mut values = raw.variables.unwrap_or_default();
        let mut secrets = BTreeSet::new();
        for (key, secret) in raw.secrets.unwrap_or_default() {
            let value = match (&secret.env, &secret.file) {
                (Some(var), None) => std::env::var(var).map_err(|_| {
                    invalid(
                        "tenants.secrets",
                        name,
                        format!("{key:?}: the worker's environment has no {var}"),
                    )
                })?,
                (None, Some(file)) => std::fs::read_to_string(file)
                    .map_err(|e| {
                        invalid(
                            "tenants.secrets",
                            name,
                            format!("{key:?}: cannot read {}: {e}", file.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                _ => {
                    return Err(invalid(
                        "tenants.secrets",
                        name,
                        format!("{key:?}: give exactly one of env or file"),
                    ));
                }
            };
            if values.insert(key.clone(), value).is_some() {
                return Err(invalid(
                    "tenants.secrets",
                    name,
                    format!("{key:?} is both a variable and a secret"),
                ));
            }
            secrets.insert(key);
        }
        let mut grants = Vec::new();
        for (pattern, grant) in raw.grants.unwrap_or_default() {
            let grant = TaskGrant {
                dirs: grant.dirs.unwrap_or_default(),
                network: grant.network.unwrap_or(false),
                variables: grant.variables.unwrap_or_default(),
            };
            if let Some(dir) = grant.dirs.iter().find(|d| !dirs.contains_key(*d)) {
                return Err(invalid(
                    "tenants.grants",
                    name,
                    format!("{pattern:?} grants {dir:?}, which is not one of its dirs"),
                ));
            }
            if let Some(var) = grant.variables.iter().find(|v| !values.contains_key(*v)) {
                return Err(invalid(
                    "tenants.grants",
                    name,
                    format!(
                        "{pattern:?} grants {var:?}, which is not one of its variables or secrets"
                    ),
                ));
            }
            grants.push((pattern, grant));
        }
        Ok(Self {
            name: name.to_owned(),
            broker,
            result_backend,
            result_prefix: raw.result_prefix,
            queues,
            plugins,
            weight,
            max_concurrency,
            reserved,
            prefetch,
            memory_budget,
            limits,
            ceiling,
            trust,
            plugin_store,
            scheduler: raw
                .scheduler
                .or_else(|| worker_scheduler.map(str::to_owned)),
            dirs,
            network,
            values,
            secrets,
            grants,
        })
    }

    /// What a task named `task` may reach: the union of the grants whose glob matches it.
    pub fn grants_for(&self, task: &str) -> Grants {
        let mut granted = Grants::default();
        let mut dirs = BTreeSet::new();
        for (_, grant) in self
            .grants
            .iter()
            .filter(|(pattern, _)| glob_matches(pattern, task))
        {
            dirs.extend(grant.dirs.iter().cloned());
            if grant.network {
                granted.network = self.network.clone();
            }
            for name in &grant.variables {
                if let Some(value) = self.values.get(name) {
                    granted.variables.insert(name.clone(), value.clone());
                    if self.secrets.contains(name) && !granted.secrets.contains(value) {
                        granted.secrets.push(value.clone());
                    }
                }
            }
        }
        granted.dirs = dirs
            .iter()
            .filter_map(|guest| self.dirs.get(guest).cloned())
            .collect();
        granted
    }

    /// The host folders its tasks may be granted.
    pub fn host_dirs(&self) -> impl Iterator<Item = &DirGrant> {
        self.dirs.values()
    }

    /// The names of its secrets (their values are never shown).
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.secrets.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(toml_text: &str) -> Result<TenantConfig, TenantError> {
        let raw: RawTenant = toml::from_str(toml_text).expect("valid TOML");
        TenantConfig::resolve("acme", raw, 4, Limits::DEFAULT, None, None)
    }

    const BASE: &str = "broker = \"sqlite://a.db\"\nplugins = \"p\"\n";

    #[test]
    fn a_tenant_needs_a_broker_and_its_own_plugin_folder() {
        let error = tenant("plugins = \"p\"").unwrap_err().to_string();
        assert!(error.contains("needs a broker"), "{error}");
        let error = tenant("broker = \"sqlite://a.db\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("own plugin folder"), "{error}");
        let error = tenant("broker = \"amqp://h/acme\"\nplugins = \"p\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("result backend"), "{error}");
        let ok = tenant(BASE).unwrap();
        assert_eq!(ok.result_backend, "sqlite://a.db");
        assert_eq!((ok.max_concurrency, ok.reserved, ok.prefetch), (4, 0, 64));
    }

    #[test]
    fn shares_are_validated() {
        for (extra, expected) in [
            ("weight = 0.0", "positive"),
            ("max_concurrency = 0", "at least 1"),
            ("max_concurrency = 2\nreserved = 3", "exceed"),
            ("memory_budget = \"lots\"", "memory_budget"),
        ] {
            let error = tenant(&format!("{BASE}{extra}")).unwrap_err().to_string();
            assert!(error.contains(expected), "{extra}: {error}");
        }
        let capped = tenant(&format!("{BASE}max_concurrency = 9")).unwrap();
        assert_eq!(
            capped.max_concurrency, 4,
            "a cap is at most the worker's slots"
        );
    }

    #[test]
    fn the_ceiling_is_the_lower_of_the_tenants_and_the_workers() {
        let t = tenant(&format!(
            "{BASE}[ceiling]\nmemory = \"64MiB\"\ntimeout = \"2h\"\n[limits]\nfuel = 5"
        ))
        .unwrap();
        assert_eq!(t.ceiling.memory_bytes, 64 << 20);
        assert_eq!(t.ceiling.timeout, Limits::DEFAULT.timeout);
        assert_eq!(t.limits.fuel, Some(5));
        assert_eq!(t.limits.memory_bytes, None);
    }

    #[test]
    fn grants_name_only_what_the_tenant_declares() {
        let error = tenant(&format!("{BASE}[grants.\"x.*\"]\ndirs = [\"/data\"]"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not one of its dirs"), "{error}");
        let error = tenant(&format!("{BASE}[grants.\"x.*\"]\nvariables = [\"k\"]"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not one of its variables"), "{error}");
        let error = tenant(&format!("{BASE}[dirs]\n\"data\" = {{ host = \"/tmp\" }}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("absolute"), "{error}");
        let error = tenant(&format!("{BASE}[network]\nallow = [\"nonsense\"]"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("nonsense"), "{error}");
    }

    #[test]
    fn a_task_gets_the_union_of_the_grants_matching_it() {
        let t = tenant(&format!(
            "{BASE}[dirs]\n\"/data\" = {{ host = \"/srv/d\" }}\n\"/scratch\" = {{ host = \"/srv/s\", mode = \"rw\" }}\n\
             [network]\nallow = [\"127.0.0.1:9\"]\n[variables]\nurl = \"u\"\nother = \"o\"\n\
             [grants.\"billing.*\"]\ndirs = [\"/data\"]\nvariables = [\"url\"]\n\
             [grants.\"billing.export\"]\ndirs = [\"/scratch\"]\nnetwork = true\n"
        ))
        .unwrap();
        let export = t.grants_for("billing.export");
        let guests: Vec<_> = export
            .dirs
            .iter()
            .map(|d| (d.guest.as_str(), d.writable))
            .collect();
        assert_eq!(guests, [("/data", false), ("/scratch", true)]);
        assert_eq!(export.network.allow.len(), 1);
        assert_eq!(export.variables.keys().collect::<Vec<_>>(), ["url"]);
        let report = t.grants_for("billing.report");
        assert_eq!(report.dirs.len(), 1);
        assert!(
            report.network.allow.is_empty(),
            "network only where granted"
        );
        let other = t.grants_for("math.add");
        assert!(
            other.dirs.is_empty() && other.variables.is_empty() && other.network.allow.is_empty()
        );
    }

    #[test]
    fn secrets_come_from_the_workers_environment_or_a_file_and_are_named_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let t = tenant(&format!(
            "{BASE}[secrets]\ntoken = {{ file = {:?} }}\n[grants.\"*\"]\nvariables = [\"token\"]",
            file.display().to_string()
        ))
        .unwrap();
        assert_eq!(t.grants_for("a.b").variables["token"], "s3cret");
        assert_eq!(
            t.grants_for("a.b").secrets,
            ["s3cret"],
            "redacted from the log"
        );
        assert_eq!(t.secret_names().collect::<Vec<_>>(), ["token"]);
        let error = tenant(&format!(
            "{BASE}[secrets]\ntoken = {{ env = \"WASMQ_TEST_SURELY_UNSET_VARIABLE\" }}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("has no WASMQ_TEST_SURELY_UNSET_VARIABLE"),
            "{error}"
        );
    }
}
