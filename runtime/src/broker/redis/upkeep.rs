//! What every wasmq consumer on Redis does beside fetching, on a timer:
//!
//! * every 200 ms, moves its queues' due delayed messages into their lists ([`MOVE_DUE`]);
//! * every heartbeat (1 s): renews its lease in `wasmq.consumers` (scored by when it
//!   lapses), keeps the `unacked_index` scores of the messages it holds fresh (so nobody
//!   takes them for abandoned, however long they run), puts back messages recorded as held
//!   that it never handed out (a fetch whose reply was lost), and puts back the messages of
//!   every consumer whose lease lapsed — the first to remove the lapsed lease does it;
//! * every fifth heartbeat, kombu's `restore_visible`: under the `unacked_mutex` lock, puts
//!   back messages unacknowledged for longer than the visibility timeout (those of Python
//!   workers, or of consumers no lease speaks for).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::AsyncCommands;
use serde_json::Value;
use tokio::sync::watch;

use super::kombu::{self, UNACKED, UNACKED_INDEX, UNACKED_MUTEX};
use super::unacked::{ConsumerState, Restoring, held_key, now_secs, restore};
use super::{RedisBroker, delayed_key, redis_error};
use crate::broker::{BrokerError, Subscriptions};

/// The leases of live consumers: consumer id → when its lease lapses (Unix ms).
const CONSUMERS: &str = "wasmq.consumers";

/// How often due delayed messages are moved.
const MOVE_EVERY: Duration = Duration::from_millis(200);

/// Messages moved per script run.
const MOVE_BATCH: usize = 500;

/// Moves the due members of delay set KEYS[1] (`<list>\n<message>`, scored by due time in
/// Unix ms) to the back of their lists. ARGV: now (ms), the most to move. Returns how many
/// it moved. The lists are named by the members, not declared: this runs on a single Redis,
/// never a cluster.
static MOVE_DUE: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local cut = string.find(member, '\n', 1, true)
  if cut then
    redis.call('LPUSH', string.sub(member, 1, cut - 1), string.sub(member, cut + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
",
    )
});

/// Releases redis-py's `Lock` if the caller holds it. KEYS: the lock. ARGV: the token.
static UNLOCK: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Sets or extends the consumer's lease.
pub(super) async fn renew_lease(state: &ConsumerState) -> Result<(), BrokerError> {
    let lease = &state.broker.inner.options.lease;
    let until = crate::db::now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut connection = state.broker.connection().await?;
    connection
        .zadd::<_, _, _, ()>(CONSUMERS, &state.id, until)
        .await
        .map_err(|e| redis_error("cannot renew the consumer's lease", e))
}

/// Removes the lease and held set of a consumer that holds nothing any more.
pub(super) async fn retire(state: &ConsumerState) {
    let Ok(mut connection) = state.broker.connection().await else {
        return;
    };
    let _: Result<(), _> = ::redis::pipe()
        .zrem(CONSUMERS, &state.id)
        .ignore()
        .del(&state.held_key)
        .ignore()
        .query_async(&mut connection)
        .await;
}

/// The consumer's timer, until it stops.
pub(super) async fn run(
    state: Arc<ConsumerState>,
    subscriptions: Subscriptions,
    mut stopping: watch::Receiver<bool>,
) {
    let heartbeat = state.broker.inner.options.heartbeat;
    let mut next_heartbeat = tokio::time::Instant::now() + heartbeat;
    let mut beats: u64 = 0;
    let mut orphans = HashSet::new();
    loop {
        if let Err(error) = move_due(&state.broker, &subscriptions.current()).await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "Redis broker: cannot move due delayed messages"
            );
        }
        if tokio::time::Instant::now() >= next_heartbeat {
            next_heartbeat += heartbeat;
            beats += 1;
            if let Err(error) = beat(&state, &mut orphans, beats).await {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "Redis broker: consumer upkeep failed; retrying"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(MOVE_EVERY) => {}
            _ = stopping.changed() => {
                if *stopping.borrow() {
                    // Keep the lease while deliveries are still being settled.
                    keep_lease(&state).await;
                    return;
                }
            }
        }
    }
}

/// After the fetcher stopped: renews the lease until every delivery is settled, then
/// retires it.
async fn keep_lease(state: &ConsumerState) {
    let heartbeat = state.broker.inner.options.heartbeat;
    loop {
        if state.held_tags().is_empty() {
            retire(state).await;
            return;
        }
        let _ = renew_lease(state).await;
        tokio::time::sleep(heartbeat.min(Duration::from_millis(250))).await;
    }
}

