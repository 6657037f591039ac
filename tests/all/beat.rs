//! Beat: real `wasmq beat` (and `wasmq worker --beat`) processes sharing a schedule, on the
//! embedded database file and on Redis. Two beats send each run once; killing the leader
//! hands over within the lease TTL; deleting the lease makes the leader step down, not
//! crash; a Python Celery worker runs what a wasmq beat sends; a bad schedule is one line.
//!
//! Each run's id is recomputed here from the entry and the instant (UUID v5 of
//! `<entry>@<RFC 3339 ms>` in the beat namespace), independently of the beat's code.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use wasmq::broker::Broker;

use crate::interop::PythonWorker;
use crate::support::{AMQP_URL, RABBITMQ, REDIS_URL, runtime, unique_queue};

/// The beat's UUID v5 namespace: the v5 id of its URL (see `beat/occurrence.rs`).
fn namespace() -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"https://wasmq.dev/beat")
}

/// The id of `entry`'s run at `at`, as every beat must derive it.
fn derived_id(entry: &str, at: DateTime<Utc>) -> String {
    let key = format!(
        "{entry}@{}",
        at.to_rfc3339_opts(SecondsFormat::Millis, true)
    );
    uuid::Uuid::new_v5(&namespace(), key.as_bytes()).to_string()
}

