//! `wasmq revoke`: tell every worker not to run the given tasks (their result becomes
//! REVOKED); with `--terminate` a running one is interrupted.

use super::endpoints::Endpoints;
use super::exit::Failure;

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

/// Revokes each id in turn, printing one line per revocation sent.
pub(super) async fn run(args: RevokeArgs) -> Result<(), Failure> {
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
