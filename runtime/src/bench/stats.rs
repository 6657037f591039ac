//! The numbers a benchmark reports: latency percentiles and how they are printed, and this
//! process's CPU time and resident memory (from `/proc`, Linux).

use std::time::Duration;

/// The `p`-th percentile (nearest rank) of sorted values.
pub(super) fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// p50, p95 and p99 of sorted samples.
pub(super) fn p50_p95_p99(sorted: &[f64]) -> [f64; 3] {
    [
        percentile(sorted, 50.0),
        percentile(sorted, 95.0),
        percentile(sorted, 99.0),
    ]
}

/// `p50 … · p95 … · p99 … ms`, for p50/p95/p99 in milliseconds.
pub(super) fn format_percentiles(ms: [f64; 3]) -> String {
    format!("p50 {:.2} · p95 {:.2} · p99 {:.2} ms", ms[0], ms[1], ms[2])
}

/// A duration in milliseconds with two decimals, e.g. `1.25 ms`.
pub(super) fn format_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time this process has used (user + system), from `/proc/self/stat`.
pub(super) fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start after ") ".
            let rest = stat
                .rsplit_once(") ")?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            let utime: u64 = rest.get(11)?.parse().ok()?;
            let stime: u64 = rest.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // The kernel reports in USER_HZ, 100 on Linux.
    ticks as f64 / 100.0
}

/// This process's resident memory in KiB, from `/proc/self/status`.
pub(super) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p50_p95_p99(&samples), [51.0, 95.0, 99.0]);
        assert_eq!(percentile::<f64>(&[], 50.0), 0.0);
        assert_eq!(percentile(&[Duration::from_millis(7)], 99.0).as_millis(), 7);
        assert_eq!(
            format_percentiles([1.0, 2.5, 10.0]),
            "p50 1.00 · p95 2.50 · p99 10.00 ms"
        );
    }

    #[test]
    fn this_process_has_resident_memory_and_cpu_time() {
        assert!(rss_kib() > 0);
        // CPU time advances in ticks of 10 ms: burn until it moves (it never does when
        // `/proc/self/stat` cannot be read).
        let before = cpu_seconds();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut n = 0_u64;
        while cpu_seconds() <= before {
            assert!(std::time::Instant::now() < deadline, "no CPU time measured");
            for i in 0..100_000 {
                n = std::hint::black_box(n.wrapping_add(i));
            }
        }
    }
}
