//! `wasmq bench amqp`: wasmq side by side with the raw AMQP ceiling and Python Celery, in one
//! run, on the RabbitMQ (and Redis) of this machine, printed as a markdown table.
//!
//! Every measurement uses a queue of its own, deleted afterwards. Python Celery (the newest
//! 5.x) is installed into a virtualenv by the harness (`$WASMQ_CELERY_VENV`, default
//! `.wasmq/bench-venv`). The harness only ever talks to 127.0.0.1 and stops by itself.
//!
//! Rows: raw lapin drain (ack each / ack every 100 with `multiple`); wasmq worker drain of N
//! trivial `math.add` tasks with results off, with Redis results, with rpc results; Celery
//! drains with the prefork (-c 2), threads (-c 8) and solo pools, results off; sequential
//! round trips (p50/p95/p99) for wasmq and Celery with rpc and Redis; a CPU-bound task
//! (fib(25)) in wasmq, in Celery and as native Rust; the publish rate of each client; and
//! the ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::bench::percentile;
use super::{EngineArgs, Failure};
use crate::broker::Broker;
use crate::broker::amqp::AmqpBroker;
use crate::client::{Client, SendOptions};
use crate::engine::Sandbox;
use crate::registry::Registry;
use crate::results::ResultBackend;
use crate::worker::{Worker, WorkerOptions};

#[derive(Debug, clap::Args)]
pub(super) struct AmqpArgs {
    /// A short run (2,000 tasks, 200 round trips, no soak or scaling rows) for
    /// development: under 3 minutes. The full run adds the 100,000-task memory soak and the
    /// 1/2/4-process scaling rows (`bench soak`, `bench scale`).
    #[arg(long)]
    quick: bool,
    /// The broker (must be on this machine).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker: String,
    /// Redis for the Redis-backend rows (must be on this machine).
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// Only the raw ceiling and wasmq's own rows (no Celery): for profiling during
    /// development.
    #[arg(long, hide = true)]
    wasmq_only: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Publishes awaiting their confirmation at once in [`Harness::publish_pipelined`].
const CONFIRM_WINDOW: usize = 256;

/// Sizes of one run.
struct Plan {
    tasks: usize,
    round_trips: usize,
    fib_tasks: usize,
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::internal(anyhow::anyhow!("{e}"))
}

fn kombu_url(lapin_url: &str) -> String {
    lapin_url.replace("/%2f", "//").replace("/%2F", "//")
}

fn only_local(url: &str) -> Result<(), Failure> {
    if url.contains("127.0.0.1") || url.contains("localhost") || url.contains("[::1]") {
        Ok(())
    } else {
        Err(Failure::bad_input(format!(
            "the benchmark only targets this machine; {url} is not 127.0.0.1"
        )))
    }
}

/// Python with Celery (newest 5.x) and redis-py, in a virtualenv.
fn celery_python() -> Result<PathBuf, Failure> {
    let venv = std::env::var_os("WASMQ_CELERY_VENV")
        .map_or_else(|| PathBuf::from(".wasmq/bench-venv"), PathBuf::from);
    let python = venv.join("bin").join("python");
    let ready = Command::new(&python)
        .args(["-c", "import celery, redis"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        eprintln!("installing Celery into {} …", venv.display());
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map_err(fail)?;
        if !created.success() {
            return Err(fail(format!(
                "cannot create a virtualenv at {}",
                venv.display()
            )));
        }
        let installed = Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "celery[redis]>=5.5,<6"])
            .status()
            .map_err(fail)?;
        if !installed.success() {
            return Err(fail("cannot install Celery"));
        }
    }
    Ok(python)
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python")
}

fn bench_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/celery_bench.py")
}

