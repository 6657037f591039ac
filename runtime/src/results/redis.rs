//! Celery's Redis result backend (`celery-reference.md` §2.8): the meta JSON lives in the
//! string key `celery-task-meta-<id>`, written with `SETEX <expires>` and announced with
//! `PUBLISH` on the channel of the same name. The write is one Lua script, so "never
//! overwrite a stored SUCCESS" holds atomically even with several workers. Waiting clients
//! subscribe to the channel, then read the key, so a result stored in between is not missed.

use std::time::Duration;

use ::redis::AsyncCommands;
use ::redis::aio::ConnectionManager;
use async_trait::async_trait;
use futures_util::StreamExt;

use super::{ChordPart, ChordResults, ReplyTo, ResultBackend, ResultError, ResultMeta, TaskState};
use crate::redis_client::RedisClient;

/// One `.j` entry, `[1, tid, state, result]`.
fn decode_part(
    group_id: &str,
    json: &str,
) -> Result<(String, TaskState, serde_json::Value), ResultError> {
    let corrupt = |reason: String| ResultError::Corrupt {
        task_id: format!("chord {group_id}"),
        reason,
    };
    let (_, tid, state, result): (serde_json::Value, String, TaskState, serde_json::Value) =
        serde_json::from_str(json).map_err(|e| corrupt(format!("{e}: {json}")))?;
    Ok((tid, state, result))
}

/// The key (and channel) of a task's meta.
pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// A key prefix as Celery applies `result_backend_transport_options["global_keyprefix"]`:
/// written before every task, group and chord key (and so before the pub/sub channel of a
/// task's meta), with `_` added when the prefix does not already end in `:`, `_`, `-` or `.`.
/// A tenant's results live under its prefix, where a Redis ACL (`~acme:*`) can fence them.
pub fn global_key_prefix(prefix: &str) -> String {
    match prefix.chars().last() {
        None => String::new(),
        Some(':' | '_' | '-' | '.') => prefix.to_owned(),
        Some(_) => format!("{prefix}_"),
    }
}

/// Stores unless a SUCCESS is already there; then publishes. Returns 1 if stored.
const STORE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
";

/// The key of a group's chord data: `celery-taskset-meta-<gid>` plus a suffix (`.s` size,
/// `.j` results, `.t` added members, `.d` parts seen, `.c` completion claim).
pub fn group_key(group_id: &str, suffix: &str) -> String {
    format!("celery-taskset-meta-{group_id}{suffix}")
}

/// Celery's chord counter (`on_chord_part_return`, 5.6/5.7), in one script: add this part
/// once (the `.d` set remembers `tid:index`, so a redelivered member counts once) to the
/// `.j` ZSET scored by `group_index`; when the count reaches the size `.s` (+ `.t`), claim
/// completion with `SET .c done NX` — a Python worker seeing `done` stands aside — and
/// return every part in order, deleting the chord's keys.
/// KEYS: j t s d c, and the group's own key (where a client saves a nested header's shape);
/// ARGV: tid, encoded part, score, expiry seconds.
/// Returns {ready, parts, saved}: `parts` is empty unless this call completed the chord, and
/// `saved` is then the group's saved result, or an empty string.
const CHORD_PART_SCRIPT: &str = r"
local jkey, tkey, skey, dkey, ckey, gkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, score, expires = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('GET', ckey) == 'done' then
  return {-1, {}, ''}
end
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
  redis.call('ZADD', jkey, score, value)
  redis.call('SADD', dkey, member)
end
local ready = redis.call('ZCOUNT', jkey, '-inf', '+inf')
if expires > 0 then
  for _, key in ipairs({jkey, tkey, skey, dkey}) do
    redis.call('EXPIRE', key, expires)
  end
end
local size = redis.call('GET', skey)
if not size then
  return {ready, {}, ''}
end
local total = tonumber(size) + tonumber(redis.call('GET', tkey) or 0)
if ready < total then
  return {ready, {}, ''}
