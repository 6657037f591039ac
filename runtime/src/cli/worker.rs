//! `wasmq worker`: run a worker from the shell. Merges the flags over the configuration
//! file, connects the broker and result backend, creates the plugin folder with the bundled
//! plugins on first start and watches it, then runs until SIGINT/SIGTERM (a second signal
//! exits at once).

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::args::EngineArgs;
use super::endpoints::{Endpoints, connect_broker};
use super::exit::Failure;
use super::process::{default_state_file, shutdown_signal};
use crate::client::Client;
use crate::config::{RawConfig, RawLimits};
use crate::engine::Sandbox;
use crate::metrics::Metrics;
use crate::worker::Worker;

#[derive(Debug, clap::Args)]
pub(super) struct WorkerArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Folder of plugin files (.wasm), watched for hot deploys. Created with the bundled
    /// plugins if it does not exist. Default: .wasmq/plugins.
    #[arg(long, env = "WASMQ_PLUGINS")]
    plugins: Option<PathBuf>,
    /// Queues to consume, comma-separated. Default: celery.
    #[arg(long, short = 'Q', env = "WASMQ_QUEUES", value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Tasks run at once, or `auto`: sized to the load (as `--autoscale` with 8 slots per
    /// CPU at most, one per CPU at least, and half the machine's memory as the budget).
    /// Default: the number of CPUs.
    #[arg(long, short = 'c', env = "WASMQ_CONCURRENCY")]
    concurrency: Option<Concurrency>,
    /// Size the task slots to the load between MAX and MIN (Celery's `--autoscale`): grow
    /// when tasks wait and the CPU and memory have room, shrink when idle or when the
    /// machine is saturated. E.g. 16,2. Default: off.
    #[arg(long, env = "WASMQ_AUTOSCALE", value_name = "MAX,MIN")]
    autoscale: Option<String>,
    /// How long the demand must stay lower before the autoscaler shrinks, e.g. 30s.
    /// Default: 30s.
    #[arg(long, env = "WASMQ_AUTOSCALE_KEEPALIVE")]
    autoscale_keepalive: Option<String>,
    /// What the memory limits of the running tasks may add up to while autoscaling, e.g.
    /// 4GiB. Default: none (with `--concurrency auto`: half the machine's memory).
    #[arg(long, env = "WASMQ_AUTOSCALE_MEMORY")]
    autoscale_memory: Option<String>,
    /// Unacknowledged messages held per concurrency slot. Default: 64 (short wasm tasks);
    /// lower it for long tasks so one worker does not hold back messages others could run.
    #[arg(long, env = "WASMQ_PREFETCH_MULTIPLIER")]
    prefetch_multiplier: Option<usize>,
    /// This worker's node name. Default: wasmq@<hostname>.
    #[arg(long = "name", short = 'n', env = "WASMQ_NODE_NAME")]
    node_name: Option<String>,
    /// How long running tasks may finish after SIGINT/SIGTERM, e.g. 30s. Default: 30s.
    #[arg(long, env = "WASMQ_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: Option<String>,
    /// How long results are kept, e.g. 1day. Default: 1day.
    #[arg(long, env = "WASMQ_RESULT_EXPIRES")]
    result_expires: Option<String>,
    /// Store a STARTED state before each task runs. Default: off.
    #[arg(long, env = "WASMQ_TRACK_STARTED")]
    track_started: Option<bool>,
    /// Retries a task may ask for before failing with MaxRetriesExceededError. Default: 3.
    #[arg(long, env = "WASMQ_MAX_RETRIES")]
    max_retries: Option<u32>,
    /// Retry delay when a task asks for a retry without one, e.g. 3m. Default: 3m.
    #[arg(long, env = "WASMQ_DEFAULT_RETRY_DELAY")]
    default_retry_delay: Option<String>,
    /// Default fuel budget of a task. Default: 10000000000 (about 1 s of guest CPU).
    #[arg(long, env = "WASMQ_FUEL")]
    fuel: Option<u64>,
    /// Default memory cap of a task, e.g. 128MiB. Default: 128MiB.
    #[arg(long, env = "WASMQ_MEMORY")]
    memory: Option<String>,
    /// Default hard time limit of a task, e.g. 30s. Default: 30s.
    #[arg(long, env = "WASMQ_TIMEOUT")]
    timeout: Option<String>,
    /// Deliveries of one message before it is dead-lettered as poison (its worker keeps
    /// dying). Default: 10.
    #[arg(long, env = "WASMQ_MAX_DELIVERIES")]
    max_deliveries: Option<u32>,
    /// Declare RabbitMQ queues with this x-max-priority (1-255), so message priorities are
    /// honoured. Default: plain queues.
    #[arg(long, env = "WASMQ_QUEUE_MAX_PRIORITY")]
    queue_max_priority: Option<u8>,
    /// Write the worker's status (JSON) to this file every second, for `wasmq status`.
    #[arg(long, env = "WASMQ_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// Where revoked task ids are remembered across restarts. Default:
    /// .wasmq/state/<node name>.revoked.json.
    #[arg(long, env = "WASMQ_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// Serve the signed releases of this plugin store (sqlite://PATH or
    /// redis://HOST:PORT/DB) instead of the plugin folder; see `wasmq deploy`.
    #[arg(long, env = "WASMQ_PLUGIN_STORE")]
    plugin_store: Option<String>,
    /// A public key (ed25519:…) or a file holding one, trusted to sign plugins and
    /// releases; repeat for several.
    #[arg(
        long = "trusted-key",
        env = "WASMQ_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Option<Vec<String>>,
    /// Refuse plugin files without a valid .wasm.sig from a trusted key.
    #[arg(long, env = "WASMQ_REQUIRE_SIGNATURES", num_args = 0..=1, default_missing_value = "true")]
    require_signatures: Option<bool>,
    /// Send task events (task-received/started/succeeded/failed…) for Flower, `celery
    /// events` and `wasmq events`, as Celery's `-E`. Flower also switches them on by
    /// remote control. Default: off (worker heartbeats are always sent).
    #[arg(long, short = 'E', env = "WASMQ_TASK_EVENTS", num_args = 0..=1, default_missing_value = "true")]
    task_events: Option<bool>,
    /// How often to send a worker-heartbeat event, e.g. 2s. Default: 2s.
    #[arg(long, env = "WASMQ_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Send no worker events at all (worker-online/heartbeat/offline); monitors then see
    /// the worker as offline.
    #[arg(long, conflicts_with = "heartbeat_interval")]
    without_heartbeat: bool,
    /// Serve Prometheus metrics (celery-exporter's names), /healthz and /readyz on this
    /// address, e.g. 127.0.0.1:9808. Default: off.
    #[arg(long, env = "WASMQ_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Also send the periodic tasks of this schedule file (see `wasmq beat`). Safe on every
    /// worker: the beats elect one leader and never send a run twice.
    #[arg(long, env = "WASMQ_BEAT", value_name = "SCHEDULE")]
    beat: Option<PathBuf>,
    #[command(flatten)]
    beat_lease: super::beat::LeaseArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `--concurrency`: a number of slots, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Concurrency {
    Slots(usize),
    Auto,
}

