//! `wasmq result`: show a task's state or value from the shell, or wait for it with
//! `--wait`; `--meta` prints the whole Celery meta JSON.

use serde_json::Value;

use super::args::seconds;
use super::endpoints::Endpoints;
use super::exit::{ExitStatus, Failure, print_ready};
use crate::client::GetError;
use crate::results::{ResultError, ResultMeta, TaskState};

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

/// Prints the task's value (a failure exits 1) or its state while it is not ready.
pub(super) async fn run(args: ResultArgs) -> Result<(), Failure> {
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
