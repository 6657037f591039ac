//! wasmq's integration tests: one binary, a module per topic. Every test uses the real
//! plugins built from `plugins/` by `wasmq-test-artifacts`.

mod autoscale;
mod bad_input;
mod bad_plugins;
mod beat;
mod cache;
mod canvas;
mod chaos;
mod cli;
mod control;
mod dashboard;
mod delays;
mod deploy;
mod events;
mod grants;
mod hostile;
mod interop;
mod limits;
mod logs;
mod metrics;
mod plugins;
mod processes;
mod publish;
mod python_tasks;
mod queue;
mod redis_broker;
mod request;
mod semantics;
mod support;
mod tenancy;
