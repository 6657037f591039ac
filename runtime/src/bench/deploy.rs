//! `wasmq bench deploy`: what a fleet deploy costs a running worker. An in-process worker
//! (concurrency 2) follows the releases of a fresh embedded plugin store while a client
//! sends back-to-back `math.add` round trips; after a quiet baseline, N releases are
//! published one after another, each with a new version of the largest bundled plugin
//! (`text`, made new by a custom section so that it must be compiled: the worker's sandbox
//! has no artifact cache). Reported: publish → served (the worker's registry on the new
//! epoch, polled every millisecond), and the probes' round trips and longest gap between
//! two answers, quiet versus during the swaps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, json};

use super::stats::percentile;
use super::workers::InProcessWorker;
use crate::client::{Client, SendOptions};
use crate::deploy::{POLL_INTERVAL, ReleaseFollower};
use crate::engine::{Sandbox, SandboxConfig};
use crate::registry::Registry;
use crate::releases::{PluginStore, Release, SignedRelease};
use crate::signing::{IMPLICIT_TENANT, SigningKey, TrustPolicy, TrustedKeys};
use crate::worker::WorkerOptions;

/// What `wasmq bench deploy` is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct DeployOptions {
    /// Releases published.
    pub(crate) deploys: usize,
    /// The worker's sandbox (its artifact cache is turned off).
    pub(crate) sandbox: SandboxConfig,
}

/// One probe: when it was answered, and how long it took.
#[derive(Debug, Clone, Copy)]
struct Probe {
    answered: Instant,
    took: Duration,
}

/// `text` with a custom section naming `version`: the same plugin, new bytes.
fn text_version(version: usize) -> Vec<u8> {
    let mut bytes = crate::bundled::TEXT.to_vec();
    let payload = format!("v{version}");
    let name = b"wasmq-bench";
    let body_len = 1 + name.len() + payload.len();
    bytes.push(0);
    bytes.push(u8::try_from(body_len).unwrap_or(u8::MAX));
    bytes.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload.as_bytes());
    bytes
}

/// Runs the measurement and prints its table.
///
/// # Errors
/// When the store, the worker or a probe fails.
pub(crate) async fn run(options: DeployOptions) -> anyhow::Result<()> {
    let folder = tempfile::tempdir()?;
    let url = format!("sqlite://{}", folder.path().join("bench.db").display());
    let broker = crate::broker::connect(&url)?;
    let backend = crate::results::connect(&url, crate::results::DEFAULT_RESULT_EXPIRES, &url)?;
    let store: Arc<dyn PluginStore> = crate::releases::open(&url)?;
    let key = SigningKey::generate()?;
    let math = store.put_blob(crate::bundled::MATH).await?;
    let publish = |epoch: usize, text: Vec<u8>| {
        let store = Arc::clone(&store);
        let math = math.clone();
        let key = &key;
        async move {
            let digest = store.put_blob(&text).await?;
            let plugins = BTreeMap::from([("math".to_owned(), math), ("text".to_owned(), digest)]);
            let epoch = u64::try_from(epoch)?;
            let release = Release::new(IMPLICIT_TENANT, epoch, plugins, "bench");
            store
                .publish(IMPLICIT_TENANT, epoch, &SignedRelease::sign(&release, key))
                .await?;
            anyhow::Ok(())
        }
    };
    publish(1, text_version(1)).await?;

    let mut sandbox = options.sandbox;
    sandbox.cache_dir = None;
    let sandbox = Arc::new(Sandbox::new(sandbox)?);
    let registry = Arc::new(Registry::for_releases(
        Arc::clone(&sandbox),
        IMPLICIT_TENANT,
    ));
    let trust = TrustPolicy {
        tenant: IMPLICIT_TENANT.into(),
        keys: TrustedKeys::new(vec![key.public()]),
        require_signatures: false,
    };
    let follower = Arc::new(ReleaseFollower::new(
        Arc::clone(&store),
        Arc::clone(&registry),
        trust,
        "bench-node",
    ));
    follower.start().await?;
    let following = Arc::clone(&follower).follow(POLL_INTERVAL, None);
    let worker = InProcessWorker::spawn(
        Arc::clone(&broker),
        Arc::clone(&backend),
        Arc::clone(&registry),
        WorkerOptions {
            concurrency: 2,
            node_name: "wasmq-bench@localhost".into(),
            ..WorkerOptions::default()
        },
    );
    let client = Client::new(Arc::clone(&broker), Arc::clone(&backend));

    // The probe: back-to-back round trips until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut probes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let result = client
                    .send_task(
                        "math.add",
                        vec![json!(1), json!(2)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await?;
                result.get(Duration::from_secs(60)).await?;
                probes.push(Probe {
                    answered: Instant::now(),
                    took: sent.elapsed(),
                });
            }
            anyhow::Ok(probes)
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut swaps = Vec::new();
    let mut served_in = Vec::new();
    for deploy in 0..options.deploys {
        let epoch = deploy + 2;
        let bytes = text_version(epoch);
        let started = Instant::now();
        publish(epoch, bytes).await?;
        let epoch = u64::try_from(epoch)?;
        while registry.snapshot().epoch() != Some(epoch) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "epoch {epoch} was not served within a minute"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        served_in.push(started.elapsed());
        swaps.push((started, Instant::now()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let probes = prober.await??;
    following.abort();
    worker.stop().await;

    // A probe belongs to a swap when it was in flight at any moment of one.
    let during = |p: &Probe| {
        let sent = p.answered.checked_sub(p.took).unwrap_or(p.answered);
        swaps
            .iter()
            .any(|(from, to)| sent <= *to && p.answered >= *from)
    };
    let (busy, quiet): (Vec<Probe>, Vec<Probe>) = probes.iter().partition(|p| during(p));
    // The gaps between consecutive answers, each counted where it lies: in a swap when it
    // overlaps one.
    let (mut busy_gap, mut quiet_gap) = (Duration::ZERO, Duration::ZERO);
    for pair in probes.windows(2) {
        let (from, to) = (pair[0].answered, pair[1].answered);
        let gap = to.duration_since(from);
        if swaps
            .iter()
            .any(|(start, end)| from <= *end && to >= *start)
        {
            busy_gap = busy_gap.max(gap);
        } else {
            quiet_gap = quiet_gap.max(gap);
        }
    }
    let row = |name: &str, set: &[Probe], gap: Duration| {
        let mut took: Vec<Duration> = set.iter().map(|p| p.took).collect();
        took.sort();
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            set.len(),
            ms(percentile(&took, 50.0)),
            ms(percentile(&took, 99.0)),
            ms(took.last().copied().unwrap_or_default()),
            ms(gap),
        );
    };
    let mut served = served_in.clone();
    served.sort();
    println!(
        "wasmq bench deploy: {} releases, each a new `text` ({} KiB, compiled on arrival: no \
         artifact cache); one worker, concurrency 2, on the embedded broker, polling its \
         store every {} ms.\n",
        options.deploys,
        crate::bundled::TEXT.len() / 1024,
        POLL_INTERVAL.as_millis()
    );
    println!(
        "publish → served: median {:.0} ms, max {:.0} ms (each: {})\n",
        percentile(&served, 50.0).as_secs_f64() * 1e3,
        served.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        served_in
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| probes (math.add round trips) | n | p50 ms | p99 ms | max ms | longest gap between answers, ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    row("quiet", &quiet, quiet_gap);
    row("in flight during a swap", &busy, busy_gap);
    Ok(())
}
