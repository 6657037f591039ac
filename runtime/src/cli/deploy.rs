//! `wasmq deploy`, `promote`, `rollback`, `releases` and `fleet`: ship signed releases of a
//! tenant's plugins to every worker following a plugin store, and see what each one serves.
//!
//! A deploy checks each plugin loads (compiling it here, not on the fleet, so a broken
//! file never reaches it), stores the bytes by digest, and publishes the next epoch: the
//! latest release with these plugins added or replaced, signed with `--key`. `--canary P%`
//! instead keeps the stable version and serves the new one to P % of the workflows;
//! `promote` makes the canary the stable version, `rollback` publishes a new epoch with an
//! earlier epoch's plugins. Every change is a new, higher epoch, so a worker never goes
//! back to a number it has seen, and the history stays (`releases`).
//!
//! Near 500 lines for one idea, publishing releases: the five commands share the store and
//! signing flags, the verified base a release builds on, and the wait for the fleet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::{EngineArgs, sandbox};
use super::exit::{ExitStatus, Failure};
use crate::releases::{Canary, NodeReport, PluginStore, Release, SignedRelease};
use crate::signing::{PublicKey, SigningKey, TrustedKeys};

/// Where releases live and whose they are.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct StoreArgs {
    /// The plugin store: sqlite://PATH (one machine) or redis://HOST:PORT/DB (a fleet).
    #[arg(long, env = "WASMQ_PLUGIN_STORE", default_value = crate::config::DEFAULT_DATABASE_URL)]
    store: String,
    /// The tenant (a worker without [tenants] is tenant "default").
    #[arg(long, default_value = crate::signing::IMPLICIT_TENANT)]
    tenant: String,
}

impl StoreArgs {
    fn open(&self) -> Result<Arc<dyn PluginStore>, Failure> {
        crate::releases::open(&self.store).map_err(Failure::bad_input)
    }
}

/// Signing and waiting, shared by the commands that publish.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct PublishArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The private key signing the release (from `wasmq keys generate`).
    #[arg(long, env = "WASMQ_SIGNING_KEY")]
    key: PathBuf,
    /// Another key (ed25519:… or a file) whose releases this one may build on; the signing
    /// key's own are always trusted. A release no trusted key signed is never built on.
    #[arg(long = "trusted-key", value_delimiter = ',')]
    trusted_keys: Vec<String>,
    /// Ring the release doorbell on this broker once published (RabbitMQ), so workers
    /// read the release at once instead of at their next poll of the store (within
    /// 250 ms). Use the tenant's own vhost.
    #[arg(long, env = "WASMQ_BROKER")]
    broker: Option<String>,
    /// Wait until every node that reported in the last 30 s serves the new epoch (or
    /// failed to), up to this many seconds; print the time it took. Exit 1 when a node
    /// failed or the wait timed out.
    #[arg(long)]
    wait: Option<f64>,
}

/// `wasmq deploy`.
#[derive(Debug, clap::Args)]
pub(super) struct DeployArgs {
    /// The plugin files (.wasm components); each one's name is its file stem.
    #[arg(required = true)]
    plugins: Vec<PathBuf>,
    #[command(flatten)]
    publish: PublishArgs,
    /// Serve the new version to this share of workflows (by root_id) only, e.g. 10%; the
    /// stable version serves the rest until `wasmq promote`.
    #[arg(long)]
    canary: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `wasmq rollback`.
#[derive(Debug, clap::Args)]
pub(super) struct RollbackArgs {
    #[command(flatten)]
    publish: PublishArgs,
    /// The epoch whose plugins to serve again. Default: the one before the latest.
    #[arg(long)]
    to: Option<u64>,
}

fn parse_percent(text: &str) -> Result<f64, Failure> {
    let number = text.trim().trim_end_matches('%');
    match number.parse::<f64>() {
        Ok(p) if p > 0.0 && p < 100.0 => Ok((p * 100.0).round() / 100.0),
        _ => Err(Failure::bad_input(format!(
            "--canary {text:?}: a share between 0% and 100%, e.g. 10%"
        ))),
    }
}

/// What a new release builds on: the newest release a trusted key signed for this tenant
/// and this epoch (a forged or replayed one, which workers refuse, is never carried into a
/// release signed by a trusted key), and the latest epoch listed (the new one goes above).
struct Base {
    release: Option<Release>,
    latest: u64,
}

impl PublishArgs {
    fn signing_key(&self) -> Result<SigningKey, Failure> {
        SigningKey::read(&self.key).map_err(Failure::bad_input)
    }

