//! Consuming from Redis: a fetcher task pops messages into the consumer's hands while it has
//! room under its prefetch limit, and the deliveries it hands out are settled here.
//!
//! A message is popped and recorded as unacknowledged in one script ([`POP`]): kombu's
//! `unacked` hash and `unacked_index`, and this consumer's `wasmq.held.<id>` set, in the
//! same atomic step as the pop, so no crash can lose it between the two. When every list is
//! empty the fetcher waits in `BRPOP` (1 s at a time, on a connection of its own) and records
//! what it gets at once ([`RECORD`]). It never abandons a `BRPOP` in flight: a reply that
//! arrived for a dropped call would be a message lost, so closing waits for the call to
//! return (at most a second) and gives back what it brought.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::kombu::{self, UNACKED, UNACKED_INDEX};
use super::unacked::{ConsumerState, Held, OWNERS, held_key, now_secs};
use super::{DEAD_LETTERS_KEPT, RedisBroker, dead_key, dead_letter_json, redis_error};
use crate::broker::{BrokerError, Consumer, Delivery, PrefetchLimit, Settle, Subscriptions};
use crate::protocol::Envelope;

/// Records one popped message as unacknowledged; the shared part of [`POP`] and [`RECORD`].
/// KEYS: unacked, unacked_index, held set, counter of untagged messages, owners. ARGV[2]:
/// now (Unix seconds), ARGV[3]: the prefix of tags given to messages that carry none,
/// ARGV[4]: this consumer's id.
const RECORD_FUNCTION: &str = r"
local function record(payload)
  local ok, message = pcall(cjson.decode, payload)
  local tag, ex, rk
  if ok and type(message) == 'table' and type(message.properties) == 'table' then
    tag = message.properties.delivery_tag
    local info = message.properties.delivery_info
    if type(info) == 'table' then ex = info.exchange; rk = info.routing_key end
  end
  if type(tag) ~= 'string' then tag = ARGV[3] .. redis.call('INCR', KEYS[4]) end
  if type(ex) ~= 'string' then ex = '' end
  if type(rk) ~= 'string' then rk = '' end
  local raw = payload
  if not ok or type(message) ~= 'table' then raw = cjson.encode(payload) end
  redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  redis.call('SADD', KEYS[3], tag)
  redis.call('HSET', KEYS[5], tag, ARGV[4])
  return tag
end
";

/// Pops up to ARGV[1] messages from KEYS[6..] in order and records each; returns
/// `{list, tag, message, …}`.
static POP: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(&format!(
        "{RECORD_FUNCTION}
local out = {{}}
local max = tonumber(ARGV[1]) * 3
for i = 6, #KEYS do
  while #out < max do
    local payload = redis.call('RPOP', KEYS[i])
    if not payload then break end
    local tag = record(payload)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = tag
    out[#out + 1] = payload
  end
  if #out >= max then break end
end
return out
"
    ))
});

/// Records the message ARGV[1] a `BRPOP` returned; returns its tag.
static RECORD: LazyLock<::redis::Script> =
    LazyLock::new(|| ::redis::Script::new(&format!("{RECORD_FUNCTION}\nreturn record(ARGV[1])\n")));

/// The counter behind the tags of messages that carry none.
const UNTAGGED: &str = "wasmq.untagged";

/// How long an idle consumer waits in one `BRPOP`.
const IDLE_WAIT_SECS: u64 = 1;

