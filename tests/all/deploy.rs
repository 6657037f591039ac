//! Signed plugins and fleet deploys.
//!
//! * Every attack on a plugin folder that requires signatures is refused with its own reason
//!   before anything compiles (the sandbox's compile counter and the artifact cache stay
//!   untouched), and the previous version keeps serving.
//! * Three `wasmq worker` processes follow one plugin store — on the embedded broker (the
//!   store in the same file) and on RabbitMQ (the store in Redis, a tenant of its own) —
//!   through deploys, a node stopped during one, a rollback with tasks in flight, a
//!   replayed manifest and a release signed by a stranger.
//! * A canary serves its share of workflows by `root_id`, and no chain mixes versions.
//!
//! Two versions of one plugin: the bundled `stamp` ("stamp build 1") and the same
//! component with its build string rewritten ("stamp build 2").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::canvas::{Signature, chain};
use wasmq::client::{Client, SendOptions};
use wasmq::deploy::ReleaseFollower;
use wasmq::registry::Registry;
use wasmq::releases::{Canary, PluginStore, Release, SignedRelease};
use wasmq::signing::{PluginSignature, SigningKey, TrustPolicy, TrustedKeys};

use crate::support::{Queue, runtime, spawn_worker};

const WAIT: Duration = Duration::from_secs(60);

fn bundled(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("WASMQ_BUNDLED_PLUGINS_DIR")).join(format!("{name}.wasm")))
        .unwrap()
}

/// The `stamp` plugin whose build string ends in `build` (`b'1'` is the bundled one).
fn stamp(build: u8) -> Vec<u8> {
    let mut bytes = bundled("stamp");
    let marker = b"stamp build 1";
    let at: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| w == marker)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the build string appears once in stamp.wasm");
    bytes[at[0] + marker.len() - 1] = build;
    bytes
}

fn later() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::days(30)
}

fn trust(tenant: &str, keys: &[&SigningKey]) -> TrustPolicy {
    TrustPolicy {
        tenant: tenant.into(),
        keys: TrustedKeys::new(keys.iter().map(|k| k.public()).collect()),
        require_signatures: true,
    }
}

fn write_signed(folder: &Path, file: &str, bytes: &[u8], signature: Option<&PluginSignature>) {
    std::fs::write(folder.join(file), bytes).unwrap();
    if let Some(signature) = signature {
        std::fs::write(folder.join(format!("{file}.sig")), signature.to_json()).unwrap();
    }
}

