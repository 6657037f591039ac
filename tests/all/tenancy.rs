//! Tenants: two tenants configured on one `wasmq worker --config` process. On RabbitMQ each
//! has a vhost and a user of its own (created and deleted here with `rabbitmqctl`), and Redis
//! results under a key prefix fenced by a Redis ACL user of its own; on the embedded broker
//! each has its own file. Every attack a tenant could try on the other ends with no effect on
//! the other and, where the sender can see one, a clear error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::client::{Client, GetError, SendOptions};

use crate::support::{runtime, unique_queue};

const WAIT: Duration = Duration::from_secs(60);

/// `rabbitmqctl args…`, which must succeed.
fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A RabbitMQ vhost with a user allowed only there; deleted (with everything in it) on drop.
struct Vhost {
    name: String,
    user: String,
    password: String,
}

impl Vhost {
    fn new(name: &str) -> Self {
        let vhost = Self {
            name: name.to_owned(),
            user: name.to_owned(),
            password: format!("pw-{name}"),
        };
        rabbitmqctl(&["add_vhost", &vhost.name]);
        rabbitmqctl(&["add_user", &vhost.user, &vhost.password]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &vhost.user,
            ".*",
            ".*",
            ".*",
        ]);
        vhost
    }

    /// The URL of this vhost as its own user.
    fn url(&self) -> String {
        self.url_as(self)
    }

    /// The URL of this vhost with `other`'s credentials.
    fn url_as(&self, other: &Vhost) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:5672/{}",
            other.user, other.password, self.name
        )
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.user])
            .output();
    }
}

/// A Redis ACL user that may touch only keys and channels under `<prefix>`; deleted on drop.
struct RedisUser {
    name: String,
    password: String,
    prefix: String,
}

impl RedisUser {
    async fn new(name: &str) -> Self {
        let user = Self {
            name: name.to_owned(),
            password: format!("pw-{name}"),
            prefix: format!("{name}:"),
        };
        let mut admin = admin_redis().await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user.name)
            .arg("on")
            .arg(format!(">{}", user.password))
            .arg("resetkeys")
            .arg(format!("~{}*", user.prefix))
            .arg("resetchannels")
            .arg(format!("&{}*", user.prefix))
            .arg("+@all")
            .arg("-@admin")
            .arg("-@dangerous")
            .query_async(&mut admin)
            .await
            .expect("ACL SETUSER");
        user
    }

    fn url(&self) -> String {
        format!("redis://{}:{}@127.0.0.1:6379/0", self.name, self.password)
    }
}

impl Drop for RedisUser {
    fn drop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["ACL", "DELUSER", &self.name])
            .output();
    }
}

