//! `cpu`: CPU-heavy tasks, the workloads of `wasmq bench cpu`. Each task runs one function of
//! `bench/cpu-workloads`, the code the bench also runs natively, at the size it is given,
//! and returns the workload's summary (a count or a checksum).

use wasmq_sdk::task;

/// Naive recursive Fibonacci: call-heavy.
#[task]
fn fib(size: u32) -> u64 {
    cpu_workloads::fib(size)
}

/// Renders a generated Markdown document of `size` sections to HTML.
#[task]
fn markdown(size: u32) -> u64 {
    cpu_workloads::markdown(size)
}

/// Scans `size` KiB of generated log lines with three regexes.
#[task]
fn regex(size: u32) -> u64 {
    cpu_workloads::regex_scan(size)
}

/// Parses, regroups and serializes `size` JSON records.
#[task]
fn json(size: u32) -> u64 {
    cpu_workloads::json_transform(size)
}

/// SHA-256 over `size` KiB.
#[task]
fn sha256(size: u32) -> u64 {
    cpu_workloads::sha256(size)
}

/// Sorts `size` integers.
#[task]
fn sort(size: u32) -> u64 {
    cpu_workloads::sort(size)
}

wasmq_sdk::export_tasks!(fib, markdown, regex, json, sha256, sort);
