//! Unit tests of the worker's decision paths: every way a delivery ends, checked through the
//! real pipeline (decode → admit → sandbox → decide → settle) with the real bundled plugins,
//! but with a fake broker and result backend so a test can see exactly what was published,
//! stored and settled — and make the broker or the backend fail on purpose, which real
//! servers cannot do on cue. Deliveries are mocks in the manner of lapin's
//! `Delivery::mock`: their settler records the one settlement they get.
//!
//! Over 800 lines for one idea, the worker's decision paths behind one fake broker and
//! backend: splitting it would split that fixture across files.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;

use super::{Shared, Worker, WorkerOptions, dispatch};
use crate::broker::{Broker, BrokerError, Consumer, DeadLetter, Delivery, Revocation, Settle};
use crate::engine::{Sandbox, SandboxConfig};
use crate::protocol::{Envelope, TaskMessage};
use crate::registry::Registry;
use crate::results::{ResultBackend, ResultError, ResultMeta, TaskState};

/// One message published through the fake broker.
#[derive(Debug, Clone)]
struct Published {
    queue: String,
    envelope: Envelope,
    delay: Option<Duration>,
}

/// A broker that records what is published to it; publishing fails while `down` is set.
/// A queue exists once something was published to it with a declaring publish, or when a
/// test says so (`existing`).
#[derive(Default)]
struct FakeBroker {
    published: Mutex<Vec<Published>>,
    existing: Mutex<std::collections::HashSet<String>>,
    down: AtomicBool,
}

#[async_trait]
impl Broker for FakeBroker {
    async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BrokerError::Refused(format!("a message to {queue}")));
        }
        self.existing.lock().unwrap().insert(queue.to_owned());
        self.published.lock().unwrap().push(Published {
            queue: queue.to_owned(),
            envelope: envelope.clone(),
            delay,
        });
        Ok(())
    }

    async fn publish_existing(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        if !self.queue_exists(queue).await? {
            return Err(BrokerError::QueueNotFound {
                queue: queue.to_owned(),
            });
        }
        self.publish(queue, envelope, delay).await
    }

    async fn queue_exists(&self, queue: &str) -> Result<bool, BrokerError> {
        Ok(self.existing.lock().unwrap().contains(queue))
    }

    async fn consume(
        &self,
        _queues: &[String],
        _prefetch: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        Err(BrokerError::Closed)
    }

    async fn dead_letters(
        &self,
        _queue: &str,
        _limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(Vec::new())
    }

    async fn queue_length(&self, _queue: &str) -> Result<u64, BrokerError> {
        Ok(0)
    }

    async fn delete_queue(&self, _queue: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn revoke(&self, _revocation: &Revocation) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn revocations(
        &self,
        _node: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<Revocation>, BrokerError> {
        Ok(tokio::sync::mpsc::channel(1).1)
    }

    async fn forget_node(&self, _node: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "fake://".into()
    }
}

/// A result backend in a map; storing fails while `down` is set.
#[derive(Default)]
struct FakeBackend {
    stored: Mutex<HashMap<String, Vec<ResultMeta>>>,
    down: AtomicBool,
}

#[async_trait]
impl ResultBackend for FakeBackend {
    async fn store(
        &self,
        meta: &ResultMeta,
        _reply: Option<&crate::results::ReplyTo>,
    ) -> Result<(), ResultError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ResultError::Broker(BrokerError::Refused("a result".into())));
        }
        let mut stored = self.stored.lock().unwrap();
        stored
            .entry(meta.task_id.clone())
            .or_default()
            .push(meta.clone());
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError> {
        Ok(self
            .stored
            .lock()
            .unwrap()
            .get(task_id)
            .and_then(|metas| metas.last().cloned()))
    }

    async fn purge_expired(&self) -> Result<u64, ResultError> {
        Ok(0)
    }

    fn describe(&self) -> String {
        "fake://".into()
    }
}

/// How a mock delivery was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Ack,
    DeadLetter(String),
    Release,
}

/// Records each delivery's settlement (a delivery is settled at most once).
#[derive(Default)]
struct SettleLog(Mutex<Vec<Settled>>);

