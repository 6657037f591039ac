//! The sandbox: the only module that knows wasmtime.
//!
//! One [`Sandbox`] per process owns one `wasmtime::Engine` (component model, epoch
//! interruption, fuel metering when its [`CpuMetering`] says so (`cpu.rs`), the pooling allocator — or the on-demand allocator where the pool's
//! address space cannot be reserved), the linker with WASI p2 and the `host` interface, and
//! one ticker thread that advances the epoch every [`SandboxConfig::epoch_tick`] while a store
//! is alive (see `ticker`).
//!
//! Plugins are compiled once ([`Sandbox::load_plugin`], with an on-disk artifact cache) into
//! a [`Plugin`] holding a ready `InstancePre`. Every [`Sandbox::call`] then builds a **fresh
//! `Store`**: a memory cap, a CPU budget (CPU time or fuel), a wall-clock deadline, WASI without ambient
//! rights (only the folders, connections and variables the call's [`Grants`] name),
//! captured and bounded output. Guests run on async fibers that yield back to the
//! executor at every epoch tick, so a CPU-bound guest never pins an executor thread; the
//! same tick enforces the deadline and, under CPU-time metering, the CPU budget. The call ends as exactly one [`Outcome`].
//!
//! Longer than 400 lines because it owns one idea, the sandbox's life cycle: building the
//! engine and linker, and running one call from a fresh `Store` to its [`CallReport`];
//! loading plugins, limits, grants, outcomes, what a task is told about its call
//! (`invocation.rs`) and the contract versions live beside it.

mod bindings;
mod cache;
mod call;
mod contract;
mod cpu;
mod grants;
mod invocation;
mod limits;
mod outcome;
mod plugin;
mod ticker;

use std::path::PathBuf;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;

pub use cache::CacheStatus;
pub use call::{CancelToken, StateListener, StateUpdate};
pub use cpu::{CpuMetering, FUEL_PER_CPU_SECOND, cpu_time_for_fuel, fuel_for_cpu_time};
pub use grants::{DirGrant, GrantError, Grants, NetworkGrant, NetworkRule, redact};
pub use invocation::{MessageInfo, MessageProperties};
pub use limits::{LimitOverrides, Limits, TenantLimits};
pub use outcome::{LimitExceeded, LimitKind, Outcome, TaskFailure};
pub use plugin::{Plugin, PluginError, TaskInfo};

use crate::units::format_bytes;
use call::{CallState, Captured, SandboxLimiter};
use cpu::CpuClock;
use outcome::{
    Cancelled, CpuBudgetExceeded, DeadlineExceeded, Observations, classify_error,
    task_error_outcome,
};

/// How instances get their memories, tables and stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorKind {
    /// Pre-reserved slots, reused across calls: the fast path.
    Pooling,
    /// Fresh mappings per call.
    OnDemand,
}

/// Engine-wide settings, fixed for the life of a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The ceiling no call can exceed, whatever the plugin or caller asks for. Default: fuel
    /// `u64::MAX`, memory 1 GiB, timeout 1 hour.
    pub ceiling: Limits,
    /// Limits of a call when neither the caller nor the plugin says otherwise.
    /// Default: [`Limits::DEFAULT`].
    pub defaults: Limits,
    /// Preferred allocator; pooling falls back to on-demand when its reservation fails.
    /// Default: pooling.
    pub allocator: AllocatorKind,
    /// Maximum concurrent sandboxes (pool slots). Default: 128.
    pub pool_size: u32,
    /// How often the epoch advances: the granularity of wall-clock limits and of yielding.
    /// Default: 10 ms.
    pub epoch_tick: Duration,
    /// Where precompiled artifacts are cached; `None` disables the cache.
    /// Default: the user's cache directory (`~/.cache/wasmq/artifacts`).
    pub cache_dir: Option<PathBuf>,
    /// Cap of each captured output stream (stdout, stderr) per call. Default: 256 KiB.
    pub max_output_bytes: usize,
    /// Largest JSON result a call may return, and the most data a guest may pass to one
    /// host call: larger transfers are refused while being copied. Default: 16 MiB.
    pub max_result_bytes: usize,
    /// Most random bytes a guest may request in one call. Default: 1 MiB.
    pub max_random_bytes: u64,
    /// The wasm stack limit. Default: 512 KiB.
    pub max_wasm_stack: usize,
    /// How a task's CPU budget (its `fuel` limit) is enforced: as thread CPU time checked at
    /// each epoch tick, or as wasmtime fuel. Default: [`CpuMetering::Time`]. Only
    /// benchmarks use [`CpuMetering::Off`].
    pub cpu_metering: CpuMetering,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            ceiling: Limits {
                fuel: u64::MAX,
                memory_bytes: 1 << 30,
                timeout: Duration::from_secs(3600),
            },
            defaults: Limits::DEFAULT,
            allocator: AllocatorKind::Pooling,
            pool_size: 128,
            epoch_tick: Duration::from_millis(10),
            cache_dir: default_cache_dir(),
            max_output_bytes: 256 << 10,
            max_result_bytes: 16 << 20,
            max_random_bytes: 1 << 20,
            max_wasm_stack: 512 << 10,
            cpu_metering: CpuMetering::Time,
        }
    }
}

