//! Celery's remote control on the embedded broker: two tables of the database file stand in
//! for kombu's pidbox exchanges.
//!
//! * `control_commands` is the broadcast: a client appends one row per command, its body
//!   exactly as it would travel on `celery.pidbox` ([`ControlCommand::body`], with its
//!   `destination`, `pattern` and `ticket`) and an `expires` time (the client's timeout).
//!   Every worker on the file reads it when the file's watcher reports a commit
//!   ([`Db::changed`]), and at least every [`COMMAND_POLL`] (50 ms without a watcher, 1 s
//!   with one), from the newest row it saw
//!   when it started listening (commands are for the workers alive now, as on RabbitMQ),
//!   runs the rows [`ControlCommand::is_for`] it that have not expired, and skips the rows
//!   it cannot read, so a malformed row costs a warning, never the worker.
//! * `control_replies` is the way back: a worker that is asked for a reply (the command has
//!   a `ticket` and a `reply_to`) appends one row with the ticket, its node name and its
//!   answer; the client reads the rows of its ticket on each reported commit and at
//!   least every [`REPLY_POLL`], in the order
//!   they arrived, until its timeout or limit, then deletes them. A cast has no ticket and
//!   gets no row.
//!
//! A command row is kept a minute past its expiry, a reply row a minute past its command's,
//! and neither table holds more than [`KEPT_ROWS`] rows: each broadcast prunes both, so the
//! file does not grow with Flower's polls. The worker's poller runs wherever
//! [`Broker::control_requests`](crate::broker::Broker::control_requests) is called — the
//! worker's control plane, so a busy worker still answers at once.

use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, params};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::broker::{BrokerError, ControlBroadcast, ControlReply, ControlRequest};
use crate::db::{Db, PollEvery, now_ms};
use crate::protocol::{ControlCommand, ControlReplyTo};

/// The tables, created with the broker's schema.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS control_commands (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    body    BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS control_replies (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    ticket  TEXT    NOT NULL,
    node    TEXT    NOT NULL,
    body    BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS control_replies_ticket ON control_replies (ticket, seq);
";

/// How often a worker looks for new commands when nothing wakes it (see [`PollEvery`]).
pub(super) const COMMAND_POLL: PollEvery = PollEvery {
    unwatched: Duration::from_millis(50),
    watched: Duration::from_millis(1_000),
};

/// How often a client looks for replies to its command.
pub(super) const REPLY_POLL: Duration = Duration::from_millis(20);

/// Where the file's watcher reports commits ([`Db::changed`]), a worker looks for commands
/// at once rather than at its next poll, but at most this often: on a busy file commits come
/// by the thousand a second and each look is a query on the database thread.
const COMMAND_LOOK_SPACING: Duration = Duration::from_millis(2);

/// How long a row is kept past its expiry (a reply row: past its command's).
const KEPT_PAST_EXPIRY_MS: i64 = 60_000;

/// Most rows each table keeps, whatever their expiry.
const KEPT_ROWS: i64 = 10_000;

/// Most command rows a worker reads in one poll.
const BATCH: i64 = 256;

/// The exchange named in `reply_to`: Celery's, though replies travel in `control_replies`
/// here (a command needs a `reply_to` to ask for replies at all).
const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// A command row as read, before it is understood.
#[derive(Debug)]
struct CommandRow {
    seq: i64,
    /// Unix milliseconds; 0 or less: never.
    expires: i64,
    /// `None` when the column holds neither text nor a blob.
    body: Option<Vec<u8>>,
}

/// What a worker does with a command row.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Run it: it is for this node and still fresh.
    Run(ControlCommand),
    /// Not for this node, or expired: nothing to do.
    Skip,
    /// Cannot be read: warn and go on.
    Malformed(String),
}

impl CommandRow {
    /// Reads one row of `control_commands`, whatever its columns hold.
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let expires = match row.get_ref(1)? {
            ValueRef::Integer(ms) => ms,
            ValueRef::Real(ms) => ms as i64,
            _ => 0,
        };
        let body = match row.get_ref(2)? {
            ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Some(bytes.to_vec()),
            _ => None,
        };
        Ok(Self {
            seq: row.get(0)?,
            expires,
            body,
        })
    }

    /// Whether worker `node` runs this row at `now` (Unix milliseconds).
    fn verdict(&self, node: &str, now: i64) -> Verdict {
        let Some(body) = &self.body else {
            return Verdict::Malformed("the body is neither text nor bytes".into());
        };
        let command = match ControlCommand::parse(body) {
            Ok(command) => command,
            Err(error) => return Verdict::Malformed(error.to_string()),
        };
        if !command.is_for(node) || (self.expires > 0 && self.expires < now) {
            return Verdict::Skip;
        }
        Verdict::Run(command)
    }
}

