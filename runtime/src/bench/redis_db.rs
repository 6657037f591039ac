//! The Redis database a `wasmq bench redis` run floods (`redis://127.0.0.1:6379/14` unless
//! told otherwise): what it held before the run, how many of a Celery drain's tasks are
//! still to be taken, and the clean-up that leaves it as it was.
//!
//! Nothing the run creates can be listed in advance — wasmq's broker, kombu and both result
//! backends name their keys themselves — so the clean-up is by difference: every key that
//! was not there when the run started is deleted, and from the shared keys that were there
//! (kombu's `unacked` hash, its `_kombu.binding*` sets and sorted set) the entries naming
//! one of the run's queues (all `wasmq-bench-…`) are removed. The database should therefore
//! be the bench's own: a key another program writes into it during the run is deleted too.

use std::collections::HashSet;

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;

use super::redis_ceiling::{UNACKED, UNACKED_INDEX, connection};

/// What every queue a run makes has in its name (see [`super::queue_name`]).
const MARK: &[u8] = b"wasmq-bench-";

/// The bench's Redis database and the keys it held before the run.
pub(super) struct BenchDb {
    client: redis::Client,
    connection: MultiplexedConnection,
    /// The keys that were there when the run started.
    before: HashSet<Vec<u8>>,
    /// The server's version, e.g. `7.0.15`.
    pub(super) version: String,
}

impl BenchDb {
    /// Connects to `url` and notes the keys it holds now.
    ///
    /// # Errors
    /// When the URL does not parse or Redis cannot be reached.
    pub(super) async fn open(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("not a Redis URL: {url}"))?;
        let mut connection = connection(&client).await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut connection)
            .await
            .context("INFO")?;
        let version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let before = keys(&mut connection).await?.into_iter().collect();
        Ok(Self {
            client,
            connection,
            before,
            version,
        })
    }

    /// The client, for connections of their own.
    pub(super) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// How many keys the database held when the run started.
    pub(super) fn keys_before(&self) -> usize {
        self.before.len()
    }

    /// Messages of `queue` not yet taken and acked by a kombu consumer: the queue's list
    /// and the `unacked` hash (kombu's early ack, Celery's default, empties it as each task
    /// starts). Counts every queue's unacked messages: one drain runs at a time.
    ///
    /// # Errors
    /// When Redis cannot be asked.
    pub(super) async fn waiting(&self, queue: &str) -> anyhow::Result<u64> {
        let mut connection = self.connection.clone();
        let (listed, unacked): (u64, u64) = redis::pipe()
            .llen(queue)
            .hlen(UNACKED)
            .query_async(&mut connection)
            .await
            .context("LLEN")?;
        Ok(listed + unacked)
    }

    /// Deletes `queue`'s list and its messages in kombu's `unacked` hash and index (a
    /// drain that stalled leaves some there, which would count as waiting in the next).
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses a command.
    pub(super) async fn drop_queue(&self, queue: &str) -> anyhow::Result<()> {
        let mut connection = self.connection.clone();
        let unacked: Vec<Vec<u8>> = redis::cmd("HGETALL")
            .arg(UNACKED)
            .query_async(&mut connection)
            .await
            .context("HGETALL")?;
        let mark = serde_json::to_vec(queue).unwrap_or_default();
        let tags: Vec<&Vec<u8>> = unacked
            .chunks(2)
            .filter(|pair| pair.get(1).is_some_and(|held| contains(held, &mark)))
            .map(|pair| &pair[0])
            .collect();
        let mut pipe = redis::pipe();
        pipe.del(queue).ignore();
        if !tags.is_empty() {
            pipe.hdel(UNACKED, &tags)
                .ignore()
                .zrem(UNACKED_INDEX, &tags)
                .ignore();
        }
        pipe.query_async::<()>(&mut connection)
            .await
            .context("DEL")?;
        Ok(())
    }

    /// Deletes every key made since [`BenchDb::open`] and the run's entries in the shared
    /// keys that were there before; returns how many keys it deleted.
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses a command.
    pub(super) async fn clean(&self) -> anyhow::Result<usize> {
        let mut connection = self.connection.clone();
        let now = keys(&mut connection).await?;
        let (made, kept): (Vec<_>, Vec<_>) =
            now.into_iter().partition(|key| !self.before.contains(key));
        for chunk in made.chunks(500) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<()>(&mut connection)
                .await
                .context("DEL")?;
        }
        for key in kept {
            remove_entries(&mut connection, &key).await?;
        }
        Ok(made.len())
    }
}

/// Every key of the database (`SCAN`).
async fn keys(connection: &mut MultiplexedConnection) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut cursor = 0_u64;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1_000)
            .query_async(connection)
            .await
            .context("SCAN")?;
        all.extend(keys);
        if next == 0 {
            return Ok(all);
        }
        cursor = next;
    }
}

fn contains(bytes: &[u8], part: &[u8]) -> bool {
    !part.is_empty() && bytes.windows(part.len()).any(|window| window == part)
}

fn names_the_run(bytes: &[u8]) -> bool {
    contains(bytes, MARK)
}

/// Removes from the set, sorted set or hash `key` the members (hash fields: the fields or
/// values) that name one of the run's queues.
async fn remove_entries(connection: &mut MultiplexedConnection, key: &[u8]) -> anyhow::Result<()> {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(connection)
        .await
        .context("TYPE")?;
    let (read, remove) = match kind.as_str() {
        "set" => ("SMEMBERS", "SREM"),
        "zset" => ("ZRANGE", "ZREM"),
        "hash" => ("HGETALL", "HDEL"),
        _ => return Ok(()),
    };
    let mut command = redis::cmd(read);
    command.arg(key);
    if kind == "zset" {
        command.arg(0).arg(-1);
    }
    let entries: Vec<Vec<u8>> = command.query_async(connection).await.context(read)?;
    let ours: Vec<&Vec<u8>> = if kind == "hash" {
        entries
            .chunks(2)
            .filter(|pair| pair.iter().any(|part| names_the_run(part)))
            .map(|pair| &pair[0])
            .collect()
    } else {
        entries.iter().filter(|e| names_the_run(e)).collect()
    };
    if !ours.is_empty() {
        redis::cmd(remove)
            .arg(key)
            .arg(ours)
            .query_async::<()>(connection)
            .await
            .context(remove)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_s_entries_are_those_naming_its_queues() {
        assert!(names_the_run(
            b"wasmq-bench-celery-solo-0f3a\x06\x16\x06\x16wasmq-bench-celery-solo-0f3a"
        ));
        assert!(names_the_run(
            br#"[{"body": "..."}, "", "wasmq-bench-raw-1"]"#
        ));
        assert!(!names_the_run(b"celery.pidbox"));
        assert!(!names_the_run(b"wasmq-ben"));
    }
}
