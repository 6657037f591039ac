//! What a worker process takes from its surroundings, for one tenant or several: the
//! signals that stop it (SIGINT/SIGTERM, a second one exits at once) and where it remembers
//! revoked ids by default.

use std::path::PathBuf;

/// Completes at the first SIGINT or SIGTERM; a second one exits the process at once.
pub(super) async fn shutdown_signal() {
    let first = wait_for_signal().await;
    tracing::warn!("{first}: finishing running tasks (send it again to exit at once)");
    tokio::spawn(async {
        let second = wait_for_signal().await;
        eprintln!("{second} again: exiting now; unfinished messages will be redelivered");
        std::process::exit(130);
    });
}

/// Completes at the next SIGINT or SIGTERM, naming it.
pub(super) async fn wait_for_signal() -> &'static str {
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

/// Where a worker remembers revoked ids by default: `.wasmq/state/<node>.revoked.json`, or
/// `<node>.<tenant>.revoked.json` for one tenant of several.
pub(super) fn default_state_file(node_name: &str, tenant: Option<&str>) -> PathBuf {
    let node = node_name.replace(['/', '\\'], "_");
    PathBuf::from(".wasmq/state").join(match tenant {
        Some(tenant) => format!("{node}.{tenant}.revoked.json"),
        None => format!("{node}.revoked.json"),
    })
}