/// Appends `command` to be run until `expires`, and prunes both tables; returns its seq.
fn insert_command(conn: &Connection, body: &[u8], now: i64, expires: i64) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO control_commands (at, expires, body) VALUES (?1, ?2, ?3)")?
        .execute(params![now, expires, body])?;
    let seq = conn.last_insert_rowid();
    prune(conn, now)?;
    Ok(seq)
}

/// Deletes the rows nobody waits for any more: a minute past their expiry, or beyond the
/// newest [`KEPT_ROWS`].
fn prune(conn: &Connection, now: i64) -> rusqlite::Result<()> {
    let oldest = now - KEPT_PAST_EXPIRY_MS;
    for table in ["control_commands", "control_replies"] {
        conn.prepare_cached(&format!(
            "DELETE FROM {table} WHERE expires < ?1
                 OR seq <= (SELECT COALESCE(MAX(seq), 0) FROM {table}) - ?2"
        ))?
        .execute(params![oldest, KEPT_ROWS])?;
    }
    Ok(())
}

/// The command rows after `after`, oldest first.
fn commands_after(conn: &Connection, after: i64) -> rusqlite::Result<Vec<CommandRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, expires, body FROM control_commands WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, BATCH], CommandRow::read)?;
    rows.collect()
}

/// Appends `node`'s reply to the command of `ticket`.
fn insert_reply(
    conn: &Connection,
    ticket: &str,
    node: &str,
    reply: &Value,
    expires: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO control_replies (at, expires, ticket, node, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        now_ms(),
        expires,
        ticket,
        node,
        serde_json::to_vec(reply).unwrap_or_default()
    ])
}

/// The replies to `ticket` after seq `after`, oldest first, with the newest seq read (a
/// reply that is not JSON is skipped).
fn replies_after(
    conn: &Connection,
    ticket: &str,
    after: i64,
) -> rusqlite::Result<(i64, Vec<ControlReply>)> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, node, body FROM control_replies WHERE ticket = ?1 AND seq > ?2 ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![ticket, after])?;
    let (mut newest, mut replies) = (after, Vec::new());
    while let Some(row) = rows.next()? {
        newest = row.get(0)?;
        let body = match row.get_ref(2)? {
            ValueRef::Blob(bytes) | ValueRef::Text(bytes) => bytes,
            _ => continue,
        };
        if let Ok(reply) = serde_json::from_slice::<Value>(body) {
            replies.push(ControlReply {
                node: row.get(1)?,
                reply,
            });
        }
    }
    Ok((newest, replies))
}

/// The commands for worker `node` appended from now on, until the receiver is dropped (see
/// [`crate::broker::Broker::control_requests`]). The newest row is read before this
/// returns, so a command appended afterwards reaches the worker.
pub(super) async fn listen(
    db: &Db,
    node: &str,
) -> Result<mpsc::Receiver<ControlRequest>, BrokerError> {
    let after: i64 = db
        .run(|conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM control_commands",
                [],
                |r| r.get(0),
            )
        })
        .await?;
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(serve(db.clone(), node.to_owned(), after, sender));
    Ok(receiver)
}