impl std::str::FromStr for Concurrency {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        text.trim()
            .parse()
            .map(Self::Slots)
            .map_err(|_| format!("expected a number of task slots or auto, not {text:?}"))
    }
}

impl WorkerArgs {
    fn raw(&self) -> RawConfig {
        let limits =
            (self.fuel.is_some() || self.memory.is_some() || self.timeout.is_some()).then(|| {
                RawLimits {
                    fuel: self.fuel,
                    memory: self.memory.clone(),
                    timeout: self.timeout.clone(),
                }
            });
        RawConfig {
            // The endpoints (broker, result backend, scheduler) are added by
            // `Endpoints::resolve`.
            broker: None,
            result_backend: None,
            scheduler: None,
            plugins: self.plugins.clone(),
            queues: self.queues.clone(),
            concurrency: match self.concurrency {
                Some(Concurrency::Slots(n)) => Some(n),
                _ => None,
            },
            autoscale: match self.concurrency {
                Some(Concurrency::Auto) => Some("auto".into()),
                _ => self.autoscale.clone(),
            },
            autoscale_keepalive: self.autoscale_keepalive.clone(),
            autoscale_memory: self.autoscale_memory.clone(),
            prefetch_multiplier: self.prefetch_multiplier,
            node_name: self.node_name.clone(),
            shutdown_timeout: self.shutdown_timeout.clone(),
            result_expires: self.result_expires.clone(),
            track_started: self.track_started,
            max_retries: self.max_retries,
            default_retry_delay: self.default_retry_delay.clone(),
            cache_dir: self.engine.cache_dir.clone(),
            cpu_metering: self
                .engine
                .cpu_metering
                .map(|arg| arg.metering().name().to_owned()),
            limits,
            ceiling: None,
            max_deliveries: self.max_deliveries,
            queue_max_priority: self.queue_max_priority,
            tasks: None,
            routes: None,
            tenants: None,
            trusted_keys: self.trusted_keys.clone(),
            require_signatures: self.require_signatures,
            plugin_store: self.plugin_store.clone(),
            task_events: self.task_events,
            heartbeat_interval: if self.without_heartbeat {
                Some("off".into())
            } else {
                self.heartbeat_interval.clone()
            },
        }
    }
}