/// Moves the due delayed messages of `queues`.
async fn move_due(broker: &RedisBroker, queues: &[String]) -> Result<(), BrokerError> {
    if queues.is_empty() {
        return Ok(());
    }
    let mut connection = broker.connection().await?;
    for queue in queues {
        loop {
            let moved: usize = MOVE_DUE
                .key(delayed_key(queue))
                .arg(crate::db::now_ms())
                .arg(MOVE_BATCH)
                .invoke_async(&mut connection)
                .await
                .map_err(|e| redis_error("cannot move due messages", e))?;
            if moved < MOVE_BATCH {
                break;
            }
        }
    }
    Ok(())
}

/// One heartbeat's duties (see the module's documentation).
async fn beat(
    state: &ConsumerState,
    orphans: &mut HashSet<String>,
    beats: u64,
) -> Result<(), BrokerError> {
    renew_lease(state).await?;
    let mut connection = state.broker.connection().await?;
    let held = state.held_tags();
    if !held.is_empty() {
        let now = now_secs();
        let mut refresh = ::redis::cmd("ZADD");
        refresh.arg(UNACKED_INDEX).arg("XX");
        for tag in &held {
            refresh.arg(now).arg(tag);
        }
        refresh
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| redis_error("cannot refresh held messages", e))?;
    }
    // Recorded as held but never handed out (seen twice, so a fetch in flight is not one).
    let recorded: Vec<String> = connection
        .smembers(&state.held_key)
        .await
        .map_err(|e| redis_error("cannot list held messages", e))?;
    let handed: HashSet<&String> = held.iter().collect();
    let unheld: HashSet<String> = recorded
        .into_iter()
        .filter(|tag| !handed.contains(tag))
        .collect();
    for tag in unheld.intersection(orphans) {
        let which = Restoring {
            tag,
            held_key: &state.held_key,
            owner: Some(&state.id),
            stale_before: None,
        };
        restore_by_tag(&state.broker, &which).await?;
    }
    *orphans = unheld;

    reap_lapsed(&state.broker).await?;
    if beats.is_multiple_of(5) {
        restore_visible(&state.broker).await?;
    }
    Ok(())
}

/// Puts back the messages of every consumer whose lease lapsed. Returns how many.
pub(super) async fn reap_lapsed(broker: &RedisBroker) -> Result<usize, BrokerError> {
    let mut connection = broker.connection().await?;
    let lapsed: Vec<String> = connection
        .zrangebyscore(CONSUMERS, "-inf", crate::db::now_ms())
        .await
        .map_err(|e| redis_error("cannot list consumer leases", e))?;
    let mut restored = 0;
    for id in lapsed {
        // Whoever removes the lease puts the messages back; the others skip it.
        let removed: i64 = connection
            .zrem(CONSUMERS, &id)
            .await
            .map_err(|e| redis_error("cannot take over a lapsed lease", e))?;
        if removed == 0 {
            continue;
        }
        let key = held_key(&id);
        let tags: Vec<String> = connection
            .smembers(&key)
            .await
            .map_err(|e| redis_error("cannot list a lapsed consumer's messages", e))?;
        for tag in &tags {
            let which = Restoring {
                tag,
                held_key: &key,
                owner: Some(&id),
                stale_before: None,
            };
            if restore_by_tag(broker, &which).await? {
                restored += 1;
            }
        }
        let _: () = connection
            .del(&key)
            .await
            .map_err(|e| redis_error("cannot remove a lapsed consumer's set", e))?;
        if !tags.is_empty() {
            tracing::info!(
                consumer = %id,
                messages = tags.len(),
                "Redis broker: a consumer's lease lapsed; its messages are back in their queues"
            );
        }
    }
    Ok(restored)
}

