//! The `wasmq` command. Everything lives in the library (`wasmq::cli`).

/// mimalloc instead of the system allocator: a worker makes many small short-lived
/// allocations per task (AMQP header tables, JSON values, wasmtime's per-store state), and
/// malloc/free were ~20 % of the worker's CPU in `perf` during the AMQP drain bench.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wasmq::cli::main()
}