#[async_trait]
impl Settle for SettleLog {
    async fn ack(&self, _tag: u64) -> Result<(), BrokerError> {
        self.0.lock().unwrap().push(Settled::Ack);
        Ok(())
    }

    async fn dead_letter(
        &self,
        _tag: u64,
        reason: &str,
        _envelope: &Envelope,
    ) -> Result<(), BrokerError> {
        self.0
            .lock()
            .unwrap()
            .push(Settled::DeadLetter(reason.to_owned()));
        Ok(())
    }

    async fn release(&self, _tag: u64) -> Result<(), BrokerError> {
        self.0.lock().unwrap().push(Settled::Release);
        Ok(())
    }
}

/// The bundled plugins, compiled once for every test of this module.
async fn registry() -> Arc<Registry> {
    static REGISTRY: OnceCell<Arc<Registry>> = OnceCell::const_new();
    REGISTRY
        .get_or_init(|| async {
            let sandbox = Sandbox::new(SandboxConfig {
                cache_dir: None,
                ..SandboxConfig::default()
            })
            .expect("sandbox");
            Arc::new(
                Registry::bundled(Arc::new(sandbox))
                    .await
                    .expect("bundled plugins"),
            )
        })
        .await
        .clone()
}

/// A worker over fakes, fed one delivery at a time.
struct Harness {
    shared: Arc<Shared>,
    broker: Arc<FakeBroker>,
    backend: Arc<FakeBackend>,
}

/// What became of one delivery.
#[derive(Debug)]
struct Ending {
    settled: Settled,
    /// Every meta stored for the task, in order.
    stored: Vec<ResultMeta>,
    published: Vec<Published>,
}

impl Ending {
    fn last(&self) -> &ResultMeta {
        self.stored.last().expect("a stored result")
    }

    fn exception(&self) -> (String, Value) {
        let exception = self.last().exception().expect("an exception");
        (exception.exc_type, Value::Array(exception.exc_message))
    }
}

impl Harness {
    async fn new() -> Self {
        Self::with(WorkerOptions {
            concurrency: 1,
            node_name: "unit@test".into(),
            ..WorkerOptions::default()
        })
        .await
    }

    async fn with(options: WorkerOptions) -> Self {
        let broker = Arc::new(FakeBroker::default());
        let backend = Arc::new(FakeBackend::default());
        let worker = Worker::new(broker.clone(), backend.clone(), registry().await, options);
        Self {
            shared: worker.shared,
            broker,
            backend,
        }
    }

    /// Delivers `envelope` (delivered `count` times) and waits for its settlement.
    async fn deliver_envelope(&self, envelope: Envelope, count: u32) -> Ending {
        let id = envelope
            .headers
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let log = Arc::new(SettleLog::default());
        let delivery = Delivery::new(envelope, "celery".into(), count, 1, log.clone());
        let (_never, mut running) = tokio::sync::watch::channel(false);
        dispatch(&self.shared, delivery, &mut running).await;
        // Storing and settling may go on beside the slot: wait for the settlement.
        let settled = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(settled) = log.0.lock().unwrap().first().cloned() {
                    return settled;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the delivery is settled");
        assert_eq!(log.0.lock().unwrap().len(), 1, "settled exactly once");
        Ending {
            settled,
            stored: self
                .backend
                .stored
                .lock()
                .unwrap()
                .get(&id)
                .cloned()
                .unwrap_or_default(),
            published: self.broker.published.lock().unwrap().clone(),
        }
    }

    async fn deliver(&self, message: &TaskMessage) -> Ending {
        self.deliver_envelope(message.encode(), 1).await
    }
}

fn message(task: &str, args: Value) -> TaskMessage {
    let Value::Array(args) = args else {
        panic!("args are a list")
    };
    TaskMessage::new(task, args, Map::new())
}

#[tokio::test]
async fn a_success_is_stored_then_acked() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("math.add", json!([2, 3]))).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.stored.len(), 1);
    assert_eq!(ending.last().status, TaskState::Success);
    assert_eq!(ending.last().result, json!(5));
    assert_eq!(ending.last().worker.as_deref(), Some("unit@test"));
    assert!(ending.published.is_empty());
    assert_eq!(harness.shared.stats.succeeded.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_task_failure_is_stored_with_its_kind_and_acked() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("math.div", json!([1, 0]))).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.last().status, TaskState::Failure);
    assert_eq!(ending.exception().0, "ZeroDivisionError");
}

