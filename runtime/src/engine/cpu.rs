//! How a task's CPU is metered: the choice between fuel and CPU time, and the CPU-time
//! clock of one call.
//!
//! A task's CPU budget is its `fuel` limit. The sandbox enforces it one of two ways
//! ([`CpuMetering`]):
//!
//! - **CPU time** (the default): the guest's code carries only wasmtime's epoch checks (a
//!   load and a compare at function entries and loop headers). The call measures the CPU time
//!   of the thread that runs it, slice by slice ([`CpuClock`], [`metered`]), and at each epoch
//!   tick (10 ms) compares it with the budget converted at [`FUEL_PER_CPU_SECOND`]. A task
//!   that spins is stopped within a tick of its budget; the cost is that of the epoch checks.
//! - **Fuel**: wasmtime counts the instructions the guest executes and traps exactly at the
//!   budget. Deterministic (the same call always uses the same fuel, on any machine), which
//!   is what charging by work done needs, but every basic block updates a counter: up to 2×
//!   on call-heavy code (`wasmq bench cpu` measures it per workload).
//!
//! Either way the wall-clock `timeout` is enforced at the same epoch ticks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// How the sandbox meters a task's CPU (see the module documentation for what each costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuMetering {
    /// The CPU budget is thread CPU time, checked at every epoch tick. The default.
    #[default]
    Time,
    /// The CPU budget is wasmtime fuel: exact and deterministic, and dearer.
    Fuel,
    /// Nothing metered and no epoch checks: no CPU or wall-clock limit can be enforced
    /// inside guest code. Only benchmarks use it, to measure what metering costs.
    Off,
}

impl CpuMetering {
    /// Its name in configuration and on the command line: `time`, `fuel`, `off`.
    pub fn name(self) -> &'static str {
        match self {
            CpuMetering::Time => "time",
            CpuMetering::Fuel => "fuel",
            CpuMetering::Off => "off",
        }
    }

    /// Parses [`CpuMetering::name`]; `off` is accepted only where `allow_off` says so.
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(value: &str, allow_off: bool) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "time" => Ok(CpuMetering::Time),
            "fuel" => Ok(CpuMetering::Fuel),
            "off" if allow_off => Ok(CpuMetering::Off),
            _ => Err(format!(
                "unknown CPU metering {value:?} (expected \"time\" or \"fuel\")"
            )),
        }
    }
}

/// The exchange rate between a fuel budget and CPU time under [`CpuMetering::Time`]: ten
/// billion fuel is one second of CPU, the rate the default budget was chosen at (compiled
/// Wasm executes 0.7–1.4 × 10¹⁰ fuel units a second on the reference machine; `wasmq bench
/// cpu` prints the rate of each workload).
pub const FUEL_PER_CPU_SECOND: u64 = 10_000_000_000;

/// The CPU time a fuel budget buys under [`CpuMetering::Time`].
pub fn cpu_time_for_fuel(fuel: u64) -> Duration {
    let nanos = u128::from(fuel) * 1_000_000_000 / u128::from(FUEL_PER_CPU_SECOND);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The fuel that `cpu` is worth under [`CpuMetering::Time`] (what a call reports as used).
pub fn fuel_for_cpu_time(cpu: Duration) -> u64 {
    let fuel = cpu.as_nanos() * u128::from(FUEL_PER_CPU_SECOND) / 1_000_000_000;
    u64::try_from(fuel).unwrap_or(u64::MAX)
}

/// The CPU time the current thread has used, in nanoseconds.
#[cfg(unix)]
fn thread_cpu_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
}

/// Without a thread CPU clock, wall time since the process's first reading stands in: a
/// task is charged for the time it held its thread.
#[cfg(not(unix))]
fn thread_cpu_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The CPU time one call has used so far.
///
/// A call runs as a future that the executor polls, maybe on a different thread each time
/// it resumes after a yield; the thread CPU clock is read when each poll starts and ends
/// ([`metered`]), so the call is charged for exactly the slices it ran, wherever they ran.
/// The epoch callback, which runs inside a slice, adds the slice's time so far
/// ([`CpuClock::used`]).
#[derive(Debug, Default)]
pub(crate) struct CpuClock {
    /// Nanoseconds of the finished slices.
    spent: AtomicU64,
    /// The thread CPU clock when the running slice began; 0 between slices.
    slice_began: AtomicU64,
}

impl CpuClock {
    /// The CPU time used: the finished slices and the running one.
    pub(crate) fn used(&self) -> Duration {
        let spent = self.spent.load(Ordering::Relaxed);
        let began = self.slice_began.load(Ordering::Relaxed);
        let running = if began == 0 {
            0
        } else {
            thread_cpu_nanos().saturating_sub(began)
        };
        Duration::from_nanos(spent.saturating_add(running))
    }

    fn begin_slice(&self) {
        // A reading of 0 (the thread's very first nanosecond) would read as "no slice".
        self.slice_began
            .store(thread_cpu_nanos().max(1), Ordering::Relaxed);
    }

    fn end_slice(&self) {
        let began = self.slice_began.swap(0, Ordering::Relaxed);
        let slice = thread_cpu_nanos().saturating_sub(began);
        self.spent.fetch_add(slice, Ordering::Relaxed);
    }
}

/// Polls `call`, charging the CPU time of every poll to `clock`.
pub(crate) async fn metered<F: Future>(clock: &CpuClock, call: F) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx: &mut Context<'_>| poll_metered(clock, call.as_mut(), cx)).await
}

fn poll_metered<F: Future>(
    clock: &CpuClock,
    call: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    clock.begin_slice();
    let poll = call.poll(cx);
    clock.end_slice();
    poll
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuel_and_cpu_time_convert_both_ways() {
        assert_eq!(cpu_time_for_fuel(10_000_000_000), Duration::from_secs(1));
        assert_eq!(cpu_time_for_fuel(2_000_000_000), Duration::from_millis(200));
        assert_eq!(fuel_for_cpu_time(Duration::from_millis(1)), 10_000_000);
        assert_eq!(
            cpu_time_for_fuel(u64::MAX).as_secs(),
            u64::MAX / FUEL_PER_CPU_SECOND
        );
    }

    #[test]
    fn names_parse_back() {
        for metering in [CpuMetering::Time, CpuMetering::Fuel, CpuMetering::Off] {
            assert_eq!(CpuMetering::parse(metering.name(), true), Ok(metering));
        }
        assert!(CpuMetering::parse("off", false).is_err());
        assert_eq!(
            CpuMetering::parse("cycles", false).unwrap_err(),
            "unknown CPU metering \"cycles\" (expected \"time\" or \"fuel\")"
        );
    }

    /// The clock charges CPU spent inside polls, not time spent waiting between them.
    #[test]
    fn the_clock_counts_cpu_inside_polls_only() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let clock = CpuClock::default();
        runtime.block_on(metered(&clock, async {
            // 30 ms of this thread's CPU, not of the wall clock: on a busy machine 30 ms of
            // wall time can hold less than 25 ms of CPU (CI saw 24.8 ms).
            let spin_until = thread_cpu_nanos() + 30_000_000;
            while thread_cpu_nanos() < spin_until {
                std::hint::spin_loop();
            }
            // Waiting: the thread is parked, no CPU is charged.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }));
        let used = clock.used();
        assert!(
            used >= Duration::from_millis(25) && used < Duration::from_millis(80),
            "charged {used:?} for 30 ms of spinning and 100 ms of sleep"
        );
    }
}
