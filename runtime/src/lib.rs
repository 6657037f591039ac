//! wasmq: a distributed task queue whose tasks are sandboxed WebAssembly components.
//!
//! # Layout
//!
//! The crate is built in floors; a module imports only from floors below its own (the
//! repository's `ARCHITECTURE.md` says why, and what must never import what):
//!
//! ```text
//! edge       cli/ (one file per command)   bench/ (the side-by-side harness)
//! config     config.rs          raw flags/env/TOML → a validated WorkerConfig
//!            tenancy.rs         [tenants.<id>]: a tenant's broker, plugins, share and grants
//! periodic   beat/              periodic tasks: a schedule file (every / cron in a zone), a
//!                               lease and a claim per run (Redis or the embedded file), sent
//!                               through the client
//! client     client/            send, call, submit; AsyncResult; starting workflows
//!            dashboard/         the web dashboard: events and inspect replies → a page
//! worker     worker/            admit → run → decide → settle → continue the workflow;
//!                               answers remote control (control.rs); Celery events
//!                               (events.rs), metrics and the embedder's hooks (hooks.rs)
//!                               fed from one set of observation points (observe.rs);
//!                               sizing itself (scaling.rs)
//!            registry/          task name → plugin: a folder's signed files, or a release
//!                               and its canary
//!            deploy.rs          following a tenant's signed releases in a plugin store
//! canvas     canvas/            signatures, chain/group/chord, publishing a workflow
//! storage    results/           result backends: embedded, Redis, rpc (over broker::amqp)
//!            releases/          the plugin store: blobs by digest, signed releases, node
//!                               reports (embedded file or Redis)
//!            broker/            brokers: embedded/, amqp/ (RabbitMQ, incl. the remote-control
//!                               mailbox and the celeryev exchange), scheduled/ (delays held
//!                               in Redis), and the traits the worker sees
//! sandbox    engine/            the only module that knows wasmtime
//! vocabulary protocol/          Celery protocol v2 messages, send options, remote-control
//!                               commands (control.rs), Celery events (events.rs), W3C
//!                               trace context (trace.rs)
//!            metrics/           Prometheus metrics (celery-exporter's names) and the
//!                               worker's HTTP endpoints; the only module that knows
//!                               prometheus-client and axum
//!            policy.rs          retry and rate-limit policy
//!            fair.rs            fair task slots across tenants (start-time fair queuing)
//!            autoscale/         how many slots to use now (a pure decision, tested by
//!                               simulation) and the machine's CPU and memory from /proc
//!            signing.rs         Ed25519 keys, plugin statements, trust policies
//!            routes.rs          task name → queue
//!            units.rs           sizes and durations
//!            db/                the embedded database file (broker and results share it)
//!            redis_client.rs    one Redis connection per URL (results and scheduler)
//! ```
//!
//! # The path of one task
//!
//! ```text
//! client     Client::send_task: SendOptions → TaskMessage, routed    client/, protocol/options.rs
//!            (a periodic task: the leading beat claims the run, sends) beat/
//!            (a workflow: canvas::Dispatch publishes its first tasks) canvas/dispatch.rs
//! broker     publish; a worker's consumer delivers it, prefetched     broker/
//! worker     decode the Celery v2 envelope                            protocol/
//!            admit: poison? revoked? expired? eta? rate limit?        worker/admit.rs
//!            look up the plugin (a canary by root_id)                  registry/
//!            run it in a fresh Store: memory, fuel, deadline, no      worker/run.rs, engine/
//!            ambient rights → exactly one Outcome
//!            decide once: result meta + ack | retry | defer |         worker/decision.rs
//!            dead-letter | release
//!            store the meta; publish the workflow's next steps;      worker/settle.rs,
//!            count chord parts; then settle (late ack)                worker/continuation.rs
//! results    the client's AsyncResult::get reads the stored meta      results/, client/result.rs
//! ```

pub mod autoscale;
pub mod beat;
pub(crate) mod bench;
pub mod broker;
pub mod bundled;
pub mod canvas;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
mod db;
pub mod deploy;
pub mod engine;
pub mod fair;
pub mod metrics;
pub mod policy;
pub mod protocol;
mod redis_client;
pub mod registry;
pub mod releases;
pub mod results;
pub mod routes;
pub mod signing;
pub mod tenancy;
pub mod units;
pub mod worker;

pub use db::DbError;
