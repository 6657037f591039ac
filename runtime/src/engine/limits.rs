//! Resource limits of one task call, and how they are resolved.
//!
//! Limits come from, in order of precedence: the caller (a CLI flag, later the message's
//! `timelimit` header), the plugin's own `describe` defaults, and the worker's defaults. The
//! result is then clamped to the worker's ceiling, which nothing can exceed.

use std::fmt;
use std::time::Duration;

use crate::units::{format_bytes, format_duration};

/// Limits that may be partly specified; `None` means "not said at this level".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// CPU budget in fuel units.
    pub fuel: Option<u64>,
    /// Linear memory cap in bytes.
    pub memory_bytes: Option<u64>,
    /// Hard wall-clock limit.
    pub timeout: Option<Duration>,
}

impl LimitOverrides {
    /// Fills what `self` leaves unset from `fallback`.
    #[must_use]
    pub fn or(self, fallback: LimitOverrides) -> LimitOverrides {
        LimitOverrides {
            fuel: self.fuel.or(fallback.fuel),
            memory_bytes: self.memory_bytes.or(fallback.memory_bytes),
            timeout: self.timeout.or(fallback.timeout),
        }
    }
}

/// The limits one call runs under: every value is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU budget in fuel units (about one per wasm instruction; 1e9 is ~0.1 s here).
    pub fuel: u64,
    /// Linear memory cap in bytes.
    pub memory_bytes: u64,
    /// Hard wall-clock limit; the sandbox is interrupted when it passes.
    pub timeout: Duration,
}

impl Limits {
    /// The worker defaults when nothing else is configured: 10 billion fuel (about one
    /// second of guest CPU on this class of machine), 128 MiB of memory, 30 seconds.
    pub const DEFAULT: Limits = Limits {
        fuel: 10_000_000_000,
        memory_bytes: 128 << 20,
        timeout: Duration::from_secs(30),
    };

    /// Resolves `wanted` (already merged by precedence) over `defaults`, then clamps every
    /// value to `ceiling`.
    pub fn resolve(wanted: LimitOverrides, defaults: Limits, ceiling: Limits) -> Limits {
        Limits {
            fuel: wanted.fuel.unwrap_or(defaults.fuel).min(ceiling.fuel),
            memory_bytes: wanted
                .memory_bytes
                .unwrap_or(defaults.memory_bytes)
                .min(ceiling.memory_bytes),
            timeout: wanted
                .timeout
                .unwrap_or(defaults.timeout)
                .min(ceiling.timeout),
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fuel {}, memory {}, timeout {}",
            self.fuel,
            format_bytes(self.memory_bytes),
            format_duration(self.timeout)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_then_ceiling() {
        let ceiling = Limits {
            fuel: 1_000,
            memory_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
        };
        let defaults = Limits {
            fuel: 500,
            memory_bytes: 1 << 10,
            timeout: Duration::from_secs(1),
        };
        let caller = LimitOverrides {
            fuel: Some(2_000),
            ..LimitOverrides::default()
        };
        let plugin = LimitOverrides {
            fuel: Some(10),
            memory_bytes: Some(4 << 10),
            timeout: None,
        };
        let limits = Limits::resolve(caller.or(plugin), defaults, ceiling);
        assert_eq!(limits.fuel, 1_000, "caller wins but the ceiling clamps");
        assert_eq!(
            limits.memory_bytes,
            4 << 10,
            "plugin default beats worker default"
        );
        assert_eq!(
            limits.timeout,
            Duration::from_secs(1),
            "worker default fills the gap"
        );
    }
}