    fn trusted(&self, key: &SigningKey) -> Result<TrustedKeys, Failure> {
        let mut keys = vec![key.public()];
        for entry in &self.trusted_keys {
            keys.push(PublicKey::from_text_or_file(entry).map_err(Failure::bad_input)?);
        }
        Ok(TrustedKeys::new(keys))
    }

    async fn base(&self, store: &dyn PluginStore, key: &SigningKey) -> Result<Base, Failure> {
        let tenant = &self.store.tenant;
        let trusted = self.trusted(key)?;
        let all = store.releases(tenant).await.map_err(Failure::internal)?;
        let latest = all.last().map_or(0, |(epoch, _)| *epoch);
        for (epoch, signed) in all.iter().rev() {
            match signed.verify(&trusted, tenant) {
                Ok(release) if release.epoch == *epoch => {
                    return Ok(Base {
                        release: Some(release),
                        latest,
                    });
                }
                Ok(release) => eprintln!(
                    "warning: epoch {epoch} holds a manifest signed as epoch {}: a replay, not built on",
                    release.epoch
                ),
                Err(error) => eprintln!("warning: epoch {epoch} is not built on: {error}"),
            }
        }
        Ok(Base {
            release: None,
            latest,
        })
    }
}

pub(super) async fn deploy(args: DeployArgs) -> Result<(), Failure> {
    let key = args.publish.signing_key()?;
    let canary = args.canary.as_deref().map(parse_percent).transpose()?;
    if canary.is_some() && args.plugins.len() != 1 {
        return Err(Failure::bad_input("a canary ships exactly one plugin"));
    }
    let store = args.publish.store.open()?;
    let tenant = &args.publish.store.tenant;
    // Each plugin must load here before the fleet sees it.
    let sandbox = sandbox(&args.engine, 4)?;
    let mut shipped = BTreeMap::new();
    for path in &args.plugins {
        let plugin = sandbox.load_plugin(path).await?;
        let bytes = std::fs::read(path).map_err(|e| {
            Failure::new(
                ExitStatus::BadPlugin,
                anyhow::anyhow!("cannot read {}: {e}", path.display()),
            )
        })?;
        let digest = store.put_blob(&bytes).await.map_err(Failure::internal)?;
        shipped.insert(plugin.name().to_owned(), digest);
    }
    let base = args.publish.base(store.as_ref(), &key).await?;
    let (mut plugins, mut kept_canary) = base
        .release
        .as_ref()
        .map(|r| (r.plugins.clone(), r.canary.clone()))
        .unwrap_or_default();
    let names: Vec<&str> = shipped.keys().map(String::as_str).collect();
    let (note, new_canary) = match canary {
        Some(percent) => {
            let (plugin, sha256) = shipped.iter().next().expect("one plugin");
            let canary = Canary {
                plugin: plugin.clone(),
                sha256: sha256.clone(),
                percent,
            };
            (format!("canary {plugin} {percent}%"), Some(canary))
        }
        None => {
            // A plain deploy of the canary's plugin supersedes the canary.
            if kept_canary
                .as_ref()
                .is_some_and(|c| shipped.contains_key(&c.plugin))
            {
                kept_canary = None;
            }
            plugins.extend(shipped.clone());
            (format!("deploy {}", names.join(", ")), kept_canary)
        }
    };
    let release = publish(
        store.as_ref(),
        &key,
        tenant,
        &base,
        plugins,
        new_canary,
        &note,
    )
    .await?;
    ring(&args.publish, &release).await?;
    wait(store.as_ref(), &release, args.publish.wait).await
}

/// Rings the doorbell on `--broker`, if given.
async fn ring(args: &PublishArgs, release: &Release) -> Result<(), Failure> {
    let Some(url) = &args.broker else {
        return Ok(());
    };
    let broker = crate::broker::connect(url).map_err(Failure::bad_input)?;
    let bell = crate::broker::ReleaseBell {
        tenant: release.tenant.clone(),
        epoch: release.epoch,
    };
    broker.ring_release(&bell).await.map_err(|e| {
        Failure::internal(anyhow::anyhow!(
            "published, but cannot ring the doorbell: {e}"
        ))
    })
}

pub(super) async fn promote(args: PublishArgs) -> Result<(), Failure> {
    let key = args.signing_key()?;
    let store = args.store.open()?;
    let tenant = &args.store.tenant;
    let base = args.base(store.as_ref(), &key).await?;
    let Some(canary) = base.release.as_ref().and_then(|r| r.canary.clone()) else {
        return Err(Failure::bad_input(format!(
            "tenant {tenant}'s latest release has no canary to promote"
        )));
    };
    let mut plugins = base
        .release
        .as_ref()
        .map(|r| r.plugins.clone())
        .unwrap_or_default();
    plugins.insert(canary.plugin.clone(), canary.sha256.clone());
    let note = format!("promote {}", canary.plugin);
    let release = publish(store.as_ref(), &key, tenant, &base, plugins, None, &note).await?;
    ring(&args, &release).await?;
    wait(store.as_ref(), &release, args.wait).await
}

pub(super) async fn rollback(args: RollbackArgs) -> Result<(), Failure> {
    let key = args.publish.signing_key()?;
    let store = args.publish.store.open()?;
    let tenant = &args.publish.store.tenant;
    let base = args.publish.base(store.as_ref(), &key).await?;
    let Some(current) = &base.release else {
        return Err(Failure::bad_input(format!(
            "tenant {tenant} has no release signed by a trusted key to roll back"
        )));
    };
    if base.latest < 2 {
        return Err(Failure::bad_input(format!(
            "tenant {tenant} has only epoch {}: nothing earlier to roll back to",
            base.latest
        )));
    }
    let to = args.to.unwrap_or(current.epoch.saturating_sub(1));
    if to == 0 || to >= base.latest {
        return Err(Failure::bad_input(format!(
            "--to {to}: roll back to an epoch between 1 and {}",
            base.latest.saturating_sub(1)
        )));
    }
    let signed = store
        .release(tenant, to)
        .await
        .map_err(Failure::internal)?
        .ok_or_else(|| Failure::bad_input(format!("tenant {tenant} has no epoch {to}")))?;
    // Only a release a trusted key signed, for this epoch, is served again.
    let target = signed
        .verify(&args.publish.trusted(&key)?, tenant)
        .map_err(|e| Failure::bad_input(format!("epoch {to} cannot be rolled back to: {e}")))?;
    if target.epoch != to {
        return Err(Failure::bad_input(format!(
            "epoch {to} holds a manifest signed as epoch {}: a replay, never rolled back to",
            target.epoch
        )));
    }
    let release = publish(
        store.as_ref(),
        &key,
        tenant,
        &base,
        target.plugins,
        target.canary,
        &format!("rollback to {to}"),
    )
    .await?;
    ring(&args.publish, &release).await?;
    wait(store.as_ref(), &release, args.publish.wait).await
}

/// Signs and publishes the next epoch; prints what changed.
async fn publish(
    store: &dyn PluginStore,
    key: &SigningKey,
    tenant: &str,
    base: &Base,
    plugins: BTreeMap<String, String>,
    canary: Option<Canary>,
    note: &str,
) -> Result<Release, Failure> {
    let epoch = base.latest + 1;
    let previous = base.release.as_ref();
    let mut release = Release::new(tenant, epoch, plugins, note);
    release.canary = canary;
    let signed = SignedRelease::sign(&release, key);
    store
        .publish(tenant, epoch, &signed)
        .await
        .map_err(|e| Failure::internal(anyhow::anyhow!("{e}; run the command again")))?;
    println!(
        "tenant {tenant}: epoch {epoch} published ({note}), signed by key {}",
        signed.key_id
    );
    for (name, digest) in &release.plugins {
        let before = previous.and_then(|r| r.plugins.get(name));
        let change = match before {
            Some(old) if old == digest => "unchanged".to_owned(),
            Some(old) => format!("was {}", &old[..12]),
            None => "new".to_owned(),
        };
        println!("  {name:<16} {}  {change}", &digest[..12]);
    }
    if let Some(canary) = &release.canary {
        println!(
            "  {:<16} {}  canary, {}% of workflows",
            canary.plugin,
            &canary.sha256[..12],
            canary.percent
        );
    }
    Ok(release)
}

/// Nodes that reported within this long are counted as the fleet.
const ALIVE: Duration = Duration::from_secs(30);

fn alive(report: &NodeReport) -> bool {
    if report.stopped {
        return false;
    }
    let age = chrono::Utc::now().timestamp_millis() - report.updated_ms;
    age <= i64::try_from(ALIVE.as_millis()).unwrap_or(i64::MAX)
}

/// With `--wait`, waits until every live node serves `release` or reports it failed.
async fn wait(
    store: &dyn PluginStore,
    release: &Release,
    wait: Option<f64>,
) -> Result<(), Failure> {
    let Some(seconds) = wait else { return Ok(()) };
    let limit = super::args::seconds("wait", Some(seconds))?.unwrap_or_default();
    let started = Instant::now();
    loop {
        let fleet = store
            .fleet(&release.tenant)
            .await
            .map_err(Failure::internal)?;
        let fleet: Vec<&NodeReport> = fleet.iter().filter(|r| alive(r)).collect();
        let serving = fleet
            .iter()
            .filter(|r| r.serving.is_some_and(|e| e >= release.epoch))
            .count();
        let failed: Vec<String> = fleet
            .iter()
            .filter_map(|r| match &r.failed {
                Some((e, why)) if *e == release.epoch => Some(format!("{}: {why}", r.node)),
                _ => None,
            })
            .collect();
        if !fleet.is_empty() && serving + failed.len() == fleet.len() {
            println!(
                "{serving} of {} node(s) serve epoch {} after {:.2} s",
                fleet.len(),
                release.epoch,
                started.elapsed().as_secs_f64()
            );
            if failed.is_empty() {
                return Ok(());
            }
            return Err(Failure::new(
                ExitStatus::TaskFailed,
                anyhow::anyhow!("epoch {} failed on {}", release.epoch, failed.join("; ")),
            ));
        }
        if started.elapsed() >= limit {
            return Err(Failure::new(
                ExitStatus::Timeout,
                anyhow::anyhow!(
                    "after {seconds} s, {serving} of {} live node(s) serve epoch {}",
                    fleet.len(),
                    release.epoch
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn releases(args: StoreArgs) -> Result<(), Failure> {
    let store = args.open()?;
    let all = store
        .releases(&args.tenant)
        .await
        .map_err(Failure::internal)?;
    if all.is_empty() {
        println!(
            "tenant {}: no releases in {}",
            args.tenant,
            store.describe()
        );
        return Ok(());
    }
    println!(
        "{:>5}  {:<20}  {:<16}  {:<24}  plugins",
        "epoch", "created", "signed by", "note"
    );
    for (_, signed) in &all {
        let release = signed.unverified().map_err(Failure::internal)?;
        let mut plugins: Vec<String> = release
            .plugins
            .iter()
            .map(|(name, digest)| format!("{name}={}", &digest[..12]))
            .collect();
        if let Some(c) = &release.canary {
            plugins.push(format!(
                "{}={} (canary {}%)",
                c.plugin,
                &c.sha256[..12],
                c.percent
            ));
        }
        println!(
            "{:>5}  {:<20}  {:<16}  {:<24}  {}",
            release.epoch,
            release.created,
            signed.key_id,
            release.note,
            plugins.join(" ")
        );
    }
    Ok(())
}

pub(super) async fn fleet(args: StoreArgs) -> Result<(), Failure> {
    let store = args.open()?;
    let latest = store
        .latest_epoch(&args.tenant)
        .await
        .map_err(Failure::internal)?;
    let fleet = store.fleet(&args.tenant).await.map_err(Failure::internal)?;
    println!(
        "tenant {}: latest epoch {}",
        args.tenant,
        latest.map_or("none".to_owned(), |e| e.to_string())
    );
    if fleet.is_empty() {
        println!("no node has reported");
        return Ok(());
    }
    println!(
        "{:<28}  {:>7}  {:>9}  state",
        "node", "serving", "last seen"
    );
    let now = chrono::Utc::now().timestamp_millis();
    for report in &fleet {
        let age = Duration::from_millis(u64::try_from(now - report.updated_ms).unwrap_or(0));
        let state = match (&report.failed, alive(report)) {
            (_, false) if report.stopped => "stopped".to_owned(),
            (_, false) => "gone (no report for 30 s)".to_owned(),
            (Some((epoch, why)), true) => format!("failed epoch {epoch}: {why}"),
            (None, true) if report.serving == latest => "current".to_owned(),
            (None, true) => "behind".to_owned(),
        };
        println!(
            "{:<28}  {:>7}  {:>8.1}s  {state}",
            report.node,
            report.serving.map_or("-".to_owned(), |e| e.to_string()),
            age.as_secs_f64()
        );
    }
    Ok(())
}
