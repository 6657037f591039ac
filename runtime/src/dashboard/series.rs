//! The charts' data: tasks ended and their runtimes, one bucket a second (by the time the
//! event says it ended), for the last [`SERIES_SECONDS`] seconds.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Seconds of throughput and runtime the charts show, one bucket a second.
pub(super) const SERIES_SECONDS: i64 = 120;

/// One second of the charts.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    succeeded: u32,
    failed: u32,
    runtime_sum: f64,
    runtime_max: f64,
    runtimes: u32,
}

/// Buckets by Unix second.
#[derive(Debug, Default)]
pub(super) struct Series {
    buckets: BTreeMap<i64, Bucket>,
}

impl Series {
    /// Counts a task that ended at `at` (Unix seconds), after `runtime` seconds when known.
    pub(super) fn count(&mut self, succeeded: bool, at: f64, runtime: Option<f64>) {
        let bucket = self.buckets.entry(at.floor() as i64).or_default();
        if succeeded {
            bucket.succeeded += 1;
        } else {
            bucket.failed += 1;
        }
        if let Some(runtime) = runtime {
            bucket.runtime_sum += runtime;
            bucket.runtime_max = bucket.runtime_max.max(runtime);
            bucket.runtimes += 1;
        }
    }

    /// Drops the seconds out of the window ending at `now`.
    pub(super) fn prune(&mut self, now: f64) {
        let oldest = now.floor() as i64 - SERIES_SECONDS;
        self.buckets.retain(|second, _| *second > oldest);
    }

    /// One value a second for the [`SERIES_SECONDS`] seconds ending at `now`, oldest first:
    /// tasks ended, of which failed, and the mean and longest runtime in milliseconds
    /// (`null` for a second without any).
    pub(super) fn to_json(&self, now: f64) -> Value {
        let end = now.floor() as i64;
        let start = end - SERIES_SECONDS + 1;
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        let (mut throughput, mut failed, mut mean, mut max) = (vec![], vec![], vec![], vec![]);
        for second in start..=end {
            let bucket = self.buckets.get(&second).copied().unwrap_or_default();
            throughput.push(bucket.succeeded + bucket.failed);
            failed.push(bucket.failed);
            if bucket.runtimes > 0 {
                mean.push(Value::from(ms(
                    bucket.runtime_sum / f64::from(bucket.runtimes)
                )));
                max.push(Value::from(ms(bucket.runtime_max)));
            } else {
                mean.push(Value::Null);
                max.push(Value::Null);
            }
        }
        json!({
            "start": start,
            "step": 1,
            "throughput": throughput,
            "failed": failed,
            "runtime_mean_ms": mean,
            "runtime_max_ms": max,
        })
    }
}
