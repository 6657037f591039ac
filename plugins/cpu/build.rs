//! Links the plugin with a 128 KiB shadow stack instead of Rust's default 1 MiB for wasm.
//! The stack is the start of linear memory, and a worker resets a task's whole memory after
//! every task: a small memory is kept resident and re-zeroed (a few µs) instead of being
//! unmapped and faulted back in, which on a multi-core machine also costs a TLB shootdown
//! per task (see BENCHMARKS.md). Overflowing it traps cleanly (out-of-bounds access).
fn main() {
    println!("cargo::rustc-link-arg-cdylib=-zstack-size=131072");
}