#[async_trait]
impl Settle for ConsumerState {
    async fn ack(&self, tag: u64) -> Result<(), BrokerError> {
        let Some(held) = self.take(tag) else {
            return Ok(());
        };
        {
            let mut batch = self.acks.lock().expect("acks");
            batch.pending.push(held.tag);
            if batch.writing {
                // The writer takes it in its next round. Should that round fail, the tag is
                // still in this consumer's held set, where upkeep finds it and puts the
                // message back: it is delivered again, as an ack that fails promises.
                return Ok(());
            }
            batch.writing = true;
        }
        let mut outcome = Ok(());
        loop {
            let tags = {
                let mut batch = self.acks.lock().expect("acks");
                if batch.pending.is_empty() {
                    batch.writing = false;
                    return outcome;
                }
                std::mem::take(&mut batch.pending)
            };
            let written = async {
                let mut connection = self.broker.connection().await?;
                let mut pipe = ::redis::pipe();
                pipe.atomic();
                for tag in &tags {
                    self.forget(&mut pipe, tag);
                }
                pipe.query_async::<()>(&mut connection)
                    .await
                    .map_err(|e| redis_error("cannot acknowledge messages", e))
            };
            if let Err(error) = written.await {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    messages = tags.len(),
                    "Redis broker: acknowledgements not written; the messages will be delivered again"
                );
                outcome = Err(error);
            }
        }
    }

    async fn dead_letter(
        &self,
        tag: u64,
        reason: &str,
        envelope: &Envelope,
    ) -> Result<(), BrokerError> {
        let Some(held) = self.take(tag) else {
            return Ok(());
        };
        let queue = kombu::queue_of_key(&held.list);
        let task_id = envelope.headers.get("id").and_then(|v| v.as_str());
        let letter = dead_letter_json(
            queue,
            &String::from_utf8_lossy(&held.payload),
            task_id,
            reason,
            held.delivery_count,
        );
        let mut connection = self.broker.connection().await?;
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .lpush(dead_key(queue), letter)
            .ignore()
            .ltrim(dead_key(queue), 0, DEAD_LETTERS_KEPT - 1)
            .ignore();
        self.forget(&mut pipe, &held.tag)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| redis_error("cannot dead-letter a message", e))
    }

    async fn release(&self, tag: u64) -> Result<(), BrokerError> {
        let Some(held) = self.take(tag) else {
            return Ok(());
        };
        self.put_back(&held, true).await.map(drop)
    }
}

/// A consumer of one or more queues on a Redis broker.
pub(super) struct RedisConsumer {
    state: Arc<ConsumerState>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    stop: watch::Sender<bool>,
    fetcher: Option<JoinHandle<()>>,
    upkeep: JoinHandle<()>,
    subscriptions: Subscriptions,
    prefetch: PrefetchLimit,
    consuming: watch::Receiver<bool>,
}