end
if not redis.call('SET', ckey, 'done', 'NX', 'EX', math.max(expires, 300)) then
  return {ready, {}, ''}
end
local parts = redis.call('ZRANGE', jkey, 0, -1)
redis.call('DEL', jkey, tkey, skey, dkey)
return {ready, parts, redis.call('GET', gkey) or ''}
";

/// `error`, met while doing `what`.
fn redis_error(what: &str, error: ::redis::RedisError) -> ResultError {
    ResultError::Redis {
        context: what.to_owned(),
        source: error,
    }
}

/// The Redis result backend.
pub struct RedisResultBackend {
    redis: RedisClient,
    /// Written before every key (Celery's `global_keyprefix`); empty by default.
    key_prefix: String,
    expires: Duration,
    script: ::redis::Script,
    chord_script: ::redis::Script,
}

impl std::fmt::Debug for RedisResultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisResultBackend")
            .field("url", &self.redis.describe())
            .finish()
    }
}

impl RedisResultBackend {
    /// A backend for `url` (`redis://host:port/db`); connects on first use and reconnects
    /// by itself.
    ///
    /// # Errors
    /// [`ResultError::UnsupportedUrl`] when the URL does not parse.
    pub fn new(url: &str, expires: Duration) -> Result<Self, ResultError> {
        let redis = RedisClient::open(url)
            .map_err(|e| ResultError::UnsupportedUrl(format!("{url} ({e})")))?;
        Ok(Self {
            redis,
            key_prefix: String::new(),
            expires,
            script: ::redis::Script::new(STORE_SCRIPT),
            chord_script: ::redis::Script::new(CHORD_PART_SCRIPT),
        })
    }

    /// The same backend with every key under `prefix`, as a Celery client configured with
    /// `result_backend_transport_options={"global_keyprefix": prefix}` reads them (see
    /// [`global_key_prefix`]).
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: &str) -> Self {
        self.key_prefix = global_key_prefix(prefix);
        self
    }

    /// The key (and channel) of a task's meta, under the prefix.
    fn meta_key(&self, task_id: &str) -> String {
        format!("{}{}", self.key_prefix, meta_key(task_id))
    }

    /// A group's key, under the prefix.
    fn group_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}{}", self.key_prefix, group_key(group_id, suffix))
    }

    async fn connection(&self) -> Result<ConnectionManager, ResultError> {
        self.redis
            .connection()
            .await
            .map_err(|e| redis_error(&format!("cannot connect to {}", self.redis.describe()), e))
    }

    fn parse(task_id: &str, json: &str) -> Result<ResultMeta, ResultError> {
        serde_json::from_str(json).map_err(|e| ResultError::Corrupt {
            task_id: task_id.to_owned(),
            reason: e.to_string(),
        })
    }
}

