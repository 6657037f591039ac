//! The state of one sandboxed call: what lives in a fresh `Store` and dies with it.
//!
//! A call owns a WASI context with no environment and no arguments, and only the preopened
//! folders, sockets and `wasi:config` variables its grants name (`grants.rs`); captured, bounded stdout/stderr pipes; a resource limiter that enforces
//! the memory cap and records when it refused a growth (so a Rust guest's abort after a
//! failed allocation is classified as the memory limit, not as a generic trap); and the host
//! side of the `host` interface (log, update-state, soft-time-left).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

use super::bindings::{self, types};
use super::outcome::HostcallLimit;
use bindings::wasmq::task::host;

/// A progress report a task made with `update_state` (Celery's custom states).
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    /// The reporting task's id.
    pub task_id: String,
    /// The custom state, e.g. `PROGRESS`.
    pub state: String,
    /// Its metadata.
    pub meta: serde_json::Value,
}

/// Receives the `update_state` reports of running tasks.
pub type StateListener = Arc<dyn Fn(StateUpdate) + Send + Sync>;

/// A handle that interrupts a running call from outside (e.g. `revoke --terminate`).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Interrupts the call: at its next epoch tick (within about 10 ms) when the guest is
    /// running, at once when it is blocked in a host call.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Completes once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Enforces a call's memory cap over **all** of its linear memories together (a component
/// may define several: a cap per memory would let it use a multiple of its limit), caps the
/// elements of all its tables together, and remembers whether it refused a growth.
pub(crate) struct SandboxLimiter {
    pub(crate) memory_limit: usize,
    pub(crate) memory_denied: bool,
    /// Bytes of every linear memory of the Store, as granted so far.
    memory_total: usize,
    /// Elements of every table of the Store, as granted so far.
    table_elements: usize,
}

impl SandboxLimiter {
    /// A limiter allowing `memory_limit` bytes of linear memory in all.
    pub(crate) fn new(memory_limit: usize) -> Self {
        Self {
            memory_limit,
            memory_denied: false,
            memory_total: 0,
            table_elements: 0,
        }
    }
}

/// Table elements (all tables together), instances, tables and memories a single call may
/// create. Rust plugins use one memory, a handful of tables and a few core instances.
const MAX_TABLE_ELEMENTS: usize = 100_000;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 4;

impl ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // `current` is this memory's size, already counted (0 when it is being created).
        let total = (self.memory_total - current.min(self.memory_total)).saturating_add(desired);
        if total > self.memory_limit {
            self.memory_denied = true;
            return Ok(false);
        }
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        self.memory_total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total =
            (self.table_elements - current.min(self.table_elements)).saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS || maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Caps on what a guest may hand to host functions.
pub(crate) const MAX_LOG_MESSAGE_BYTES: usize = 8 << 10;
pub(crate) const MAX_STATE_META_BYTES: usize = 64 << 10;

/// Lines of captured output forwarded to the log per stream and call.
const MAX_FORWARDED_LINES: usize = 50;

/// Everything a fresh `Store` holds for one call.
pub(crate) struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// The variables granted to this call, served by `wasi:config/store`.
    pub(crate) variables: WasiConfigVariables,
    /// Values the call's log records never show (its tenant's secrets).
    pub(crate) secrets: Vec<String>,
    pub(crate) limiter: SandboxLimiter,
    /// Tags log records and state updates.
    pub(crate) task_id: String,
    pub(crate) task: String,
    /// When the soft time limit passes, if the call has one.
    pub(crate) soft_deadline: Option<Instant>,
    pub(crate) on_state: Option<StateListener>,
    /// Keeps the epoch ticker ticking while this store lives.
    pub(crate) _ticking: Option<super::ticker::TickerHold>,
    /// The CPU time this call has used (see `engine::cpu`).
    pub(crate) cpu_clock: std::sync::Arc<super::cpu::CpuClock>,
}

/// The captured output streams of a call; clones share the buffer with the store's pipes.
pub(crate) struct Captured {
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
}

