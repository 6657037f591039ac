//! Resource limits of one task call, and how they are resolved.
//!
//! Limits come from, in order of precedence: the caller (a CLI flag, the message's
//! `timelimit` header), the plugin's own `describe` defaults, the tenant's defaults (when the
//! call belongs to a tenant, [`TenantLimits`]), and the worker's defaults. The result is then
//! clamped, field by field, to the lower of the tenant's ceiling and the worker's: nothing
//! can exceed either ([`Limits::for_call`]).

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

/// A tenant's layer of limits: its defaults sit between the plugin's declarations and the
/// worker's defaults, and its ceiling bounds every call of the tenant (below the worker's
/// ceiling, which still applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// What the tenant's calls get when neither the caller nor the plugin says.
    pub defaults: LimitOverrides,
    /// What no call of the tenant may exceed.
    pub ceiling: Limits,
}

impl Limits {
    /// Each field the lower of `self`'s and `other`'s.
    #[must_use]
    pub fn lowest(self, other: Limits) -> Limits {
        Limits {
            fuel: self.fuel.min(other.fuel),
            memory_bytes: self.memory_bytes.min(other.memory_bytes),
            timeout: self.timeout.min(other.timeout),
        }
    }

    /// The limits of one call, from every layer: the `caller`'s request (the message), then
    /// the `plugin`'s declarations, then the `tenant`'s defaults, then the worker's
    /// `defaults`; each field clamped to the lower of the tenant's ceiling and the worker's
    /// `ceiling`.
    pub fn for_call(
        caller: LimitOverrides,
        plugin: LimitOverrides,
        tenant: Option<&TenantLimits>,
        defaults: Limits,
        ceiling: Limits,
    ) -> Limits {
        let (wanted, ceiling) = match tenant {
            Some(tenant) => (
                caller.or(plugin).or(tenant.defaults),
                ceiling.lowest(tenant.ceiling),
            ),
            None => (caller.or(plugin), ceiling),
        };
        Limits::resolve(wanted, defaults, ceiling)
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

    const WORKER_CEILING: Limits = Limits {
        fuel: 1_000_000,
        memory_bytes: 1 << 30,
        timeout: Duration::from_secs(60),
    };
    const WORKER_DEFAULTS: Limits = Limits {
        fuel: 100_000,
        memory_bytes: 128 << 20,
        timeout: Duration::from_secs(30),
    };

    #[test]
    fn without_a_tenant_the_layers_are_as_before() {
        let caller = LimitOverrides {
            fuel: Some(5),
            ..LimitOverrides::default()
        };
        let plugin = LimitOverrides {
            memory_bytes: Some(1 << 20),
            ..LimitOverrides::default()
        };
        assert_eq!(
            Limits::for_call(caller, plugin, None, WORKER_DEFAULTS, WORKER_CEILING),
            Limits::resolve(caller.or(plugin), WORKER_DEFAULTS, WORKER_CEILING)
        );
    }

    #[test]
    fn tenant_defaults_sit_between_the_plugin_and_the_worker() {
        let tenant = TenantLimits {
            defaults: LimitOverrides {
                fuel: Some(50_000),
                memory_bytes: Some(16 << 20),
                timeout: None,
            },
            ceiling: WORKER_CEILING,
        };
        let plugin = LimitOverrides {
            memory_bytes: Some(32 << 20),
            ..LimitOverrides::default()
        };
        let limits = Limits::for_call(
            LimitOverrides::default(),
            plugin,
            Some(&tenant),
            WORKER_DEFAULTS,
            WORKER_CEILING,
        );
        assert_eq!(limits.memory_bytes, 32 << 20, "the plugin beats the tenant");
        assert_eq!(limits.fuel, 50_000, "the tenant beats the worker");
        assert_eq!(
            limits.timeout,
            Duration::from_secs(30),
            "the worker fills what the tenant leaves"
        );
        let caller = LimitOverrides {
            fuel: Some(70_000),
            ..LimitOverrides::default()
        };
        let limits = Limits::for_call(
            caller,
            plugin,
            Some(&tenant),
            WORKER_DEFAULTS,
            WORKER_CEILING,
        );
        assert_eq!(limits.fuel, 70_000, "the caller beats everyone");
    }

    #[test]
    fn the_lower_ceiling_wins_field_by_field() {
        let tenant = TenantLimits {
            defaults: LimitOverrides::default(),
            ceiling: Limits {
                fuel: 10_000,
                memory_bytes: 2 << 30,
                timeout: Duration::from_secs(5),
            },
        };
        let caller = LimitOverrides {
            fuel: Some(u64::MAX),
            memory_bytes: Some(u64::MAX),
            timeout: Some(Duration::from_secs(3600)),
        };
        let limits = Limits::for_call(
            caller,
            LimitOverrides::default(),
            Some(&tenant),
            WORKER_DEFAULTS,
            WORKER_CEILING,
        );
        assert_eq!(limits.fuel, 10_000, "the tenant's ceiling is lower");
        assert_eq!(
            limits.memory_bytes,
            1 << 30,
            "the worker's ceiling is lower: a tenant cannot raise it"
        );
        assert_eq!(limits.timeout, Duration::from_secs(5));
        // Defaults above a ceiling are clamped too.
        let limits = Limits::for_call(
            LimitOverrides::default(),
            LimitOverrides::default(),
            Some(&tenant),
            WORKER_DEFAULTS,
            WORKER_CEILING,
        );
        assert_eq!(limits.fuel, 10_000);
        assert_eq!(limits.timeout, Duration::from_secs(5));
        assert_eq!(limits.memory_bytes, 128 << 20);
        // A tenant default above the tenant's ceiling is clamped to it.
        let generous = TenantLimits {
            defaults: LimitOverrides {
                fuel: Some(20_000),
                ..LimitOverrides::default()
            },
            ..tenant
        };
        let limits = Limits::for_call(
            LimitOverrides::default(),
            LimitOverrides::default(),
            Some(&generous),
            WORKER_DEFAULTS,
            WORKER_CEILING,
        );
        assert_eq!(limits.fuel, 10_000);
    }
}
