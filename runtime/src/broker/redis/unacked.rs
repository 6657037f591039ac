//! What a wasmq consumer holds unacknowledged, and putting it back: kombu's `unacked`
//! bookkeeping as a consumer, its upkeep and its settler all see it. A delivery is known by
//! kombu's tag, this consumer's held set (`wasmq.held.<id>`) and the owner table
//! (`wasmq.unacked_owner`), which says which consumer holds each tag *now*: kombu keeps a
//! message's tag when it restores it, so a tag alone cannot tell one delivery from the next.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};

use tokio::sync::Notify;

use super::kombu::{self, UNACKED, UNACKED_INDEX};
use super::{RedisBroker, redis_error};
use crate::broker::BrokerError;

/// Puts an unacknowledged message back, if it still is the delivery the caller means:
/// kombu keeps a message's tag when it restores it, so the same tag may since have been
/// delivered again to someone else. KEYS: unacked, unacked_index, held set, owners, then
/// the lists to push to. ARGV: tag, message, 1 to push to the front (consumed next) or 0 to
/// the back, the consumer that must hold it ('' for anyone), the score it must not exceed
/// in `unacked_index` ('' for any). Whoever removes it from `unacked` first restores it,
/// once. Returns 1 when restored, 0 when it was not (settled, restored or delivered again).
pub(super) static RESTORE: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r"
local tag = ARGV[1]
if ARGV[4] ~= '' and redis.call('HGET', KEYS[4], tag) ~= ARGV[4] then
  redis.call('SREM', KEYS[3], tag)
  return 0
end
if ARGV[5] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], tag)
  if score and tonumber(score) > tonumber(ARGV[5]) then return 0 end
end
local kept = redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('SREM', KEYS[3], tag)
redis.call('HDEL', KEYS[4], tag)
if kept == 0 then return 0 end
for i = 5, #KEYS do
  if ARGV[3] == '1' then
    redis.call('RPUSH', KEYS[i], ARGV[2])
  else
    redis.call('LPUSH', KEYS[i], ARGV[2])
  end
end
return 1
",
    )
});

/// Which wasmq consumer holds each unacknowledged message it delivered: tag → consumer id
/// (kombu's `unacked` has no room for it; Python's deliveries have no entry).
pub(super) const OWNERS: &str = "wasmq.unacked_owner";

/// The set of tags consumer `id` holds.
pub(super) fn held_key(id: &str) -> String {
    format!("wasmq.held.{id}")
}

/// A message handed out and not yet settled.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// kombu's delivery tag: the message's key in `unacked`.
    pub(super) tag: String,
    /// The list it came from.
    pub(super) list: String,
    /// The message as it was in the list.
    pub(super) payload: Vec<u8>,
    /// Deliveries so far, this one included.
    pub(super) delivery_count: u32,
}

/// What the fetcher, the upkeep task and the settler share.
pub(super) struct ConsumerState {
    pub(super) broker: RedisBroker,
    /// This consumer's id (its lease and held set are named after it).
    pub(super) id: String,
    pub(super) held_key: String,
    /// Handed-out deliveries by number.
    pub(super) held: Mutex<HashMap<u64, Held>>,
    pub(super) next_number: AtomicU64,
    /// Rung when a delivery is settled: the fetcher may have room again.
    pub(super) settled: Notify,
    /// Acknowledgements waiting to be written, and whether someone is writing them.
    pub(super) acks: Mutex<AckBatch>,
}

/// Acknowledgements written together: the first ack finding nobody writing writes its own
/// and every one that arrives meanwhile, one pipeline per round, until none is left (group
/// commit: no timer, so no ack waits for one).
#[derive(Debug, Default)]
pub(super) struct AckBatch {
    /// Tags acknowledged and not yet written.
    pub(super) pending: Vec<String>,
    /// Whether an ack is writing them now.
    pub(super) writing: bool,
}

impl ConsumerState {
    /// Takes delivery `number` out of the consumer's hands (it is being settled).
    pub(super) fn take(&self, number: u64) -> Option<Held> {
        let held = self.held.lock().expect("held").remove(&number);
        self.settled.notify_one();
        held
    }

    /// How many deliveries are in the consumer's hands.
    pub(super) fn held_count(&self) -> usize {
        self.held.lock().expect("held").len()
    }

    /// The tags held now.
    pub(super) fn held_tags(&self) -> Vec<String> {
        self.held
            .lock()
            .expect("held")
            .values()
            .map(|held| held.tag.clone())
            .collect()
    }

    /// Puts `held` back into its list: at the front (next out) or at the back.
    pub(super) async fn put_back(&self, held: &Held, front: bool) -> Result<bool, BrokerError> {
        let payload = std::str::from_utf8(&held.payload)
            .ok()
            .and_then(|text| kombu::mark_redelivered(text, held.delivery_count))
            .map_or_else(|| held.payload.clone(), String::into_bytes);
        let which = Restoring {
            tag: &held.tag,
            held_key: &self.held_key,
            owner: Some(&self.id),
            stale_before: None,
        };
        restore(
            &self.broker,
            &which,
            std::slice::from_ref(&held.list),
            &payload,
            front,
        )
        .await
    }
}

/// Which delivery a restore means.
pub(super) struct Restoring<'a> {
    /// Its tag.
    pub(super) tag: &'a str,
    /// The held set it is in (removed from it either way).
    pub(super) held_key: &'a str,
    /// The consumer that must still hold it; none: whoever does.
    pub(super) owner: Option<&'a str>,
    /// Only if its `unacked_index` score is not above this (a timed-out message, checked
    /// again at the moment of restoring); none: any.
    pub(super) stale_before: Option<f64>,
}

/// Runs [`RESTORE`] for the delivery `which` means, into `lists`.
pub(super) async fn restore(
    broker: &RedisBroker,
    which: &Restoring<'_>,
    lists: &[String],
    payload: &[u8],
    front: bool,
) -> Result<bool, BrokerError> {
    let mut connection = broker.connection().await?;
    let mut invocation = RESTORE.prepare_invoke();
    invocation
        .key(UNACKED)
        .key(UNACKED_INDEX)
        .key(which.held_key)
        .key(OWNERS);
    for list in lists {
        invocation.key(list);
    }
    invocation
        .arg(which.tag)
        .arg(payload)
        .arg(if front { "1" } else { "0" })
        .arg(which.owner.unwrap_or_default())
        .arg(
            which
                .stale_before
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
    invocation
        .invoke_async::<i64>(&mut connection)
        .await
        .map(|restored| restored == 1)
        .map_err(|e| redis_error("cannot put a message back", e))
}

impl ConsumerState {
    /// Adds to `pipe` what settling delivery `tag` removes (kombu's `_remove_from_indices`,
    /// and wasmq's held set and owner).
    pub(super) fn forget<'p>(
        &self,
        pipe: &'p mut ::redis::Pipeline,
        tag: &str,
    ) -> &'p mut ::redis::Pipeline {
        pipe.zrem(UNACKED_INDEX, tag)
            .ignore()
            .hdel(UNACKED, tag)
            .ignore()
            .srem(&self.held_key, tag)
            .ignore()
            .hdel(OWNERS, tag)
            .ignore()
    }
}

/// Unix seconds with a fraction, as kombu scores `unacked_index`.
pub(super) fn now_secs() -> f64 {
    crate::db::now_ms() as f64 / 1000.0
}