#[test]
fn every_signature_attack_is_refused_before_a_compile_and_the_previous_version_keeps_serving() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("plugins");
        let cache = dir.path().join("artifacts");
        std::fs::create_dir_all(&folder).unwrap();
        let acme = SigningKey::generate().unwrap();
        let globex = SigningKey::generate().unwrap();
        let shared_ops = SigningKey::generate().unwrap();

        // 1. unsigned
        write_signed(&folder, "math.wasm", &bundled("math"), None);
        // 2. signed by another tenant's key
        let text = bundled("text");
        let by_globex = PluginSignature::sign(&globex, "acme", "text", &text, later()).unwrap();
        write_signed(&folder, "text.wasm", &text, Some(&by_globex));
        // 3. signed for another name, then renamed
        let grants = bundled("grants");
        let as_grants = PluginSignature::sign(&acme, "acme", "grants", &grants, later()).unwrap();
        write_signed(&folder, "billing.wasm", &grants, Some(&as_grants));
        // 4. one byte changed after signing
        let v1 = stamp(b'1');
        let signed_v1 = PluginSignature::sign(&acme, "acme", "stamp", &v1, later()).unwrap();
        write_signed(&folder, "stamp.wasm", &stamp(b'2'), Some(&signed_v1));
        // 5. expired
        let hostile = bundled("hostile");
        let expired = PluginSignature::sign(
            &acme,
            "acme",
            "hostile",
            &hostile,
            chrono::Utc::now() - chrono::Duration::minutes(1),
        )
        .unwrap();
        write_signed(&folder, "hostile.wasm", &hostile, Some(&expired));
        // 6. a valid plugin of tenant globex, signed with a key acme trusts too
        let math = bundled("math");
        let for_globex =
            PluginSignature::sign(&shared_ops, "globex", "calc", &math, later()).unwrap();
        write_signed(&folder, "calc.wasm", &math, Some(&for_globex));

        let sandbox = Arc::new(
            wasmq::engine::Sandbox::new(wasmq::engine::SandboxConfig {
                cache_dir: Some(cache.clone()),
                ..Default::default()
            })
            .unwrap(),
        );
        let policy = trust("acme", &[&acme, &shared_ops]);
        let registry = Arc::new(
            Registry::load_folder(Arc::clone(&sandbox), &folder, Some(policy))
                .await
                .unwrap(),
        );
        let snapshot = registry.snapshot();
        assert!(snapshot.tasks().is_empty(), "{:?}", snapshot.tasks());
        let refused: BTreeMap<String, String> = snapshot
            .broken()
            .into_iter()
            .map(|(path, why)| {
                (
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    why,
                )
            })
            .collect();
        let expect = [
            ("math.wasm", "math is not signed"),
            ("text.wasm", "which tenant acme does not trust"),
            (
                "billing.wasm",
                "signed as plugin grants, but this file is billing",
            ),
            ("stamp.wasm", "the bytes of stamp changed after signing"),
            ("hostile.wasm", "the signature of hostile expired"),
            ("calc.wasm", "signed for tenant globex, not for tenant acme"),
        ];
        for (file, reason) in expect {
            let why = refused
                .get(file)
                .unwrap_or_else(|| panic!("{file} not refused: {refused:?}"));
            assert!(why.contains(reason), "{file}: {why:?} lacks {reason:?}");
        }
        assert_eq!(
            sandbox.compiled_count(),
            0,
            "a refused plugin costs no compile"
        );
        assert!(
            std::fs::read_dir(&cache).map_or(true, |mut d| d.next().is_none()),
            "a refused plugin leaves nothing in the artifact cache"
        );

        // Signed properly: it loads (one compile).
        let signed_math = PluginSignature::sign(&acme, "acme", "math", &math, later()).unwrap();
        write_signed(&folder, "math.wasm", &math, Some(&signed_math));
        let report = registry.rescan().await;
        assert_eq!(report.added, vec![folder.join("math.wasm")], "{report:?}");
        assert_eq!(sandbox.compiled_count(), 1);
        let serving = registry
            .lookup("math.add")
            .unwrap()
            .content_hash()
            .to_owned();

        // A changed file under the old signature: refused, and the old version serves on.
        let mut tampered = math.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0xff;
        std::fs::write(folder.join("math.wasm"), &tampered).unwrap();
        let report = registry.rescan().await;
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert!(
            report.failed[0].1.contains("changed after signing"),
            "{report:?}"
        );
        assert_eq!(registry.lookup("math.add").unwrap().content_hash(), serving);
        assert_eq!(sandbox.compiled_count(), 1);
    });
}

