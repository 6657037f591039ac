//! `hostile`: tasks that attack the sandbox. Each must cost exactly one failed task with a
//! precise reason, and leave the worker serving. A task that *succeeds* here is a sandbox
//! breach: the file, environment or network tasks return what they managed to read.

use std::hint::black_box;
use std::io::Write;

use wasmq_sdk::{RawJson, TaskError, task};

/// Loops forever: stopped by the fuel budget or the wall-clock limit.
#[task]
fn spin() -> u64 {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
        if black_box(counter) == 0 {
            return counter;
        }
    }
}

/// Allocates 1 MiB blocks (and touches them) until allocation fails.
#[task]
fn hog() -> usize {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        block[0] = 1;
        blocks.push(black_box(block));
        if blocks.len() == usize::MAX {
            return blocks.len();
        }
    }
}

/// Recurses without bound: stopped by the wasm stack limit.
#[task]
fn recurse() -> u64 {
    deeper(black_box(0))
}

fn deeper(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return depth;
    }
    black_box(deeper(depth + 1)).wrapping_add(1)
}

/// Panics.
#[task]
fn panic() -> u64 {
    panic!("the hostile plugin panicked on purpose")
}

/// Writes to stdout forever: stopped by the captured-output cap.
#[task]
fn flood() -> u64 {
    let line = "flood flood flood flood flood flood flood flood flood flood flood flood\n";
    let mut stdout = std::io::stdout();
    let mut written: u64 = 0;
    loop {
        stdout
            .write_all(line.as_bytes())
            .expect("stdout refused the write");
        written += line.len() as u64;
        if written == u64::MAX {
            return written;
        }
    }
}

/// Tries to read /etc/passwd; returns its contents if the sandbox lets it.
#[task]
fn read_file() -> Result<String, TaskError> {
    std::fs::read_to_string("/etc/passwd")
        .map_err(|e| TaskError::failed("PermissionError", format!("cannot read /etc/passwd: {e}")))
}

/// Tries to read the environment; returns what it finds if the sandbox lets it.
#[task]
fn read_env() -> Result<Vec<(String, String)>, TaskError> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    if vars.is_empty() {
        let home = std::env::var("HOME").map_err(|e| {
            TaskError::failed("KeyError", format!("no environment visible (HOME: {e})"))
        })?;
        return Ok(vec![("HOME".to_owned(), home)]);
    }
    Ok(vars)
}

/// Tries to open a TCP connection to 127.0.0.1:5672 (RabbitMQ); reports success if it can.
#[task]
fn connect() -> Result<String, TaskError> {
    match std::net::TcpStream::connect("127.0.0.1:5672") {
        Ok(stream) => Ok(format!("connected to {:?}", stream.peer_addr().ok())),
        Err(e) => Err(TaskError::failed(
            "ConnectionRefusedError",
            format!("cannot connect to 127.0.0.1:5672: {e}"),
        )),
    }
}

/// Returns a 100 MB JSON string: stopped by the result size cap.
#[task]
fn big_result() -> Result<RawJson, TaskError> {
    const SIZE: usize = 100_000_000;
    let mut json = vec![b'x'; SIZE + 2];
    json[0] = b'"';
    json[SIZE + 1] = b'"';
    let json =
        String::from_utf8(json).map_err(|e| TaskError::failed("ValueError", e.to_string()))?;
    Ok(RawJson::unchecked(json))
}

wasmq_sdk::export_tasks!(
    spin, hog, recurse, panic, flood, read_file, read_env, connect, big_result
);
