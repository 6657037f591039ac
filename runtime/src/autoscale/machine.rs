//! The machine's figures the autoscaler needs, read from Linux's `/proc`: the CPU busy
//! share of the whole machine and of this process over the last interval (`/proc/stat`,
//! `/proc/self/stat`), and the memory available (`/proc/meminfo`). Elsewhere, or when a
//! file cannot be read, a figure is `None` and the autoscaler goes without it.

use super::CpuSample;

/// What [`MachineSampler::sample`] read.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MachineSample {
    /// The CPU since the previous sample (none on the first, or when unreadable).
    pub cpu: Option<CpuSample>,
    /// Available memory, 0–1 of the machine's total.
    pub memory_available: Option<f64>,
}

/// Reads the machine's CPU and memory; keeps the previous counters to report the CPU over
/// each interval.
#[derive(Debug)]
pub struct MachineSampler {
    cores: usize,
    /// The previous (machine busy, machine total, own) clock ticks.
    last: Option<(u64, u64, u64)>,
}

impl Default for MachineSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl MachineSampler {
    /// A sampler; its first [`sample`](Self::sample) has no CPU figure yet.
    pub fn new() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            last: None,
        }
    }

    /// The figures now (the CPU: since the previous call).
    pub fn sample(&mut self) -> MachineSample {
        let memory_available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| memory_available(&text));
        let counters = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| machine_ticks(&text))
            .zip(
                std::fs::read_to_string("/proc/self/stat")
                    .ok()
                    .and_then(|text| process_ticks(&text)),
            )
            .map(|((busy, total), own)| (busy, total, own));
        let cpu = match (self.last, counters) {
            (Some((busy0, total0, own0)), Some((busy, total, own))) if total > total0 => {
                let total = (total - total0) as f64;
                Some(CpuSample {
                    cores: self.cores,
                    machine: (busy.saturating_sub(busy0) as f64 / total).clamp(0.0, 1.0),
                    own: (own.saturating_sub(own0) as f64 / total).clamp(0.0, 1.0),
                })
            }
            _ => None,
        };
        if counters.is_some() {
            self.last = counters;
        }
        MachineSample {
            cpu,
            memory_available,
        }
    }
}

/// The machine's memory in bytes (`MemTotal`), when `/proc/meminfo` says.
pub fn memory_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `(busy, total)` clock ticks of all cores from `/proc/stat`'s `cpu` line: user, nice,
/// system, idle, iowait, irq, softirq, steal (guest time is already in user); idle and
/// iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// This process's user + system clock ticks from `/proc/self/stat` (fields 14 and 15,
/// counted after the command name, which may hold spaces, in parentheses).
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so utime (14) is the 12th from here.
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// `MemAvailable / MemTotal` from `/proc/meminfo`.
fn memory_available(meminfo: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        let line = meminfo.lines().find(|line| line.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let total = field("MemTotal:").filter(|total| *total > 0.0)?;
    Some((field("MemAvailable:")? / total).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_counts_idle_and_iowait_as_not_busy() {
        let stat = "cpu  100 5 50 800 40 2 3 0 7 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(machine_ticks(stat), Some((160, 1000)));
    }

    #[test]
    fn a_process_name_with_spaces_and_parentheses_is_skipped() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 500 0 0 0 123 45 0 0 20 0 9 0";
        assert_eq!(process_ticks(stat), Some(168));
    }

    #[test]
    fn available_memory_is_a_share_of_the_total() {
        let meminfo = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(memory_available(meminfo), Some(0.25));
        assert_eq!(memory_available("MemTotal: 0 kB\nMemAvailable: 0 kB"), None);
    }

    #[test]
    fn on_linux_the_second_sample_has_the_cpu() {
        let mut sampler = MachineSampler::new();
        let first = sampler.sample();
        assert_eq!(first.cpu, None);
        // Burn a little CPU so some ticks pass.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let second = sampler.sample();
        if cfg!(target_os = "linux") {
            let cpu = second.cpu.expect("a CPU figure");
            assert!(cpu.own > 0.0, "it burnt CPU: {cpu:?}");
            assert!(second.memory_available.is_some_and(|m| m > 0.0 && m <= 1.0));
        }
    }
}
