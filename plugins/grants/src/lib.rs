//! `grants`: tasks that use what a worker may grant a call — a host folder, outbound TCP
//! connections, name lookups, variables — with nothing but `std` and `wasmq_sdk::config`.
//! Without the grant each fails with the Python exception its I/O error maps to
//! (`PermissionError`, `FileNotFoundError`, `ConnectionRefusedError`, `OSError`…) and a
//! message naming the path or address and what the system said.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};

use wasmq_sdk::{TaskError, config, task};

/// Reads a text file.
#[task]
fn read_text(path: String) -> Result<String, TaskError> {
    std::fs::read_to_string(&path).map_err(|e| TaskError::io(format!("cannot read {path}"), &e))
}

/// Writes `text` to a file (created or truncated); returns the bytes written.
#[task]
fn write_text(path: String, text: String) -> Result<usize, TaskError> {
    std::fs::write(&path, text.as_bytes())
        .map_err(|e| TaskError::io(format!("cannot write {path}"), &e))?;
    Ok(text.len())
}

/// The names in a folder, sorted.
#[task]
fn list_dir(path: String) -> Result<Vec<String>, TaskError> {
    let fail = |e: std::io::Error| TaskError::io(format!("cannot list {path}"), &e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(fail)? {
        names.push(
            entry
                .map_err(fail)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    Ok(names)
}

/// Connects to `addr` ("ip:port"), sends `line` and a newline, and returns the one line
/// that comes back (without its newline).
#[task]
fn tcp_request(addr: String, line: String) -> Result<String, TaskError> {
    let fail = |step: &str, e: std::io::Error| TaskError::io(format!("cannot {step} {addr}"), &e);
    let mut stream = TcpStream::connect(addr.as_str()).map_err(|e| fail("connect to", e))?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| fail("write to", e))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| fail("read from", e))?;
    Ok(answer.trim_end_matches(['\r', '\n']).to_owned())
}

/// The value of a granted variable, or `None` when it is not granted.
#[task]
fn variable(name: String) -> Result<Option<String>, TaskError> {
    Ok(config::get(&name)?)
}

/// The IP addresses a host name resolves to (DNS, with the worker's resolver), sorted.
#[task]
fn resolve(host: String) -> Result<Vec<String>, TaskError> {
    let addrs = (host.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| TaskError::io(format!("cannot resolve {host}"), &e))?;
    let mut ips: Vec<String> = addrs.map(|addr| addr.ip().to_string()).collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

wasmq_sdk::export_tasks!(
    read_text,
    write_text,
    list_dir,
    tcp_request,
    variable,
    resolve
);