async fn admin_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(crate::support::REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

/// Messages ready in `queue`, by a passive declare on `channel`.
async fn messages_in(channel: &lapin::Channel, queue: &str) -> u32 {
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
        .await
        .expect("the queue exists")
        .message_count()
}

/// Whether `queue` exists in `connection`'s vhost, by a passive declare on a channel of its
/// own (RabbitMQ closes the channel when the queue does not exist).
async fn queue_exists(connection: &lapin::Connection, queue: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
        .await;
    if declared.is_ok() {
        let _ = channel.close(200, "OK".into()).await;
    }
    declared.is_ok()
}

/// A folder holding copies of the bundled plugins named in `names`.
fn plugin_folder(root: &Path, tenant: &str, names: &[&str]) -> PathBuf {
    let folder = root.join(tenant).join("plugins");
    std::fs::create_dir_all(&folder).unwrap();
    for name in names {
        let source = Path::new(env!("WASMQ_BUNDLED_PLUGINS_DIR")).join(format!("{name}.wasm"));
        std::fs::copy(source, folder.join(format!("{name}.wasm"))).unwrap();
    }
    folder
}

/// A `wasmq worker --config <config>` process in `dir`, logging to `dir/worker.log` and
/// writing its status to `dir/status.json`; killed on drop if still running.
struct WorkerProcess {
    child: Child,
    log: PathBuf,
    status: PathBuf,
}

impl WorkerProcess {
    fn start(dir: &Path, config: &str) -> Self {
        let file = dir.join("wasmq.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("worker.log");
        let status = dir.join("status.json");
        let child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .current_dir(dir)
            .env(
                "WASMQ_CACHE_DIR",
                std::env::temp_dir().join("wasmq-test-artifact-cache"),
            )
            .env("RUST_LOG", "wasmq=info")
            .env_remove("WASMQ_LOG")
            .arg("worker")
            .arg("--config")
            .arg(&file)
            .arg("--status-file")
            .arg(&status)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start wasmq worker");
        let worker = Self { child, log, status };
        // One "worker ready" per `[tenants.<id>]` table.
        let tenants = config
            .lines()
            .filter(|line| line.starts_with("[tenants.") && line.matches('.').count() == 1)
            .count();
        worker.wait_for_log("worker ready", tenants.max(1));
        worker
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text` `times` times.
    fn wait_for_log(&self, text: &str, times: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log().matches(text).count() < times {
            assert!(
                Instant::now() < deadline,
                "the worker never logged {text:?} {times} times:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status of `tenant`, from the status file.
    fn tenant_status(&self, tenant: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let status: Value = std::fs::read_to_string(&self.status)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Value::Null);
            if let Some(found) = status["tenants"]
                .as_array()
                .and_then(|tenants| tenants.iter().find(|t| t["tenant"] == tenant))
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no status for {tenant}: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the worker with SIGTERM; it must exit 0.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the worker exited with {status}:\n{}",
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "the worker did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of one tenant: its broker URL, its result backend (under `prefix`; rpc over
/// its broker).
fn client(broker_url: &str, results: &str, prefix: Option<&str>) -> Client {
    let broker = wasmq::broker::connect(broker_url).expect("broker");
    let backend: Arc<dyn wasmq::results::ResultBackend> = match prefix {
        Some(prefix) => Arc::new(
            wasmq::results::redis::RedisResultBackend::new(results, Duration::from_secs(600))
                .unwrap()
                .with_key_prefix(prefix),
        ),
        None => wasmq::results::connect(results, Duration::from_secs(600), broker_url).unwrap(),
    };
    Client::new(broker, backend)
}

/// A `math.add(1, 2)` message of `client` with one callback, `math.add(100)` to `queue`.
fn linked_to(client: &Client, queue: &str) -> wasmq::protocol::TaskMessage {
    let mut linked = client.build_message(
        "math.add",
        vec![json!(1), json!(2)],
        Map::new(),
        &SendOptions::default(),
    );
    linked.embed.callbacks = Some(vec![json!({
        "task": "math.add", "args": [100], "kwargs": {},
        "options": {"queue": queue}, "subtask_type": null, "immutable": false,
    })]);
    linked
}

/// The exception type and message of a task failure.
fn failure(error: &GetError) -> (String, String) {
    match error {
        GetError::Failed { exception, .. } => (
            exception.exc_type.clone(),
            exception
                .exc_message
                .iter()
                .map(|part| {
                    part.as_str()
                        .map_or_else(|| part.to_string(), str::to_owned)
                })
                .collect::<Vec<_>>()
                .join(" "),
        ),
        other => panic!("not a task failure: {other}"),
    }
}

async fn call(client: &Client, task: &str, args: Value) -> Result<Value, GetError> {
    let args = args.as_array().cloned().unwrap_or_default();
    client
        .send_task(task, args, Map::new(), SendOptions::default())
        .await
        .expect("sent")
        .get(WAIT)
        .await
}

fn exception_type(error: &GetError) -> String {
    match error {
        GetError::Failed { exception, .. } | GetError::Revoked { exception, .. } => {
            exception.exc_type.clone()
        }
        other => panic!("not a task failure: {other}"),
    }
}

#[test]
fn two_tenants_on_rabbitmq_vhosts_and_redis_acl_users_cannot_reach_each_other() {
    let _shared = crate::support::RABBITMQ.read();
    let id = unique_queue("tenant").replace("wasmq-test-tenant-", "");
    let (name_a, name_b) = (format!("wasmq-ta-{id}"), format!("wasmq-tb-{id}"));
    let (vhost_a, vhost_b) = (Vhost::new(&name_a), Vhost::new(&name_b));
    // A third tenant whose results travel as rpc replies over its own vhost.
    let vhost_c = Vhost::new(&format!("wasmq-tc-{id}"));
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (redis_a, redis_b) = (RedisUser::new(&name_a).await, RedisUser::new(&name_b).await);
        // Tenant a serves math and hostile; tenant b serves math and text: two task
        // namespaces, both with their own `math.add`.
        let plugins_a = plugin_folder(dir.path(), "a", &["math", "hostile"]);
        let plugins_b = plugin_folder(dir.path(), "b", &["math", "text"]);
        let plugins_c = plugin_folder(dir.path(), "c", &["math"]);
        let config = format!(
            r#"
concurrency = 2
[tenants.a]
broker = "{broker_a}"
result_backend = "{results_a}"
result_prefix = "{prefix_a}"
queues = ["work-a"]
plugins = "{plugins_a}"
reserved = 1
[tenants.b]
broker = "{broker_b}"
result_backend = "{results_b}"
result_prefix = "{prefix_b}"
queues = ["work-b"]
plugins = "{plugins_b}"
reserved = 1
[tenants.c]
broker = "{broker_c}"
result_backend = "rpc://"
queues = ["work-c"]
plugins = "{plugins_c}"
"#,
            broker_a = vhost_a.url(),
            results_a = redis_a.url(),
            prefix_a = redis_a.prefix,
            plugins_a = plugins_a.display(),
            broker_b = vhost_b.url(),
            results_b = redis_b.url(),
            prefix_b = redis_b.prefix,
            plugins_b = plugins_b.display(),
            broker_c = vhost_c.url(),
            plugins_c = plugins_c.display(),
        );
        let worker = WorkerProcess::start(dir.path(), &config);
        let a = client(&vhost_a.url(), &redis_a.url(), Some(&redis_a.prefix))
            .with_default_queue("work-a");
        let b = client(&vhost_b.url(), &redis_b.url(), Some(&redis_b.prefix))
            .with_default_queue("work-b");

        // Each tenant runs its own tasks; a task of the other's namespace is unknown.
        assert_eq!(call(&a, "math.add", json!([2, 3])).await.unwrap(), json!(5));
        assert_eq!(
            call(&b, "math.add", json!([20, 3])).await.unwrap(),
            json!(23)
        );
        assert_eq!(
            call(&b, "text.slugify", json!(["Hello B"])).await.unwrap(),
            json!("hello-b")
        );
        let unknown = call(&a, "text.slugify", json!(["Hello A"]))
            .await
            .unwrap_err();
        assert_eq!(exception_type(&unknown), "NotRegistered", "{unknown}");

        // Results: under each tenant's prefix, which its Redis user cannot leave.
        let sent_b = b
            .send_task(
                "math.add",
                vec![json!(1), json!(1)],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(sent_b.get(WAIT).await.unwrap(), json!(2));
        let mut as_a = redis::Client::open(redis_a.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key_b = format!("{}celery-task-meta-{}", redis_b.prefix, sent_b.id);
        let stolen: Result<Option<String>, _> =
            redis::cmd("GET").arg(&key_b).query_async(&mut as_a).await;
        let refused = stolen.expect_err("tenant a's Redis user reads tenant b's result");
        assert!(
            refused.to_string().to_uppercase().contains("NOPERM"),
            "{refused}"
        );
        let mut admin = admin_redis().await;
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key_b)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(
            stored.is_some_and(|meta| meta.contains("SUCCESS")),
            "b's result is under b's prefix"
        );

        // Queues: tenant a's user cannot even open tenant b's vhost.
        let intrusion = lapin::Connection::connect(
            &vhost_b.url_as(&vhost_a),
            lapin::ConnectionProperties::default(),
        )
        .await;
        let refused = intrusion.expect_err("tenant a's user opens tenant b's vhost");
        assert!(
            refused.to_string().to_lowercase().contains("access")
                || refused.to_string().to_lowercase().contains("not_allowed")
                || refused.to_string().to_lowercase().contains("refused"),
            "{refused}"
        );

        // A callback naming tenant b's queue, sent by tenant a: a's vhost has no such queue,
        // and a's worker creates none. The sender's result says so.
        let linked = a
            .send_message(&linked_to(&a, "work-b"), Some("work-a"))
            .await
            .unwrap();
        let refused = linked.get(WAIT).await.unwrap_err();
        assert_eq!(
            failure(&refused),
            (
                "QueueNotFound".into(),
                "the callback math.add names queue 'work-b', which does not exist in tenant a's broker"
                    .into()
            ),
            "{refused}"
        );
        worker.wait_for_log(
            "a follow-up cannot be published: the callback math.add names queue 'work-b'",
            1,
        );
        assert!(
            worker.log().lines().any(|line| line.contains("ERROR")
                && line.contains(&linked.id)
                && line.contains("work-b")),
            "an error line with the task id:\n{}",
            worker.log()
        );

        // A callback to a queue that exists in a's vhost, though a's worker does not
        // consume it, is delivered there: legitimate routing still works.
        let in_a =
            lapin::Connection::connect(&vhost_a.url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel_a = in_a.create_channel().await.unwrap();
        let side = format!("side-{id}");
        channel_a
            .queue_declare(
                side.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let routed = a
            .send_message(&linked_to(&a, &side), Some("work-a"))
            .await
            .unwrap();
        assert_eq!(routed.get(WAIT).await.unwrap(), json!(3));
        assert_eq!(
            messages_in(&channel_a, &side).await,
            1,
            "the callback waits in a's own queue"
        );

        // A reply_to naming tenant b's reply queue, sent by tenant a, never reaches it.
        let reply_b =
            lapin::Connection::connect(&vhost_b.url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel_b = reply_b.create_channel().await.unwrap();
        let reply_queue = format!("replies-{id}");
        channel_b
            .queue_declare(
                reply_queue.as_str().into(),
                lapin::options::QueueDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let mut spoofed = a.build_message(
            "math.add",
            vec![json!(4), json!(4)],
            Map::new(),
            &SendOptions::default(),
        );
        spoofed.reply_to = Some(reply_queue.clone());
        let spoofed = a.send_message(&spoofed, Some("work-a")).await.unwrap();
        assert_eq!(
            spoofed.get(WAIT).await.unwrap(),
            json!(8),
            "stored in a's backend (Redis: the reply_to is not used)"
        );
        // With rpc results, the reply is published to the reply_to — in the sender's own
        // vhost, which has no such queue: the worker says so instead of losing it silently.
        let c = client(&vhost_c.url(), "rpc://", None).with_default_queue("work-c");
        assert_eq!(call(&c, "math.add", json!([6, 1])).await.unwrap(), json!(7));
        let mut spoofed = c.build_message(
            "math.add",
            vec![json!(4), json!(4)],
            Map::new(),
            &SendOptions::default(),
        );
        spoofed.reply_to = Some(reply_queue.clone());
        let spoofed = c.send_message(&spoofed, Some("work-c")).await.unwrap();
        worker.wait_for_log(
            &format!(
                "the rpc reply of task {} was not delivered: reply queue {reply_queue:?} does not exist in tenant c's broker",
                spoofed.id
            ),
            1,
        );

        // A revoke of tenant b's task id, sent by tenant a, does not touch b's task.
        let later = SendOptions {
            countdown: Some(Duration::from_secs(2)),
            ..SendOptions::default()
        };
        let delayed_b = b
            .send_task("math.add", vec![json!(5), json!(5)], Map::new(), later)
            .await
            .unwrap();
        a.revoke(&delayed_b.id, false).await.unwrap();
        assert_eq!(
            delayed_b.get(WAIT).await.unwrap(),
            json!(10),
            "b's task ran"
        );

        // Tenant b ran exactly its own four tasks: nothing of a's callback, reply or revoke.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status_b = worker.tenant_status("b");
        assert_eq!(status_b["succeeded"], json!(4), "{status_b}");
        assert_eq!(status_b["failed"], json!(0), "{status_b}");
        assert_eq!(status_b["revoked"], json!(0), "{status_b}");
        let declared = messages_in(&channel_b, &reply_queue).await;
        assert_eq!(declared, 0, "tenant a's reply reached b's reply queue");
        let b_queue = messages_in(&channel_b, "work-b").await;
        assert_eq!(b_queue, 0, "tenant a's callback reached b's queue");
        let _ = reply_b.close(200, "OK".into()).await;

        // `wasmq status` lists every tenant.
        let status_a = worker.tenant_status("a");
        assert_eq!(status_a["finished"], json!(5), "{status_a}");
        assert_eq!(status_a["failed"], json!(2), "{status_a}");
        // Neither the callback that named b's queue nor a queue for it is in a's vhost.
        assert!(
            !queue_exists(&in_a, "work-b").await,
            "a's worker declared a queue named after b's"
        );
        let in_c =
            lapin::Connection::connect(&vhost_c.url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        assert!(!queue_exists(&in_c, &reply_queue).await);
        let _ = in_c.close(200, "OK".into()).await;
        let _ = in_a.close(200, "OK".into()).await;
        let printed = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .args(["status", "--status-file"])
            .arg(&worker.status)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&printed.stdout);
        for tenant in ["a ", "b ", "c "] {
            assert!(
                printed
                    .lines()
                    .any(|line| line.starts_with(tenant) && line.contains("consuming")),
                "{printed}"
            );
        }
        assert!(
            !worker.log().contains(&redis_a.password),
            "a password was logged"
        );
        worker.stop();
        drop((redis_a, redis_b));
    });
}

/// Two tenants on one worker of `concurrency` slots, each with its own SQLite file and a
/// plugin folder of `math`; `a_keys` and `b_keys` are the rest of each tenant's table.
/// Returns the config and the two files' URLs.
fn embedded_tenants(
    dir: &Path,
    concurrency: usize,
    a_keys: &str,
    b_keys: &str,
) -> (String, String, String) {
    let plugins_a = plugin_folder(dir, "a", &["math"]);
    let plugins_b = plugin_folder(dir, "b", &["math"]);
    let url_a = format!("sqlite://{}", dir.join("a.db").display());
    let url_b = format!("sqlite://{}", dir.join("b.db").display());
    let config = format!(
        "concurrency = {concurrency}\n\
         [tenants.a]\nbroker = \"{url_a}\"\nplugins = \"{}\"\n{a_keys}\n\
         [tenants.b]\nbroker = \"{url_b}\"\nplugins = \"{}\"\n{b_keys}\n",
        plugins_a.display(),
        plugins_b.display(),
    );
    (config, url_a, url_b)
}

/// How long `n` × `math.sleep(seconds)` sent at once by `client` take to finish.
async fn makespan(client: &Client, n: usize, seconds: f64) -> Duration {
    let started = Instant::now();
    let mut sent = Vec::new();
    for _ in 0..n {
        sent.push(
            client
                .send_task(
                    "math.sleep",
                    vec![json!(seconds)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap(),
        );
    }
    for result in sent {
        assert_eq!(result.get(WAIT).await.unwrap(), json!(seconds));
    }
    started.elapsed()
}

#[test]
fn a_memory_budget_bounds_what_a_tenant_runs_at_once() {
    // Four slots. Tenant a's tasks run under 128 MiB each and its budget holds two of them;
    // tenant b, with the same tasks and no budget, is the control.
    let dir = tempfile::tempdir().unwrap();
    let (config, url_a, url_b) = embedded_tenants(
        dir.path(),
        4,
        "memory_budget = \"256MiB\"\n[tenants.a.limits]\nmemory = \"128MiB\"",
        "[tenants.b.limits]\nmemory = \"128MiB\"",
    );
    let a = client(&url_a, &url_a, None);
    let b = client(&url_b, &url_b, None);
    runtime().block_on(async {
        let worker = WorkerProcess::start(dir.path(), &config);
        // Warm both tenants up (plugins loaded, consumers running) before timing.
        makespan(&a, 1, 0.01).await;
        makespan(&b, 1, 0.01).await;
        let unbounded = makespan(&b, 4, 1.0).await;
        let bounded = makespan(&a, 4, 1.0).await;
        assert!(
            unbounded < Duration::from_millis(1800),
            "b's four tasks ran side by side: {unbounded:?}"
        );
        assert!(
            bounded >= Duration::from_millis(1950),
            "a's budget holds two 128 MiB tasks at once, so four take two rounds: {bounded:?}"
        );
        worker.stop();
    });
}

#[test]
fn a_flooding_tenant_does_not_hold_back_another_tenants_task() {
    let dir = tempfile::tempdir().unwrap();
    let (config, url_a, url_b) = embedded_tenants(dir.path(), 2, "", "reserved = 1");
    let a = client(&url_a, &url_a, None);
    let b = client(&url_b, &url_b, None);
    runtime().block_on(async {
        // The flood (20 s of work for two slots) is in a's broker before the worker starts:
        // FIFO over one merged stream would run all of it first.
        const FLOOD: usize = 400;
        let mut flood = Vec::new();
        for _ in 0..FLOOD {
            flood.push(
                a.send_task(
                    "math.sleep",
                    vec![json!(0.05)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap(),
            );
        }
        let worker = WorkerProcess::start(dir.path(), &config);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probe = b
            .send_task(
                "math.add",
                vec![json!(1), json!(2)],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(probe.get(WAIT).await.unwrap(), json!(3));
        let mut done = 0;
        for result in &flood {
            if result.ready().await.unwrap() {
                done += 1;
            }
        }
        assert!(
            done < FLOOD / 2,
            "tenant b's task waited for {done} of tenant a's {FLOOD} tasks"
        );
        let status_a = worker.tenant_status("a");
        assert!(
            status_a["queued"].as_u64().unwrap() <= 32 + 2,
            "a's flood stays in its broker: {status_a}"
        );
        worker.stop();
    });
}

#[test]
fn a_follow_up_naming_another_tenants_queue_fails_for_its_sender_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (config, url_a, url_b) = embedded_tenants(
        dir.path(),
        2,
        "queues = [\"work-a\"]",
        "queues = [\"work-b\"]",
    );
    let a = client(&url_a, &url_a, None).with_default_queue("work-a");
    let (broker_a, broker_b) = (
        wasmq::broker::connect(&url_a).unwrap(),
        wasmq::broker::connect(&url_b).unwrap(),
    );
    let missing = |follow_up: &str| {
        format!("the {follow_up} names queue 'work-b', which does not exist in tenant a's broker")
    };
    runtime().block_on(async {
        let worker = WorkerProcess::start(dir.path(), &config);

        // A callback naming b's queue: a's file has no such queue and gets none.
        let linked = a
            .send_message(&linked_to(&a, "work-b"), None)
            .await
            .unwrap();
        let refused = linked.get(WAIT).await.unwrap_err();
        assert_eq!(
            failure(&refused),
            ("QueueNotFound".into(), missing("callback math.add")),
            "{refused}"
        );
        assert_eq!(broker_a.queue_length("work-b").await.unwrap(), 0);

        // A queue of a's own file that its clients send to is reached.
        let to_side = SendOptions {
            queue: Some("side".into()),
            ..SendOptions::default()
        };
        a.send_task("math.add", vec![json!(0), json!(0)], Map::new(), to_side)
            .await
            .unwrap();
        let routed = a.send_message(&linked_to(&a, "side"), None).await.unwrap();
        assert_eq!(routed.get(WAIT).await.unwrap(), json!(3));
        assert_eq!(broker_a.queue_length("side").await.unwrap(), 2);

        // Two callbacks, the first to a's "side", the second to b's queue: none is
        // published, so "side" gets nothing and the sender sees the second one named.
        let mut both = linked_to(&a, "side");
        let callbacks = both.embed.callbacks.as_mut().unwrap();
        let mut to_b = callbacks[0].clone();
        to_b["options"]["queue"] = json!("work-b");
        callbacks.push(to_b);
        let refused = a.send_message(&both, None).await.unwrap();
        let refused = refused.get(WAIT).await.unwrap_err();
        assert_eq!(
            failure(&refused),
            ("QueueNotFound".into(), missing("callback math.add")),
            "{refused}"
        );
        assert_eq!(broker_a.queue_length("side").await.unwrap(), 2);

        // After the result is stored: an errback, then a chord body, naming b's queue. Each
        // is answered under its own id.
        let errback_id = uuid::Uuid::new_v4().to_string();
        let mut failing = a.build_message(
            "math.div",
            vec![json!(1), json!(0)],
            Map::new(),
            &SendOptions::default(),
        );
        failing.embed.errbacks = Some(vec![json!({
            "task": "math.add", "args": [1], "kwargs": {},
            "options": {"queue": "work-b", "task_id": errback_id},
            "subtask_type": null, "immutable": false,
        })]);
        let failing = a.send_message(&failing, None).await.unwrap();
        let failed = failing.get(WAIT).await.unwrap_err();
        assert_eq!(exception_type(&failed), "ZeroDivisionError", "{failed}");
        let errback = a.result(&errback_id).get(WAIT).await.unwrap_err();
        assert_eq!(
            failure(&errback),
            ("QueueNotFound".into(), missing("errback math.add")),
            "{errback}"
        );
        let body = wasmq::canvas::chord(
            [
                wasmq::canvas::Signature::new("math.add", vec![json!(1), json!(1)]),
                wasmq::canvas::Signature::new("math.add", vec![json!(2), json!(2)]),
            ],
            wasmq::canvas::Signature::new("math.sum", vec![]).with_option("queue", "work-b"),
        )
        .apply(&a)
        .await
        .unwrap();
        let chord_error = body.get(WAIT).await.unwrap_err();
        assert_eq!(
            failure(&chord_error),
            (
                "ChordError".into(),
                format!(
                    "Callback error: QueueNotFound: {}",
                    missing("chord body math.sum")
                )
            ),
            "{chord_error}"
        );
        assert_eq!(broker_a.queue_length("work-b").await.unwrap(), 0);

        // Tenant b saw none of it.
        assert_eq!(broker_b.queue_length("work-b").await.unwrap(), 0);
        let status_b = worker.tenant_status("b");
        assert_eq!(status_b["received"], json!(0), "{status_b}");
        worker.stop();
    });
}

#[test]
fn each_tenants_delayed_messages_wait_in_the_shared_scheduler_under_its_own_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (a, b) = (format!("sched_a_{id}"), format!("sched_b_{id}"));
    let url_a = format!("sqlite://{}", dir.path().join("a.db").display());
    let url_b = format!("sqlite://{}", dir.path().join("b.db").display());
    let config = format!(
        "concurrency = 2\nscheduler = \"{redis}\"\n\
         [tenants.{a}]\nbroker = \"{url_a}\"\nplugins = \"{}\"\n\
         [tenants.{b}]\nbroker = \"{url_b}\"\nplugins = \"{}\"\n",
        plugin_folder(dir.path(), "a", &["math"]).display(),
        plugin_folder(dir.path(), "b", &["math"]).display(),
        redis = crate::support::REDIS_URL,
    );
    let (due_a, due_b) = (
        format!("wasmq.scheduler.{a}:due"),
        format!("wasmq.scheduler.{b}:due"),
    );
    let client_a = client(&url_a, &url_a, None);
    runtime().block_on(async {
        let worker = WorkerProcess::start(dir.path(), &config);
        let mut redis = admin_redis().await;
        // Ten tasks that each ask for three retries 100 ms apart: every retry is a delayed
        // publish by tenant a's worker, which its scheduler holds until due.
        let mut sent = Vec::new();
        for _ in 0..10 {
            sent.push(
                client_a
                    .send_task(
                        "math.flaky",
                        vec![json!(3)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        let (mut most_a, mut most_b) = (0_u64, 0_u64);
        let watching = Instant::now();
        while watching.elapsed() < Duration::from_millis(600) {
            let (in_a, in_b): (u64, u64) = redis::pipe()
                .zcard(&due_a)
                .zcard(&due_b)
                .query_async(&mut redis)
                .await
                .unwrap();
            most_a = most_a.max(in_a);
            most_b = most_b.max(in_b);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for result in sent {
            assert_eq!(result.get(WAIT).await.unwrap(), json!(3));
        }
        assert!(
            most_a > 0,
            "tenant a's retries never waited in its scheduler"
        );
        assert_eq!(most_b, 0, "tenant a's retries reached tenant b's prefix");
        worker.stop();
        let _: () = redis::cmd("DEL")
            .arg(&due_a)
            .arg(format!("wasmq.scheduler.{a}:claimed"))
            .arg(&due_b)
            .arg(format!("wasmq.scheduler.{b}:claimed"))
            .query_async(&mut redis)
            .await
            .unwrap();
    });
}

#[test]
fn the_example_tenants_file_is_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tenants.toml");
    let raw = wasmq::config::RawConfig::from_file(&file).unwrap();
    let config = wasmq::config::WorkerConfig::resolve(raw).unwrap();
    let names: Vec<_> = config.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["acme", "globex"]);
    let acme = &config.tenants[0];
    let granted = acme.grants_for("grants.read_text");
    assert_eq!(granted.dirs.len(), 2);
    assert_eq!(granted.variables["greeting"], "hello from acme");
    assert!(acme.grants_for("math.add").dirs.is_empty());
}

#[test]
fn a_tenants_grants_reach_only_its_granted_tasks_and_never_the_other_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_a = plugin_folder(dir.path(), "a", &["grants", "hostile"]);
    let plugins_b = plugin_folder(dir.path(), "b", &["grants"]);
    let data_a = dir.path().join("a").join("data");
    let data_b = dir.path().join("b").join("data");
    std::fs::create_dir_all(&data_a).unwrap();
    std::fs::create_dir_all(&data_b).unwrap();
    std::fs::write(data_a.join("hello.txt"), "hello from a's folder").unwrap();
    std::fs::write(data_b.join("secret.txt"), "b's secret").unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-of-a\n").unwrap();
    let (db_a, db_b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // An echo server on this machine that tenant a's allow-list names.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for stream in echo.incoming().flatten() {
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(&stream);
            if reader.read_line(&mut line).is_ok() {
                let _ = (&stream).write_all(format!("echo: {line}").as_bytes());
            }
        }
    });
    let config = format!(
        r#"
concurrency = 2
[tenants.a]
broker = "sqlite://{db_a}"
plugins = "{plugins_a}"
[tenants.a.network]
allow = ["{echo_addr}"]
[tenants.a.dirs]
"/data" = {{ host = "{data_a}" }}
[tenants.a.variables]
greeting = "hello from a"
[tenants.a.secrets]
token = {{ file = "{token}" }}
[tenants.a.grants."grants.*"]
dirs = ["/data"]
network = true
variables = ["greeting", "token"]
[tenants.b]
broker = "sqlite://{db_b}"
plugins = "{plugins_b}"
"#,
        db_a = db_a.display(),
        db_b = db_b.display(),
        plugins_a = plugins_a.display(),
        plugins_b = plugins_b.display(),
        data_a = data_a.display(),
        token = token.display(),
    );
    let echo_addr = echo_addr.to_string();
    let url = |db: &Path| format!("sqlite://{}", db.display());
    let a = client(&url(&db_a), &url(&db_a), None);
    let b = client(&url(&db_b), &url(&db_b), None);
    runtime().block_on(async {
        let worker = WorkerProcess::start(dir.path(), &config);
        // A granted task reads its tenant's folder, variable and secret.
        assert_eq!(
            call(&a, "grants.read_text", json!(["/data/hello.txt"]))
                .await
                .unwrap(),
            json!("hello from a's folder")
        );
        assert_eq!(
            call(&a, "grants.variable", json!(["greeting"]))
                .await
                .unwrap(),
            json!("hello from a")
        );
        assert_eq!(
            call(&a, "grants.variable", json!(["token"])).await.unwrap(),
            json!("s3cret-token-of-a")
        );
        assert_eq!(
            call(&a, "grants.tcp_request", json!([echo_addr, "ping"]))
                .await
                .unwrap(),
            json!("echo: ping")
        );
        let broker = call(&a, "grants.tcp_request", json!(["127.0.0.1:5672", "ping"]))
            .await
            .unwrap_err();
        assert!(broker.to_string().contains("Permission denied"), "{broker}");
        // Out of the folder, and an ungranted task of the same tenant: nothing.
        let escape = call(
            &a,
            "grants.read_text",
            json!(["/data/../../b/data/secret.txt"]),
        )
        .await
        .unwrap_err();
        assert!(escape.to_string().contains("PermissionError"), "{escape}");
        let ungranted = call(&a, "hostile.read_variable", json!(["token"]))
            .await
            .unwrap_err();
        assert_eq!(exception_type(&ungranted), "KeyError", "{ungranted}");
        let no_folder = call(&a, "hostile.read_outside", json!(["/data/hello.txt"]))
            .await
            .unwrap_err();
        assert_eq!(
            exception_type(&no_folder),
            "FileNotFoundError",
            "{no_folder}"
        );
        // The other tenant runs the same plugin with none of it.
        assert_eq!(
            call(&b, "grants.variable", json!(["greeting"]))
                .await
                .unwrap(),
            json!(null)
        );
        let b_read = call(&b, "grants.read_text", json!(["/data/hello.txt"]))
            .await
            .unwrap_err();
        assert_eq!(exception_type(&b_read), "FileNotFoundError", "{b_read}");
        let b_connect = call(&b, "grants.tcp_request", json!([echo_addr, "ping"]))
            .await
            .unwrap_err();
        assert_eq!(exception_type(&b_connect), "PermissionError", "{b_connect}");
        assert!(
            !worker.log().contains("s3cret-token-of-a"),
            "a secret was logged:\n{}",
            worker.log()
        );
        worker.stop();
    });
}
