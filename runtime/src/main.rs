//! The `wasmq` command. Everything lives in the library (`wasmq::cli`).

use std::process::ExitCode;

/// The stack a thread of this process gets unless it asks for its own size: 64 MiB of
/// address space, of which only the pages touched are ever committed. lapin parses a
/// message's header table recursively on its I/O thread (and wasmq converts and drops it
/// recursively on its own), so one message with a header nested 5,000 deep — which any
/// client may publish, and RabbitMQ delivers — overflowed the default 2 MiB and aborted the
/// worker, again after every restart. A content header must fit in one frame (RabbitMQ's
/// `frame_max`, 128 KiB by default), which bounds the nesting near 26,000 levels; those are
/// parsed, converted and dropped well within 64 MiB (`tests/all/bad_input.rs`). An
/// operator's own `RUST_MIN_STACK` wins.
const THREAD_STACK_BYTES: &str = "67108864";

fn main() -> ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet (this is the first line of `main`), so nothing
        // can read the environment while it is written; std reads RUST_MIN_STACK when the
        // first thread is spawned.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES);
        }
    }
    wasmq::cli::main()
}