/// Runs `wasmq args…` in `dir`.
fn wasmq(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .current_dir(dir)
        .env(
            "WASMQ_CACHE_DIR",
            std::env::temp_dir().join("wasmq-test-artifact-cache"),
        )
        .env_remove("WASMQ_LOG")
        .args(args)
        .output()
        .expect("wasmq runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn succeeded(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

#[test]
fn keys_sign_and_verify_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let public = succeeded(
        wasmq(dir.path(), &["keys", "generate", "keys/acme"]),
        "keys generate",
    );
    assert!(public.trim().starts_with("ed25519:"), "{public}");
    std::fs::write(dir.path().join("math.wasm"), bundled("math")).unwrap();
    let signed = succeeded(
        wasmq(
            dir.path(),
            &[
                "plugins",
                "sign",
                "math.wasm",
                "--key",
                "keys/acme.key",
                "--tenant",
                "acme",
            ],
        ),
        "plugins sign",
    );
    assert!(signed.contains("signed for tenant acme"), "{signed}");
    let ok = succeeded(
        wasmq(
            dir.path(),
            &[
                "plugins",
                "verify",
                "math.wasm",
                "--trusted-key",
                "keys/acme.pub",
                "--tenant",
                "acme",
            ],
        ),
        "plugins verify",
    );
    assert!(ok.contains(": ok: plugin math"), "{ok}");
    let other = wasmq(
        dir.path(),
        &[
            "plugins",
            "verify",
            "math.wasm",
            "--trusted-key",
            public.trim(),
            "--tenant",
            "globex",
        ],
    );
    assert_eq!(other.status.code(), Some(4));
    let why = String::from_utf8_lossy(&other.stderr);
    assert!(
        why.contains("signed for tenant acme, not for tenant globex"),
        "{why}"
    );
    assert_eq!(why.lines().count(), 1, "one readable line: {why}");
    let again = wasmq(dir.path(), &["keys", "generate", "keys/acme"]);
    assert_eq!(again.status.code(), Some(2), "a key is never overwritten");

    // A worker that requires signatures: the signed plugin serves, an unsigned one is one
    // log line and an entry in the status file.
    let folder = dir.path().join("plugins");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(dir.path().join("math.wasm"), folder.join("math.wasm")).unwrap();
    std::fs::write(folder.join("text.wasm"), bundled("text")).unwrap();
    let signed = succeeded(
        wasmq(
            dir.path(),
            &[
                "plugins",
                "sign",
                "plugins/math.wasm",
                "--key",
                "keys/acme.key",
            ],
        ),
        "plugins sign",
    );
    assert!(signed.contains("signed for tenant default"), "{signed}");
    // `plugins list` with the worker's policy shows what it would refuse, and why.
    let listed = wasmq(
        dir.path(),
        &[
            "plugins",
            "list",
            "plugins",
            "--trusted-key",
            "keys/acme.pub",
            "--require-signatures",
        ],
    );
    assert_eq!(listed.status.code(), Some(4), "{listed:?}");
    let shown = stdout(&listed);
    assert!(shown.contains("math.add"), "{shown}");
    assert!(
        shown.contains("text.wasm (not loadable: refused: text is not signed"),
        "{shown}"
    );
    let db = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    let queue = crate::support::unique_queue("signed");
    let node = Node::start(
        dir.path(),
        "signed",
        &[
            "--broker",
            &db,
            "--result-backend",
            &db,
            "--plugins",
            "plugins",
            "--queues",
            &queue,
            "--trusted-key",
            "keys/acme.pub",
            "--require-signatures",
        ]
        .map(str::to_owned),
    );
    let log = node.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("text is not signed"))
            .count(),
        1,
        "{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: Value = std::fs::read_to_string(&node.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let failed = &status["plugins"]["failed"];
        if failed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("text is not signed"))
        {
            assert!(status["plugins"]["served"]["math"].is_string(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal in the status: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = wasmq(
        dir.path(),
        &[
            "send",
            "math.add",
            "[2, 3]",
            "--wait",
            "--broker",
            &db,
            "--result-backend",
            &db,
            "--queue",
            &queue,
        ],
    );
    assert_eq!(stdout(&output).trim(), "5", "{output:?}");
    node.stop();
}

/// A `wasmq worker` process of a fleet, logging to `<dir>/<name>.log`.
struct Node {
    name: String,
    child: Child,
    log: PathBuf,
    status: PathBuf,
}

impl Node {
    fn start(dir: &Path, name: &str, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let status = dir.join(format!("{name}.status.json"));
        let child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .current_dir(dir)
            .env(
                "WASMQ_CACHE_DIR",
                std::env::temp_dir().join("wasmq-test-artifact-cache"),
            )
            .env("RUST_LOG", "wasmq=info")
            .env_remove("WASMQ_LOG")
            .args(["worker", "--name", name, "--concurrency", "2"])
            .arg("--status-file")
            .arg(&status)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start wasmq worker");
        let node = Self {
            name: name.to_owned(),
            child,
            log,
            status,
        };
        node.wait_for_log("worker ready");
        node
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{} never logged {text:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The epoch its status file says it serves (of its only tenant, if it has tenants).
    fn epoch(&self) -> Option<u64> {
        let status: Value = std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())?;
        let status = status["tenants"].get(0).cloned().unwrap_or(status);
        status["plugins"]["epoch"].as_u64()
    }

    /// Waits until its status file says it serves `epoch` (the file is rewritten every
    /// second).
    fn wait_epoch(&self, epoch: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.epoch() != Some(epoch) {
            assert!(
                Instant::now() < deadline,
                "{} does not serve epoch {epoch} ({:?}):\n{}",
                self.name,
                self.epoch(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} did not stop", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three workers following one plugin store, and the keys and client to drive them.
struct Fleet {
    dir: tempfile::TempDir,
    store_url: String,
    store: Arc<dyn PluginStore>,
    tenant: String,
    /// `wasmq worker` arguments of every node (broker, store, keys, queue or config).
    worker_args: Vec<String>,
    /// Where `wasmq deploy` rings the release doorbell, if anywhere.
    doorbell: Option<String>,
    client: Client,
}

impl Fleet {
    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// `wasmq <command> … --key deploy.key --store … --tenant … --wait 20`.
    fn publish(&self, command: &[&str]) -> String {
        let key = self.path("deploy.key");
        let mut args: Vec<&str> = command.to_vec();
        args.extend([
            "--key",
            &key,
            "--store",
            &self.store_url,
            "--tenant",
            &self.tenant,
            "--wait",
            "20",
        ]);
        if let Some(broker) = &self.doorbell {
            args.extend(["--broker", broker]);
        }
        succeeded(wasmq(self.dir.path(), &args), &command.join(" "))
    }

    fn start(&self, name: &str) -> Node {
        Node::start(self.dir.path(), name, &self.worker_args)
    }
}

/// The seconds `--wait` printed for the fleet to serve the epoch.
fn convergence(printed: &str) -> f64 {
    let line = printed
        .lines()
        .find(|l| l.contains("node(s) serve epoch"))
        .unwrap_or_else(|| panic!("no convergence line in {printed}"));
    line.split("after ")
        .nth(1)
        .and_then(|rest| rest.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line}"))
}

async fn versions(client: &Client, n: usize) -> BTreeMap<String, usize> {
    let mut sent = Vec::new();
    for _ in 0..n {
        sent.push(
            client
                .send_task("stamp.version", vec![], Map::new(), SendOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut seen = BTreeMap::new();
    for result in sent {
        let version = result.get(WAIT).await.unwrap();
        *seen
            .entry(version.as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    seen
}

fn only(build: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(build.to_owned(), n)])
}

/// Waits until every one of `nodes` reports that it failed `epoch` with `reason`.
async fn wait_refused(
    store: &dyn PluginStore,
    tenant: &str,
    nodes: usize,
    epoch: u64,
    reason: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fleet = store.fleet(tenant).await.unwrap();
        let refused = fleet
            .iter()
            .filter(|r| {
                r.failed
                    .as_ref()
                    .is_some_and(|(e, why)| *e == epoch && why.contains(reason))
            })
            .count();
        if refused >= nodes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not refused by {nodes} nodes: {fleet:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole life of a fleet: deploy, a node down during a deploy, rollback with tasks in
/// flight, a replayed manifest, a stranger's release. Returns the convergence times.
fn fleet_lifecycle(fleet: &Fleet) -> Vec<f64> {
    let rt = runtime();
    let v1 = fleet.dir.path().join("v1");
    let v2 = fleet.dir.path().join("v2");
    for (folder, build) in [(&v1, b'1'), (&v2, b'2')] {
        std::fs::create_dir_all(folder).unwrap();
        std::fs::write(folder.join("stamp.wasm"), stamp(build)).unwrap();
    }
    let (v1, v2) = (
        format!("{}/stamp.wasm", v1.display()),
        format!("{}/stamp.wasm", v2.display()),
    );
    let mut times = Vec::new();

    let mut nodes: Vec<Node> = (1..=3).map(|i| fleet.start(&format!("node{i}"))).collect();
    let printed = fleet.publish(&["deploy", &v1]);
    assert!(
        printed.contains("3 of 3 node(s) serve epoch 1"),
        "{printed}"
    );
    times.push(convergence(&printed));
    assert_eq!(
        rt.block_on(versions(&fleet.client, 30)),
        only("stamp build 1", 30)
    );

    // node3 is down during the deploy of epoch 2, and catches up when it starts.
    nodes.pop().unwrap().stop();
    let printed = fleet.publish(&["deploy", &v2]);
    assert!(
        printed.contains("2 of 2 node(s) serve epoch 2"),
        "{printed}"
    );
    times.push(convergence(&printed));
    assert_eq!(
        rt.block_on(versions(&fleet.client, 30)),
        only("stamp build 2", 30)
    );
    let node3 = fleet.start("node3");
    node3.wait_epoch(2);
    nodes.push(node3);

    // Rollback while tasks run: every one completes, on the version it started with.
    let in_flight: Vec<_> = rt.block_on(async {
        let mut sent = Vec::new();
        for _ in 0..12 {
            sent.push(
                fleet
                    .client
                    .send_task(
                        "stamp.version_after",
                        vec![json!(0.4)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(150));
    let printed = fleet.publish(&["rollback"]);
    // `rollback` without --to serves the epoch before the latest again: 1, build 1.
    assert!(
        printed.contains("epoch 3 published (rollback to 1)"),
        "{printed}"
    );
    assert!(
        printed.contains("3 of 3 node(s) serve epoch 3"),
        "{printed}"
    );
    times.push(convergence(&printed));
    rt.block_on(async {
        for result in in_flight {
            let version = result.get(WAIT).await.unwrap();
            assert!(
                version == json!("stamp build 1") || version == json!("stamp build 2"),
                "{version}"
            );
        }
    });
    assert_eq!(
        rt.block_on(versions(&fleet.client, 20)),
        only("stamp build 1", 20)
    );
    let printed = fleet.publish(&["rollback", "--to", "2"]);
    assert!(
        printed.contains("epoch 4 published (rollback to 2)"),
        "{printed}"
    );
    assert_eq!(
        rt.block_on(versions(&fleet.client, 20)),
        only("stamp build 2", 20)
    );

    rt.block_on(async {
        let store = fleet.store.as_ref();
        // A replayed manifest: epoch 2's, published again as epoch 5.
        let old = store.release(&fleet.tenant, 2).await.unwrap().unwrap();
        store.publish(&fleet.tenant, 5, &old).await.unwrap();
        wait_refused(store, &fleet.tenant, 3, 5, "refused as a replay").await;
        // A release signed by a key the tenant does not trust.
        let stranger = SigningKey::generate().unwrap();
        let latest = store
            .latest(&fleet.tenant)
            .await
            .unwrap()
            .unwrap()
            .unverified()
            .unwrap();
        let mut forged = Release::new(&fleet.tenant, 6, latest.plugins.clone(), "forged");
        forged.plugins.insert(
            "evil".into(),
            wasmq::signing::sha256_hex(&bundled("hostile")),
        );
        store
            .publish(&fleet.tenant, 6, &SignedRelease::sign(&forged, &stranger))
            .await
            .unwrap();
        wait_refused(store, &fleet.tenant, 3, 6, "does not trust").await;
        // Another tenant's release, signed by a key this tenant trusts too, moved here.
        let key = SigningKey::read(&fleet.dir.path().join("deploy.key")).unwrap();
        let theirs = Release::new("globex", 7, latest.plugins.clone(), "globex's");
        store
            .publish(&fleet.tenant, 7, &SignedRelease::sign(&theirs, &key))
            .await
            .unwrap();
        wait_refused(store, &fleet.tenant, 3, 7, "signed for tenant globex").await;
    });
    assert_eq!(
        rt.block_on(versions(&fleet.client, 20)),
        only("stamp build 2", 20)
    );
    for node in &nodes {
        node.wait_epoch(4);
        assert!(node.log().contains("release refused"), "{}", node.log());
    }

    let shown = succeeded(
        wasmq(
            fleet.dir.path(),
            &[
                "fleet",
                "--store",
                &fleet.store_url,
                "--tenant",
                &fleet.tenant,
            ],
        ),
        "fleet",
    );
    for node in &nodes {
        assert!(shown.contains(&node.name), "{shown}");
    }
    assert!(shown.contains("failed epoch 7"), "{shown}");
    // The next deploy builds on epoch 4, the newest release a trusted key signed for its
    // own epoch and tenant: neither the replay (5), the forgery (6) nor globex's (7) is
    // carried into it.
    let printed = fleet.publish(&["deploy", &v1]);
    assert!(
        printed.contains("epoch 8 published (deploy stamp)"),
        "{printed}"
    );
    let v2_digest = wasmq::signing::sha256_hex(&stamp(b'2'));
    assert!(
        printed.contains(&format!("was {}", &v2_digest[..12])),
        "{printed}"
    );
    assert!(
        printed.contains("3 of 3 node(s) serve epoch 8"),
        "{printed}"
    );
    assert_eq!(
        rt.block_on(versions(&fleet.client, 20)),
        only("stamp build 1", 20)
    );
    let history = succeeded(
        wasmq(
            fleet.dir.path(),
            &[
                "releases",
                "--store",
                &fleet.store_url,
                "--tenant",
                &fleet.tenant,
            ],
        ),
        "releases",
    );
    for note in ["deploy stamp", "rollback to 1", "rollback to 2", "forged"] {
        assert!(history.contains(note), "{history}");
    }
    for node in nodes {
        node.stop();
    }
    times
}

/// A fleet's directory with a deploy key, and `deploy.pub` to trust.
fn fleet_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    key.write(&dir.path().join("deploy.key")).unwrap();
    (dir, key.public().to_string())
}

#[test]
fn a_fleet_of_three_workers_on_the_embedded_broker_follows_signed_releases() {
    let (dir, public) = fleet_dir();
    let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    let queue = crate::support::unique_queue("deploy");
    let broker = wasmq::broker::connect(&url).unwrap();
    let backend = wasmq::results::connect(&url, Duration::from_secs(600), &url).unwrap();
    let fleet = Fleet {
        store: wasmq::releases::open(&url).unwrap(),
        store_url: url.clone(),
        tenant: "default".into(),
        worker_args: [
            "--broker",
            &url,
            "--result-backend",
            &url,
            "--plugin-store",
            &url,
            "--trusted-key",
            &public,
            "--queues",
            &queue,
        ]
        .map(str::to_owned)
        .to_vec(),
        client: Client::new(broker, backend).with_default_queue(&queue),
        doorbell: None,
        dir,
    };
    let times = fleet_lifecycle(&fleet);
    eprintln!("embedded fleet: deploy → every node serving in {times:?} s");
    assert!(times.iter().all(|t| *t < 5.0), "{times:?}");
}

#[test]
fn a_fleet_of_three_workers_on_rabbitmq_follows_signed_releases_from_redis() {
    let _shared = crate::support::RABBITMQ.read();
    let (dir, public) = fleet_dir();
    let tenant = format!(
        "deploy_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let queue = crate::support::unique_queue("deploy");
    let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let redis = "redis://127.0.0.1:6379/0";
    let prefix = format!("{tenant}:");
    let config = format!(
        "[tenants.{tenant}]\nbroker = \"{amqp}\"\nresult_backend = \"{redis}\"\n\
         result_prefix = \"{prefix}\"\nqueues = [\"{queue}\"]\nplugin_store = \"{redis}\"\n\
         trusted_keys = [\"{public}\"]\n"
    );
    std::fs::write(dir.path().join("wasmq.toml"), config).unwrap();
    let broker = wasmq::broker::connect(amqp).unwrap();
    let backend = Arc::new(
        wasmq::results::redis::RedisResultBackend::new(redis, Duration::from_secs(600))
            .unwrap()
            .with_key_prefix(&prefix),
    );
    let store = Arc::new(wasmq::releases::RedisStore::open(redis).unwrap());
    let fleet = Fleet {
        store: store.clone(),
        store_url: redis.into(),
        tenant: tenant.clone(),
        worker_args: vec![
            "--config".into(),
            dir.path().join("wasmq.toml").display().to_string(),
        ],
        client: Client::new(broker, backend).with_default_queue(&queue),
        doorbell: Some(amqp.into()),
        dir,
    };
    let times = fleet_lifecycle(&fleet);
    eprintln!("RabbitMQ fleet: deploy → every node serving in {times:?} s");
    runtime().block_on(async {
        // A client of this runtime: the store's connection died with the lifecycle's.
        let store = wasmq::releases::RedisStore::open(redis).unwrap();
        store.forget_tenant(&tenant).await.unwrap();
        let broker = wasmq::broker::connect(amqp).unwrap();
        let _ = broker.delete_queue(&queue).await;
        for node in ["node1", "node2", "node3"] {
            broker.forget_node(node).await.unwrap();
        }
    });
    assert!(times.iter().all(|t| *t < 5.0), "{times:?}");
}

#[test]
fn a_doorbell_on_rabbitmq_brings_a_release_at_once_without_waiting_for_a_poll() {
    let _shared = crate::support::RABBITMQ.read();
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store: Arc<dyn PluginStore> = wasmq::releases::open(&url).unwrap();
        let key = SigningKey::generate().unwrap();
        // A tenant of its own: other tests' doorbells on this vhost are not for it.
        let tenant = format!("bell_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let publish = |epoch: u64, build: u8| {
            let (store, key, tenant) = (Arc::clone(&store), &key, tenant.clone());
            async move {
                let digest = store.put_blob(&stamp(build)).await.unwrap();
                let release = Release::new(
                    &tenant,
                    epoch,
                    BTreeMap::from([("stamp".to_owned(), digest)]),
                    "bell",
                );
                store
                    .publish(&tenant, epoch, &SignedRelease::sign(&release, key))
                    .await
                    .unwrap();
            }
        };
        publish(1, b'1').await;
        let registry = Arc::new(Registry::for_releases(
            Arc::new(crate::support::sandbox()),
            &tenant,
        ));
        let follower = Arc::new(ReleaseFollower::new(
            Arc::clone(&store),
            Arc::clone(&registry),
            trust(&tenant, &[&key]),
            "bell-node",
        ));
        follower.start().await.unwrap();
        let broker = wasmq::broker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        let bells = broker.release_bells().await.unwrap();
        assert!(bells.is_some(), "RabbitMQ carries doorbells");
        // Polling once an hour: only the doorbell can bring epoch 2 in time.
        let following = Arc::clone(&follower).follow(Duration::from_secs(3600), bells);
        tokio::time::sleep(Duration::from_millis(500)).await;
        publish(2, b'2').await;
        let rung = Instant::now();
        broker
            .ring_release(&wasmq::broker::ReleaseBell {
                tenant: tenant.clone(),
                epoch: 2,
            })
            .await
            .unwrap();
        while registry.snapshot().epoch() != Some(2) {
            assert!(
                rung.elapsed() < Duration::from_secs(5),
                "the doorbell did not bring epoch 2"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!("doorbell → epoch served in {:?}", rung.elapsed());
        following.abort();
    });
}

#[test]
fn a_release_whose_bytes_were_altered_in_the_store_is_refused_and_the_previous_one_serves() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store: Arc<dyn PluginStore> =
            Arc::new(wasmq::releases::EmbeddedStore::open(&path).unwrap());
        let key = SigningKey::generate().unwrap();
        let tenant = wasmq::signing::IMPLICIT_TENANT;
        for (epoch, build) in [(1, b'1'), (2, b'2')] {
            let digest = store.put_blob(&stamp(build)).await.unwrap();
            if epoch == 2 {
                // Someone with write access to the store swaps the bytes under the digest.
                let conn = rusqlite::Connection::open(&path).unwrap();
                conn.execute(
                    "UPDATE plugin_blobs SET bytes = ?1 WHERE digest = ?2",
                    rusqlite::params![bundled("hostile"), digest],
                )
                .unwrap();
            }
            let release = Release::new(
                tenant,
                epoch,
                BTreeMap::from([("stamp".to_owned(), digest)]),
                "t",
            );
            store
                .publish(tenant, epoch, &SignedRelease::sign(&release, &key))
                .await
                .unwrap();
        }
        let sandbox = Arc::new(crate::support::sandbox());
        let registry = Arc::new(Registry::for_releases(Arc::clone(&sandbox), tenant));
        let follower = ReleaseFollower::new(
            Arc::clone(&store),
            Arc::clone(&registry),
            trust(tenant, &[&key]),
            "n",
        );
        // At start the latest (2) fails, so the newest earlier release that applies serves.
        assert_eq!(follower.start().await.unwrap(), Some(1));
        let compiled = sandbox.compiled_count();
        let error = follower.check().await;
        assert_eq!(
            error.unwrap(),
            None,
            "epoch 2 failed once and is not retried"
        );
        let fleet = store.fleet(tenant).await.unwrap();
        let (epoch, why) = fleet[0].failed.clone().unwrap();
        assert_eq!(epoch, 2);
        assert!(
            why.contains("the bytes of stamp changed after signing"),
            "{why}"
        );
        assert_eq!(fleet[0].serving, Some(1));
        assert_eq!(
            sandbox.compiled_count(),
            compiled,
            "altered bytes are never compiled"
        );
        let plugin = registry.lookup("stamp.version").unwrap();
        assert_eq!(
            plugin.content_hash(),
            wasmq::signing::sha256_hex(&stamp(b'1'))
        );
    });
}

#[test]
fn a_canary_serves_its_share_of_workflows_and_never_splits_a_chain() {
    runtime().block_on(async {
        let queue = Queue::new();
        let store: Arc<dyn PluginStore> = wasmq::releases::open(&queue.url).unwrap();
        let key = SigningKey::generate().unwrap();
        let tenant = wasmq::signing::IMPLICIT_TENANT;
        let stable = store.put_blob(&stamp(b'1')).await.unwrap();
        let next = store.put_blob(&stamp(b'2')).await.unwrap();
        let publish = |epoch: u64, percent: Option<f64>| {
            let store = Arc::clone(&store);
            let mut release = Release::new(
                tenant,
                epoch,
                BTreeMap::from([("stamp".to_owned(), stable.clone())]),
                "test",
            );
            release.canary = percent.map(|percent| Canary {
                plugin: "stamp".into(),
                sha256: next.clone(),
                percent,
            });
            let signed = SignedRelease::sign(&release, &key);
            async move { store.publish(tenant, epoch, &signed).await.unwrap() }
        };
        publish(1, Some(10.0)).await;

        let registry = Arc::new(Registry::for_releases(
            Arc::new(crate::support::sandbox()),
            tenant,
        ));
        let follower = ReleaseFollower::new(
            Arc::clone(&store),
            Arc::clone(&registry),
            trust(tenant, &[&key]),
            "canary-node",
        );
        assert_eq!(follower.start().await.unwrap(), Some(1));
        let options = wasmq::worker::WorkerOptions {
            concurrency: 2,
            node_name: "canary-node".into(),
            shutdown_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let (stop, worker) = spawn_worker(&queue, Arc::clone(&registry), options);

        let seen = versions(&queue.client, 10_000).await;
        let canary = seen.get("stamp build 2").copied().unwrap_or(0);
        eprintln!("10% canary: {canary} of 10000 tasks on the canary ({seen:?})");
        assert!((800..=1200).contains(&canary), "{seen:?}");

        // At 50 %, 200 chains of three steps: each runs one version; both versions run.
        publish(2, Some(50.0)).await;
        assert_eq!(follower.check().await.unwrap(), Some(2));
        let mut chains = Vec::new();
        for _ in 0..200 {
            let steps = (0..3).map(|i| {
                Signature::new("stamp.trail", if i == 0 { vec![json!([])] } else { vec![] })
            });
            chains.push(chain(steps).apply(&queue.client).await.unwrap());
        }
        let mut by_version = BTreeMap::<String, usize>::new();
        for result in chains {
            let trail = result.get(WAIT).await.unwrap();
            let steps: Vec<&str> = trail
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(steps.len(), 3, "{trail}");
            assert!(
                steps.iter().all(|s| *s == steps[0]),
                "a chain mixed versions: {trail}"
            );
            *by_version.entry(steps[0].to_owned()).or_default() += 1;
        }
        assert_eq!(by_version.len(), 2, "{by_version:?}");

        // Promote: the canary's version serves every workflow.
        let mut promoted = Release::new(
            tenant,
            3,
            BTreeMap::from([("stamp".to_owned(), next.clone())]),
            "promote stamp",
        );
        promoted.canary = None;
        store
            .publish(tenant, 3, &SignedRelease::sign(&promoted, &key))
            .await
            .unwrap();
        assert_eq!(follower.check().await.unwrap(), Some(3));
        assert_eq!(versions(&queue.client, 50).await, only("stamp build 2", 50));
        let _ = stop.send(());
        worker.await.unwrap();
    });
}