/// The instant of each whole second from `from` to `to`, by the id of `entry`'s run then.
fn ids_by_second(entry: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> HashMap<String, i64> {
    (from.timestamp() - 1..=to.timestamp() + 1)
        .map(|s| {
            (
                derived_id(entry, DateTime::from_timestamp(s, 0).unwrap()),
                s,
            )
        })
        .collect()
}

/// A `wasmq beat` (or `wasmq worker --beat`) process, its JSON log in a file; killed when
/// dropped.
struct Process {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Process {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .args(["--log-format", "json"])
            .args(args)
            .args(["--name", name])
            .current_dir(dir)
            .env_remove("WASMQ_LOG")
            .env(
                "WASMQ_CACHE_DIR",
                std::env::temp_dir().join("wasmq-test-artifact-cache"),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start wasmq");
        Self {
            child,
            log,
            name: name.to_owned(),
        }
    }

    fn beat(dir: &Path, name: &str, schedule: &Path, endpoints: &[&str]) -> Self {
        let schedule = schedule.to_str().unwrap();
        let mut args = vec!["beat", "--schedule", schedule];
        args.extend(endpoints);
        Self::start(dir, name, &args)
    }

    /// The log's JSON lines.
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Lines whose message starts with `message`.
    fn said(&self, message: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .collect()
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }

    /// SIGTERM, then waits (up to 10 s) for it to exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The task ids arriving on a queue, with when each arrived.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<(String, Instant)>>>);

impl Arrivals {
    /// Consumes `queue` on `broker` (acking everything) until the runtime ends.
    async fn collect(broker: Arc<dyn Broker>, queue: &str) -> Self {
        let arrivals = Self::default();
        let mut consumer = broker.consume(&[queue.to_owned()], 100).await.unwrap();
        let seen = arrivals.clone();
        tokio::spawn(async move {
            while let Ok(delivery) = consumer.next().await {
                let id = delivery.envelope.headers["id"].as_str().unwrap().to_owned();
                seen.0.lock().unwrap().push((id, Instant::now()));
                let _ = delivery.ack().await;
            }
        });
        arrivals
    }

    fn all(&self) -> Vec<(String, Instant)> {
        self.0.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<(String, Instant)> {
        let deadline = Instant::now() + within;
        while self.all().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all = self.all();
        assert!(
            all.len() >= n,
            "{} of {n} runs arrived in {within:?}",
            all.len()
        );
        all
    }
}

/// Asserts every id is a derived id of `entry` and none repeats; returns their instants.
fn check_ids(entry: &str, ids: &[(String, Instant)], since: DateTime<Utc>) -> Vec<i64> {
    let known = ids_by_second(entry, since, Utc::now());
    let mut seen = HashSet::new();
    for (id, _) in ids {
        assert!(
            known.contains_key(id),
            "{id} is not a derived id of {entry}"
        );
        assert!(
            seen.insert(id.clone()),
            "{id} arrived twice: a duplicate run"
        );
    }
    let mut seconds: Vec<i64> = ids.iter().map(|(id, _)| known[id]).collect();
    seconds.sort_unstable();
    seconds
}

/// Where a test's beats agree: the embedded file (the broker's) or Redis under a fresh
/// prefix, deleted at the end.
struct Lease {
    args: Vec<String>,
    prefix: String,
    store: Store,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Embedded,
    Redis,
    RabbitMq,
}

impl Lease {
    fn embedded(prefix: &str) -> Self {
        // The beat's default: the broker's embedded file.
        Self {
            args: vec!["--beat-prefix".into(), prefix.into()],
            prefix: prefix.into(),
            store: Store::Embedded,
        }
    }

    fn rabbitmq(prefix: &str) -> Self {
        // The beat's default with a RabbitMQ broker and rpc results: an exclusive queue.
        Self {
            args: vec!["--beat-prefix".into(), prefix.into()],
            prefix: prefix.into(),
            store: Store::RabbitMq,
        }
    }

    fn redis(prefix: &str) -> Self {
        Self {
            args: vec![
                "--beat-lease".into(),
                REDIS_URL.into(),
                "--beat-prefix".into(),
                prefix.into(),
            ],
            prefix: prefix.into(),
            store: Store::Redis,
        }
    }

    /// Deletes the lease under its holder's feet.
    async fn steal(&self, db_url: &str) {
        match self.store {
            Store::Redis => redis_del(&[format!("{}:leader", self.prefix)]).await,
            Store::Embedded => {
                let path = db_url.strip_prefix("sqlite://").unwrap();
                wasmq::beat::lease::embedded::EmbeddedLease::open(Path::new(path), &self.prefix)
                    .unwrap()
                    .break_lease()
                    .await
                    .unwrap();
            }
            Store::RabbitMq => {
                // Only its own connection may delete an exclusive queue; the operator can.
                let queue = format!("{}.leader", self.prefix);
                let status = Command::new("rabbitmqctl")
                    .args(["-q", "delete_queue", &queue])
                    .status()
                    .unwrap();
                assert!(status.success(), "rabbitmqctl delete_queue {queue}");
            }
        }
    }

    async fn clean(&self, entry: &str) {
        match self.store {
            Store::Redis => {
                let keys = ["leader", "last_run", "last_id", "runs"]
                    .map(|k| format!("{}:{k}", self.prefix));
                redis_del(&keys).await;
            }
            Store::RabbitMq => {
                let broker = wasmq::broker::connect(AMQP_URL).unwrap();
                let _ = broker
                    .delete_queue(&format!("{}.runs.{entry}", self.prefix))
                    .await;
            }
            Store::Embedded => {}
        }
    }
}

async fn redis_del(keys: &[String]) {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// A temporary folder with an embedded database and a schedule of one entry.
struct Setup {
    dir: tempfile::TempDir,
    db: String,
    /// The broker and result backend the beats are given.
    endpoints: (String, String),
    schedule: PathBuf,
    queue: String,
    broker: Arc<dyn Broker>,
}

impl Setup {
    /// On the embedded database.
    fn new(entry: &str, body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("wasmq.db").display());
        Self::with(dir, db.clone(), (db.clone(), db), entry, body)
    }

    /// On `store`'s broker: RabbitMQ (with rpc results) for its lease, else the embedded one.
    fn for_store(store: Store, entry: &str, body: &str) -> Self {
        if store != Store::RabbitMq {
            return Self::new(entry, body);
        }
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("wasmq.db").display());
        let endpoints = (AMQP_URL.to_owned(), "rpc://".to_owned());
        Self::with(dir, db, endpoints, entry, body)
    }

    fn with(
        dir: tempfile::TempDir,
        db: String,
        endpoints: (String, String),
        entry: &str,
        body: &str,
    ) -> Self {
        let queue = unique_queue("beat");
        let schedule = dir.path().join("beat.toml");
        std::fs::write(
            &schedule,
            format!("[beat.{entry}]\nqueue = \"{queue}\"\n{body}\n"),
        )
        .unwrap();
        let broker = wasmq::broker::connect(&endpoints.0).unwrap();
        Self {
            dir,
            db,
            endpoints,
            schedule,
            queue,
            broker,
        }
    }

    /// Deletes the work queue from RabbitMQ (the embedded one goes with its folder).
    async fn clean(&self) {
        if self.endpoints.0 == AMQP_URL {
            self.broker.delete_queue(&self.queue).await.unwrap();
        }
    }

    fn beat(&self, name: &str, lease: &Lease) -> Process {
        let (broker, backend) = (self.endpoints.0.as_str(), self.endpoints.1.as_str());
        let mut args = vec!["--broker", broker, "--result-backend", backend];
        args.extend(lease.args.iter().map(String::as_str));
        Process::beat(self.dir.path(), name, &self.schedule, &args)
    }
}

const ONE_SECOND: &str = "task = \"math.add\"\nargs = [1, 1]\nevery = \"1s\"";

/// Which of `beats` logged that it leads (and has not said it lost the lease since).
fn leader<'a>(beats: &'a [&'a Process]) -> Option<&'a Process> {
    beats.iter().copied().find(|beat| {
        let lines = beat.lines();
        let led = lines
            .iter()
            .rposition(|l| l["message"] == "leading the beat");
        let lost = lines.iter().rposition(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("lost the beat lease"))
        });
        led.is_some() && led > lost
    })
}

fn two_beats_send_each_run_once(lease: Lease) {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let setup = Setup::for_store(lease.store, "tick", ONE_SECOND);
    runtime().block_on(async {
        let arrivals = Arrivals::collect(Arc::clone(&setup.broker), &setup.queue).await;
        let started = Utc::now();
        let mut a = setup.beat("beat-a", &lease);
        let mut b = setup.beat("beat-b", &lease);
        let first = arrivals.wait_for(1, Duration::from_secs(30)).await[0].1;
        // Ten seconds, starting half-way between two runs.
        let (from, to) = (
            first + Duration::from_millis(500),
            first + Duration::from_millis(10_500),
        );
        tokio::time::sleep_until((to + Duration::from_millis(200)).into()).await;
        let window: Vec<_> = arrivals
            .all()
            .into_iter()
            .filter(|(_, at)| *at >= from && *at < to)
            .collect();
        assert!(a.alive() && b.alive(), "{}\n{}", a.text(), b.text());
        // Before stopping: the leader gives its lease up on SIGTERM, and the other may then
        // lead for a moment.
        let leaders = [&a, &b]
            .iter()
            .filter(|beat| !beat.said("leading the beat").is_empty())
            .count();
        assert_eq!(leaders, 1, "one leader:\n{}\n{}", a.text(), b.text());
        a.stop();
        b.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seconds = check_ids("tick", &arrivals.all(), started);
        println!(
            "two beats ({:?}), 10 s: {} runs, {} in all, instants {seconds:?}",
            lease.store,
            window.len(),
            seconds.len()
        );
        assert!(
            (9..=11).contains(&window.len()),
            "{} runs in 10 s: {seconds:?}",
            window.len()
        );
        assert!(
            seconds.windows(2).all(|w| w[1] - w[0] == 1),
            "one run a second, none skipped: {seconds:?}"
        );
        let sent: usize = [&a, &b].iter().map(|beat| beat.said("sent").len()).sum();
        assert_eq!(sent, seconds.len(), "every run sent was received, once");
        lease.clean("tick").await;
        setup.clean().await;
    });
}

#[test]
fn two_beats_on_the_embedded_database_send_each_run_once() {
    two_beats_send_each_run_once(Lease::embedded("wasmq.beat"));
}

#[test]
fn two_beats_with_a_redis_lease_send_each_run_once() {
    two_beats_send_each_run_once(Lease::redis(&unique_queue("beat-lease")));
}

#[test]
fn two_beats_on_rabbitmq_alone_send_each_run_once() {
    two_beats_send_each_run_once(Lease::rabbitmq(&unique_queue("beat-lease")));
}

/// SIGKILL the leader: the follower takes over within the lease TTL (+ 1 s), the run
/// missed meanwhile fires once, and no id arrives twice.
fn the_follower_takes_over_from_a_killed_leader(lease: Lease) {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let setup = Setup::for_store(lease.store, "tick", ONE_SECOND);
    let ttl = Duration::from_secs(2);
    let mut lease = lease;
    lease.args.extend(["--beat-lease-ttl".into(), "2s".into()]);
    runtime().block_on(async {
        let arrivals = Arrivals::collect(Arc::clone(&setup.broker), &setup.queue).await;
        let started = Utc::now();
        let a = setup.beat("beat-a", &lease);
        let b = setup.beat("beat-b", &lease);
        let before = arrivals.wait_for(3, Duration::from_secs(30)).await.len();
        let beats = [&a, &b];
        let leader = leader(&beats).expect("a leader");
        let follower = if leader.name == a.name { &b } else { &a };
        leader.signal("-KILL");
        let killed = Instant::now();
        let killed_at = Utc::now();
        let after = arrivals.wait_for(before + 4, Duration::from_secs(15)).await;
        let first_after = after
            .iter()
            .map(|(_, at)| *at)
            .find(|at| *at > killed + Duration::from_millis(50))
            .unwrap();
        let failover = first_after - killed;
        let gaps: Vec<Duration> = after.windows(2).map(|w| w[1].1 - w[0].1).collect();
        let longest = gaps.iter().max().copied().unwrap_or_default();
        let seconds = check_ids("tick", &after, started);
        let took_over = follower
            .said("leading the beat")
            .iter()
            .filter_map(|line| line["timestamp"].as_str())
            .filter_map(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| {
                (at.with_timezone(&Utc) - killed_at)
                    .to_std()
                    .unwrap_or_default()
            })
            .next_back();
        println!(
            "SIGKILL of the leader ({:?}, lease TTL {ttl:?}): the follower led after \
             {took_over:?}, the first run arrived after {failover:?}; longest gap between runs \
             {longest:?}; {} runs, no duplicate",
            lease.store,
            seconds.len()
        );
        assert!(
            failover <= ttl + Duration::from_secs(1),
            "the follower resumed after {failover:?}:\n{}",
            follower.text()
        );
        assert!(
            longest <= ttl + Duration::from_secs(1),
            "a gap of {longest:?}"
        );
        assert!(
            !follower.said("leading the beat").is_empty(),
            "{}",
            follower.text()
        );
        drop(a);
        drop(b);
        lease.clean("tick").await;
        setup.clean().await;
    });
}

#[test]
fn the_follower_takes_over_from_a_killed_leader_on_the_embedded_database() {
    the_follower_takes_over_from_a_killed_leader(Lease::embedded("wasmq.beat"));
}

#[test]
fn the_follower_takes_over_from_a_killed_leader_on_redis() {
    the_follower_takes_over_from_a_killed_leader(Lease::redis(&unique_queue("beat-lease")));
}

#[test]
fn the_follower_takes_over_from_a_killed_leader_on_rabbitmq() {
    the_follower_takes_over_from_a_killed_leader(Lease::rabbitmq(&unique_queue("beat-lease")));
}

/// The lease deleted under the leader (RedBeat #230 crashed here): the leader notices at its
/// next renewal or claim, steps down, and the beats carry on with no run twice.
fn a_leader_whose_lease_is_deleted_steps_down(lease: Lease) {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let setup = Setup::for_store(lease.store, "tick", ONE_SECOND);
    let mut lease = lease;
    lease.args.extend(["--beat-lease-ttl".into(), "2s".into()]);
    runtime().block_on(async {
        let arrivals = Arrivals::collect(Arc::clone(&setup.broker), &setup.queue).await;
        let started = Utc::now();
        let mut a = setup.beat("beat-a", &lease);
        let mut b = setup.beat("beat-b", &lease);
        let before = arrivals.wait_for(2, Duration::from_secs(30)).await.len();
        let beats = [&a, &b];
        let leader_name = leader(&beats).expect("a leader").name.clone();
        lease.steal(&setup.db).await;
        let deadline = Instant::now() + Duration::from_secs(3);
        let stepped_down = loop {
            let old = if leader_name == a.name { &a } else { &b };
            if !old.said("lost the beat lease").is_empty() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let after = arrivals.wait_for(before + 3, Duration::from_secs(10)).await;
        let seconds = check_ids("tick", &after, started);
        assert!(stepped_down, "{}\n{}", a.text(), b.text());
        assert!(
            a.alive() && b.alive(),
            "no crash:\n{}\n{}",
            a.text(),
            b.text()
        );
        assert!(
            !a.text().contains("panicked") && !b.text().contains("panicked"),
            "{}\n{}",
            a.text(),
            b.text()
        );
        println!(
            "{:?}: after the lease was deleted: runs {seconds:?}",
            lease.store
        );
        a.stop();
        b.stop();
        lease.clean("tick").await;
        setup.clean().await;
    });
}

#[test]
fn a_leader_whose_lease_is_deleted_steps_down_on_the_embedded_database() {
    a_leader_whose_lease_is_deleted_steps_down(Lease::embedded("wasmq.beat"));
}

#[test]
fn a_leader_whose_lease_is_deleted_steps_down_on_redis() {
    a_leader_whose_lease_is_deleted_steps_down(Lease::redis(&unique_queue("beat-lease")));
}

#[test]
fn a_leader_whose_lease_queue_is_deleted_steps_down_on_rabbitmq() {
    a_leader_whose_lease_is_deleted_steps_down(Lease::rabbitmq(&unique_queue("beat-lease")));
}

/// The runs a beat's log says it sent: (id, scheduled instant).
fn sent(process: &Process) -> Vec<(String, DateTime<Utc>)> {
    process
        .said("sent")
        .iter()
        .map(|line| {
            let at = DateTime::parse_from_rfc3339(line["at"].as_str().unwrap()).unwrap();
            (
                line["id"].as_str().unwrap().to_owned(),
                at.with_timezone(&Utc),
            )
        })
        .collect()
}

/// A Python Celery worker (Celery 5, from PyPI) runs `tasks.add` sent by a wasmq beat on
/// RabbitMQ, and stores its result in Redis under the run's derived id. The beat keeps its
/// lease in the Redis result backend, its default when there is one.
#[test]
fn a_python_celery_worker_runs_what_a_wasmq_beat_sends() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue("beat-py");
    let prefix = unique_queue("beat-lease");
    let schedule = dir.path().join("beat.toml");
    std::fs::write(
        &schedule,
        format!(
            "[beat.py-add]\ntask = \"tasks.add\"\nargs = [2, 3]\nevery = \"1s\"\nqueue = \"{queue}\"\n"
        ),
    )
    .unwrap();
    let python = PythonWorker::start(&queue, REDIS_URL, dir.path());
    let mut beat = Process::beat(
        dir.path(),
        "beat-py",
        &schedule,
        &[
            "--broker",
            AMQP_URL,
            "--result-backend",
            REDIS_URL,
            "--beat-prefix",
            prefix.as_str(),
        ],
    );
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent(&beat).len() < 2 {
            assert!(Instant::now() < deadline, "no run sent: {}", beat.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = beat.text();
        assert!(text.contains(&format!("{REDIS_URL} ({prefix})")), "{text}");
        let broker = wasmq::broker::connect(AMQP_URL).unwrap();
        let backend =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), AMQP_URL).unwrap();
        let client = wasmq::client::Client::new(broker, backend);
        for (id, at) in sent(&beat).into_iter().take(2) {
            assert_eq!(id, derived_id("py-add", at));
            let value = client.result(&id).get(Duration::from_secs(30)).await;
            assert_eq!(value.unwrap(), json!(5), "run {id} at {at}");
        }
        beat.stop();
        drop(python);
        wasmq::broker::connect(AMQP_URL)
            .unwrap()
            .delete_queue(&queue)
            .await
            .unwrap();
        Lease::redis(&prefix).clean("py-add").await;
    });
}