/// kombu's `restore_visible`: puts back messages unacknowledged for longer than the
/// visibility timeout, up to 100 at a time, under kombu's lock (so a Python worker doing
/// the same never races us).
async fn restore_visible(broker: &RedisBroker) -> Result<(), BrokerError> {
    let mut connection = broker.connection().await?;
    let ceiling = now_secs() - broker.inner.options.visibility_timeout.as_secs_f64();
    let stale: Vec<String> = connection
        .zrangebyscore_limit(UNACKED_INDEX, "-inf", ceiling, 0, 100)
        .await
        .map_err(|e| redis_error("cannot look for timed-out messages", e))?;
    if stale.is_empty() {
        return Ok(());
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let locked: Option<String> = ::redis::cmd("SET")
        .arg(UNACKED_MUTEX)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(300_000)
        .query_async(&mut connection)
        .await
        .map_err(|e| redis_error("cannot take the restore lock", e))?;
    if locked.is_none() {
        return Ok(());
    }
    let mut outcome = Ok(());
    for tag in &stale {
        // Whose held set it is in is unknown; the message is removed from it when a
        // lapsed consumer's set is cleaned up.
        let which = Restoring {
            tag,
            held_key: "wasmq.held.unknown",
            owner: None,
            stale_before: Some(ceiling),
        };
        if let Err(error) = restore_by_tag(broker, &which).await {
            outcome = Err(error);
            break;
        }
    }
    let _: Result<i64, _> = UNLOCK
        .key(UNACKED_MUTEX)
        .arg(&token)
        .invoke_async(&mut connection)
        .await;
    if !stale.is_empty() {
        tracing::info!(
            messages = stale.len(),
            "Redis broker: messages unacknowledged past the visibility timeout are back in their queues"
        );
    }
    outcome
}

/// Puts back unacknowledged message `tag` as kombu's `restore_by_tag` does: into the lists
/// its exchange and routing key lead to, at the front, marked redelivered. False when it
/// was acknowledged (or restored by someone else) meanwhile.
async fn restore_by_tag(broker: &RedisBroker, which: &Restoring<'_>) -> Result<bool, BrokerError> {
    let (tag, held) = (which.tag, which.held_key);
    let mut connection = broker.connection().await?;
    let kept: Option<String> = connection
        .hget(UNACKED, tag)
        .await
        .map_err(|e| redis_error("cannot read an unacknowledged message", e))?;
    let Some(kept) = kept else {
        let _: () = ::redis::pipe()
            .zrem(UNACKED_INDEX, tag)
            .ignore()
            .srem(held, tag)
            .ignore()
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot clean up a settled message", e))?;
        return Ok(false);
    };
    let (message, exchange, routing_key) = match serde_json::from_str::<Value>(&kept) {
        Ok(Value::Array(parts)) if parts.len() == 3 => {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let message = match &parts[0] {
                Value::String(raw) => raw.clone(),
                other => other.to_string(),
            };
            (message, text(&parts[1]), text(&parts[2]))
        }
        _ => (kept.clone(), String::new(), String::new()),
    };
    let delivered = kombu::decode(message.as_bytes()).map_or(1, |m| m.delivery_count());
    let payload = kombu::mark_redelivered(&message, delivered).unwrap_or(message.clone());
    let priority = kombu::priority_of(&message);
    let queues = lookup(broker, &exchange, &routing_key).await?;
    if queues.is_empty() {
        tracing::error!(
            tag,
            exchange,
            routing_key,
            "Redis broker: an unacknowledged message leads to no queue; it is dead-lettered"
        );
        let letter =
            super::dead_letter_json("", &message, None, "no queue to restore to", delivered);
        let _: () = ::redis::pipe()
            .atomic()
            .lpush(super::dead_key(""), letter)
            .ignore()
            .hdel(UNACKED, tag)
            .ignore()
            .zrem(UNACKED_INDEX, tag)
            .ignore()
            .srem(held, tag)
            .ignore()
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot dead-letter a message", e))?;
        return Ok(false);
    }
    let lists: Vec<String> = queues
        .iter()
        .map(|queue| kombu::queue_key(queue, priority))
        .collect();
    restore(broker, which, &lists, payload.as_bytes(), true).await
}

/// The queues a message published to `exchange` with `routing_key` goes to (kombu's
/// `_lookup` for a direct exchange: the default exchange names the queue itself; another
/// is looked up in its binding table, and its routing key names the queue when nothing is
/// bound, as Celery's queues are named after their routing keys).
async fn lookup(
    broker: &RedisBroker,
    exchange: &str,
    routing_key: &str,
) -> Result<Vec<String>, BrokerError> {
    if exchange.is_empty() {
        return Ok(if routing_key.is_empty() {
            Vec::new()
        } else {
            vec![routing_key.to_owned()]
        });
    }
    let queues = broker.bound(exchange, routing_key).await?;
    if queues.is_empty() && !routing_key.is_empty() {
        return Ok(vec![routing_key.to_owned()]);
    }
    Ok(queues)
}