impl RedisConsumer {
    /// Registers the consumer's lease and starts fetching `queues`.
    pub(super) async fn start(broker: RedisBroker, queues: &[String], prefetch: usize) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let state = Arc::new(ConsumerState {
            broker,
            held_key: held_key(&id),
            id,
            held: Mutex::new(HashMap::new()),
            next_number: AtomicU64::new(1),
            settled: Notify::new(),
            acks: Mutex::default(),
        });
        if let Err(error) = super::upkeep::renew_lease(&state).await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "Redis broker: cannot register the consumer yet; retrying"
            );
        }
        let subscriptions = Subscriptions::new(queues);
        let prefetch = PrefetchLimit::new(prefetch);
        let (stop, stopping) = watch::channel(false);
        // Consuming once the first fetch succeeds.
        let (consuming_sender, consuming) = watch::channel(false);
        let (sender, deliveries) = mpsc::unbounded_channel();
        let fetcher = Fetcher {
            state: Arc::clone(&state),
            subscriptions: subscriptions.clone(),
            prefetch: prefetch.clone(),
            stopping: stopping.clone(),
            sender,
            consuming: consuming_sender,
            blocking: None,
            rotation: 0,
        };
        let fetcher = tokio::spawn(fetcher.run());
        let upkeep = tokio::spawn(super::upkeep::run(
            Arc::clone(&state),
            subscriptions.clone(),
            stopping,
        ));
        Self {
            state,
            deliveries,
            stop,
            fetcher: Some(fetcher),
            upkeep,
            subscriptions,
            prefetch,
            consuming,
        }
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(fetcher) = &self.fetcher {
            fetcher.abort();
        }
        self.upkeep.abort();
        // Whatever is still held is put back by whoever sees the lease lapse; a consumer
        // that holds nothing leaves nothing behind.
        let state = Arc::clone(&self.state);
        if state.held_count() == 0
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move { super::upkeep::retire(&state).await });
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.deliveries.recv().await.ok_or(BrokerError::Closed)
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        if let Some(fetcher) = self.fetcher.take() {
            let _ = fetcher.await;
        }
        self.deliveries.close();
        while let Ok(delivery) = self.deliveries.try_recv() {
            if let Err(error) = delivery.release().await {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot give a fetched message back; it returns when this worker's lease lapses"
                );
            }
        }
    }

    async fn flush_acks(&mut self) {
        // Acks are written by whichever ack is writing; wait for it to finish (bounded).
        for _ in 0..500 {
            if !self.state.acks.lock().expect("acks").writing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn consuming(&self) -> Option<watch::Receiver<bool>> {
        Some(self.consuming.clone())
    }

    fn subscriptions(&self) -> Option<Subscriptions> {
        Some(self.subscriptions.clone())
    }

    fn prefetch_limit(&self) -> Option<PrefetchLimit> {
        Some(self.prefetch.clone())
    }
}

/// The task that fills the consumer's hands.
struct Fetcher {
    state: Arc<ConsumerState>,
    subscriptions: Subscriptions,
    prefetch: PrefetchLimit,
    stopping: watch::Receiver<bool>,
    sender: mpsc::UnboundedSender<Delivery>,
    consuming: watch::Sender<bool>,
    /// The connection `BRPOP` waits on (a blocking call would stall the shared one).
    blocking: Option<::redis::aio::MultiplexedConnection>,
    /// Round-robin start among the queues (kombu's default `round_robin` order).
    rotation: usize,
}

impl Fetcher {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut watched = self.subscriptions.watch();
        loop {
            if *self.stopping.borrow() {
                return;
            }
            // Refill when half the window is free, not at every settlement: one script then
            // fetches a batch (at full drain, a refill per settlement popped ~3 messages a
            // script and cost more CPU per task than the task).
            let window = self.prefetch.get();
            let room = window.saturating_sub(self.state.held_count());
            if room < (window / 2).max(1) {
                let mut stopping = self.stopping.clone();
                tokio::select! {
                    () = self.state.settled.notified() => {}
                    _ = stopping.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            let lists = self.lists();
            if lists.is_empty() {
                let mut stopping = self.stopping.clone();
                tokio::select! {
                    _ = watched.changed() => {}
                    _ = stopping.changed() => {}
                }
                continue;
            }
            let fetched = match self.declare_and_pop(&lists, room).await {
                Ok(fetched) if fetched.is_empty() => self.wait(&lists).await,
                other => other,
            };
            match fetched {
                Ok(fetched) => {
                    self.consuming
                        .send_if_modified(|up| !std::mem::replace(up, true));
                    backoff = Duration::from_millis(100);
                    if !fetched.is_empty() {
                        self.rotation = self.rotation.wrapping_add(1);
                    }
                    for (list, tag, payload) in fetched {
                        self.hand_out(list, tag, payload);
                    }
                }
                Err(error) => {
                    self.consuming
                        .send_if_modified(|up| std::mem::replace(up, false));
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        retry_in = ?backoff,
                        "Redis broker: cannot fetch messages; retrying"
                    );
                    self.blocking = None;
                    let mut stopping = self.stopping.clone();
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopping.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The lists to pop from, in order: every queue's step-0 list first (round robin among
    /// the queues), then step 3, and so on.
    fn lists(&self) -> Vec<String> {
        let mut queues = self.subscriptions.current();
        if queues.is_empty() {
            return Vec::new();
        }
        let start = self.rotation % queues.len();
        queues.rotate_left(start);
        kombu::PRIORITY_STEPS
            .iter()
            .flat_map(|&step| {
                queues
                    .iter()
                    .map(move |queue| kombu::queue_key(queue, step))
            })
            .collect()
    }

    /// Declares the queues consumed (once per process) and pops up to `room` messages.
    async fn declare_and_pop(
        &self,
        lists: &[String],
        room: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, BrokerError> {
        for queue in self.subscriptions.current() {
            self.state.broker.declare(&queue).await?;
        }
        self.pop(lists, room).await
    }

    async fn pop(
        &self,
        lists: &[String],
        room: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, BrokerError> {
        let mut connection = self.state.broker.connection().await?;
        let mut invocation = POP.prepare_invoke();
        invocation
            .key(UNACKED)
            .key(UNACKED_INDEX)
            .key(&self.state.held_key)
            .key(UNTAGGED)
            .key(OWNERS);
        for list in lists {
            invocation.key(list);
        }
        invocation
            .arg(room)
            .arg(now_secs())
            .arg(self.untagged_prefix())
            .arg(&self.state.id);
        let flat: Vec<Vec<u8>> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot fetch messages", e))?;
        let mut fetched = Vec::with_capacity(flat.len() / 3);
        let mut fields = flat.into_iter();
        while let (Some(list), Some(tag), Some(payload)) =
            (fields.next(), fields.next(), fields.next())
        {
            fetched.push((lossy(list), lossy(tag), payload));
        }
        Ok(fetched)
    }

    /// Waits for a message in `BRPOP`, at most [`IDLE_WAIT_SECS`]; records what it gets.
    async fn wait(
        &mut self,
        lists: &[String],
    ) -> Result<Vec<(String, String, Vec<u8>)>, BrokerError> {
        if self.blocking.is_none() {
            let config = ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                // Far beyond the wait: a reply given up on would be a message lost.
                .set_response_timeout(Some(Duration::from_secs(IDLE_WAIT_SECS + 30)));
            let connection = self
                .state
                .broker
                .inner
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| redis_error("cannot connect to Redis", e))?;
            self.blocking = Some(connection);
        }
        let Some(connection) = self.blocking.as_mut() else {
            return Ok(Vec::new());
        };
        let popped: Option<(Vec<u8>, Vec<u8>)> = ::redis::cmd("BRPOP")
            .arg(lists)
            .arg(IDLE_WAIT_SECS)
            .query_async(connection)
            .await
            .map_err(|e| redis_error("cannot wait for messages", e))?;
        let Some((list, payload)) = popped else {
            return Ok(Vec::new());
        };
        let list = lossy(list);
        let tag = self.record(&payload).await;
        Ok(vec![(list, tag, payload)])
    }

    /// Records a message `BRPOP` returned as unacknowledged, retrying for a few seconds
    /// while Redis is unreachable. Returns its tag (a tag of its own when it cannot be
    /// recorded: the message is still handed out, but a crash now would lose it).
    async fn record(&self, payload: &[u8]) -> String {
        let mut wait = Duration::from_millis(50);
        for _ in 0..8 {
            let recorded = async {
                let mut connection = self.state.broker.connection().await?;
                RECORD
                    .key(UNACKED)
                    .key(UNACKED_INDEX)
                    .key(&self.state.held_key)
                    .key(UNTAGGED)
                    .key(OWNERS)
                    .arg(payload)
                    .arg(now_secs())
                    .arg(self.untagged_prefix())
                    .arg(&self.state.id)
                    .invoke_async::<String>(&mut connection)
                    .await
                    .map_err(|e| redis_error("cannot record a delivered message", e))
            };
            match recorded.await {
                Ok(tag) => return tag,
                Err(error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "Redis broker: cannot record a delivered message yet"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
        tracing::error!(
            "Redis broker: a delivered message could not be recorded as unacknowledged"
        );
        format!(
            "{}unrecorded-{}",
            self.untagged_prefix(),
            uuid::Uuid::new_v4().simple()
        )
    }

    fn untagged_prefix(&self) -> String {
        format!("wasmq-{}-", self.state.id)
    }

    fn hand_out(&self, list: String, tag: String, payload: Vec<u8>) {
        let number = self.state.next_number.fetch_add(1, Ordering::Relaxed);
        let queue = kombu::queue_of_key(&list).to_owned();
        let (envelope, delivery_count) = match kombu::decode(&payload) {
            Some(received) => {
                let count = received.delivery_count();
                (received.envelope, count)
            }
            // Not a kombu message: handed on as it is, for the worker to refuse as
            // malformed (a FAILURE where it can tell the id, and a dead letter).
            None => (
                Envelope {
                    headers: serde_json::Map::new(),
                    properties: crate::protocol::Properties::default(),
                    body: payload.clone(),
                },
                1,
            ),
        };
        self.state.held.lock().expect("held").insert(
            number,
            Held {
                tag,
                list,
                payload,
                delivery_count,
            },
        );
        let settler: Arc<dyn Settle> = self.state.clone();
        let delivery = Delivery::new(envelope, queue, delivery_count, number, settler);
        if let Err(unsent) = self.sender.send(delivery) {
            // The consumer is gone: give the message back at once.
            let delivery = unsent.0;
            tokio::spawn(async move {
                let _ = delivery.release().await;
            });
        }
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}
