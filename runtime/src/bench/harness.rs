//! The harness of `wasmq bench amqp` and `wasmq bench redis`: what their measurements share
//! (one broker, the bundled plugins, the Redis URL, the CPU time of each drain) and the
//! measurements of wasmq itself: publish rates, drains and round trips of its client and
//! in-process worker. Each measurement uses a queue of its own and deletes it afterwards.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::queue_name;
use super::stats::{cpu_seconds, p50_p95_p99};
use super::workers::{InProcessWorker, services_cpu};
use crate::broker::Broker;
use crate::client::{Client, SendOptions};
use crate::engine::{Sandbox, SandboxConfig};
use crate::registry::Registry;
use crate::results::ResultBackend;
use crate::worker::{WorkerOptions, WorkerStats};

/// Publishes awaiting their confirmation at once in [`Harness::publish_pipelined`].
pub(super) const CONFIRM_WINDOW: usize = crate::client::DEFAULT_CONFIRM_WINDOW;

/// The state one `wasmq bench amqp` (or `bench redis`) run shares across its measurements.
pub(super) struct Harness {
    /// The worker process's CPU time per task (µs) in each wasmq drain, in order.
    cpu_per_task: Mutex<Vec<f64>>,
    /// The local RabbitMQ's and Redis's CPU time per task (µs) in the same drains.
    service_cpu_per_task: Mutex<Vec<f64>>,
    /// A Celery drain slower than this is cut off and reported as stalled.
    pub(super) stall_limit: Duration,
    /// The broker's URL (for RabbitMQ, as lapin spells it).
    pub(super) broker_url: String,
    /// Redis, for the Redis result rows and as the backend of runs with results off.
    pub(super) redis_url: String,
    /// The broker every measurement publishes to and drains from.
    pub(super) broker: Arc<dyn Broker>,
    /// The bundled plugins, loaded once for every in-process worker.
    pub(super) registry: Arc<Registry>,
}

impl Harness {
    /// Connects to the RabbitMQ broker at `broker_url` (lapin's spelling) and loads the
    /// bundled plugins into a sandbox built from `sandbox`.
    pub(super) async fn connect(
        broker_url: &str,
        redis_url: &str,
        stall_limit: Duration,
        sandbox: SandboxConfig,
    ) -> anyhow::Result<Self> {
        let broker = Arc::new(crate::broker::amqp::AmqpBroker::new(broker_url)?);
        Self::over(broker, broker_url, redis_url, stall_limit, sandbox).await
    }

    /// Measures over `broker` (opened from `broker_url`, any broker wasmq knows) and loads
    /// the bundled plugins into a sandbox built from `sandbox`.
    pub(super) async fn over(
        broker: Arc<dyn Broker>,
        broker_url: &str,
        redis_url: &str,
        stall_limit: Duration,
        sandbox: SandboxConfig,
    ) -> anyhow::Result<Self> {
        let sandbox = Arc::new(Sandbox::new(sandbox)?);
        let registry = Arc::new(Registry::bundled(sandbox).await?);
        Ok(Self {
            cpu_per_task: Mutex::default(),
            service_cpu_per_task: Mutex::default(),
            stall_limit,
            broker_url: broker_url.to_owned(),
            redis_url: redis_url.to_owned(),
            broker,
            registry,
        })
    }

    /// A client of this broker whose tasks go to `queue`.
    pub(super) fn client(&self, backend: Arc<dyn ResultBackend>, queue: &str) -> Client {
        Client::new(Arc::clone(&self.broker), backend).with_default_queue(queue)
    }

    /// The result backend at `url`, results kept for an hour.
    pub(super) fn backend(&self, url: &str) -> anyhow::Result<Arc<dyn ResultBackend>> {
        Ok(crate::results::connect(
            url,
            Duration::from_secs(3600),
            &self.broker_url,
        )?)
    }

