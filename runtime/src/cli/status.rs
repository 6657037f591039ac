//! `wasmq status`: whether a worker is running and consuming, read from the status file it
//! rewrites every second (`wasmq worker --status-file`); exit 0 only when it is consuming and
//! the file is fresh, 1 otherwise. A worker serving tenants lists each one: its state and its
//! running, queued (held, not yet running) and finished messages.

use std::path::PathBuf;

use serde_json::Value;

use super::exit::{ExitStatus, Failure};

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
pub(super) async fn run(args: StatusArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.status_file).map_err(|e| {
        Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("no status at {}: {e}", args.status_file.display()),
        )
    })?;
    println!("{text}");
    let status: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::internal(anyhow::anyhow!("unreadable status: {e}")))?;
    if let Some(tenants) = status["tenants"].as_array() {
        println!(
            "{:<16} {:<12} {:>8} {:>8} {:>9} {:>9}",
            "tenant", "state", "running", "queued", "finished", "failed"
        );
        for tenant in tenants {
            println!(
                "{:<16} {:<12} {:>8} {:>8} {:>9} {:>9}",
                tenant["tenant"].as_str().unwrap_or("-"),
                tenant["state"].as_str().unwrap_or("unknown"),
                // A JSON value ignores the width; its text does not.
                tenant["running"].to_string(),
                tenant["queued"].to_string(),
                tenant["finished"].to_string(),
                tenant["failed"].to_string(),
            );
        }
    }
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
