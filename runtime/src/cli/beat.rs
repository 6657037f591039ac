//! `wasmq beat`: send periodic tasks from a schedule file until SIGINT/SIGTERM, or with
//! `--list` print each entry's next and last run. The lease flags ([`LeaseArgs`]) and
//! [`prepare`] are shared with `wasmq worker --beat`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};

use super::endpoints::Endpoints;
use super::exit::{ExitStatus, Failure};
use super::process::shutdown_signal;
use crate::beat::lease::{self, LeaseStore};
use crate::beat::{Beat, BeatOptions, Schedule, When};
use crate::client::Client;
use crate::config::{RawConfig, WorkerConfig};

#[derive(Debug, clap::Args)]
pub(super) struct BeatArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The schedule: a TOML file of [beat.<name>] entries (see examples/beat.toml). Changes
    /// are picked up while the beat runs.
    #[arg(long, short = 's', env = "WASMQ_BEAT_SCHEDULE")]
    schedule: PathBuf,
    /// Print each entry's schedule, next run and last run (from the lease store), and who
    /// leads; then exit.
    #[arg(long)]
    list: bool,
    /// This beat's name in logs and in its lease. Default: beat@<hostname>.
    #[arg(long = "name", short = 'n', env = "WASMQ_NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    lease: LeaseArgs,
}

/// Where beats agree on a leader and on each run; shared by `beat` and `worker --beat`.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct LeaseArgs {
    /// Where the beats hold their lease and claim each run: redis://HOST:PORT/DB,
    /// sqlite://PATH or amqp://… (an exclusive queue). Default: the Redis scheduler or result
    /// backend, else the embedded database file of the broker or result backend, else the
    /// RabbitMQ broker.
    #[arg(long = "beat-lease", env = "WASMQ_BEAT_LEASE", value_name = "URL")]
    url: Option<String>,
    /// How long the lease lasts unless renewed (a follower replaces a dead leader within
    /// it), e.g. 10s. Default: 10s.
    #[arg(
        long = "beat-lease-ttl",
        env = "WASMQ_BEAT_LEASE_TTL",
        value_name = "DURATION"
    )]
    ttl: Option<String>,
    /// The lease's name and key prefix: beats sharing it elect one leader. Default:
    /// wasmq.beat.
    #[arg(long = "beat-prefix", env = "WASMQ_BEAT_PREFIX")]
    prefix: Option<String>,
}

impl LeaseArgs {
    /// The lease store: the flag's, else one the configuration already has.
    fn store(&self, config: &WorkerConfig) -> Result<Arc<dyn LeaseStore>, Failure> {
        let redis = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        let sqlite = |url: &str| url.starts_with("sqlite://");
        let url = self
            .url
            .clone()
            .or_else(|| config.scheduler.clone().filter(|url| redis(url)))
            .or_else(|| redis(&config.result_backend).then(|| config.result_backend.clone()))
            .or_else(|| sqlite(&config.broker).then(|| config.broker.clone()))
            .or_else(|| sqlite(&config.result_backend).then(|| config.result_backend.clone()))
            .or_else(|| {
                config
                    .broker
                    .starts_with("amqp")
                    .then(|| config.broker.clone())
            })
            .ok_or_else(|| {
                Failure::bad_input(
                    "beat needs a lease store every beat shares: pass --beat-lease \
                     redis://HOST:PORT/DB, sqlite://PATH or amqp://…",
                )
            })?;
        let prefix = self.prefix.as_deref().unwrap_or(lease::DEFAULT_PREFIX);
        lease::connect(&url, prefix).map_err(|e| Failure::new(ExitStatus::BadInput, e))
    }

    fn ttl(&self) -> Result<Duration, Failure> {
        let Some(text) = &self.ttl else {
            return Ok(BeatOptions::default().lease_ttl);
        };
        let ttl = crate::units::parse_duration(text)
            .map_err(|e| Failure::bad_input(format!("--beat-lease-ttl: {e}")))?;
        if ttl < Duration::from_millis(300) {
            return Err(Failure::bad_input(
                "--beat-lease-ttl: must be at least 300ms",
            ));
        }
        Ok(ttl)
    }
}

/// Reads the schedule file: a bad one is one line and exit 2.
pub(super) fn load(path: &Path) -> Result<Schedule, Failure> {
    Schedule::load(path).map_err(|e| Failure::new(ExitStatus::BadInput, e))
}

/// A beat for `schedule`, read from `path` (and following it), sending through `client`.
pub(super) fn prepare(
    schedule: Schedule,
    path: &Path,
    lease: &LeaseArgs,
    config: &WorkerConfig,
    client: Client,
    node_name: Option<String>,
) -> Result<Beat, Failure> {
    let store = lease.store(config)?;
    let mut options = BeatOptions {
        lease_ttl: lease.ttl()?,
        ..BeatOptions::default()
    };
    if let Some(name) = node_name {
        options.node_name = name;
    }
    Ok(Beat::new(schedule, client, store, options).watching(path))
}

/// Runs a beat until the first SIGINT or SIGTERM (it then gives its lease up).
pub(super) async fn run(args: BeatArgs) -> Result<(), Failure> {
    let config = args.endpoints.resolve(RawConfig::default())?;
    if args.list {
        let schedule = load(&args.schedule)?;
        let store = args.lease.store(&config)?;
        return list(&schedule, &*store).await;
    }
    let schedule = load(&args.schedule)?;
    let client = args.endpoints.client()?;
    let beat = prepare(
        schedule,
        &args.schedule,
        &args.lease,
        &config,
        client,
        args.node_name.clone(),
    )?;
    beat.run(shutdown_signal()).await;
    Ok(())
}

/// Prints each entry's schedule, next run and last run, and the lease's holder.
async fn list(schedule: &Schedule, store: &dyn LeaseStore) -> Result<(), Failure> {
    let names: Vec<String> = schedule.entries.iter().map(|e| e.name.clone()).collect();
    let last = store.last_runs(&names).await.map_err(Failure::internal)?;
    let holder = store.holder().await.map_err(Failure::internal)?;
    let now = Utc::now();
    let time = |at: chrono::DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::Secs, true);
    println!(
        "{:<20} {:<18} {:<36} {:<22} {:<22} {:>6}  last id",
        "entry", "task", "schedule", "next run (UTC)", "last run (UTC)", "runs"
    );
    for entry in &schedule.entries {
        let next = if !entry.enabled {
            "disabled".to_owned()
        } else {
            match (entry.when.next_after(now), &entry.when) {
                (Some(at), When::Cron { zone, .. }) if *zone != chrono_tz::UTC => format!(
                    "{} ({})",
                    time(at),
                    at.with_timezone(zone).format("%H:%M %Z")
                ),
                (Some(at), _) => time(at),
                (None, _) => "never".to_owned(),
            }
        };
        let run = last.get(&entry.name);
        println!(
            "{:<20} {:<18} {:<36} {:<22} {:<22} {:>6}  {}",
            entry.name,
            entry.task,
            entry.when.to_string(),
            next,
            run.map_or_else(|| "never".to_owned(), |run| time(run.at)),
            run.map_or(0, |run| run.runs),
            run.map_or("-", |run| run.task_id.as_str()),
        );
    }
    println!(
        "leader: {} (lease store: {})",
        holder.as_deref().unwrap_or("none"),
        store.describe()
    );
    Ok(())
}