/// Polls the commands after `after`, hands those for `node` to `sender` and writes their
/// replies, until the receiver is dropped.
async fn serve(db: Db, node: String, mut after: i64, sender: mpsc::Sender<ControlRequest>) {
    loop {
        // Registered before the read, so a command committed meanwhile is not missed.
        let committed = db.watch_commits();
        let seen = after;
        match db.read(move |conn| commands_after(conn, seen)).await {
            Ok(rows) => {
                let now = now_ms();
                for row in rows {
                    after = row.seq;
                    let command = match row.verdict(&node, now) {
                        Verdict::Run(command) => command,
                        Verdict::Skip => continue,
                        Verdict::Malformed(error) => {
                            tracing::warn!(seq = row.seq, %error,
                                "remote control: ignoring a malformed command");
                            continue;
                        }
                    };
                    tracing::debug!(method = %command.method, "remote control command");
                    let reply = match (&command.ticket, &command.reply_to) {
                        (Some(ticket), Some(_)) => {
                            let (reply, answer) = oneshot::channel();
                            tokio::spawn(send_reply(
                                db.clone(),
                                answer,
                                ticket.clone(),
                                node.clone(),
                                row.expires,
                            ));
                            Some(reply)
                        }
                        _ => None,
                    };
                    if sender
                        .send(ControlRequest { command, reply })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "remote control: cannot read commands"),
        }
        tokio::select! {
            () = committed.wait(COMMAND_POLL, COMMAND_LOOK_SPACING) => {}
            () = sender.closed() => return,
        }
    }
}

/// Waits for the worker's answer and appends it; nothing when the worker drops the answer
/// (e.g. `shutdown`).
async fn send_reply(
    db: Db,
    answer: oneshot::Receiver<Value>,
    ticket: String,
    node: String,
    expires: i64,
) {
    let Ok(reply) = answer.await else {
        return;
    };
    let written = db
        .run(move |conn| insert_reply(conn, &ticket, &node, &reply, expires))
        .await;
    if let Err(error) = written {
        tracing::warn!(%error, "remote control: cannot send a reply");
    }
}

/// Appends `broadcast`'s command with a fresh ticket and collects the replies to it (see
/// [`crate::broker::Broker::broadcast_control`]).
pub(super) async fn broadcast(
    db: &Db,
    broadcast: &ControlBroadcast,
) -> Result<Vec<ControlReply>, BrokerError> {
    let mut command = broadcast.command.clone();
    let ticket = broadcast.reply.then(|| uuid::Uuid::new_v4().to_string());
    command.ticket.clone_from(&ticket);
    command.reply_to = ticket.as_ref().map(|ticket| ControlReplyTo {
        exchange: REPLY_EXCHANGE.to_owned(),
        routing_key: ticket.clone(),
    });
    let body = command.body();
    let now = now_ms();
    let expires = now
        .saturating_add(i64::try_from(broadcast.timeout.as_millis()).unwrap_or(i64::MAX / 2))
        .max(now + 1);
    db.run(move |conn| insert_command(conn, &body, now, expires))
        .await?;
    let Some(ticket) = ticket else {
        return Ok(Vec::new());
    };
    let collected = collect(db, &ticket, broadcast.timeout, broadcast.limit).await;
    let done = ticket.clone();
    // The replies are read; late ones are pruned with the next broadcast.
    let _ = db
        .run(move |conn| {
            conn.prepare_cached("DELETE FROM control_replies WHERE ticket = ?1")?
                .execute(params![done])
        })
        .await;
    collected
}

/// The replies to `ticket` that arrive within `timeout`, stopping at `limit` nodes.
async fn collect(
    db: &Db,
    ticket: &str,
    timeout: Duration,
    limit: Option<usize>,
) -> Result<Vec<ControlReply>, BrokerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut after, mut replies) = (0_i64, Vec::new());
    // A reply committed by a worker in another process wakes this wait at once where the
    // file has a watcher; otherwise (or should a wake-up be missed) the poll finds it. Each
    // wait is registered before the read that precedes it, so no commit falls in between.
    let watch = || {
        let mut committed = Box::pin(db.changed().notified());
        committed.as_mut().enable();
        committed
    };
    let mut committed = watch();
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(REPLY_POLL.min(deadline - now)) => {}
            () = &mut committed => {}
        }
        committed = watch();
        let (seen, owned) = (after, ticket.to_owned());
        let (newest, more) = db
            .read(move |conn| replies_after(conn, &owned, seen))
            .await?;
        after = newest;
        replies.extend(more);
        if limit.is_some_and(|limit| replies.len() >= limit) {
            break;
        }
    }
    if let Some(limit) = limit {
        replies.truncate(limit);
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    fn ping(destination: Option<Vec<String>>) -> Vec<u8> {
        ControlCommand::new("ping", Map::new(), destination).body()
    }

    #[test]
    fn expired_rows_and_rows_beyond_the_cap_are_pruned() {
        let conn = conn();
        let now = 1_000_000_000;
        let then = now - 180_000;
        // Written three minutes ago: one expiring two minutes ago, one a second ago.
        insert_command(&conn, &ping(None), then, now - 120_000).unwrap();
        insert_command(&conn, &ping(None), then, now - 1_000).unwrap();
        assert_eq!(count(&conn, "control_commands"), 2, "pruned too early");
        insert_reply(&conn, "old", "w@h", &json!("pong"), now - 120_000).unwrap();
        insert_reply(&conn, "recent", "w@h", &json!("pong"), now - 1_000).unwrap();
        // A broadcast now drops what expired more than a minute ago, in both tables.
        insert_command(&conn, &ping(None), now, now + 1_000).unwrap();
        let expiries: Vec<i64> = conn
            .prepare("SELECT expires FROM control_commands ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(expiries, [now - 1_000, now + 1_000]);
        assert_eq!(replies_after(&conn, "recent", 0).unwrap().1.len(), 1);
        assert!(replies_after(&conn, "old", 0).unwrap().1.is_empty());

        // The cap: only the newest KEPT_ROWS stay, however fresh.
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO control_commands (at, expires, body) SELECT ?2, ?3, 'x' FROM n",
            params![KEPT_ROWS + 5, now, now + 60_000],
        )
        .unwrap();
        let newest = insert_command(&conn, &ping(None), now, now + 60_000).unwrap();
        assert_eq!(count(&conn, "control_commands"), KEPT_ROWS);
        let oldest: i64 = conn
            .query_row("SELECT MIN(seq) FROM control_commands", [], |r| r.get(0))
            .unwrap();
        assert_eq!(newest - oldest + 1, KEPT_ROWS);
    }

    #[test]
    fn a_client_reads_only_its_own_tickets_replies_in_arrival_order() {
        let conn = conn();
        insert_reply(&conn, "mine", "b@h", &json!({"ok": "pong"}), i64::MAX).unwrap();
        insert_reply(&conn, "other", "c@h", &json!({"ok": "pong"}), i64::MAX).unwrap();
        insert_reply(&conn, "mine", "a@h", &json!({"ok": "pong"}), i64::MAX).unwrap();
        let (newest, replies) = replies_after(&conn, "mine", 0).unwrap();
        let nodes: Vec<&str> = replies.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, ["b@h", "a@h"]);
        assert_eq!(replies[0].reply, json!({"ok": "pong"}));
        // Read again from the newest seen: nothing new, until another reply arrives.
        assert!(replies_after(&conn, "mine", newest).unwrap().1.is_empty());
        conn.execute(
            "INSERT INTO control_replies (at, expires, ticket, node, body)
             VALUES (0, 0, 'mine', 'bad@h', 'not json')",
            [],
        )
        .unwrap();
        insert_reply(&conn, "mine", "d@h", &json!(1), i64::MAX).unwrap();
        let (_, later) = replies_after(&conn, "mine", newest).unwrap();
        assert_eq!(
            later,
            [ControlReply {
                node: "d@h".into(),
                reply: json!(1)
            }]
        );
    }

    #[test]
    fn workers_run_fresh_rows_addressed_to_them_and_skip_the_rest() {
        let row = |expires, body: Option<&[u8]>| CommandRow {
            seq: 1,
            expires,
            body: body.map(<[u8]>::to_vec),
        };
        let now = 1_000;
        let to_a = ping(Some(vec!["a@h".into()]));
        assert!(matches!(
            row(now + 1, Some(&to_a)).verdict("a@h", now),
            Verdict::Run(_)
        ));
        assert_eq!(row(now + 1, Some(&to_a)).verdict("b@h", now), Verdict::Skip);
        assert_eq!(
            row(now - 1, Some(&to_a)).verdict("a@h", now),
            Verdict::Skip,
            "expired"
        );
        assert!(
            matches!(row(0, Some(&to_a)).verdict("a@h", now), Verdict::Run(_)),
            "0: never"
        );
        assert!(matches!(
            row(now, Some(b"{nope")).verdict("a@h", now),
            Verdict::Malformed(_)
        ));
        assert!(matches!(
            row(now, None).verdict("a@h", now),
            Verdict::Malformed(_)
        ));

        // Whatever the columns hold, reading the rows does not fail.
        let conn = conn();
        conn.execute_batch(
            "INSERT INTO control_commands (at, expires, body) VALUES (0, 'soon', 42);
             INSERT INTO control_commands (at, expires, body) VALUES (0, 1.5, 'not json');",
        )
        .unwrap();
        insert_command(&conn, &to_a, 0, 0).unwrap();
        let rows = commands_after(&conn, 0).unwrap();
        let verdicts: Vec<Verdict> = rows.iter().map(|r| r.verdict("a@h", now)).collect();
        assert!(matches!(verdicts[0], Verdict::Malformed(_)), "{verdicts:?}");
        assert!(matches!(verdicts[1], Verdict::Malformed(_)), "{verdicts:?}");
        assert!(matches!(verdicts[2], Verdict::Run(_)), "{verdicts:?}");
    }
}