#[tokio::test]
async fn a_sandbox_limit_is_a_failure_and_the_message_is_acked() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("hostile.hog", json!([]))).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.exception().0, "MemoryError");
}

#[tokio::test]
async fn bad_arguments_are_a_type_error_and_dead_lettered() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("math.add", json!([1, "x"]))).await;
    assert!(
        matches!(&ending.settled, Settled::DeadLetter(reason) if reason.starts_with("invalid arguments"))
    );
    assert_eq!(ending.exception().0, "TypeError");
}

#[tokio::test]
async fn a_rejected_task_is_dead_lettered() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("math.sqrt", json!([-1.0]))).await;
    assert!(
        matches!(&ending.settled, Settled::DeadLetter(reason) if reason.starts_with("rejected by the task"))
    );
    assert_eq!(ending.exception().0, "Reject");
}

#[tokio::test]
async fn an_unknown_task_is_not_registered_and_dead_lettered() {
    let harness = Harness::new().await;
    let ending = harness.deliver(&message("no.such.task", json!([]))).await;
    assert_eq!(
        ending.settled,
        Settled::DeadLetter("unknown task no.such.task".into())
    );
    assert_eq!(
        ending.exception(),
        ("NotRegistered".into(), json!(["no.such.task"]))
    );
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_with_a_failure_under_its_id() {
    let harness = Harness::new().await;
    let mut envelope = message("math.add", json!([2, 5])).encode();
    envelope.body = br#"[[2, 5], {}]"#.to_vec();
    let ending = harness.deliver_envelope(envelope, 1).await;
    assert!(
        matches!(&ending.settled, Settled::DeadLetter(reason) if reason.starts_with("malformed message"))
    );
    assert_eq!(ending.exception().0, "DecodeError");
}

#[tokio::test]
async fn a_retry_request_stores_retry_publishes_the_next_attempt_then_acks() {
    let harness = Harness::new().await;
    let first = message("math.flaky", json!([1]));
    let ending = harness.deliver(&first).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.last().status, TaskState::Retry);
    let [retry] = ending.published.as_slice() else {
        panic!("one retry published: {:?}", ending.published)
    };
    assert_eq!(retry.queue, "celery");
    assert_eq!(retry.delay, Some(Duration::from_millis(100)));
    let next = TaskMessage::decode(&retry.envelope).unwrap();
    assert_eq!((next.id.as_str(), next.retries), (first.id.as_str(), 1));
    assert!(next.eta.is_some());

    let ending = harness.deliver(&next).await;
    assert_eq!(ending.last().status, TaskState::Success);
    assert_eq!(ending.last().result, json!(1));
}

