//! The `rusage` section of `inspect stats` (Celery: `resource.getrusage(RUSAGE_SELF)`),
//! read from `/proc/self` on Linux, since wasmq calls no C library directly (`unsafe` is
//! denied). Fields `/proc` does not expose are 0, as Linux's `getrusage` reports them
//! (`ixrss`, `idrss`, `isrss`, `nswap`, `msgsnd`, `msgrcv`, `nsignals`). Elsewhere: null.

use serde_json::{Value, json};

/// Clock ticks per second of `/proc/self/stat`'s times (Linux's `USER_HZ`, 100 on every
/// architecture Rust targets).
const USER_HZ: f64 = 100.0;

/// This process's resource usage, as Celery's `stats` reports it; null when unknown.
pub(super) fn rusage() -> Value {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Value::Null;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    from_proc(&stat, &status, &io).unwrap_or(Value::Null)
}

/// The usage from the text of `/proc/self/stat`, `status` and `io`.
fn from_proc(stat: &str, status: &str, io: &str) -> Option<Value> {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // `fields[0]` is field 3 (state): field n is `fields[n - 3]`.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let line = |text: &str, key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(json!({
        "utime": field(14)? as f64 / USER_HZ,
        "stime": field(15)? as f64 / USER_HZ,
        // Kibibytes, as getrusage reports it on Linux.
        "maxrss": line(status, "VmHWM:"),
        "ixrss": 0,
        "idrss": 0,
        "isrss": 0,
        "minflt": field(10)?,
        "majflt": field(12)?,
        "nswap": 0,
        // 512-byte blocks, as getrusage counts them.
        "inblock": line(io, "read_bytes:") / 512,
        "oublock": line(io, "write_bytes:") / 512,
        "msgsnd": 0,
        "msgrcv": 0,
        "nsignals": 0,
        "nvcsw": line(status, "voluntary_ctxt_switches:"),
        "nivcsw": line(status, "nonvoluntary_ctxt_switches:"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_give_celerys_rusage_fields() {
        let stat = "42 (wasmq (worker)) S 1 42 42 0 -1 4194560 1234 0 7 0 250 50 0 0 20 0";
        let status = "Name:\twasmq\nVmHWM:\t  20480 kB\nvoluntary_ctxt_switches:\t9\n\
                      nonvoluntary_ctxt_switches:\t3\n";
        let io = "rchar: 1\nread_bytes: 1024\nwrite_bytes: 4096\n";
        let usage = from_proc(stat, status, io).unwrap();
        assert_eq!(usage["utime"], 2.5);
        assert_eq!(usage["stime"], 0.5);
        assert_eq!(usage["maxrss"], 20480);
        assert_eq!(usage["minflt"], 1234);
        assert_eq!(usage["majflt"], 7);
        assert_eq!(
            (usage["inblock"].as_u64(), usage["oublock"].as_u64()),
            (Some(2), Some(8))
        );
        assert_eq!(
            (usage["nvcsw"].as_u64(), usage["nivcsw"].as_u64()),
            (Some(9), Some(3))
        );
        assert!(from_proc("garbage", "", "").is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_usage() {
        let usage = rusage();
        assert!(usage["maxrss"].as_u64().unwrap() > 0, "{usage}");
    }
}