#[async_trait]
impl ResultBackend for RedisResultBackend {
    async fn store(&self, meta: &ResultMeta, _reply: Option<&ReplyTo>) -> Result<(), ResultError> {
        let mut connection = self.connection().await?;
        let json = serde_json::to_string(meta).expect("meta serializes");
        let seconds = self.expires.as_secs().max(1);
        let _: i64 = self
            .script
            .key(self.meta_key(&meta.task_id))
            .arg(json)
            .arg(seconds)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot store a result", e))?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, ResultError> {
        let mut connection = self.connection().await?;
        let json: Option<String> = connection
            .get(self.meta_key(task_id))
            .await
            .map_err(|e| redis_error("cannot read a result", e))?;
        json.map(|json| Self::parse(task_id, &json)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<ResultMeta, ResultError> {
        let key = self.meta_key(task_id);
        let mut pubsub = self
            .redis
            .client()
            .get_async_pubsub()
            .await
            .map_err(|e| redis_error("cannot subscribe", e))?;
        pubsub
            .subscribe(&key)
            .await
            .map_err(|e| redis_error("cannot subscribe", e))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = self.get(task_id).await?;
        if let Some(meta) = &last
            && meta.status.is_ready()
        {
            return Ok(meta.clone());
        }
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::time::timeout_at(deadline, messages.next()).await;
            match message {
                Ok(Some(message)) => {
                    let Ok(json) = message.get_payload::<String>() else {
                        continue;
                    };
                    let meta = Self::parse(task_id, &json)?;
                    if meta.status.is_ready() {
                        return Ok(meta);
                    }
                    last = Some(meta);
                }
                Ok(None) => {
                    // The subscription dropped: fall back to reading the key.
                    drop(messages);
                    return super::poll_until_ready(self, task_id, deadline, timeout).await;
                }
                Err(_) => {
                    return Err(ResultError::Timeout {
                        task_id: task_id.to_owned(),
                        timeout,
                        state: last.map_or(TaskState::Pending, |m| m.status),
                    });
                }
            }
        }
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), ResultError> {
        let mut connection = self.connection().await?;
        // As Celery's `set_chord_size`: a re-applied chord starts a new run.
        let _: () = ::redis::pipe()
            .atomic()
            .del(self.group_key(group_id, ".c"))
            .set_ex(
                self.group_key(group_id, ".s"),
                size,
                self.expires.as_secs().max(1),
            )
            .query_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot set a chord size", e))?;
        Ok(())
    }

    async fn save_chord_shape(
        &self,
        group_id: &str,
        shape: &serde_json::Value,
    ) -> Result<(), ResultError> {
        let mut connection = self.connection().await?;
        // Celery's `GroupResult.save()` of a complex header: a Python worker completing the
        // chord reads it too.
        let _: () = connection
            .set_ex(
                self.group_key(group_id, ""),
                serde_json::json!({ "result": shape }).to_string(),
                self.expires.as_secs().max(1),
            )
            .await
            .map_err(|e| redis_error("cannot save a chord's header", e))?;
        Ok(())
    }

    async fn chord_part_return(
        &self,
        part: &ChordPart,
    ) -> Result<Option<ChordResults>, ResultError> {
        let mut connection = self.connection().await?;
        let gid = &part.group_id;
        let encoded = serde_json::json!([1, part.task_id, part.state, part.result]).to_string();
        let score = part
            .index
            .map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let (_ready, parts, saved): (i64, Vec<String>, String) = self
            .chord_script
            .key(self.group_key(gid, ".j"))
            .key(self.group_key(gid, ".t"))
            .key(self.group_key(gid, ".s"))
            .key(self.group_key(gid, ".d"))
            .key(self.group_key(gid, ".c"))
            .key(self.group_key(gid, ""))
            .arg(&part.task_id)
            .arg(encoded)
            .arg(score)
            .arg(self.expires.as_secs().max(1))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| redis_error("cannot count a chord part", e))?;
        if parts.is_empty() {
            return Ok(None);
        }
        let members = parts
            .iter()
            .map(|json| decode_part(gid, json))
            .collect::<Result<Vec<_>, _>>()?;
        // Celery saves `{"result": group.as_tuple()}` (JSON) for a header holding groups.
        let saved_group = serde_json::from_str::<serde_json::Value>(&saved)
            .ok()
            .and_then(|mut saved| saved.get_mut("result").map(serde_json::Value::take))
            .filter(|shape| shape.get(1).is_some_and(serde_json::Value::is_array));
        Ok(Some(ChordResults {
            members,
            saved_group,
        }))
    }

    async fn purge_expired(&self) -> Result<u64, ResultError> {
        // Redis expires the keys itself (SETEX).
        Ok(0)
    }

    fn describe(&self) -> String {
        if self.key_prefix.is_empty() {
            self.redis.describe().to_owned()
        } else {
            format!("{} (keys under {})", self.redis.describe(), self.key_prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::global_key_prefix;

    #[test]
    fn a_global_key_prefix_ends_in_a_separator_as_celery_writes_it() {
        assert_eq!(global_key_prefix("acme:"), "acme:");
        assert_eq!(global_key_prefix("acme-"), "acme-");
        assert_eq!(global_key_prefix("acme"), "acme_");
        assert_eq!(global_key_prefix(""), "");
    }
}