impl Captured {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            stdout: MemoryOutputPipe::new(cap),
            stderr: MemoryOutputPipe::new(cap),
        }
    }

    /// Forwards what the guest printed to `tracing`, one record per line, tagged with the
    /// task id.
    pub(crate) fn forward_to_log(&self, task_id: &str, task: &str, secrets: &[String]) {
        for (stream, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = pipe.contents();
            if bytes.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            for line in lines.by_ref().take(MAX_FORWARDED_LINES) {
                let line = super::grants::redact(secrets, line);
                tracing::info!(target: "wasmq::guest", task_id, task, stream, "{line}");
            }
            let rest = lines.count();
            if rest > 0 {
                tracing::info!(target: "wasmq::guest", task_id, task, stream,
                    "… {rest} more lines not forwarded");
            }
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The `wasi:config/store` host of a call: its granted variables.
pub(crate) fn wasi_config(state: &mut CallState) -> WasiConfig<'_> {
    WasiConfig::from(&state.variables)
}

impl types::Host for CallState {}

impl host::Host for CallState {
    fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        // Secrets go before truncation, which could otherwise cut one and show its start.
        let mut message = super::grants::redact(&self.secrets, &message).into_owned();
        if message.len() > MAX_LOG_MESSAGE_BYTES {
            let mut end = MAX_LOG_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" …[truncated]");
        }
        let (task_id, task) = (self.task_id.as_str(), self.task.as_str());
        match level {
            types::LogLevel::Trace => {
                tracing::trace!(target: "wasmq::guest", task_id, task, "{message}")
            }
            types::LogLevel::Debug => {
                tracing::debug!(target: "wasmq::guest", task_id, task, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "wasmq::guest", task_id, task, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "wasmq::guest", task_id, task, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "wasmq::guest", task_id, task, "{message}")
            }
        }
        Ok(())
    }

    fn update_state(&mut self, state: String, meta_json: String) -> wasmtime::Result<()> {
        if meta_json.len() > MAX_STATE_META_BYTES {
            return Err(HostcallLimit(format!(
                "passed {} bytes of update-state metadata, over the {} KiB cap",
                meta_json.len(),
                MAX_STATE_META_BYTES >> 10
            ))
            .into());
        }
        let meta: serde_json::Value = serde_json::from_str(&meta_json)
            .map_err(|e| wasmtime::Error::msg(format!("update-state metadata is not JSON: {e}")))?;
        if let Some(listener) = &self.on_state {
            listener(StateUpdate {
                task_id: self.task_id.clone(),
                state,
                meta,
            });
        }
        Ok(())
    }

    fn soft_time_left_ms(&mut self) -> wasmtime::Result<Option<u64>> {
        Ok(self.soft_deadline.map(|deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
        }))
    }
}

/// The previous contract's `host` interface: the same three functions, served by the
/// current implementation.
impl bindings::v0_2::types::Host for CallState {}

impl bindings::v0_2::wasmq::task::host::Host for CallState {
    fn log(
        &mut self,
        level: bindings::v0_2::types::LogLevel,
        message: String,
    ) -> wasmtime::Result<()> {
        use bindings::v0_2::types::LogLevel as Old;
        let level = match level {
            Old::Trace => types::LogLevel::Trace,
            Old::Debug => types::LogLevel::Debug,
            Old::Info => types::LogLevel::Info,
            Old::Warn => types::LogLevel::Warn,
            Old::Error => types::LogLevel::Error,
        };
        host::Host::log(self, level, message)
    }

    fn update_state(&mut self, state: String, meta_json: String) -> wasmtime::Result<()> {
        host::Host::update_state(self, state, meta_json)
    }

    fn soft_time_left_ms(&mut self) -> wasmtime::Result<Option<u64>> {
        host::Host::soft_time_left_ms(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_cap_counts_every_memory_of_the_store_together() {
        let mut limiter = SandboxLimiter::new(10 << 20);
        // Two memories created at 4 MiB each: 8 MiB in all.
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        // The first grows to 6 MiB: 10 MiB in all, the cap.
        assert!(limiter.memory_growing(4 << 20, 6 << 20, None).unwrap());
        assert!(!limiter.memory_denied);
        // The second grows to 5 MiB: 11 MiB in all, over the cap, though each memory alone
        // is under it.
        assert!(!limiter.memory_growing(4 << 20, 5 << 20, None).unwrap());
        assert!(limiter.memory_denied);
        // A third memory of 1 byte no longer fits either.
        assert!(!limiter.memory_growing(0, 1, None).unwrap());
        // A memory's own maximum still holds.
        let mut limiter = SandboxLimiter::new(10 << 20);
        assert!(!limiter.memory_growing(0, 2 << 20, Some(1 << 20)).unwrap());
        assert!(
            !limiter.memory_denied,
            "refused by the module, not by the cap"
        );
    }

    #[test]
    fn table_elements_are_capped_across_tables() {
        let mut limiter = SandboxLimiter::new(1 << 20);
        assert!(
            limiter
                .table_growing(0, MAX_TABLE_ELEMENTS / 2, None)
                .unwrap()
        );
        assert!(
            limiter
                .table_growing(0, MAX_TABLE_ELEMENTS / 2, None)
                .unwrap()
        );
        assert!(!limiter.table_growing(0, 1, None).unwrap());
        assert!(
            limiter
                .table_growing(MAX_TABLE_ELEMENTS / 2, MAX_TABLE_ELEMENTS / 2, None)
                .unwrap(),
            "no growth"
        );
    }
}
