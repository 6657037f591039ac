//! `wasmq worker`, `wasmq send`, `wasmq result` and `wasmq dead-letters`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{EngineArgs, ExitStatus, Failure};
use crate::client::{Client, GetError, SendOptions};
use crate::config::{DEFAULT_DATABASE_URL, RawConfig, RawLimits, WorkerConfig};
use crate::engine::Sandbox;
use crate::registry::Registry;
use crate::results::{ResultError, ResultMeta, TaskState};
use crate::worker::Worker;

/// Where messages and results live; shared by worker, send and result.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct Endpoints {
    /// Broker URL. Default: sqlite://.wasmq/wasmq.db (the embedded broker).
    #[arg(long, env = "WASMQ_BROKER")]
    broker: Option<String>,
    /// Result backend URL. Default: sqlite://.wasmq/wasmq.db (the embedded backend).
    #[arg(long, env = "WASMQ_RESULT_BACKEND")]
    result_backend: Option<String>,
    /// Hold delayed messages (countdown, eta, retries) in Redis until due, e.g.
    /// redis://127.0.0.1:6379/0, instead of in the broker. Default: in the broker.
    #[arg(long, env = "WASMQ_SCHEDULER")]
    scheduler: Option<String>,
    /// A strict TOML configuration file (see the README); flags and WASMQ_* variables
    /// override it. Clients read `broker`, `result_backend`, `scheduler`, `routes` and
    /// `queue_max_priority` from it.
    #[arg(long, env = "WASMQ_CONFIG")]
    config: Option<PathBuf>,
}

impl Endpoints {
    /// The configuration: these flags over the file.
    fn resolve(&self, flags: RawConfig) -> Result<WorkerConfig, Failure> {
        let mut raw = RawConfig {
            broker: self.broker.clone(),
            result_backend: self.result_backend.clone(),
            scheduler: self.scheduler.clone(),
            ..flags
        };
        if let Some(file) = &self.config {
            let from_file =
                RawConfig::from_file(file).map_err(|e| Failure::bad_input(format!("{e:#}")))?;
            raw = raw.or(from_file);
        }
        WorkerConfig::resolve(raw).map_err(Failure::bad_input)
    }

    pub(super) fn client(&self) -> Result<Client, Failure> {
        let config = self.resolve(RawConfig::default())?;
        let broker = connect_broker(&config)?;
        let backend = crate::results::connect(
            &config.result_backend,
            crate::results::DEFAULT_RESULT_EXPIRES,
            &config.broker,
        )
        .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
        Ok(Client::new(broker, backend).with_routes(config.routes))
    }
}

fn connect_broker(config: &WorkerConfig) -> Result<Arc<dyn crate::broker::Broker>, Failure> {
    let options = crate::broker::amqp::AmqpOptions {
        queue_max_priority: config.queue_max_priority,
    };
    crate::broker::scheduled::connect(&config.broker, config.scheduler.as_deref(), options)
        .map_err(|e| Failure::bad_input(format!("{e:#}")))
}

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
    /// Tasks run at once. Default: the number of CPUs.
    #[arg(long, short = 'c', env = "WASMQ_CONCURRENCY")]
    concurrency: Option<usize>,
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
    #[command(flatten)]
    engine: EngineArgs,
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
            concurrency: self.concurrency,
            prefetch_multiplier: self.prefetch_multiplier,
            node_name: self.node_name.clone(),
            shutdown_timeout: self.shutdown_timeout.clone(),
            result_expires: self.result_expires.clone(),
            track_started: self.track_started,
            max_retries: self.max_retries,
            default_retry_delay: self.default_retry_delay.clone(),
            cache_dir: self.engine.cache_dir.clone(),
            limits,
            ceiling: None,
            max_deliveries: self.max_deliveries,
            queue_max_priority: self.queue_max_priority,
            tasks: None,
            routes: None,
        }
    }
}