    /// Publishes `n` tasks, each confirmed before the next is sent; returns the rate.
    pub(super) async fn publish(
        &self,
        client: &Client,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        ignore_result: bool,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        for i in 0..n {
            client
                .send_task(
                    task,
                    args(i),
                    Map::new(),
                    SendOptions {
                        ignore_result: Some(ignore_result),
                        ..SendOptions::default()
                    },
                )
                .await?;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Publishes `n` tasks through a [`crate::client::Pipeline`] with [`CONFIRM_WINDOW`]
    /// confirmations outstanding; returns the rate of confirmed messages.
    pub(super) async fn publish_pipelined(
        &self,
        client: &Client,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        ignore_result: bool,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut pipeline = client.pipeline(CONFIRM_WINDOW);
        for i in 0..n {
            let options = SendOptions {
                ignore_result: Some(ignore_result),
                ..SendOptions::default()
            };
            pipeline.send(task, args(i), Map::new(), options).await?;
        }
        pipeline.finish().await?;
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Starts an in-process wasmq worker on `queue`.
    fn worker(
        &self,
        queue: &str,
        backend: Arc<dyn ResultBackend>,
        task_events: bool,
    ) -> InProcessWorker {
        let options = WorkerOptions {
            queues: vec![queue.to_owned()],
            node_name: format!("wasmq-bench@{queue}"),
            task_events,
            ..WorkerOptions::default()
        };
        InProcessWorker::spawn(
            Arc::clone(&self.broker),
            backend,
            Arc::clone(&self.registry),
            options,
        )
    }

    /// wasmq drains `n` queued tasks; returns tasks per second. Results go to
    /// `backend_url`, or are off when it is `None`.
    pub(super) async fn wasmq_drain(
        &self,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        backend_url: Option<&str>,
    ) -> anyhow::Result<f64> {
        self.wasmq_drain_with(task, n, args, backend_url, false)
            .await
    }

    /// [`Harness::wasmq_drain`] with the worker's task events on or off.
    pub(super) async fn wasmq_drain_with(
        &self,
        task: &str,
        n: usize,
        args: impl Fn(usize) -> Vec<Value>,
        backend_url: Option<&str>,
        task_events: bool,
    ) -> anyhow::Result<f64> {
        let queue = queue_name("wasmq-drain");
        let backend = match backend_url {
            Some(url) => self.backend(url)?,
            None => self.backend(&self.redis_url)?,
        };
        let client = self.client(Arc::clone(&backend), &queue);
        self.publish_pipelined(&client, task, n, args, backend_url.is_none())
            .await?;
        eprintln!("        {n} queued; draining");
        let worker = self.worker(&queue, backend, task_events);
        let stats = Arc::clone(&worker.stats);
        // Timed from the first message taken (as the Celery drains and the raw ceiling are),
        // not from the worker's connection set-up.
        let set_up = Instant::now();
        while stats.received.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
            if set_up.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("the wasmq worker took no message in a minute");
            }
        }
        let started = Instant::now();
        let cpu_before = cpu_seconds();
        let services_before = services_cpu();
        let done = |s: &WorkerStats| {
            s.succeeded.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed)
        };
        while done(&stats) < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if started.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("the wasmq drain did not finish in 10 minutes");
            }
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        self.cpu_per_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((cpu_seconds() - cpu_before) / n as f64 * 1e6);
        self.service_cpu_per_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((services_cpu() - services_before).as_secs_f64() / n as f64 * 1e6);
        worker.stop().await;
        self.broker.delete_queue(&queue).await?;
        Ok(rate)
    }

    /// Sequential send → get round trips with a wasmq worker; returns p50/p95/p99 in ms.
    /// With `overlap_confirm` each is a [`Client::call`] (the publisher confirm overlaps
    /// the wait for the result), else `send_task` (confirmed) then `get`.
    pub(super) async fn wasmq_round_trips(
        &self,
        backend_url: &str,
        n: usize,
        overlap_confirm: bool,
    ) -> anyhow::Result<[f64; 3]> {
        let queue = queue_name("wasmq-rtt");
        let backend = self.backend(backend_url)?;
        let client = self.client(Arc::clone(&backend), &queue);
        let worker = self.worker(&queue, backend, false);
        let mut samples = Vec::with_capacity(n);
        // One more than asked: the first warms the connections up and is not counted.
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
                    .await?;
            } else {
                let result = client
                    .send_task("math.add", args, Map::new(), SendOptions::default())
                    .await?;
                result.get(timeout).await?;
            }
            if i > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        worker.stop().await;
        self.broker.delete_queue(&queue).await?;
        samples.sort_by(f64::total_cmp);
        Ok(p50_p95_p99(&samples))
    }

    /// The CPU time per task of each wasmq drain so far, in µs.
    pub(super) fn cpu_per_task(&self) -> Vec<f64> {
        self.cpu_per_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What each wasmq drain so far cost the local RabbitMQ and Redis servers, in CPU µs a
    /// task ([`services_cpu`]).
    pub(super) fn service_cpu_per_task(&self) -> Vec<f64> {
        self.service_cpu_per_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
