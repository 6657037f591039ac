//! Celery's events on the embedded broker: the `events` table of the database file, one row
//! per event message as it would travel on RabbitMQ (routing key, node, JSON body). Every
//! worker on the file appends; `wasmq events` tails it. The table keeps the newest
//! [`KEPT`] messages: events are for watching now, not for history (results are).

use std::time::Duration;

use rusqlite::params;
use tokio::sync::mpsc;

use crate::broker::BrokerError;
use crate::db::{Db, PollEvery, now_ms};
use crate::protocol::events::EventMessage;

/// The table, created with the broker's schema.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    routing_key TEXT    NOT NULL,
    hostname    TEXT    NOT NULL,
    body        BLOB    NOT NULL
);
";

/// Event messages kept in the table; older ones are deleted as new ones come.
const KEPT: i64 = 100_000;

/// How often a listener looks for new rows when nothing wakes it (see [`PollEvery`]).
const POLL: PollEvery = PollEvery {
    unwatched: Duration::from_millis(100),
    watched: Duration::from_millis(1_000),
};

/// Appends `message`, dropping what falls out of the newest [`KEPT`].
pub(super) async fn publish(db: &Db, message: &EventMessage) -> Result<(), BrokerError> {
    let message = message.clone();
    db.run(move |conn| {
        conn.execute(
            "INSERT INTO events (at, routing_key, hostname, body) VALUES (?1, ?2, ?3, ?4)",
            params![
                now_ms(),
                message.routing_key,
                message.hostname,
                message.body
            ],
        )?;
        let newest = conn.last_insert_rowid();
        conn.execute("DELETE FROM events WHERE seq <= ?1", params![newest - KEPT])
    })
    .await?;
    Ok(())
}

/// The newest `backlog` event messages still kept, then those appended from now on, until
/// the receiver is dropped.
pub(super) async fn listen(
    db: &Db,
    backlog: usize,
) -> Result<mpsc::Receiver<EventMessage>, BrokerError> {
    let newest: i64 = db
        .run(|conn| conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0)))
        .await?;
    let mut after = newest
        .saturating_sub(i64::try_from(backlog).unwrap_or(i64::MAX))
        .max(0);
    let (sender, receiver) = mpsc::channel(1024);
    let db = db.clone();
    tokio::spawn(async move {
        loop {
            let committed = db.watch_commits();
            let rows = db
                .read(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "SELECT seq, routing_key, hostname, body FROM events
                         WHERE seq > ?1 ORDER BY seq LIMIT 1000",
                    )?;
                    let rows = stmt.query_map(params![after], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            EventMessage {
                                routing_key: r.get(1)?,
                                hostname: r.get(2)?,
                                body: r.get(3)?,
                            },
                        ))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await;
            match rows {
                Ok(rows) => {
                    for (seq, message) in rows {
                        after = seq;
                        if sender.send(message).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot read events"),
            }
            tokio::select! {
                () = committed.wait(POLL, super::LOOK_SPACING) => {}
                () = sender.closed() => return,
            }
        }
    });
    Ok(receiver)
}