/// A schedule that does not validate is one line naming the file, entry and key, exit 2,
/// from `wasmq beat` and from `wasmq worker --beat` alike.
#[test]
fn a_bad_schedule_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("beat.toml");
    std::fs::write(
        &schedule,
        "[beat.nightly]\ntask = \"math.add\"\ncron = \"0 25 * * *\"\n",
    )
    .unwrap();
    let db = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    for args in [
        vec!["beat", "--schedule"],
        vec!["worker", "--plugins", "nowhere", "--beat"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .args(&args)
            .arg(&schedule)
            .args(["--broker", db.as_str()])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains("[beat.nightly] cron: "),
            "{stderr}"
        );
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args([
            "beat",
            "--schedule",
            "no-such.toml",
            "--broker",
            db.as_str(),
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.starts_with("error: cannot read the schedule no-such.toml: "),
        "{stderr}"
    );
}

/// A running beat follows its file: one that no longer validates is logged and ignored, an
/// entry added is sent within a couple of seconds, a disabled one stops; `--list` then shows
/// each entry's schedule, next and last run.
#[test]
fn a_changed_schedule_is_picked_up_and_list_shows_next_and_last_runs() {
    let setup = Setup::new("first", ONE_SECOND);
    let lease = Lease::embedded("wasmq.beat");
    let mut beat = setup.beat("beat-list", &lease);
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent(&beat).is_empty() {
            assert!(Instant::now() < deadline, "no run sent: {}", beat.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A file that no longer validates is logged and ignored: the beat runs on.
        let valid = std::fs::read_to_string(&setup.schedule).unwrap();
        std::fs::write(&setup.schedule, format!("{valid}evry = \"1s\"\n")).unwrap();
        let before = sent(&beat).len();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(beat.alive(), "{}", beat.text());
        let refused = beat.said("the schedule file no longer validates");
        assert_eq!(refused.len(), 1, "{}", beat.text());
        assert!(
            refused[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown field `evry`")),
            "{refused:?}"
        );
        assert!(sent(&beat).len() >= before + 2, "{}", beat.text());
        std::fs::write(
            &setup.schedule,
            format!(
                "[beat.first]\nqueue = \"{q}\"\n{ONE_SECOND}\nenabled = false\n\
                 [beat.second]\nqueue = \"{q}\"\n{ONE_SECOND}\n\
                 [beat.nightly]\ntask = \"text.slugify\"\nargs = [\"x\"]\n\
                 cron = \"4 16 * * *\"\ntimezone = \"America/New_York\"\n",
                q = setup.queue
            ),
        )
        .unwrap();
        let changed = Instant::now();
        let deadline = changed + Duration::from_secs(5);
        let second = loop {
            let runs: Vec<_> = beat
                .said("sent")
                .into_iter()
                .filter(|l| l["entry"] == "second")
                .collect();
            if let Some(first) = runs.first() {
                break first.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the new entry never ran: {}",
                beat.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "a new entry's first run came {:?} after the file changed",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second_at = second["timestamp"].as_str().unwrap().to_owned();
        let late_firsts = beat
            .said("sent")
            .into_iter()
            .filter(|l| {
                l["entry"] == "first" && l["timestamp"].as_str().unwrap() > second_at.as_str()
            })
            .count();
        assert_eq!(
            late_firsts,
            0,
            "the disabled entry still ran: {}",
            beat.text()
        );
        beat.stop();
        assert!(
            !beat.said("released the beat lease").is_empty(),
            "{}",
            beat.text()
        );
        let output = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .args(["beat", "--list", "--schedule"])
            .arg(&setup.schedule)
            .args(["--broker", setup.db.as_str()])
            .current_dir(setup.dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        println!("{stdout}");
        let row = |entry: &str| {
            stdout
                .lines()
                .find(|line| line.starts_with(&format!("{entry} ")))
                .unwrap_or_else(|| panic!("no row for {entry}: {stdout}"))
                .to_owned()
        };
        let last = sent(&beat).last().unwrap().clone();
        let second_row = row("second");
        assert!(second_row.contains("every 1s"), "{second_row}");
        assert!(
            second_row.contains(&last.0),
            "the last run's id: {second_row}"
        );
        assert!(
            second_row.contains(&last.1.to_rfc3339_opts(SecondsFormat::Secs, true)),
            "the last run: {second_row}"
        );
        assert!(row("first").contains("disabled"), "{}", row("first"));
        let nightly = row("nightly");
        assert!(
            nightly.contains("cron 4 16 * * * (America/New_York)"),
            "{nightly}"
        );
        assert!(
            nightly.contains(":04:00Z (16:04 E"),
            "next run at 16:04 local: {nightly}"
        );
        assert!(nightly.contains("never"), "{nightly}");
        assert!(
            stdout.contains("leader: none"),
            "released on stop: {stdout}"
        );
    });
}

/// `wasmq worker --beat` on every worker: two workers on one embedded database, each with
/// the same schedule; each run is sent once, by the leader, and run once.
#[test]
fn workers_with_beat_send_and_run_each_run_once() {
    let setup = Setup::new("tick", ONE_SECOND);
    let schedule = setup.schedule.to_str().unwrap().to_owned();
    let plugins = setup.dir.path().join("plugins");
    let plugins = plugins.to_str().unwrap();
    let worker = |name: &str| {
        Process::start(
            setup.dir.path(),
            name,
            &[
                "worker",
                "--broker",
                setup.db.as_str(),
                "--result-backend",
                setup.db.as_str(),
                "--plugins",
                plugins,
                "-Q",
                setup.queue.as_str(),
                "-c",
                "1",
                "--beat",
                schedule.as_str(),
            ],
        )
    };
    let mut a = worker("worker-a");
    // The first worker writes the bundled plugins into the folder; let it finish first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.said("sent").is_empty() {
        assert!(Instant::now() < deadline, "no run sent: {}", a.text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = worker("worker-b");
    std::thread::sleep(Duration::from_secs(4));
    let runs: Vec<(String, DateTime<Utc>)> = sent(&a).into_iter().chain(sent(&b)).collect();
    let ids: HashSet<&String> = runs.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), runs.len(), "a run sent twice: {runs:?}");
    assert!(runs.len() >= 4, "{runs:?}");
    runtime().block_on(async {
        let backend =
            wasmq::results::connect(&setup.db, Duration::from_secs(3600), &setup.db).unwrap();
        let client = wasmq::client::Client::new(Arc::clone(&setup.broker), backend);
        for (id, at) in &runs[..3] {
            assert_eq!(id, &derived_id("tick", *at));
            let value = client.result(id).get(Duration::from_secs(30)).await;
            assert_eq!(value.unwrap(), json!(2), "run {id}");
        }
    });
    assert!(a.alive() && b.alive());
    a.stop();
    b.stop();
}