/// `~/.cache/wasmq/artifacts` (or the platform's equivalent).
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|dir| dir.join("wasmq").join("artifacts"))
}

/// Errors creating a [`Sandbox`].
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// wasmtime rejected the engine configuration.
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
}

/// Errors that prevent a call from running at all; the task itself is not at fault.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin does not export the requested task.
    #[error("plugin {plugin} has no task named {task} (it has: {available})")]
    UnknownTask {
        /// The plugin's name.
        plugin: String,
        /// The requested task.
        task: String,
        /// The tasks it has, comma-separated.
        available: String,
    },
    /// The sandbox could not be set up (e.g. every pool slot is in use).
    #[error("cannot start a sandbox: {0}")]
    Unavailable(String),
    /// The call's grants cannot be given (e.g. a granted folder is missing). Trying again
    /// does not help until the configuration changes: the worker records a failure.
    #[error("cannot give the task its grants: {0}")]
    Grant(#[from] GrantError),
}

/// One call to make.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// Full task name, e.g. `math.add`.
    pub task: String,
    /// The task id.
    pub id: String,
    /// JSON array of positional arguments.
    pub args_json: String,
    /// JSON object of keyword arguments.
    pub kwargs_json: String,
    /// Retries before this attempt.
    pub retries: u32,
    /// Workflow root id.
    pub root_id: Option<String>,
    /// Parent task id.
    pub parent_id: Option<String>,
    /// Group id.
    pub group_id: Option<String>,
    /// Limits asked for by the caller; merged over the plugin's defaults and the sandbox's.
    pub limits: LimitOverrides,
    /// The tenant's layer of limits, between the plugin's declarations and the worker's
    /// defaults, and its ceiling; none = no tenant layer.
    pub tenant_limits: Option<TenantLimits>,
    /// What the call may reach (files, network, variables); nothing by default.
    pub grants: Grants,
    /// Soft time limit: the task can see the time left through the SDK.
    pub soft_timeout: Option<Duration>,
    /// What the task can read about the message the call serves (Celery's
    /// `self.request`); empty by default.
    pub message: MessageInfo,
    /// Interrupts the call from outside.
    pub cancel: Option<CancelToken>,
}

impl CallRequest {
    /// A request for `task` with positional arguments `args_json`, no keywords, a fresh
    /// random-free id (`call-<n>`), and default limits.
    pub fn new(task: impl Into<String>, args_json: impl Into<String>) -> Self {
        use std::sync::atomic::AtomicU64;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            task: task.into(),
            id: format!("call-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            args_json: args_json.into(),
            kwargs_json: "{}".to_owned(),
            retries: 0,
            root_id: None,
            parent_id: None,
            group_id: None,
            limits: LimitOverrides::default(),
            tenant_limits: None,
            grants: Grants::default(),
            soft_timeout: None,
            message: MessageInfo::default(),
            cancel: None,
        }
    }
}

/// How a call went.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// How it ended.
    pub outcome: Outcome,
    /// The limits it ran under.
    pub limits: Limits,
    /// Fuel consumed: exact under [`CpuMetering::Fuel`]; under [`CpuMetering::Time`], the
    /// CPU time the call used at [`FUEL_PER_CPU_SECOND`]; 0 under [`CpuMetering::Off`].
    pub fuel_used: u64,
    /// CPU time of the threads that ran the call (instantiation and the task, host calls
    /// included); zero for calls that ran no sandbox.
    pub cpu_time: Duration,
    /// Wall-clock time from store creation to the end of the call.
    pub elapsed: Duration,
}

