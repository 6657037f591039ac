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

/// Recurses without bound: stopped by the wasm stack limit. (This plugin keeps Rust's
/// default 1 MiB shadow stack, unlike the other bundled plugins' 128 KiB: with a small one,
/// the shadow stack in linear memory can run out first, which traps as an out-of-bounds
/// access — whichever is smaller per frame decides, and it differs between fuel and
/// CPU-time metering.)
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

// The tasks below attack grants: they try to leave a granted folder, change a read-only
// one, listen for connections, or read a variable the call was not granted.

/// Tries to read `path` — `/data/../../etc/passwd`, an absolute host path, a symlink out of
/// a granted folder — and returns what it read (a file's text, or a folder's names).
#[task]
fn read_outside(path: String) -> Result<String, TaskError> {
    read_any(&path).map_err(|e| TaskError::io(format!("cannot read {path}"), &e))
}

/// A file's text, or a folder's names (one a line); the file's error when it is neither.
fn read_any(path: &str) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(read) => match std::fs::read_dir(path) {
            Ok(entries) => Ok(entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("\n")),
            Err(_) => Err(read),
        },
    }
}

/// Tries every way to change the file at `path` in a read-only folder: open it for
/// writing with truncation, append to it, create a file beside it, rename it, remove it.
/// Returns what worked, if anything did; else fails listing each refusal.
#[task]
fn write_readonly(path: String) -> Result<String, TaskError> {
    use std::fs::OpenOptions;
    let beside = format!("{path}.hostile");
    let attempts: [(&str, std::io::Result<()>); 5] = [
        (
            "truncate",
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"owned")),
        ),
        (
            "append",
            OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"owned")),
        ),
        ("create beside", std::fs::write(&beside, b"owned")),
        ("rename", std::fs::rename(&path, &beside)),
        ("remove", std::fs::remove_file(&path)),
    ];
    let worked: Vec<&str> = attempts
        .iter()
        .filter(|(_, result)| result.is_ok())
        .map(|(what, _)| *what)
        .collect();
    if !worked.is_empty() {
        return Ok(format!("changed {path}: {}", worked.join(", ")));
    }
    let refusals: Vec<String> = attempts
        .iter()
        .filter_map(|(what, result)| result.as_ref().err().map(|e| format!("{what}: {e}")))
        .collect();
    Err(TaskError::failed(
        "PermissionError",
        format!("cannot change {path} ({})", refusals.join("; ")),
    ))
}

/// Tries to listen for connections: on 127.0.0.1:`port`, then on an ephemeral port of
/// every interface. Reports the address if either listens.
#[task]
fn bind_listen(port: u16) -> Result<String, TaskError> {
    let mut refusals = Vec::new();
    for addr in [format!("127.0.0.1:{port}"), "0.0.0.0:0".to_owned()] {
        match std::net::TcpListener::bind(addr.as_str()) {
            Ok(listener) => return Ok(format!("listening on {:?}", listener.local_addr().ok())),
            Err(e) => refusals.push(format!("{addr}: {e}")),
        }
    }
    Err(TaskError::failed(
        "PermissionError",
        format!("cannot listen ({})", refusals.join("; ")),
    ))
}

/// Tries to read the variable `name`; returns its value if the sandbox serves it.
#[task]
fn read_variable(name: String) -> Result<String, TaskError> {
    wasmq_sdk::config::get(&name)?
        .ok_or_else(|| TaskError::failed("KeyError", format!("no variable {name} is served")))
}

unsafe extern "C" {
    /// wasi-libc's `symlink(target, linkpath)`, which resolves `linkpath` in the preopens.
    fn symlink(target: *const std::ffi::c_char, linkpath: *const std::ffi::c_char) -> i32;
}

/// Plants a symlink `link` pointing to `target` (e.g. `../other-tenant`) from inside the
/// sandbox, then reads `link/<then_read>` through it (`then_read` empty: `link` itself).
/// Returns what it read.
#[task]
fn follow_symlink(link: String, target: String, then_read: String) -> Result<String, TaskError> {
    let c = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| TaskError::failed("ValueError", format!("{s:?} has a NUL byte")))
    };
    let (c_target, c_link) = (c(&target)?, c(&link)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let planted = unsafe { symlink(c_target.as_ptr(), c_link.as_ptr()) };
    let planted = if planted == 0 {
        "planted".to_owned()
    } else {
        format!("not planted ({})", std::io::Error::last_os_error())
    };
    let path = if then_read.is_empty() {
        link.clone()
    } else {
        format!("{link}/{then_read}")
    };
    read_any(&path).map_err(|e| {
        TaskError::io(
            format!("symlink {link} -> {target} {planted}; cannot read {path}"),
            &e,
        )
    })
}

wasmq_sdk::export_tasks!(
    spin,
    hog,
    recurse,
    panic,
    flood,
    read_file,
    read_env,
    connect,
    big_result,
    read_outside,
    write_readonly,
    bind_listen,
    read_variable,
    follow_symlink
);
