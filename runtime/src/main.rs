//! The `wasmq` command. Everything lives in the library (`wasmq::cli`).

fn main() -> std::process::ExitCode {
    wasmq::cli::main()
}
