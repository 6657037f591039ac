//! `stamp`: tasks that say which build of the plugin ran them, so a fleet deploy can be
//! watched task by task. Two builds differ only in [`BUILD`]: change it (or, as the deploy
//! tests do, rewrite its last byte in the component) and you have a new version whose
//! answers tell it apart from the old one.

use std::time::Duration;

use wasmq_sdk::{TaskError, task};

/// This build's name. Kept whole in the component's data (`black_box`), so a test can find
/// and rewrite it.
const BUILD: &str = "stamp build 1";

fn build() -> String {
    std::hint::black_box(BUILD).to_owned()
}

/// Which build of this plugin ran the task.
#[task]
fn version() -> String {
    build()
}

/// Sleeps `seconds`, then says which build ran it: a task that is in flight while a deploy
/// swaps the plugin, and finishes on the version it started with.
#[task]
fn version_after(seconds: f64) -> Result<String, TaskError> {
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|e| TaskError::failed("ValueError", format!("cannot sleep {seconds} s: {e}")))?;
    std::thread::sleep(duration);
    Ok(build())
}

/// Appends this build's name to `seen` (the previous step's result in a chain), so a
/// chain's result lists the build that ran each step.
#[task]
fn trail(seen: Vec<String>) -> Vec<String> {
    let mut seen = seen;
    seen.push(build());
    seen
}

wasmq_sdk::export_tasks!(version, version_after, trail);