/// Completes at the first SIGINT or SIGTERM; a second one exits the process at once.
async fn shutdown_signal() {
    let first = wait_for_signal().await;
    tracing::warn!("{first}: finishing running tasks (send it again to exit at once)");
    tokio::spawn(async {
        let second = wait_for_signal().await;
        eprintln!("{second} again: exiting now; unfinished messages will be redelivered");
        std::process::exit(130);
    });
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

pub(super) async fn worker(args: WorkerArgs) -> Result<(), Failure> {
    let config = args.endpoints.resolve(args.raw())?;
    let broker = connect_broker(&config)?;
    let backend = crate::results::connect(
        &config.result_backend,
        config.result_expires,
        &config.broker,
    )
    .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    let mut sandbox_config = args
        .engine
        .sandbox_config(pool_size(config.worker.concurrency));
    sandbox_config.defaults = config.limits;
    sandbox_config.ceiling = config.ceiling;
    if let Some(dir) = &config.cache_dir
        && !args.engine.no_cache
    {
        sandbox_config.cache_dir = Some(dir.clone());
    }
    let sandbox = Arc::new(Sandbox::new(sandbox_config).map_err(Failure::internal)?);

    if !config.plugins.exists() {
        let written = super::plugins::export_bundled(&config.plugins).map_err(Failure::internal)?;
        tracing::info!(folder = %config.plugins.display(), plugins = written.len(),
            "created the plugin folder with the bundled plugins (math, text, hostile)");
    }
    let registry = Arc::new(
        Registry::load_folder(sandbox, &config.plugins)
            .await
            .map_err(|e| Failure::new(ExitStatus::BadPlugin, e))?,
    );
    for (task, file) in registry.snapshot().tasks() {
        tracing::info!(task, plugin = %file.display(), "registered");
    }
    let watcher = registry.watch(Duration::from_millis(500));
    let mut options = config.worker;
    options.status_file.clone_from(&args.status_file);
    options.state_file = Some(args.state_file.clone().unwrap_or_else(|| {
        PathBuf::from(".wasmq/state").join(format!(
            "{}.revoked.json",
            options.node_name.replace(['/', '\\'], "_")
        ))
    }));
    let worker = Worker::new(broker, backend, registry, options);
    let stats = worker
        .run(shutdown_signal())
        .await
        .map_err(Failure::internal)?;
    watcher.abort();
    tracing::info!(?stats, "bye");
    Ok(())
}

/// Pool slots: the running tasks plus headroom for describe calls during hot deploys.
fn pool_size(concurrency: usize) -> u32 {
    u32::try_from(concurrency.saturating_add(4)).unwrap_or(u32::MAX)
}

#[derive(Debug, clap::Args)]
pub(super) struct SendArgs {
    /// The task name, e.g. math.add.
    task: String,
    /// Positional arguments as a JSON array, e.g. '[2, 3]'.
    #[arg(default_value = "[]")]
    args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    /// The queue. Default: the task's route in the config file's [routes], else celery.
    #[arg(long, short = 'Q')]
    queue: Option<String>,
    /// Run no earlier than SECS seconds from now.
    #[arg(long, value_name = "SECS")]
    countdown: Option<f64>,
    /// Expire (REVOKED, not run) if not started within SECS seconds.
    #[arg(long, value_name = "SECS")]
    expires: Option<f64>,
    /// Message priority 0-255 (higher first).
    #[arg(long)]
    priority: Option<u8>,
    /// Hard time limit in seconds.
    #[arg(long, value_name = "SECS")]
    time_limit: Option<f64>,
    /// Soft time limit in seconds.
    #[arg(long, value_name = "SECS")]
    soft_time_limit: Option<f64>,
    /// Use this task id.
    #[arg(long)]
    id: Option<String>,
    /// Wait for the result and print it (a failure exits non-zero with the error).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub(super) fn seconds(name: &str, secs: Option<f64>) -> Result<Option<Duration>, Failure> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            Failure::bad_input(format!("--{name} must be a non-negative number of seconds"))
        })
    })
    .transpose()
}

pub(super) async fn send(args: SendArgs) -> Result<(), Failure> {
    let positional: Value = serde_json::from_str(&args.args)
        .map_err(|e| Failure::bad_input(format!("ARGS_JSON is not JSON: {e}")))?;
    let Value::Array(positional) = positional else {
        return Err(Failure::bad_input(
            "ARGS_JSON must be a JSON array, e.g. '[2, 3]'",
        ));
    };
    let keywords: Value = serde_json::from_str(&args.kwargs)
        .map_err(|e| Failure::bad_input(format!("--kwargs is not JSON: {e}")))?;
    let Value::Object(keywords) = keywords else {
        return Err(Failure::bad_input(
            "--kwargs must be a JSON object, e.g. '{\"b\": 3}'",
        ));
    };
    let timeout = seconds("timeout", Some(args.timeout))?.unwrap_or_default();
    let options = SendOptions {
        task_id: args.id.clone(),
        countdown: seconds("countdown", args.countdown)?,
        expires: seconds("expires", args.expires)?,
        queue: args.queue.clone(),
        priority: args.priority,
        time_limit: seconds("time-limit", args.time_limit)?,
        soft_time_limit: seconds("soft-time-limit", args.soft_time_limit)?,
        ..SendOptions::default()
    };
    let client = args.endpoints.client()?;
    let result = client
        .send_task(&args.task, positional, keywords, options)
        .await
        .map_err(|e| Failure::internal(anyhow::anyhow!("{e:#}")))?;
    if !args.wait {
        println!("{}", result.id);
        return Ok(());
    }
    print_ready(&args.task, result.get(timeout).await)
}

