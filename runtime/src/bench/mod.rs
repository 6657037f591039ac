//! The benchmark harness behind `wasmq bench` (the clap flags live in `cli/bench.rs`): each
//! run measures the whole loop on this machine and prints a markdown table, recorded in
//! BENCHMARKS.md.
//!
//! ```text
//! embedded   the embedded broker, an in-process worker                    (embedded.rs)
//! amqp       wasmq side by side with the raw AMQP ceiling and Celery      (amqp.rs)
//!   table      the rows it prints, the ratios and their goals             (amqp_table.rs)
//!   ceiling    raw lapin drains and round trips, no wasmq                 (ceiling.rs)
//!   harness    wasmq's publish rates, drains and round trips              (harness.rs)
//!   celery     Python Celery: its virtualenv, workers, drains, script     (celery.rs)
//! redis      wasmq on the Redis broker beside the raw Redis ceiling and     (redis.rs)
//!            Celery on the same Redis (reuses harness and celery)
//!   table      the rows it prints, the ratios and their goals             (redis_table.rs)
//!   ceiling    kombu's messages, raw BRPOP drains and round trips         (redis_ceiling.rs)
//!   db         the bench's Redis database: Celery's backlog, clean-up     (redis_db.rs)
//! soak       a worker's resident memory across 100,000 tasks             (soak.rs)
//! scale      drains with 1, 2 and 4 `wasmq worker` processes              (scale.rs)
//! tenants    the noisy neighbour: B's probe latency while A floods         (tenants.rs)
//! deploy     what a release swap costs a running worker's tasks            (deploy.rs)
//! autoscale  `--concurrency auto` against fixed sizes: throughput, memory  (autoscale.rs)
//! cpu        CPU-heavy workloads: native, Wasm, and each CPU metering      (cpu.rs)
//! ```
//!
//! What the runs share sits here (the only-this-machine guard, queue names, the concurrent
//! publisher), in [`workers`] (child processes stopped on drop, an in-process worker with a
//! stop handle) and in [`stats`] (percentiles, CPU time, memory).
//!
//! Errors are `anyhow`: the harness is an edge like the CLI, each error ends the run with a
//! message for the person who started it, and no caller branches on its kind; a typed enum
//! would only list the libraries it drives (broker, results, client, sandbox, processes,
//! JSON). The one error the CLI maps to its own exit status (bad input, 2) is typed,
//! [`NotLocal`], and the CLI finds it again by downcasting; plugin errors keep their type
//! the same way.

pub(crate) mod amqp;
mod amqp_table;
pub(crate) mod autoscale;
mod ceiling;
mod celery;
pub(crate) mod cpu;
pub(crate) mod deploy;
pub(crate) mod embedded;
mod harness;
pub(crate) mod redis;
mod redis_ceiling;
mod redis_db;
mod redis_table;
pub(crate) mod scale;
pub(crate) mod soak;
mod stats;
pub(crate) mod tenants;
mod workers;

use serde_json::{Map, json};

use crate::client::{Client, SendOptions};

/// A benchmark (or `wasmq chaos`) was pointed at a server that is not on this machine. The
/// harnesses flood the broker they are given and kill what they start, so they refuse
/// anything but 127.0.0.1.
#[derive(Debug, thiserror::Error)]
#[error("this harness only targets servers on this machine; {url} is not 127.0.0.1")]
pub(crate) struct NotLocal {
    /// The URL that was refused.
    pub(crate) url: String,
}

/// Refuses `url` unless it names this machine.
pub(crate) fn only_local(url: &str) -> Result<(), NotLocal> {
    if url.contains("127.0.0.1") || url.contains("localhost") || url.contains("[::1]") {
        Ok(())
    } else {
        Err(NotLocal {
            url: url.to_owned(),
        })
    }
}

/// Runs `rabbitmqctl` on this machine (the benchmarks only target this machine's broker).
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run rabbitmqctl: {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// What the `wasmq-bench` policy tells RabbitMQ: delete a `wasmq-bench-*` queue nobody has
/// used for 10 minutes.
const LEFTOVERS_POLICY: &str = r#"{"expires": 600000}"#;

/// Makes RabbitMQ delete the queues a benchmark run leaves behind (a run that fails midway,
/// or is killed, cannot delete its 20,000-message queue itself): a policy on the vhost of
/// `url` expires every `wasmq-bench-*` queue unused for 10 minutes, whoever declared it —
/// wasmq, the raw ceiling or Python Celery (a policy, not an `x-expires` argument, so
/// Celery's own queue declarations stay as it makes them). Best effort: without
/// `rabbitmqctl` a note says what is not cleaned up.
fn expire_leftover_queues(url: &str) {
    let vhost = url
        .parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.vhost)
        .unwrap_or_else(|_| "/".to_owned());
    let set = rabbitmqctl(&[
        "set_policy",
        "-p",
        &vhost,
        "--apply-to",
        "queues",
        "wasmq-bench",
        "^wasmq-bench-",
        LEFTOVERS_POLICY,
    ]);
    if let Err(error) = set {
        eprintln!(
            "note: the queues of a run that fails midway stay on the broker \
             (cannot set the wasmq-bench expiry policy: {error:#})"
        );
    }
}

/// A queue name of its own for one measurement (`what`), deleted when it is done.
fn queue_name(what: &str) -> String {
    format!("wasmq-bench-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Publishes `n` `math.add` tasks (results off) with 8 concurrent publishers, so publisher
/// confirms are pipelined; calls `each_publisher_done` as each publisher finishes.
async fn publish_adds(
    client: &Client,
    n: usize,
    each_publisher_done: impl FnMut(),
) -> anyhow::Result<()> {
    publish_tasks(
        client,
        "math.add",
        |i| vec![json!(i), json!(i)],
        n,
        each_publisher_done,
    )
    .await
}

/// Publishes `n` × `task` (results off), the `i`-th with `args(i)`, with 8 concurrent
/// publishers; calls `each_publisher_done` as each publisher finishes.
async fn publish_tasks(
    client: &Client,
    task: &str,
    args: impl Fn(usize) -> Vec<serde_json::Value> + Clone + Send + 'static,
    n: usize,
    mut each_publisher_done: impl FnMut(),
) -> anyhow::Result<()> {
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (client, task, args) = (client.clone(), task.to_owned(), args.clone());
        publishers.push(tokio::spawn(async move {
            for i in (p..n).step_by(8) {
                client
                    .send_task(
                        &task,
                        args(i),
                        Map::new(),
                        SendOptions {
                            ignore_result: Some(true),
                            ..SendOptions::default()
                        },
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
        each_publisher_done();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machine_is_benchmarked() {
        assert!(only_local("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(only_local("redis://localhost:6379/0").is_ok());
        let refused = only_local("amqp://guest:guest@rabbit.example:5672/%2f").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "this harness only targets servers on this machine; amqp://guest:guest@rabbit.example:5672/%2f is not 127.0.0.1"
        );
    }
}