fn celery_version(python: &Path) -> String {
    Command::new(python)
        .args(["-c", "import celery; print(celery.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs the Celery benchmark script and parses its JSON.
fn celery_script(
    python: &Path,
    broker: &str,
    backend: &str,
    queue: &str,
    command: &str,
    n: usize,
) -> Result<Value, Failure> {
    let output = Command::new(python)
        .arg(bench_script())
        .args([command, &n.to_string()])
        .env("PYTHONPATH", python_dir())
        .env("BROKER", kombu_url(broker))
        .env("BACKEND", backend)
        .env("QUEUE", queue)
        .output()
        .map_err(fail)?;
    if !output.status.success() {
        return Err(fail(format!(
            "celery_bench.py {command} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    serde_json::from_slice(&output.stdout).map_err(fail)
}

/// A benchmark child process (a Celery or wasmq worker), stopped with SIGTERM when dropped.
struct BenchProcess(Child);

impl BenchProcess {
    fn start(
        python: &Path,
        broker: &str,
        backend: &str,
        queue: &str,
        pool: &str,
        concurrency: usize,
    ) -> Result<Self, Failure> {
        let child = Command::new(python)
            .args([
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "-P",
                pool,
                "-c",
                &concurrency.to_string(),
            ])
            .args([
                "-Q",
                queue,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "error",
            ])
            .args([
                "--hostname",
                &format!("bench-{pool}-{}@localhost", std::process::id()),
            ])
            .current_dir(python_dir())
            .env("BROKER", kombu_url(broker))
            .env("BACKEND", backend)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(fail)?;
        Ok(Self(child))
    }
}

impl Drop for BenchProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Harness {
    /// The worker process's CPU time per task (µs) in each wasmq drain, in order.
    cpu_per_task: std::sync::Mutex<Vec<f64>>,
    /// A Celery drain slower than this is cut off and reported as stalled.
    stall_limit: Duration,
    broker_url: String,
    redis_url: String,
    broker: Arc<AmqpBroker>,
    sandbox: Arc<Sandbox>,
    registry: Arc<Registry>,
}

/// A worker running in this process until the returned sender fires.
fn spawn_worker(
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Arc<Registry>,
    options: WorkerOptions,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<crate::worker::WorkerStats>,
) {
    let worker = Worker::new(broker, backend, registry, options);
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let _ = worker
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, handle, stats)
}

fn queue_name(what: &str) -> String {
    format!("wasmq-bench-{what}-{}", uuid::Uuid::new_v4().simple())
}

impl Harness {
    fn client(&self, backend: Arc<dyn ResultBackend>, queue: &str) -> Client {
        Client::new(Arc::clone(&self.broker) as Arc<dyn Broker>, backend).with_default_queue(queue)
    }

    fn backend(&self, url: &str) -> Result<Arc<dyn ResultBackend>, Failure> {
        crate::results::connect(url, Duration::from_secs(3600), &self.broker_url).map_err(fail)
    }

    /// Publishes `n` tasks, each confirmed before the next is sent; returns the rate.
    async fn publish(
        &self,
        client: &Client,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        ignore_result: bool,
    ) -> Result<f64, Failure> {
        let started = Instant::now();
        for i in 0..n {
            client
                .send_task(
                    task,
                    args(i),
                    Map::new(),
                    SendOptions {
                        ignore_result,
                        ..SendOptions::default()
                    },
                )
                .await
                .map_err(fail)?;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Publishes `n` tasks with [`Client::submit`], at most [`CONFIRM_WINDOW`] awaiting
    /// their confirmation; returns the rate, timed until the last is confirmed.
    async fn publish_pipelined(
        &self,
        client: &Client,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        ignore_result: bool,
    ) -> Result<f64, Failure> {
        let started = Instant::now();
        let mut unconfirmed: std::collections::VecDeque<crate::broker::Confirmation> =
            std::collections::VecDeque::with_capacity(CONFIRM_WINDOW);
        for i in 0..n {
            if unconfirmed.len() == CONFIRM_WINDOW
                && let Some(oldest) = unconfirmed.pop_front()
            {
                oldest.await.map_err(fail)?;
            }
            let (_, confirmation) = client
                .submit(
                    task,
                    args(i),
                    Map::new(),
                    SendOptions {
                        ignore_result,
                        ..SendOptions::default()
                    },
                )
                .await
                .map_err(fail)?;
            unconfirmed.push_back(confirmation);
        }
        for confirmation in unconfirmed {
            confirmation.await.map_err(fail)?;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Starts an in-process wasmq worker on `queue`; returns a stop handle and its stats.
    fn worker(
        &self,
        queue: &str,
        backend: Arc<dyn ResultBackend>,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
        Arc<crate::worker::WorkerStats>,
    ) {
        let options = WorkerOptions {
            queues: vec![queue.to_owned()],
            node_name: format!("wasmq-bench@{queue}"),
            ..WorkerOptions::default()
        };
        spawn_worker(
            Arc::clone(&self.broker) as Arc<dyn Broker>,
            backend,
            Arc::clone(&self.registry),
            options,
        )
    }

    /// wasmq drains `n` queued tasks; returns tasks per second.
    async fn wasmq_drain(
        &self,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        backend_url: Option<&str>,
    ) -> Result<f64, Failure> {
        let queue = queue_name("wasmq-drain");
        let backend = match backend_url {
            Some(url) => self.backend(url)?,
            None => self.backend(&self.redis_url)?,
        };
        let client = self.client(Arc::clone(&backend), &queue);
        self.publish_pipelined(&client, task, n, args, backend_url.is_none())
            .await?;
        eprintln!("        {n} queued; draining");
        let (stop, handle, stats) = self.worker(&queue, backend);
        // Timed from the first message taken (as the Celery drains and the raw ceiling are),
        // not from the worker's connection set-up.
        let set_up = Instant::now();
        while stats.received.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
            if set_up.elapsed() > Duration::from_secs(60) {
                return Err(fail("the wasmq worker took no message in a minute"));
            }
        }
        let started = Instant::now();
        let cpu_before = cpu_seconds();
        let done = |s: &crate::worker::WorkerStats| {
            s.succeeded.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed)
        };
        while done(&stats) < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if started.elapsed() > Duration::from_secs(600) {
                return Err(fail("the wasmq drain did not finish in 10 minutes"));
            }
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        self.cpu_per_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((cpu_seconds() - cpu_before) / n as f64 * 1e6);
        let _ = stop.send(());
        let _ = handle.await;
        self.broker.delete_queue(&queue).await.map_err(fail)?;
        Ok(rate)
    }

    /// A Celery pool drains `n` queued tasks (results off); returns tasks per second, timed
    /// from the first message taken to an empty queue, and whether it stalled (the drain is
    /// cut off after two minutes and the rate taken over what was done).
    async fn celery_drain(
        &self,
        python: &Path,
        pool: &str,
        concurrency: usize,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
    ) -> Result<(f64, Option<u64>), Failure> {
        let queue = queue_name(&format!("celery-{pool}"));
        let client = self.client(self.backend(&self.redis_url)?, &queue);
        self.publish_pipelined(&client, task, n, args, true).await?;
        let worker = BenchProcess::start(python, &self.broker_url, "", &queue, pool, concurrency)?;
        let total = n as u64;
        let mut started = None;
        let give_up = Instant::now() + self.stall_limit + Duration::from_secs(30);
        let mut stalled = None;
        let mut done = total;
        loop {
            let left = self.broker.queue_length(&queue).await.map_err(fail)?;
            if left < total && started.is_none() {
                started = Some(Instant::now());
            }
            if left == 0 {
                break;
            }
            if started.is_some_and(|s| s.elapsed() > self.stall_limit) || Instant::now() > give_up {
                done = total - left;
                stalled = Some(done);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
        drop(worker);
        self.broker.delete_queue(&queue).await.map_err(fail)?;
        Ok((done as f64 / elapsed.as_secs_f64().max(1e-9), stalled))
    }

    /// Sequential send → get round trips with a wasmq worker; returns p50/p95/p99 in ms.
    async fn wasmq_round_trips(
        &self,
        backend_url: &str,
        n: usize,
        overlap_confirm: bool,
    ) -> Result<[f64; 3], Failure> {
        let queue = queue_name("wasmq-rtt");
        let backend = self.backend(backend_url)?;
        let client = self.client(Arc::clone(&backend), &queue);
        let (stop, handle, _) = self.worker(&queue, backend);
        let mut samples = Vec::with_capacity(n);
        for i in 0..=n {
            let started = Instant::now();
            let args = vec![json!(i), json!(1)];
            let timeout = Duration::from_secs(30);
            if overlap_confirm {
                client
                    .call(
                        "math.add",
                        args,
                        Map::new(),
                        SendOptions::default(),
                        timeout,
                    )
                    .await
                    .map_err(fail)?;
            } else {
                let result = client
                    .send_task("math.add", args, Map::new(), SendOptions::default())
                    .await
                    .map_err(fail)?;
                result.get(timeout).await.map_err(fail)?;
            }
            if i > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let _ = stop.send(());
        let _ = handle.await;
        self.broker.delete_queue(&queue).await.map_err(fail)?;
        samples.sort_by(f64::total_cmp);
        Ok([
            percentile(&samples, 50.0),
            percentile(&samples, 95.0),
            percentile(&samples, 99.0),
        ])
    }
}

fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

pub(super) async fn run(args: AmqpArgs) -> Result<(), Failure> {
    only_local(&args.broker)?;
    only_local(&args.redis)?;
    let plan = if args.quick {
        Plan {
            tasks: 2_000,
            round_trips: 200,
            fib_tasks: 200,
        }
    } else {
        Plan {
            tasks: 20_000,
            round_trips: 1_000,
            fib_tasks: 2_000,
        }
    };
    let python = celery_python()?;
    let version = celery_version(&python);
    let broker = Arc::new(AmqpBroker::new(&args.broker).map_err(fail)?);
    let sandbox = Arc::new(Sandbox::new(args.engine.sandbox_config(32)).map_err(fail)?);
    let registry = Arc::new(
        Registry::bundled(Arc::clone(&sandbox))
            .await
            .map_err(fail)?,
    );
    let h = Harness {
        cpu_per_task: std::sync::Mutex::default(),
        stall_limit: Duration::from_secs(if args.quick { 20 } else { 120 }),
        broker_url: args.broker.clone(),
        redis_url: args.redis.clone(),
        broker,
        sandbox,
        registry,
    };
    let started = Instant::now();
    let n = plan.tasks;
    let add_args = |i: usize| vec![json!(i), json!(i)];
    let step = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());

    // The raw ceiling drains the very message wasmq's client sends for `math.add` (Celery's
    // protocol 2: ~20 headers and the JSON body), and for reference the body alone.
    let message = Client::new(
        Arc::clone(&h.broker) as Arc<dyn Broker>,
        h.backend(&h.redis_url)?,
    )
    .build_message(
        "math.add",
        add_args(1),
        Map::new(),
        &SendOptions {
            ignore_result: true,
            ..SendOptions::default()
        },
    )
    .encode();
    let (body, properties) = (
        message.body.as_slice(),
        crate::broker::amqp::properties_of(&message),
    );
    let raw = |properties, prefetch, ack_every| {
        let broker = args.broker.clone();
        async move {
            crate::broker::ceiling::raw_drain(&broker, n, body, &properties, prefetch, ack_every)
                .await
                .map(|elapsed| n as f64 / elapsed.as_secs_f64())
                .map_err(fail)
        }
    };
    step("raw lapin drain, ack each");
    let raw_each = raw(properties.clone(), 100, 1).await?;
    step("raw lapin drain, ack every 100 (multiple)");
    let raw_batched = raw(properties.clone(), 1000, 100).await?;
    step("raw lapin drain, body only, ack every 100 (multiple)");
    let raw_bare = raw(lapin::BasicProperties::default(), 1000, 100).await?;

    step("wasmq drain, results off");
    let publish_queue = queue_name("publish");
    let publish_client = h.client(h.backend(&h.redis_url)?, &publish_queue);
    let wasmq_publish = h
        .publish(&publish_client, "math.add", n.min(5_000), add_args, true)
        .await?;
    h.broker.delete_queue(&publish_queue).await.map_err(fail)?;
    let wasmq_publish_pipelined = h
        .publish_pipelined(&publish_client, "math.add", n, add_args, true)
        .await?;
    h.broker.delete_queue(&publish_queue).await.map_err(fail)?;
    let wasmq_off = h.wasmq_drain("math.add", n, add_args, None).await?;
    step("wasmq drain, Redis results");
    let wasmq_redis = h
        .wasmq_drain("math.add", n, add_args, Some(&args.redis))
        .await?;
    step("wasmq drain, rpc results");
    let wasmq_rpc = h
        .wasmq_drain("math.add", n, add_args, Some("rpc://"))
        .await?;
    step("raw AMQP round trips");
    let raw_rtt = {
        let samples = crate::broker::ceiling::raw_round_trips(
            &args.broker,
            plan.round_trips,
            body,
            &properties,
        )
        .await
        .map_err(fail)?;
        [
            percentile(&samples, 50.0),
            percentile(&samples, 95.0),
            percentile(&samples, 99.0),
        ]
    };
    step("wasmq round trips");
    let wasmq_rtt_rpc = h
        .wasmq_round_trips("rpc://", plan.round_trips, true)
        .await?;
    let wasmq_rtt_redis = h
        .wasmq_round_trips(&args.redis, plan.round_trips, true)
        .await?;
    let wasmq_rtt_rpc_confirmed = h
        .wasmq_round_trips("rpc://", plan.round_trips, false)
        .await?;
    let wasmq_rtt_redis_confirmed = h
        .wasmq_round_trips(&args.redis, plan.round_trips, false)
        .await?;
    if args.wasmq_only {
        let ms = |v: [f64; 3]| format!("p50 {:.2} · p95 {:.2} · p99 {:.2} ms", v[0], v[1], v[2]);
        println!(
            "| raw ack each | {raw_each:.0} |\n| raw batched | {raw_batched:.0} |\n| raw bare | {raw_bare:.0} |"
        );
        println!(
            "| wasmq off | {wasmq_off:.0} |\n| wasmq redis | {wasmq_redis:.0} |\n| wasmq rpc | {wasmq_rpc:.0} |"
        );
        println!(
            "| wasmq publish | {wasmq_publish:.0} |\n| wasmq publish pipelined | {wasmq_publish_pipelined:.0} |"
        );
        println!("| raw rtt | {} |", ms(raw_rtt));
        println!(
            "| rtt rpc | {} |\n| rtt redis | {} |",
            ms(wasmq_rtt_rpc),
            ms(wasmq_rtt_redis)
        );
        println!(
            "| rtt rpc confirmed | {} |\n| rtt redis confirmed | {} |",
            ms(wasmq_rtt_rpc_confirmed),
            ms(wasmq_rtt_redis_confirmed)
        );
        println!("| off / batched | {:.2} |", wasmq_off / raw_batched);
        println!(
            "| cpu µs/task | {:.1?} |",
            h.cpu_per_task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
        return Ok(());
    }

    let mut celery = Vec::new();
    for (pool, concurrency) in [("prefork", 2), ("threads", 8), ("solo", 1)] {
        step(&format!(
            "Celery {pool} -c {concurrency} drain, results off"
        ));
        celery.push((
            pool,
            concurrency,
            h.celery_drain(&python, pool, concurrency, "tasks.add", n, add_args)
                .await?,
        ));
    }

    step("Celery round trips");
    let mut celery_rtt = Vec::new();
    for backend in ["rpc://", args.redis.as_str()] {
        let queue = queue_name("celery-rtt");
        let worker = BenchProcess::start(&python, &args.broker, backend, &queue, "solo", 1)?;
        let result = celery_script(
            &python,
            &args.broker,
            backend,
            &queue,
            "roundtrip",
            plan.round_trips,
        )?;
        drop(worker);
        h.broker.delete_queue(&queue).await.map_err(fail)?;
        celery_rtt.push([
            result["p50"].as_f64().unwrap_or(0.0),
            result["p95"].as_f64().unwrap_or(0.0),
            result["p99"].as_f64().unwrap_or(0.0),
        ]);
    }

    step("publish rate of Celery's apply_async");
    let queue = queue_name("celery-publish");
    let celery_publish = celery_script(&python, &args.broker, "", &queue, "publish", n.min(5_000))?
        ["rate"]
        .as_f64()
        .unwrap_or(0.0);
    h.broker.delete_queue(&queue).await.map_err(fail)?;

    step("CPU-bound fib(25)");
    let m = plan.fib_tasks;
    let fib_args = |_: usize| vec![json!(25)];
    let wasmq_fib = h.wasmq_drain("math.fib", m, fib_args, None).await?;
    let celery_fib = h
        .celery_drain(&python, "prefork", 2, "tasks.fib", m, fib_args)
        .await?
        .0;
    let native_started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..m / 2 {
                    std::hint::black_box(fib(std::hint::black_box(25)));
                }
            });
        }
    });
    let native_fib = m as f64 / native_started.elapsed().as_secs_f64();
    step("done");

    let best_celery = celery.iter().map(|c| c.2.0).fold(0.0_f64, f64::max);
    println!(
        "wasmq bench amqp{}: {} trivial tasks, {} round trips, {} fib(25) tasks; RabbitMQ {}, Python Celery {}, wasmq worker concurrency {} (in-process), {} cores\n",
        if args.quick { " --quick" } else { "" },
        n,
        plan.round_trips,
        m,
        args.broker.split('@').next_back().unwrap_or(""),
        version,
        WorkerOptions::default().concurrency,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| raw lapin consumer, the same Celery messages, ack each (prefetch 100) | {raw_each:.0} msgs/s |"
    );
    println!(
        "| raw lapin consumer, the same Celery messages, ack every 100 with `multiple` (prefetch 1000) | {raw_batched:.0} msgs/s |"
    );
    println!(
        "| raw lapin consumer, the body alone (no headers), ack every 100 with `multiple` (prefetch 1000) | {raw_bare:.0} msgs/s |"
    );
    println!("| **wasmq** drain `math.add`, results off | **{wasmq_off:.0} tasks/s** |");
    println!("| wasmq drain `math.add`, Redis results | {wasmq_redis:.0} tasks/s |");
    println!("| wasmq drain `math.add`, rpc results | {wasmq_rpc:.0} tasks/s |");
    let cpu = h
        .cpu_per_task
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let [off, redis, rpc, ..] = cpu[..] {
        println!(
            "| wasmq process CPU per task in those drains (off / Redis / rpc) | {off:.0} / {redis:.0} / {rpc:.0} µs |"
        );
    }
    for (pool, concurrency, (rate, stalled)) in &celery {
        let note = stalled
            .map(|done| {
                format!(
                    " (stalled: {done} of {n} done in {} s, cut off)",
                    h.stall_limit.as_secs()
                )
            })
            .unwrap_or_default();
        println!(
            "| Celery {pool} `-c {concurrency}` drain `add`, results off | {rate:.0} tasks/s{note} |"
        );
    }
    let ms = |v: [f64; 3]| format!("p50 {:.2} · p95 {:.2} · p99 {:.2} ms", v[0], v[1], v[2]);
    println!(
        "| raw AMQP round trip (persistent publish → consumer → transient reply, lapin) | {} |",
        ms(raw_rtt)
    );
    println!(
        "| wasmq round trip, rpc (`Client::call`) | {} |",
        ms(wasmq_rtt_rpc)
    );
    println!(
        "| wasmq round trip, Redis (`Client::call`) | {} |",
        ms(wasmq_rtt_redis)
    );
    println!(
        "| wasmq round trip, rpc (`send_task`, confirmed, then `get`) | {} |",
        ms(wasmq_rtt_rpc_confirmed)
    );
    println!(
        "| wasmq round trip, Redis (`send_task`, confirmed, then `get`) | {} |",
        ms(wasmq_rtt_redis_confirmed)
    );
    println!("| Celery (solo) round trip, rpc | {} |", ms(celery_rtt[0]));
    println!(
        "| Celery (solo) round trip, Redis | {} |",
        ms(celery_rtt[1])
    );
    println!("| fib(25): wasmq (Wasm, fuel + epochs), 2 slots | {wasmq_fib:.0} tasks/s |");
    println!("| fib(25): Celery prefork `-c 2` (Python) | {celery_fib:.1} tasks/s |");
    println!("| fib(25): native Rust, 2 threads, no queue | {native_fib:.0} calls/s |");
    println!(
        "| publish: wasmq `Client::send_task` (each confirmed before the next) | {wasmq_publish:.0} msgs/s |"
    );
    println!(
        "| publish: wasmq `Client::submit` ({CONFIRM_WINDOW} confirmations outstanding, all awaited) | {wasmq_publish_pipelined:.0} msgs/s |"
    );
    println!("| publish: Celery `apply_async` | {celery_publish:.0} msgs/s |");
    println!();
    println!("| ratio | value | goal |");
    println!("|---|---|---|");
    println!(
        "| wasmq drain / raw batched-ack ceiling | {:.2}× | ≥ 0.8× |",
        wasmq_off / raw_batched
    );
    println!(
        "| wasmq drain / raw ack-each ceiling | {:.2}× | |",
        wasmq_off / raw_each
    );
    println!(
        "| wasmq drain / best Celery pool | {:.1}× | ≥ 8× |",
        wasmq_off / best_celery.max(1e-9)
    );
    println!(
        "| Celery round-trip p50 / wasmq (rpc) | {:.1}× | ≥ 3× |",
        celery_rtt[0][0] / wasmq_rtt_rpc[0].max(1e-9)
    );
    println!(
        "| Celery round-trip p50 / wasmq (Redis) | {:.1}× | ≥ 3× |",
        celery_rtt[1][0] / wasmq_rtt_redis[0].max(1e-9)
    );
    println!(
        "| fib(25) throughput: native / wasmq (queue included) | {:.2}× | ≤ 1.5× |",
        native_fib / wasmq_fib.max(1e-9)
    );
    println!(
        "| fib(25) throughput: wasmq / Celery | {:.0}× | |",
        wasmq_fib / celery_fib.max(1e-9)
    );
    let _ = h.sandbox;
    if !args.quick {
        // The full mode also runs the memory soak and the scaling rows.
        println!();
        step("memory soak (100,000 tasks)");
        soak(SoakArgs {
            tasks: 100_000,
            broker: args.broker.clone(),
            engine: args.engine.clone(),
        })
        .await?;
        println!();
        step("scaling: 1, 2 and 4 worker processes");
        scale(ScaleArgs {
            tasks: n,
            broker: args.broker.clone(),
        })
        .await?;
    }
    eprintln!("total {:.0?}", started.elapsed());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(super) struct SoakArgs {
    /// Tasks to run in all.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// The broker (must be on this machine).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker: String,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Publishes `n` `math.add` tasks (results off) with 8 concurrent publishers, so publisher
/// confirms are pipelined; calls `each_publisher_done` as each publisher finishes.
async fn publish_adds(
    client: &Client,
    n: usize,
    mut each_publisher_done: impl FnMut(),
) -> Result<(), Failure> {
    let mut publishers = Vec::new();
    for p in 0..8 {
        let client = client.clone();
        publishers.push(tokio::spawn(async move {
            for i in (p..n).step_by(8) {
                let value = json!(i);
                client
                    .send_task(
                        "math.add",
                        vec![value.clone(), value],
                        Map::new(),
                        SendOptions {
                            ignore_result: true,
                            ..SendOptions::default()
                        },
                    )
                    .await
                    .map_err(fail)?;
            }
            Ok::<(), Failure>(())
        }));
    }
    for publisher in publishers {
        publisher.await.map_err(fail)??;
        each_publisher_done();
    }
    Ok(())
}

/// This process's resident memory in KiB (Linux).
/// CPU time this process has used (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start after ") ".
            let rest = stat
                .rsplit_once(") ")?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            let utime: u64 = rest.get(11)?.parse().ok()?;
            let stime: u64 = rest.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // The kernel reports in USER_HZ, 100 on Linux.
    ticks as f64 / 100.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// `wasmq bench soak`: the resident memory of a worker (in this process, with its client)
/// idle with the bundled plugins loaded, at full load, and after every 20,000 tasks, on
/// RabbitMQ with results off. Tasks are published in rounds of 20,000 by 8 concurrent
/// publishers while the worker drains.
pub(super) async fn soak(args: SoakArgs) -> Result<(), Failure> {
    only_local(&args.broker)?;
    let broker = Arc::new(AmqpBroker::new(&args.broker).map_err(fail)?);
    let sandbox = Arc::new(Sandbox::new(args.engine.sandbox_config(32)).map_err(fail)?);
    let registry = Arc::new(
        Registry::bundled(Arc::clone(&sandbox))
            .await
            .map_err(fail)?,
    );
    let queue = queue_name("soak");
    let backend = crate::results::connect(
        "redis://127.0.0.1:6379/0",
        Duration::from_secs(60),
        &args.broker,
    )
    .map_err(fail)?;
    let client = Client::new(Arc::clone(&broker) as Arc<dyn Broker>, backend)
        .with_default_queue(queue.clone());
    let options = WorkerOptions {
        queues: vec![queue.clone()],
        node_name: "wasmq-soak@localhost".into(),
        ..WorkerOptions::default()
    };
    let (stop, handle, stats) = spawn_worker(
        Arc::clone(&broker) as Arc<dyn Broker>,
        client.backend(),
        registry,
        options,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib();
    println!("| tasks done | resident memory (this process: worker + client) |");
    println!("|---|---|");
    println!(
        "| 0 (idle, bundled plugins loaded) | {:.1} MiB |",
        idle as f64 / 1024.0
    );
    let round = 20_000.min(args.tasks.max(1));
    let mut sent = 0;
    let mut peak = idle;
    let started = Instant::now();
    while sent < args.tasks {
        let this_round = round.min(args.tasks - sent);
        publish_adds(&client, this_round, || peak = peak.max(rss_kib())).await?;
        sent += this_round;
        while (stats.succeeded.load(Ordering::Relaxed) as usize) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(rss_kib());
        }
        println!("| {sent} | {:.1} MiB |", rss_kib() as f64 / 1024.0);
    }
    println!("| peak during the run | {:.1} MiB |", peak as f64 / 1024.0);
    eprintln!("{} tasks in {:.1?}", args.tasks, started.elapsed());
    let _ = stop.send(());
    let _ = handle.await;
    broker.delete_queue(&queue).await.map_err(fail)?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(super) struct ScaleArgs {
    /// Tasks per measurement.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// The broker (must be on this machine).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker: String,
}

/// `wasmq bench scale`: drain throughput with 1, 2 and 4 `wasmq worker` processes
/// (concurrency 2 each) on one queue, results off, timed from the first message taken to an
/// empty queue (at most the workers' prefetch is still in flight then).
pub(super) async fn scale(args: ScaleArgs) -> Result<(), Failure> {
    only_local(&args.broker)?;
    let broker = Arc::new(AmqpBroker::new(&args.broker).map_err(fail)?);
    let folder = tempfile::tempdir().map_err(fail)?;
    let plugins = folder.path().join("plugins");
    super::plugins::export_bundled(&plugins).map_err(fail)?;
    let exe = std::env::current_exe().map_err(fail)?;
    let backend = crate::results::connect(
        "redis://127.0.0.1:6379/0",
        Duration::from_secs(60),
        &args.broker,
    )
    .map_err(fail)?;
    println!(
        "| worker processes (concurrency 2 each) | drain `math.add`, results off | vs 1 process |"
    );
    println!("|---|---|---|");
    let mut single = None;
    for processes in [1_usize, 2, 4] {
        let queue = queue_name(&format!("scale{processes}"));
        let client = Client::new(Arc::clone(&broker) as Arc<dyn Broker>, Arc::clone(&backend))
            .with_default_queue(queue.clone());
        publish_adds(&client, args.tasks, || {}).await?;
        let mut workers = Vec::new();
        for w in 0..processes {
            let child = Command::new(&exe)
                .args([
                    "worker",
                    "--broker",
                    &args.broker,
                    "-Q",
                    &queue,
                    "--concurrency",
                    "2",
                    "--name",
                ])
                .arg(format!("wasmq-scale-{w}@localhost"))
                .arg("--plugins")
                .arg(&plugins)
                .env("WASMQ_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(fail)?;
            workers.push(BenchProcess(child));
        }
        let total = args.tasks as u64;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = broker.queue_length(&queue).await.map_err(fail)?;
            if left < total && started.is_none() {
                started = Some(Instant::now());
            }
            if left == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rate = args.tasks as f64 / started.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
        drop(workers);
        broker.delete_queue(&queue).await.map_err(fail)?;
        let base = *single.get_or_insert(rate);
        println!("| {processes} | {rate:.0} tasks/s | {:.2}× |", rate / base);
    }
    Ok(())
}
