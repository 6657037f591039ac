//! wasmq: a distributed task queue whose tasks are sandboxed WebAssembly components.
//!
//! # Layout
//!
//! The path of one task through the crate:
//!
//! ```text
//! engine     a plugin (.wasm component) is compiled once, cached on disk, described;
//!            each call gets a fresh Store: memory cap, fuel budget, wall-clock deadline,
//!            WASI without ambient rights, captured output  -> exactly one Outcome
//! cli        `wasmq call`, `wasmq plugins inspect`: the command-line edge
//! ```
//!
//! Only [`engine`] knows wasmtime. Everything else sees [`engine::Sandbox`],
//! [`engine::Plugin`], [`engine::CallRequest`] and [`engine::Outcome`].

pub mod bundled;
pub mod cli;
pub mod engine;
