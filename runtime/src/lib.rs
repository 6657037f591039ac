//! wasmq: a distributed task queue whose tasks are sandboxed WebAssembly components.
//!
//! # Layout
//!
//! The path of one task through the crate:
//!
//! ```text
//! client     Client::send_task builds a Celery v2 message            (client.rs)
//!            chain / group / chord build Celery canvas messages      (canvas.rs)
//! protocol   headers + [args, kwargs, embed] ⇄ Envelope                (protocol/)
//! broker     publish / consume with prefetch / ack, dead-letter       (broker/)
//!   -> worker    decode, admit (expires, eta), look up the task       (worker/)
//!   -> registry  task name -> plugin, hot-deployed from a folder      (worker/registry.rs)
//!   -> engine    fresh Store: memory cap, fuel, deadline, no ambient  (engine/)
//!                rights -> exactly one Outcome
//!   -> worker    decide once: result meta + ack | retry | dead-letter (worker/outcome.rs)
//!   -> worker    continue the workflow: callbacks, chain, chord       (worker/canvas.rs)
//! results    store Celery meta; clients wait on it                    (results/)
//! scheduler  optionally hold delayed messages in Redis until due      (scheduler/)
//! broker     settle the message (late ack, after the result is stored)
//! ```
//!
//! Only [`engine`] knows wasmtime; only [`broker`] and [`results`] know their storage.
//! [`cli`] is the command-line edge and [`config`] merges configuration sources.

pub(crate) mod bench;
pub mod broker;
pub mod bundled;
pub mod canvas;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod policy;
pub mod protocol;
pub mod results;
pub mod scheduler;
mod sqlite;
pub mod worker;

pub use sqlite::DbError;
