//! Flags more than one command shares: the engine flags ([`EngineArgs`]) of every command
//! that loads plugins, and the parser of the seconds flags (`--timeout`, `--countdown`, …) of
//! the client commands.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use super::exit::Failure;
use crate::engine::{AllocatorKind, CpuMetering, Sandbox, SandboxConfig};

/// Options shared by every command that loads plugins.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct EngineArgs {
    /// Directory of cached precompiled plugins. Default: ~/.cache/wasmq/artifacts.
    #[arg(long, env = "WASMQ_CACHE_DIR")]
    pub(super) cache_dir: Option<PathBuf>,
    /// Compile plugins every time instead of using the artifact cache.
    #[arg(long)]
    pub(super) no_cache: bool,
    /// Instance allocator: pooling (fast; falls back to on-demand when the pool cannot be
    /// reserved) or on-demand.
    #[arg(long, value_enum, default_value_t = AllocatorArg::Pooling)]
    allocator: AllocatorArg,
    /// How a task's CPU budget (its fuel) is enforced: `time`, the CPU time of the task's
    /// thread checked every 10 ms at 10^10 fuel per second (the default), or `fuel`,
    /// wasmtime's exact instruction count (deterministic; up to 2× slower on call-heavy code).
    #[arg(long, value_enum, env = "WASMQ_CPU_METERING")]
    pub(super) cpu_metering: Option<CpuMeteringArg>,
}

/// `--cpu-metering`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum CpuMeteringArg {
    Time,
    Fuel,
}

impl CpuMeteringArg {
    /// The sandbox setting.
    pub(super) fn metering(self) -> CpuMetering {
        match self {
            CpuMeteringArg::Time => CpuMetering::Time,
            CpuMeteringArg::Fuel => CpuMetering::Fuel,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AllocatorArg {
    Pooling,
    OnDemand,
}

impl EngineArgs {
    /// The sandbox settings these flags ask for, with `pool_size` instance slots.
    pub(super) fn sandbox_config(&self, pool_size: u32) -> SandboxConfig {
        let mut config = SandboxConfig {
            allocator: match self.allocator {
                AllocatorArg::Pooling => AllocatorKind::Pooling,
                AllocatorArg::OnDemand => AllocatorKind::OnDemand,
            },
            pool_size,
            cpu_metering: self
                .cpu_metering
                .map_or(CpuMetering::default(), CpuMeteringArg::metering),
            ..SandboxConfig::default()
        };
        if self.no_cache {
            config.cache_dir = None;
        } else if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        config
    }
}

/// A sandbox built from the engine flags, with `pool_size` instance slots.
pub(super) fn sandbox(engine: &EngineArgs, pool_size: u32) -> Result<Sandbox, Failure> {
    Sandbox::new(engine.sandbox_config(pool_size)).map_err(Failure::internal)
}

/// The duration of the seconds flag `--{name}`, or bad input (exit 2) when it is negative or
/// not finite.
pub(super) fn seconds(name: &str, secs: Option<f64>) -> Result<Option<Duration>, Failure> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            Failure::bad_input(format!("--{name} must be a non-negative number of seconds"))
        })
    })
    .transpose()
}