/// Runs a worker until the first SIGINT or SIGTERM, once its running tasks have finished.
pub(super) async fn run(args: WorkerArgs) -> Result<(), Failure> {
    let mut config = args.endpoints.resolve(args.raw())?;
    // A bad schedule file stops the worker before it connects to anything.
    let schedule = args.beat.as_deref().map(super::beat::load).transpose()?;
    if args.metrics.is_some() {
        config.worker.metrics = Some(Arc::new(Metrics::new(&config.worker.node_name)));
    }
    // Autoscaling: the pool is sized for the maximum.
    let mut sandbox_config = args
        .engine
        .sandbox_config(pool_size(config.worker.max_concurrency()));
    sandbox_config.defaults = config.limits;
    sandbox_config.ceiling = config.ceiling;
    sandbox_config.cpu_metering = config.cpu_metering;
    if let Some(dir) = &config.cache_dir
        && !args.engine.no_cache
    {
        sandbox_config.cache_dir = Some(dir.clone());
    }
    let sandbox = Arc::new(Sandbox::new(sandbox_config).map_err(Failure::internal)?);
    tracing::info!(
        cpu_metering = config.cpu_metering.name(),
        limits = %config.limits,
        ceiling = %config.ceiling,
        "sandbox ready"
    );
    if !config.tenants.is_empty() {
        if schedule.is_some() {
            return Err(Failure::bad_input(
                "--beat: a worker serving [tenants] cannot run a beat yet; run `wasmq beat` per tenant",
            ));
        }
        return super::tenants::run(
            config,
            sandbox,
            &args.status_file,
            &args.state_file,
            args.metrics,
        )
        .await;
    }

    let broker = connect_broker(&config)?;
    let backend = crate::results::connect(
        &config.result_backend,
        config.result_expires,
        &config.broker,
    )
    .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    if config.plugin_store.is_none() && !config.plugins.exists() {
        let written = super::plugins::export_bundled(&config.plugins).map_err(Failure::internal)?;
        tracing::info!(folder = %config.plugins.display(), plugins = written.len(),
            "created the plugin folder with the bundled plugins (math, text, hostile, grants, stamp)");
    }
    let source = super::plugin_source::serve_plugins(
        sandbox,
        &config.plugins,
        config.plugin_store.as_deref(),
        &config.trust,
        &config.worker.node_name,
        &broker,
    )
    .await?;
    for (task, file) in source.registry.snapshot().tasks() {
        tracing::info!(task, plugin = %file.display(), "registered");
    }
    let beat = schedule
        .zip(args.beat.as_deref())
        .map(|(schedule, path)| {
            let client = Client::new(Arc::clone(&broker), Arc::clone(&backend))
                .with_routes(config.routes.clone());
            super::beat::prepare(
                schedule,
                path,
                &args.beat_lease,
                &config,
                client,
                Some(config.worker.node_name.clone()),
            )
        })
        .transpose()?;
    let mut options = config.worker;
    options.status_file.clone_from(&args.status_file);
    options.state_file = Some(
        args.state_file
            .clone()
            .unwrap_or_else(|| default_state_file(&options.node_name, None)),
    );
    let metrics = options.metrics.clone();
    let worker = Worker::new(broker, backend, Arc::clone(&source.registry), options);
    let view = worker.status_view();
    let endpoint = super::metrics::serve(args.metrics, metrics, move || {
        let status = view.snapshot();
        (status["consuming"] == true, status)
    })
    .await?;
    // One stop for the worker and its beat: the first signal, or the worker ending.
    let stop = CancellationToken::new();
    let signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
        })
    };
    let beat = beat.map(|beat| tokio::spawn(beat.run(stop.clone().cancelled_owned())));
    let stats = worker.run(stop.clone().cancelled_owned()).await;
    stop.cancel();
    signal.abort();
    if let Some(beat) = beat {
        let _ = beat.await;
    }
    let stats = stats.map_err(Failure::internal)?;
    if let Some(endpoint) = endpoint {
        endpoint.abort();
    }
    source.stop().await;
    tracing::info!(?stats, "bye");
    Ok(())
}

/// Pool slots: the running tasks plus headroom for describe calls during hot deploys.
pub(super) fn pool_size(concurrency: usize) -> u32 {
    u32::try_from(concurrency.saturating_add(4)).unwrap_or(u32::MAX)
}
