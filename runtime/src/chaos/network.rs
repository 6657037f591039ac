//! Network faults between a worker and RabbitMQ: the worker reaches the broker through a
//! [`FaultProxy`], with AMQP heartbeats every `heartbeat` seconds, and drains while the
//! harness adds latency, stalls its connections (no FIN, no RST), resets them, and leaves
//! them half-open. A stalled or half-open connection is only found dead by its heartbeats:
//! it must be within two of them (AMQP's rule), the worker must report the loss (its log;
//! its status file, which `/readyz` and `wasmq status` follow, when the outage outlasts the
//! status reporter's tick), reconnect, and lose nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::kill_workers::clean_up;
use super::ledger::{Ledger, Outcomes};
use super::processes::{Wasmq, WorkerSpec};
use super::proxy::{Fault, FaultProxy};
use super::{Check, Tally, only_local, recovery_summary};

/// What a network-faults run does.
#[derive(Debug, Clone)]
pub struct NetworkFaults {
    /// RabbitMQ, as the publisher reaches it directly (`amqp://…@127.0.0.1:5672/%2f`).
    pub broker: String,
    /// The result backend (a `redis://` URL), reached directly.
    pub results: String,
    /// Tasks to drain.
    pub tasks: usize,
    /// The worker's task slots.
    pub concurrency: usize,
    /// The AMQP heartbeat the worker asks for, in seconds.
    pub heartbeat: u16,
    /// How long the run may wait with no task finishing before it counts the rest as lost.
    pub stall: Duration,
}