#[tokio::test]
async fn a_retry_that_cannot_be_published_releases_the_message() {
    let harness = Harness::new().await;
    harness.broker.down.store(true, Ordering::SeqCst);
    let ending = harness.deliver(&message("math.flaky", json!([1]))).await;
    assert_eq!(ending.settled, Settled::Release);
    assert_eq!(harness.shared.stats.released.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_result_that_cannot_be_stored_releases_the_message() {
    let harness = Harness::new().await;
    harness.backend.down.store(true, Ordering::SeqCst);
    let ending = harness.deliver(&message("math.add", json!([2, 3]))).await;
    assert_eq!(
        ending.settled,
        Settled::Release,
        "never acked away unstored"
    );
    assert!(ending.stored.is_empty());
}

#[tokio::test]
async fn an_ignored_result_is_not_stored_but_the_message_is_acked() {
    let harness = Harness::new().await;
    let mut quiet = message("math.add", json!([2, 3]));
    quiet.ignore_result = Some(true);
    let ending = harness.deliver(&quiet).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert!(ending.stored.is_empty());
}

#[tokio::test]
async fn a_revoked_task_is_not_run_revoked_and_acked() {
    let harness = Harness::new().await;
    let sleeper = message("math.sleep", json!([30.0]));
    harness
        .shared
        .revoked
        .insert(Revocation::now(&sleeper.id, false));
    let ending = tokio::time::timeout(Duration::from_secs(5), harness.deliver(&sleeper))
        .await
        .expect("not run: it would sleep 30 s");
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.last().status, TaskState::Revoked);
    assert_eq!(
        ending.exception(),
        ("TaskRevokedError".into(), json!(["revoked"]))
    );
    assert_eq!(harness.shared.stats.revoked.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_expired_task_is_revoked_as_expired_and_acked() {
    let harness = Harness::new().await;
    let mut late = message("math.add", json!([1, 1]));
    late.expires = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    let ending = harness.deliver(&late).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(
        ending.exception(),
        ("TaskRevokedError".into(), json!(["expired"]))
    );
}

#[tokio::test]
async fn a_poison_message_is_a_worker_lost_error_and_dead_lettered() {
    let harness = Harness::new().await;
    let poison = message("math.add", json!([1, 1]));
    let max = harness.shared.options.max_deliveries;
    let ending = harness.deliver_envelope(poison.encode(), max + 1).await;
    assert!(
        matches!(&ending.settled, Settled::DeadLetter(reason) if reason.starts_with("poison message"))
    );
    assert_eq!(ending.exception().0, "WorkerLostError");
    let ending = harness.deliver_envelope(poison.encode(), max).await;
    assert_eq!(
        ending.last().status,
        TaskState::Success,
        "max deliveries is still run"
    );
}

#[tokio::test]
async fn a_far_eta_goes_back_to_the_broker_unchanged_and_is_acked() {
    let harness = Harness::new().await;
    let mut later = message("math.add", json!([1, 1]));
    later.eta = Some(chrono::Utc::now() + chrono::Duration::seconds(30));
    let envelope = later.encode();
    let ending = harness.deliver_envelope(envelope.clone(), 1).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert!(ending.stored.is_empty(), "nothing to store yet");
    let [deferred] = ending.published.as_slice() else {
        panic!("deferred once: {:?}", ending.published)
    };
    assert_eq!(deferred.envelope, envelope);
    let delay = deferred.delay.expect("delayed");
    assert!(delay > Duration::from_secs(29) && delay <= Duration::from_secs(30));
    assert_eq!(harness.shared.stats.deferred.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_near_eta_is_waited_for_in_memory() {
    let harness = Harness::new().await;
    let mut soon = message("math.add", json!([1, 1]));
    soon.eta = Some(chrono::Utc::now() + chrono::Duration::milliseconds(300));
    let started = std::time::Instant::now();
    let ending = harness.deliver(&soon).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(ending.last().result, json!(2));
    assert!(ending.published.is_empty(), "not deferred");
}

#[tokio::test]
async fn revoke_with_terminate_interrupts_a_running_task() {
    let harness = Harness::new().await;
    let sleeper = message("math.sleep", json!([30.0]));
    let shared = Arc::clone(&harness.shared);
    let id = sleeper.id.clone();
    let terminate = tokio::spawn(async move {
        while shared.running.len() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared.revoked.insert(Revocation::now(&id, true));
        assert!(shared.running.cancel(&id));
    });
    let ending = tokio::time::timeout(Duration::from_secs(10), harness.deliver(&sleeper))
        .await
        .expect("interrupted, not slept out");
    terminate.await.unwrap();
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(
        ending.exception(),
        ("TaskRevokedError".into(), json!(["terminated"]))
    );
}

#[tokio::test]
async fn a_task_interrupted_by_shutdown_is_released_for_redelivery() {
    let harness = Harness::new().await;
    let sleeper = message("math.sleep", json!([30.0]));
    let shared = Arc::clone(&harness.shared);
    let abort = tokio::spawn(async move {
        while shared.running.len() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared.aborting.store(true, Ordering::SeqCst);
        shared.running.cancel_all();
    });
    let ending = tokio::time::timeout(Duration::from_secs(10), harness.deliver(&sleeper))
        .await
        .expect("interrupted, not slept out");
    abort.await.unwrap();
    assert_eq!(ending.settled, Settled::Release);
    assert!(
        ending.stored.is_empty(),
        "no result: it runs again elsewhere"
    );
}

#[tokio::test]
async fn a_rate_limited_task_waits_its_turn_in_memory() {
    let harness = Harness::with(WorkerOptions {
        concurrency: 1,
        prefetch_multiplier: 8,
        ..WorkerOptions::default()
    })
    .await;
    let started = std::time::Instant::now();
    for x in 0..3 {
        let ending = harness
            .deliver(&message("math.throttled", json!([x])))
            .await;
        assert_eq!(ending.last().result, json!(x));
    }
    // 5/s: the second and third runs wait 200 ms each.
    assert!(
        started.elapsed() >= Duration::from_millis(380),
        "{:?}",
        started.elapsed()
    );
    assert!(harness.broker.published.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_workflow_step_follows_the_workers_routes() {
    let harness = Harness::with(WorkerOptions {
        concurrency: 1,
        routes: crate::routes::TaskRoutes::new([("math.mul".to_owned(), "cpu".to_owned())]),
        ..WorkerOptions::default()
    })
    .await;
    let mut first = message("math.add", json!([2, 2]));
    let step = |task: &str| {
        let mut sig = crate::canvas::Signature::new(task, vec![json!(10)]);
        sig.freeze().unwrap();
        sig.to_value()
    };
    first.embed.chain = Some(vec![step("math.add"), step("math.mul")]);
    let ending = harness.deliver(&first).await;
    assert_eq!(ending.last().result, json!(4));
    let [next] = ending.published.as_slice() else {
        panic!("the next step: {:?}", ending.published)
    };
    assert_eq!(next.queue, "cpu", "routed by the worker's routes");
    let next = TaskMessage::decode(&next.envelope).unwrap();
    assert_eq!(
        (next.task.as_str(), next.args.clone()),
        ("math.mul", vec![json!(4), json!(10)])
    );
    assert_eq!(next.embed.chain.as_ref().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_workflow_step_that_cannot_be_published_now_releases_the_message() {
    let harness = Harness::new().await;
    harness.broker.down.store(true, Ordering::SeqCst);
    let mut first = message("math.add", json!([2, 2]));
    let mut next = crate::canvas::Signature::new("math.mul", vec![json!(10)]);
    next.freeze().unwrap();
    first.embed.chain = Some(vec![next.to_value()]);
    let ending = harness.deliver(&first).await;
    assert_eq!(
        ending.settled,
        Settled::Release,
        "runs again once the broker is back"
    );
    assert!(
        ending.stored.is_empty(),
        "the result waits for its next step"
    );
}

#[tokio::test]
async fn a_workflow_step_that_can_never_run_fails_the_task_instead_of_looping() {
    let harness = Harness::new().await;
    let mut first = message("math.add", json!([2, 2]));
    first.embed.chain = Some(vec![
        json!({"task": "celery.chunks", "args": [], "kwargs": {},
        "options": {}, "subtask_type": "chunks"}),
    ]);
    let ending = harness.deliver(&first).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(ending.exception().0, "NotImplementedError");
}

/// A worker serving tenant `a`, which consumes (and may declare) only `celery`.
async fn tenant_harness() -> Harness {
    Harness::with(WorkerOptions {
        concurrency: 1,
        queues: vec!["celery".into()],
        tenant: Some(super::TenantOptions {
            name: "a".into(),
            limits: None,
            grants: super::GrantsFor::new(|_| crate::engine::Grants::default()),
        }),
        ..WorkerOptions::default()
    })
    .await
}

/// A frozen signature of `task` with `args`, for `queue` when given.
fn follow_up(task: &str, args: Value, queue: Option<&str>) -> crate::canvas::Signature {
    let Value::Array(args) = args else {
        panic!("args are a list")
    };
    let mut sig = crate::canvas::Signature::new(task, args);
    if let Some(queue) = queue {
        sig = sig.with_option("queue", queue);
    }
    sig.freeze().unwrap();
    sig
}

/// The last meta stored for `id`.
fn stored(harness: &Harness, id: &str) -> ResultMeta {
    harness.backend.stored.lock().unwrap()[id]
        .last()
        .cloned()
        .expect("a stored result")
}

#[tokio::test]
async fn a_tenants_callback_to_a_queue_its_broker_lacks_fails_the_task_naming_it() {
    let harness = tenant_harness().await;
    let mut parent = message("math.add", json!([1, 2]));
    let callback = follow_up("math.add", json!([100]), Some("work-b"));
    parent.embed.callbacks = Some(vec![callback.to_value()]);
    let ending = harness.deliver(&parent).await;
    assert_eq!(
        ending.settled,
        Settled::Ack,
        "never released: it would fail again"
    );
    assert!(ending.published.is_empty(), "nothing was published");
    let text =
        "the callback math.add names queue 'work-b', which does not exist in tenant a's broker";
    assert_eq!(ending.last().status, TaskState::Failure);
    assert_eq!(ending.exception(), ("QueueNotFound".into(), json!([text])));
    // Whoever waits on the callback is answered too.
    let answered = stored(&harness, callback.task_id().unwrap());
    assert_eq!(answered.status, TaskState::Failure);
    assert_eq!(answered.parent_id.as_deref(), Some(parent.id.as_str()));
    assert_eq!(harness.shared.stats.failed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_tenants_follow_ups_reach_its_own_queues_and_queues_that_exist() {
    let harness = tenant_harness().await;
    harness
        .broker
        .existing
        .lock()
        .unwrap()
        .insert("side".into());
    let mut parent = message("math.add", json!([1, 2]));
    parent.embed.callbacks = Some(vec![
        follow_up("math.add", json!([10]), Some("side")).to_value(),
        follow_up("math.add", json!([20]), None).to_value(),
    ]);
    let ending = harness.deliver(&parent).await;
    assert_eq!(ending.last().status, TaskState::Success);
    let queues: Vec<_> = ending.published.iter().map(|p| p.queue.as_str()).collect();
    assert_eq!(queues, ["side", "celery"]);
}

#[tokio::test]
async fn the_implicit_tenant_declares_any_queue_a_follow_up_names() {
    let harness = Harness::new().await;
    let mut parent = message("math.add", json!([1, 2]));
    parent.embed.callbacks = Some(vec![
        follow_up("math.add", json!([100]), Some("work-b")).to_value(),
    ]);
    let ending = harness.deliver(&parent).await;
    assert_eq!(ending.last().status, TaskState::Success);
    let [published] = ending.published.as_slice() else {
        panic!("the callback: {:?}", ending.published)
    };
    assert_eq!(published.queue, "work-b", "Celery's auto-declare");
}

#[tokio::test]
async fn a_tenants_next_step_to_a_missing_queue_fails_the_task_and_the_chain() {
    let harness = tenant_harness().await;
    let mut first = message("math.add", json!([2, 2]));
    let last = follow_up("math.add", json!([1]), None);
    let next = follow_up("math.mul", json!([10]), Some("work-b"));
    first.embed.chain = Some(vec![last.to_value(), next.to_value()]);
    let ending = harness.deliver(&first).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert!(ending.published.is_empty());
    let text = "the next chain step math.mul names queue 'work-b', which does not exist in tenant a's broker";
    assert_eq!(ending.exception(), ("QueueNotFound".into(), json!([text])));
    // The chain's end is answered with the same failure.
    let end = stored(&harness, last.task_id().unwrap());
    assert_eq!(end.status, TaskState::Failure);
    assert_eq!(end.exception().unwrap().exc_type, "QueueNotFound");
}

#[tokio::test]
async fn a_tenants_errback_to_a_missing_queue_is_failed_under_its_own_id() {
    let harness = tenant_harness().await;
    let mut failing = message("math.div", json!([1, 0]));
    let errback = follow_up("math.add", json!([1]), Some("work-b"));
    failing.embed.errbacks = Some(vec![errback.to_value()]);
    let ending = harness.deliver(&failing).await;
    assert_eq!(ending.settled, Settled::Ack);
    assert_eq!(
        ending.exception().0,
        "ZeroDivisionError",
        "the task's own failure"
    );
    assert!(ending.published.is_empty());
    let answered = stored(&harness, errback.task_id().unwrap());
    let exception = answered.exception().unwrap();
    assert_eq!(exception.exc_type, "QueueNotFound");
    assert_eq!(
        exception.exc_message,
        [json!(
            "the errback math.add names queue 'work-b', which does not exist in tenant a's broker"
        )]
    );
    assert_eq!(answered.parent_id.as_deref(), Some(failing.id.as_str()));
}

/// A worker whose hooks write one line per call into the returned log.
async fn hooked_harness(
    hooks: impl FnOnce(Arc<Mutex<Vec<String>>>) -> super::Hooks,
) -> (Harness, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let harness = Harness::with(WorkerOptions {
        concurrency: 1,
        node_name: "unit@test".into(),
        hooks: hooks(Arc::clone(&log)),
        ..WorkerOptions::default()
    })
    .await;
    (harness, log)
}

#[tokio::test]
async fn hooks_see_each_task_before_and_after_with_its_outcome() {
    let (harness, log) = hooked_harness(|log| {
        let (a, b, c, d) = (Arc::clone(&log), Arc::clone(&log), Arc::clone(&log), log);
        super::Hooks::new()
            .before_task(move |t| {
                assert!(t.args_size > 0, "the body's size");
                a.lock()
                    .unwrap()
                    .push(format!("before {} {}", t.name, t.id));
            })
            .after_task(move |t| {
                let ran = t.runtime.is_some_and(|r| r > Duration::ZERO);
                b.lock().unwrap().push(format!(
                    "after {} {} {} ran={ran}",
                    t.name,
                    t.id,
                    t.state.as_str()
                ));
            })
            .on_failure(move |t| {
                let ran = t.runtime.is_some();
                c.lock()
                    .unwrap()
                    .push(format!("failure {} {:?} ran={ran}", t.name, t.exception));
            })
            .on_retry(move |t| {
                d.lock()
                    .unwrap()
                    .push(format!("retry {} {}", t.name, t.retries))
            })
    })
    .await;
    let add = message("math.add", json!([2, 3]));
    harness.deliver(&add).await;
    let div = message("math.div", json!([1, 0]));
    harness.deliver(&div).await;
    let flaky = message("math.flaky", json!([1]));
    harness.deliver(&flaky).await;
    harness.deliver(&message("no.such_task", json!([]))).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            format!("before math.add {}", add.id),
            format!("after math.add {} SUCCESS ran=true", add.id),
            format!("before math.div {}", div.id),
            format!("after math.div {} FAILURE ran=true", div.id),
            "failure math.div Some(\"ZeroDivisionError\") ran=true".to_owned(),
            format!("before math.flaky {}", flaky.id),
            format!("after math.flaky {} RETRY ran=true", flaky.id),
            "retry math.flaky 0".to_owned(),
            "failure no.such_task Some(\"NotRegistered\") ran=false".to_owned(),
        ]
    );
}

#[tokio::test]
async fn a_panicking_hook_is_logged_and_the_task_carries_on() {
    let (harness, log) = hooked_harness(|log| {
        super::Hooks::new()
            .before_task(|_| panic!("a broken before_task"))
            .after_task(|_| panic!("a broken after_task"))
            .after_task(move |t| log.lock().unwrap().push(t.state.as_str().to_owned()))
    })
    .await;
    for x in 0..2 {
        let ending = harness.deliver(&message("math.add", json!([x, 1]))).await;
        assert_eq!(ending.settled, Settled::Ack);
        assert_eq!(ending.last().result, json!(x + 1));
    }
    assert_eq!(
        *log.lock().unwrap(),
        ["SUCCESS", "SUCCESS"],
        "the next hook still ran"
    );
    assert_eq!(harness.shared.stats.succeeded.load(Ordering::Relaxed), 2);
}