/// One wasmtime engine with its linker and epoch ticker. Share it (it is `Send + Sync`);
/// create one per process.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<CallState>,
    config: SandboxConfig,
    allocator: AllocatorKind,
    cache: Option<cache::ArtifactCache>,
    /// Plugins compiled by Cranelift (not loaded from the artifact cache) so far.
    compiled: std::sync::atomic::AtomicU64,
    /// Advances the epoch while stores are alive; `None` without instrumentation.
    ticker: Option<ticker::EpochTicker>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("allocator", &self.allocator)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Linear memory kept mapped between tasks in a pool slot (see [`engine_config`]).
const MEMORY_KEEP_RESIDENT: usize = 256 << 10;

fn engine_config(config: &SandboxConfig, allocator: AllocatorKind) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .consume_fuel(config.cpu_metering == CpuMetering::Fuel)
        .epoch_interruption(config.cpu_metering != CpuMetering::Off)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.max_wasm_stack + (1 << 20));
    // Threads, shared memory and GC are compiled out (wasmtime's `threads` and `gc`
    // features are off in the workspace manifest).
    if allocator == AllocatorKind::Pooling {
        let mut pool = PoolingAllocationConfig::new();
        let slots = config.pool_size.max(1);
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(8))
            .total_stacks(slots)
            .max_memory_size(usize::try_from(config.ceiling.memory_bytes).unwrap_or(usize::MAX))
            // After each task wasmtime resets the instance's memory. Up to this much is
            // kept mapped and re-zeroed (image data re-copied) with memset; the rest is
            // unmapped with madvise, which costs page faults on the next task and, while
            // other threads of the worker run on other cores, a TLB shootdown (an IPI,
            // dear in a VM). The bundled plugins link a 128 KiB shadow stack (192 KiB of
            // initial memory), so a typical task never leaves this range: in the AMQP drain
            // bench this took the worker from 11.2k to 12.7k tasks/s, and the madvise path
            // had been 15 % of the worker's CPU in `perf`. A guest with Rust's default 1 MiB
            // stack pays memset for 256 KiB plus madvise for the rest. Tables stay resident
            // too (19 µs against 27 µs a call in `cargo bench --bench sandbox`).
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(64 << 10);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    } else {
        wasm.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    }
    wasm
}