/// Runs the scenario with `exe` as `wasmq`, in `dir`.
///
/// # Errors
/// When a server is not on this machine or cannot be reached, a process cannot be
/// started, or the results cannot be read. Lost tasks are what the [`Tally`] reports.
pub async fn run(exe: &Path, dir: &Path, options: &NetworkFaults) -> anyhow::Result<Tally> {
    only_local(&options.broker)?;
    only_local(&options.results)?;
    let uri: lapin::uri::AMQPUri = options
        .broker
        .parse()
        .map_err(|e| anyhow::anyhow!("not an AMQP URL: {e}"))?;
    let upstream = tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port))
        .await?
        .next()
        .context("the broker's host has no address")?;
    let proxy = FaultProxy::start(upstream).await?;
    let through_proxy = format!(
        "amqp://{}:{}@{}/{}?heartbeat={}",
        uri.authority.userinfo.username,
        uri.authority.userinfo.password,
        proxy.address(),
        urlencode_vhost(&uri.vhost),
        options.heartbeat
    );

    let ledger = Ledger::new(options.tasks);
    let wasmq = Wasmq {
        exe: exe.to_owned(),
        dir: dir.to_owned(),
    };
    let queue = ledger.run.clone();
    let lines = (0..options.tasks).map(|i| ledger.line(i)).collect();
    let confirmed = wasmq
        .start_publisher(&options.broker, &options.results, &queue, lines)?
        .wait(Duration::from_secs(300))?;
    let spec = WorkerSpec {
        broker: through_proxy,
        results: options.results.clone(),
        queue: queue.clone(),
        node: format!("{}@chaos", ledger.run),
        concurrency: options.concurrency,
        extra: Vec::new(),
    };
    let log = dir.join("worker.log");
    let mut outcomes = Outcomes::new(&ledger);
    outcomes.watch(log.clone());
    let mut worker = wasmq.start_worker(&spec, &log)?;

    let heartbeat = Duration::from_secs(u64::from(options.heartbeat));
    let mut checks = Vec::new();
    let mut recoveries = Vec::new();
    let started = Instant::now();
    let mut faults = 0;
    for (number, fault) in ["latency", "stall", "reset", "half-open"]
        .into_iter()
        .enumerate()
    {
        // At a tenth, two tenths… of the drain: fixed points, so a fast drain cannot end
        // before the last fault.
        let target = options.tasks * (number + 1) / 10;
        let reached = outcomes
            .wait_until(options.stall, |o| o.finished() >= target)
            .await?;
        if !reached {
            checks.push(Check::new(
                format!("{fault}: not injected: the drain stopped short of task {target}"),
                false,
            ));
            continue;
        }
        let finished_then = outcomes.finished();
        let connections_then = proxy.connections();
        let began = Instant::now();
        faults += 1;
        match fault {
            "latency" => {
                proxy.set(Fault::Latency(Duration::from_millis(20)));
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.set(Fault::None);
            }
            "stall" => proxy.set(Fault::Stall),
            "reset" => proxy.reset_all(),
            _ => proxy.half_open_all(),
        }
        if fault != "latency" {
            // Found dead, reconnected: a connection of its own through the proxy again.
            let (reconnected, not_consuming) =
                watch_reconnect(&proxy, connections_then, &log, heartbeat * 4).await;
            proxy.set(Fault::None);
            match reconnected {
                Some(after) => {
                    let within = if fault == "reset" {
                        heartbeat
                    } else {
                        heartbeat * 2 + Duration::from_millis(500)
                    };
                    checks.push(Check::new(
                        format!("{fault}: reconnected after {} ms", after.as_millis()),
                        after <= within,
                    ));
                }
                None => checks.push(Check::new(format!("{fault}: never reconnected"), false)),
            }
            checks.push(Check::new(
                format!(
                    "{fault}: loss reported: {}",
                    if not_consuming { "yes" } else { "no" }
                ),
                not_consuming,
            ));
        }
        if outcomes
            .wait_until(options.stall, |o| {
                o.finished() > finished_then || o.finished() >= confirmed.len()
            })
            .await?
            && outcomes.finished() > finished_then
        {
            recoveries.push(began.elapsed());
        }
    }
    outcomes
        .wait_until(options.stall, |o| {
            confirmed.iter().all(|id| o.has_finished(id))
        })
        .await?;
    let took = started.elapsed();
    let broker = crate::broker::connect(&options.broker).context("cannot open the broker")?;
    super::settle(&*broker, &queue, &mut outcomes, options.stall).await?;
    worker.terminate(Duration::from_secs(10));

    let backend =
        crate::results::connect(&options.results, Duration::from_secs(3600), &options.broker)
            .context("cannot open the result backend")?;
    let (completed, lost, wrong) = ledger.verify(&*backend, &confirmed).await?;
    let left = broker.queue_length(&queue).await.unwrap_or(u64::MAX);
    checks.push(Check::new(format!("left in the queue: {left}"), left == 0));
    clean_up(&*broker, &queue, &spec.node, &options.results, &confirmed).await;
    let (mean_recovery, worst_recovery) = recovery_summary(&recoveries);
    Ok(Tally {
        scenario: format!(
            "network faults (RabbitMQ, heartbeat {} s)",
            options.heartbeat
        ),
        sent: confirmed.len(),
        completed,
        lost,
        wrong,
        duplicated: outcomes.duplicated(),
        faults,
        mean_recovery,
        worst_recovery,
        took,
        checks,
    })
}

/// What a worker's consumer logs each time it loses its broker connection (then, unless it
/// is back within the status reporter's tick, the worker logs that it is not consuming and
/// writes `"consuming": false` to its status file, which `/readyz` and `wasmq status` read).
const LOST_THE_BROKER: &str = "lost the broker connection; reconnecting";

/// How many times the worker's `log` says it lost the broker.
fn times_not_consuming(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(LOST_THE_BROKER)
        .count()
}

/// Waits up to `within` for the worker to open a new connection through `proxy`: how long
/// that took. Then waits (up to a second more) for its log to say it had lost the broker:
/// whether it did.
async fn watch_reconnect(
    proxy: &FaultProxy,
    connections_then: usize,
    log: &Path,
    within: Duration,
) -> (Option<Duration>, bool) {
    let began = Instant::now();
    let said_before = times_not_consuming(log);
    let mut reconnected = None;
    while began.elapsed() < within {
        if proxy.connections() > connections_then {
            reconnected = Some(began.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if times_not_consuming(log) > said_before {
            return (reconnected, true);
        }
        if Instant::now() > deadline {
            return (reconnected, false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A vhost as it goes in the path of an AMQP URL (`/` is `%2f`).
fn urlencode_vhost(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2f")
}