pub(super) fn print_ready(task: &str, outcome: Result<Value, GetError>) -> Result<(), Failure> {
    match outcome {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(GetError::Failed { task_id, exception }) => Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("{task}[{task_id}] failed: {exception}"),
        )),
        Err(GetError::Revoked { task_id, exception }) => Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("{task}[{task_id}] was revoked: {exception}"),
        )),
        Err(GetError::Backend(error @ ResultError::Timeout { .. })) => {
            Err(Failure::new(ExitStatus::Timeout, error))
        }
        Err(GetError::Backend(error)) => Err(Failure::internal(error)),
        Err(GetError::NotSent(error)) => Err(Failure::internal(error)),
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct RevokeArgs {
    /// The ids of the tasks to revoke.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Also interrupt the task if a worker is running it.
    #[arg(long)]
    terminate: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub(super) async fn revoke(args: RevokeArgs) -> Result<(), Failure> {
    let client = args.endpoints.client()?;
    for id in &args.ids {
        client
            .revoke(id, args.terminate)
            .await
            .map_err(|e| Failure::internal(anyhow::anyhow!("cannot revoke {id}: {e:#}")))?;
        println!(
            "revoked {id}{}",
            if args.terminate { " (terminate)" } else { "" }
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(super) struct ResultArgs {
    /// The task id.
    id: String,
    /// Wait until the task is ready.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    /// Print the whole Celery meta JSON instead of the value.
    #[arg(long)]
    meta: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub(super) async fn result(args: ResultArgs) -> Result<(), Failure> {
    let client = args.endpoints.client()?;
    let handle = client.result(&args.id);
    let meta = if args.wait {
        let timeout = seconds("timeout", Some(args.timeout))?.unwrap_or_default();
        match handle.meta().await.map_err(Failure::internal)? {
            Some(meta) if meta.status.is_ready() => meta,
            _ => {
                let waited = client.result(&args.id);
                match waited.get(timeout).await {
                    Err(GetError::Backend(error @ ResultError::Timeout { .. })) => {
                        return Err(Failure::new(ExitStatus::Timeout, error));
                    }
                    _ => handle
                        .meta()
                        .await
                        .map_err(Failure::internal)?
                        .unwrap_or_else(|| pending(&args.id)),
                }
            }
        }
    } else {
        handle
            .meta()
            .await
            .map_err(Failure::internal)?
            .unwrap_or_else(|| pending(&args.id))
    };
    if args.meta {
        println!("{}", serde_json::to_string(&meta).unwrap_or_default());
        return Ok(());
    }
    match meta.status {
        TaskState::Success | TaskState::Failure | TaskState::Revoked => {
            print_ready(&args.id, crate::client::into_value(meta))
        }
        other => {
            println!("{other}");
            Ok(())
        }
    }
}

fn pending(id: &str) -> ResultMeta {
    ResultMeta::custom(id, "PENDING", Value::Null)
}

#[derive(Debug, clap::Args)]
pub(super) struct DeadLettersArgs {
    /// The work queue whose dead letters to show.
    #[arg(long, short = 'Q', default_value = "celery")]
    queue: String,
    /// How many to show, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub(super) async fn dead_letters(args: DeadLettersArgs) -> Result<(), Failure> {
    let broker = crate::broker::connect(
        args.endpoints
            .broker
            .as_deref()
            .unwrap_or(DEFAULT_DATABASE_URL),
    )
    .map_err(|e| Failure::bad_input(format!("{e:#}")))?;
    let letters = broker
        .dead_letters(&args.queue, args.limit)
        .await
        .map_err(Failure::internal)?;
    for letter in &letters {
        if args.json {
            println!("{}", serde_json::to_string(letter).unwrap_or_default());
        } else {
            let task = letter
                .envelope
                .headers
                .get("task")
                .and_then(Value::as_str)
                .unwrap_or("?");
            println!(
                "{}  {}  {}  deliveries={}  {}",
                letter.queue,
                letter.task_id.as_deref().unwrap_or("(no id)"),
                task,
                letter.delivery_count,
                letter.reason
            );
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(super) struct StatusArgs {
    /// The status file a worker writes (`wasmq worker --status-file`).
    #[arg(long, env = "WASMQ_STATUS_FILE")]
    status_file: PathBuf,
    /// Consider the worker dead if the file is older than this many seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    max_age: f64,
}

/// Prints the worker's status; exits 0 only when it is consuming and the status is fresh.
pub(super) async fn status(args: StatusArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.status_file).map_err(|e| {
        Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("no status at {}: {e}", args.status_file.display()),
        )
    })?;
    println!("{text}");
    let status: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::internal(anyhow::anyhow!("unreadable status: {e}")))?;
    let age = std::fs::metadata(&args.status_file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default();
    if age.as_secs_f64() > args.max_age {
        return Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!(
                "the status is {:.0} s old: the worker is not running",
                age.as_secs_f64()
            ),
        ));
    }
    if status["consuming"] != Value::Bool(true) {
        return Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!(
                "the worker is {}, not consuming",
                status["state"].as_str().unwrap_or("unknown")
            ),
        ));
    }
    Ok(())
}
