//! `wasmq dashboard`: serve the web dashboard (see [`crate::dashboard`]) until Ctrl-C or
//! SIGTERM. Prints `dashboard: http://ADDR/` once it listens (with `--listen …:0`, the port
//! the system chose).

use std::net::SocketAddr;

use super::endpoints::{Endpoints, connect_broker};
use super::exit::Failure;
use crate::config::RawConfig;
use crate::dashboard::{DashboardError, DashboardOptions};
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub(super) struct DashboardArgs {
    /// Serve the page on this address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:5555")]
    listen: SocketAddr,
    /// Show this queue (repeatable). Default: the configured worker queues (celery). Shown
    /// as well: the queues workers consume, queues named by task events, and on the
    /// embedded broker every queue in the file.
    #[arg(long = "queue", short = 'Q')]
    queues: Vec<String>,
    /// How many of the latest tasks to keep in memory.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// How often to read queue lengths (dead letters and inspect every third time), e.g. 2s.
    #[arg(long, default_value = "2s")]
    refresh: String,
    /// Do not broadcast `enable_events` (by default the dashboard switches task events on
    /// in every worker on the broker, as Flower does).
    #[arg(long)]
    no_enable_events: bool,
    #[command(flatten)]
    endpoints: Endpoints,
}

/// Serves the dashboard until interrupted.
pub(super) async fn run(args: DashboardArgs) -> Result<(), Failure> {
    let refresh =
        parse_duration(&args.refresh).map_err(|e| Failure::bad_input(format!("--refresh: {e}")))?;
    let config = args.endpoints.resolve(RawConfig::default())?;
    let broker = connect_broker(&config)?;
    let queues = if args.queues.is_empty() {
        config.worker.queues.clone()
    } else {
        args.queues
    };
    let options = DashboardOptions {
        queues,
        tasks_kept: args.tasks,
        refresh: refresh.max(std::time::Duration::from_millis(100)),
        enable_events: !args.no_enable_events,
        ..DashboardOptions::default()
    };
    let (bound, server) = crate::dashboard::bind(args.listen, broker, options, async {
        super::process::wait_for_signal().await;
    })
    .await
    .map_err(|e| match e {
        DashboardError::Bind { .. } => Failure::bad_input(format!("--listen: {e:#}")),
        DashboardError::NoEvents(_) => Failure::bad_input(e),
        DashboardError::Events(_) => Failure::internal(anyhow::Error::new(e)),
    })?;
    println!("dashboard: http://{bound}/");
    server.await;
    Ok(())
}