impl Sandbox {
    /// Creates the engine, the linker and the epoch ticker.
    ///
    /// # Errors
    /// [`SandboxError::Engine`] when wasmtime rejects the configuration (with the pooling
    /// allocator, a failed reservation falls back to on-demand instead).
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let (engine, allocator) = match config.allocator {
            AllocatorKind::Pooling => {
                match Engine::new(&engine_config(&config, AllocatorKind::Pooling)) {
                    Ok(engine) => (engine, AllocatorKind::Pooling),
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"),
                            "cannot reserve the instance pool; using the on-demand allocator");
                        let engine = Engine::new(&engine_config(&config, AllocatorKind::OnDemand))
                            .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
                        (engine, AllocatorKind::OnDemand)
                    }
                }
            }
            AllocatorKind::OnDemand => (
                Engine::new(&engine_config(&config, AllocatorKind::OnDemand))
                    .map_err(|e| SandboxError::Engine(format!("{e:#}")))?,
                AllocatorKind::OnDemand,
            ),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        contract::add_to_linker(&mut linker).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
        // Linked for every plugin, so one that reads variables loads everywhere; a plugin
        // that never calls it does not import it. Each call serves only its own grants.
        wasmtime_wasi_config::add_to_linker(&mut linker, call::wasi_config)
            .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;

        let ticker = if config.cpu_metering != CpuMetering::Off {
            Some(
                ticker::EpochTicker::start(engine.clone(), config.epoch_tick).map_err(|e| {
                    SandboxError::Engine(format!("cannot start the epoch ticker: {e}"))
                })?,
            )
        } else {
            None
        };
        let cache = config
            .cache_dir
            .clone()
            .map(|dir| cache::ArtifactCache::new(dir, &engine));
        Ok(Self {
            engine,
            linker,
            config,
            allocator,
            cache,
            compiled: std::sync::atomic::AtomicU64::new(0),
            ticker,
        })
    }

    /// How many plugins this sandbox has compiled with Cranelift (artifact cache hits not
    /// counted): what a refused plugin must never cost.
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// The allocator actually in use (pooling may have fallen back to on-demand).
    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    /// The engine-wide configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The path the artifact cache uses for a plugin with these bytes, if caching is on.
    pub fn cached_artifact_path(&self, plugin_bytes: &[u8]) -> Option<PathBuf> {
        self.cache
            .as_ref()
            .map(|c| c.path_for(&cache::content_hash(plugin_bytes)))
    }

    /// The limits `request` would run under with `plugin`: the request's, else the
    /// plugin's declared ones, else the tenant's defaults, else the worker's; clamped to
    /// the lower of the tenant's ceiling and the worker's ([`Limits::for_call`]). A worker
    /// asks before running a task, e.g. to charge its memory to a tenant's budget;
    /// [`Sandbox::call`] runs under exactly these.
    ///
    /// # Errors
    /// [`CallError::UnknownTask`] when the plugin has no such task.
    pub fn limits_for(&self, plugin: &Plugin, request: &CallRequest) -> Result<Limits, CallError> {
        let info = plugin
            .task(&request.task)
            .ok_or_else(|| CallError::UnknownTask {
                plugin: plugin.name().to_owned(),
                task: request.task.clone(),
                available: plugin
                    .tasks()
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(Limits::for_call(
            request.limits,
            info.limits,
            request.tenant_limits.as_ref(),
            self.config.defaults,
            self.config.ceiling,
        ))
    }

    /// Builds a fresh store for one call, with `grants` and nothing else.
    #[allow(clippy::too_many_arguments)] // one call's whole setup, each part named
    fn new_store(
        &self,
        limits: &Limits,
        task_id: &str,
        task: &str,
        grants: &Grants,
        soft_deadline: Option<Instant>,
        cancel: Option<CancelToken>,
        on_state: Option<StateListener>,
    ) -> Result<(Store<CallState>, Captured), CallError> {
        let cpu_clock = Arc::new(CpuClock::default());
        let captured = Captured::new(self.config.max_output_bytes);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(captured.stdout.clone())
            .stderr(captured.stderr.clone())
            .max_random_size(self.config.max_random_bytes);
        // No environment, arguments or preopens; sockets and lookups off unless granted.
        grants.apply(&mut wasi, task_id)?;
        let state = CallState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            // Only this call's variables; an empty set when none are granted.
            variables: grants
                .variables
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
            secrets: grants.secrets.clone(),
            limiter: SandboxLimiter::new(
                usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            ),
            task_id: task_id.to_owned(),
            task: task.to_owned(),
            soft_deadline,
            on_state,
            _ticking: self.ticker.as_ref().map(ticker::EpochTicker::hold),
            cpu_clock: Arc::clone(&cpu_clock),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_hostcall_fuel(self.config.max_result_bytes);
        if self.config.cpu_metering == CpuMetering::Fuel {
            store
                .set_fuel(limits.fuel)
                .map_err(|e| CallError::Unavailable(format!("{e:#}")))?;
        }
        if self.config.cpu_metering != CpuMetering::Off {
            let deadline = Instant::now() + limits.timeout;
            // Under fuel metering wasmtime enforces the budget itself.
            let cpu_budget = (self.config.cpu_metering == CpuMetering::Time)
                .then(|| cpu::cpu_time_for_fuel(limits.fuel));
            let clock = Arc::clone(&cpu_clock);
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
                    return Err(Cancelled.into());
                }
                if Instant::now() >= deadline {
                    return Err(DeadlineExceeded.into());
                }
                if let Some(budget) = cpu_budget {
                    let used = clock.used();
                    if used >= budget {
                        return Err(CpuBudgetExceeded { used }.into());
                    }
                }
                Ok(UpdateDeadline::Yield(1))
            });
        }
        Ok((store, captured))
    }

    /// Runs one task of `plugin` in a fresh sandbox.
    ///
    /// # Errors
    /// [`CallError`] only when the call cannot start (unknown task, grants that cannot be
    /// given, no free sandbox slot); everything the task does, including hitting a limit or trapping, is an [`Outcome`].
    pub async fn call(
        &self,
        plugin: &Plugin,
        request: CallRequest,
    ) -> Result<CallReport, CallError> {
        self.call_with_listener(plugin, request, None).await
    }

    /// [`Sandbox::call`], reporting the task's `update_state` calls to `on_state`.
    ///
    /// # Errors
    /// As [`Sandbox::call`].
    pub async fn call_with_listener(
        &self,
        plugin: &Plugin,
        mut request: CallRequest,
        on_state: Option<StateListener>,
    ) -> Result<CallReport, CallError> {
        let limits = self.limits_for(plugin, &request)?;
        let started = Instant::now();
        let soft_deadline = request.soft_timeout.map(|t| started + t);
        let (mut store, captured) = self.new_store(
            &limits,
            &request.id,
            &request.task,
            &request.grants,
            soft_deadline,
            request.cancel.clone(),
            on_state,
        )?;
        let invocation = invocation::invocation(&mut request);

        let cpu_clock = Arc::clone(&store.data().cpu_clock);
        let instantiate = plugin.instance_pre().instantiate(&mut store);
        let instance = match cpu::metered(&cpu_clock, instantiate).await {
            Ok(instance) => instance,
            Err(error) => {
                if error.downcast_ref::<wasmtime::Trap>().is_none()
                    && !store.data().limiter.memory_denied
                {
                    return Err(CallError::Unavailable(format!("{error:#}")));
                }
                let outcome = self.classify(&error, &store, &captured, &limits);
                return Ok(self.report(outcome, &store, &captured, &limits, started, &request));
            }
        };
        let call = instance.run(
            &mut store,
            &invocation,
            &request.args_json,
            &request.kwargs_json,
        );
        // Backstop for a guest blocked inside a host call (where no epoch check runs).
        let backstop = limits.timeout + self.config.epoch_tick * 10;
        // Cancellation too: a guest blocked in a host call never reaches an epoch check.
        let cancel = request.cancel.clone().unwrap_or_default();
        let finished = tokio::select! {
            finished = tokio::time::timeout(backstop, cpu::metered(&cpu_clock, call)) => Some(finished),
            () = cancel.cancelled() => None,
        };
        let outcome = match finished {
            Some(Ok(Ok(Ok(json)))) => self.check_result(json),
            Some(Ok(Ok(Err(task_error)))) => task_error_outcome(task_error),
            Some(Ok(Err(error))) => self.classify(&error, &store, &captured, &limits),
            Some(Err(_elapsed)) => {
                self.classify(&DeadlineExceeded.into(), &store, &captured, &limits)
            }
            None => self.classify(&Cancelled.into(), &store, &captured, &limits),
        };
        Ok(self.report(outcome, &store, &captured, &limits, started, &request))
    }

    fn classify(
        &self,
        error: &wasmtime::Error,
        store: &Store<CallState>,
        captured: &Captured,
        limits: &Limits,
    ) -> Outcome {
        let stderr = captured.stderr.contents();
        let cap = self.config.max_output_bytes;
        let output_full = captured.stdout.contents().len() >= cap || stderr.len() >= cap;
        classify_error(
            error,
            &Observations {
                limits,
                memory_denied: store.data().limiter.memory_denied,
                stderr: &stderr,
                output_cap: cap,
                output_full,
                max_result_bytes: self.config.max_result_bytes,
                max_wasm_stack: self.config.max_wasm_stack,
            },
        )
    }

    fn check_result(&self, json: String) -> Outcome {
        if json.len() > self.config.max_result_bytes {
            return Outcome::LimitExceeded(LimitExceeded::new(
                LimitKind::Output,
                format!(
                    "returned a result of {} bytes, over the {} result limit",
                    json.len(),
                    format_bytes(self.config.max_result_bytes as u64)
                ),
            ));
        }
        match serde_json::from_str::<serde::de::IgnoredAny>(&json) {
            Ok(_) => Outcome::Success(json),
            Err(e) => Outcome::Failed(TaskFailure::new(
                "EncodeError",
                format!("the task returned invalid JSON: {e}"),
            )),
        }
    }

    fn report(
        &self,
        outcome: Outcome,
        store: &Store<CallState>,
        captured: &Captured,
        limits: &Limits,
        started: Instant,
        request: &CallRequest,
    ) -> CallReport {
        captured.forward_to_log(&request.id, &request.task, &request.grants.secrets);
        let cpu_time = store.data().cpu_clock.used();
        let fuel_used = match self.config.cpu_metering {
            CpuMetering::Fuel => limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0)),
            CpuMetering::Time => cpu::fuel_for_cpu_time(cpu_time),
            CpuMetering::Off => 0,
        };
        CallReport {
            outcome,
            limits: *limits,
            fuel_used,
            cpu_time,
            elapsed: started.elapsed(),
        }
    }
}
