//! Which queues exist in an embedded file. A queue needs no row to be used, but the file
//! remembers which queues were declared, in its `queues` table, as RabbitMQ holds them in a
//! vhost:
//!
//! * a queue is declared by any consumer of it (every worker on the file declares the
//!   queues it consumes, whether or not they hold anything yet) and by any publish that may
//!   declare ([`Broker::publish`]: a client's send, the implicit tenant's worker) — both
//!   declare on RabbitMQ too;
//! * [`Broker::delete_queue`] undeclares it;
//! * a queue also exists while it holds messages, so files written before queues were
//!   recorded keep working (their consumers declare their queues when they start).
//!
//! [`Broker::publish_existing`] — a tenant's follow-ups, in the tenant's own file —
//! publishes only into a queue that exists by this rule, looked up in the same transaction
//! as the insert. A signature naming a queue of another tenant's file (or no one's)
//! therefore fails with [`BrokerError::QueueNotFound`] instead of creating a queue nobody
//! consumes, while a queue of the tenant's own that another worker consumes, or its clients
//! send to, is reached as before. Existence is what the file says, never what this process
//! remembers: a broker remembers only what it declared itself, to declare each queue once.
//!
//! [`Broker::publish`]: crate::broker::Broker::publish
//! [`Broker::delete_queue`]: crate::broker::Broker::delete_queue
//! [`Broker::publish_existing`]: crate::broker::Broker::publish_existing

use std::collections::HashSet;

use rusqlite::{Connection, params};

use super::SqliteBroker;
use crate::broker::BrokerError;
use crate::db::now_ms;

impl SqliteBroker {
    /// Declares `queues` in the file, those this broker has not declared yet.
    pub(super) async fn declare_queues(&self, queues: &[String]) -> Result<(), BrokerError> {
        let new: Vec<String> = {
            let declared = self.declared();
            queues
                .iter()
                .filter(|queue| !declared.contains(*queue))
                .cloned()
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let names = new.clone();
        self.db
            .run(move |conn| {
                let now = now_ms();
                for name in &names {
                    declare(conn, name, now)?;
                }
                Ok(())
            })
            .await?;
        self.declared().extend(new);
        Ok(())
    }

    /// The queues this broker has declared in the file.
    pub(super) fn declared(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Records queue `name` as declared (once).
pub(super) fn declare(conn: &Connection, name: &str, now: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached("INSERT OR IGNORE INTO queues (name, declared_at) VALUES (?1, ?2)")?
        .execute(params![name, now])
}

/// Whether queue `name` exists in the file: declared, or holding messages.
pub(super) fn exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM queues WHERE name = ?1)
             OR EXISTS (SELECT 1 FROM messages WHERE queue = ?1)",
    )?
    .query_row(params![name], |r| r.get(0))
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;
    use crate::broker::Broker;
    use crate::broker::embedded::SqliteBrokerOptions;
    use crate::protocol::{Envelope, TaskMessage};

    fn envelope() -> Envelope {
        TaskMessage::new("math.add", vec![1.into(), 2.into()], Map::new()).encode()
    }

    fn open(dir: &tempfile::TempDir) -> SqliteBroker {
        SqliteBroker::open(&dir.path().join("a.db"), SqliteBrokerOptions::default()).unwrap()
    }

    fn missing(result: Result<(), BrokerError>, queue: &str) -> bool {
        matches!(result, Err(BrokerError::QueueNotFound { queue: q }) if q == queue)
    }

    #[tokio::test]
    async fn a_queue_nobody_declared_takes_no_follow_up() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(&dir);
        assert!(!broker.queue_exists("work-b").await.unwrap());
        let refused = broker.publish_existing("work-b", &envelope(), None).await;
        assert!(missing(refused, "work-b"));
        assert_eq!(broker.queue_length("work-b").await.unwrap(), 0);
        assert!(
            !broker.queue_exists("work-b").await.unwrap(),
            "a refused publish declares nothing"
        );
    }

    #[tokio::test]
    async fn consumers_and_declaring_publishes_declare_their_queues() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(&dir);
        // Consumed, still empty: it exists.
        let mut consumer = broker.consume(&["work-a".into()], 1).await.unwrap();
        assert!(broker.queue_exists("work-a").await.unwrap());
        broker
            .publish_existing("work-a", &envelope(), None)
            .await
            .unwrap();
        consumer.close().await;
        // Sent to by a client: it exists, for any broker on the file.
        broker.publish("side", &envelope(), None).await.unwrap();
        let other = open(&dir);
        assert!(other.queue_exists("side").await.unwrap());
        other
            .publish_existing("side", &envelope(), Some(std::time::Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(broker.queue_length("side").await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_deleted_queue_is_gone_and_a_queue_with_messages_exists() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(&dir);
        broker.publish("side", &envelope(), None).await.unwrap();
        broker.delete_queue("side").await.unwrap();
        assert!(!broker.queue_exists("side").await.unwrap());
        assert!(missing(
            broker.publish_existing("side", &envelope(), None).await,
            "side"
        ));
        // Declared again by the next declaring publish.
        broker.publish("side", &envelope(), None).await.unwrap();
        assert!(broker.queue_exists("side").await.unwrap());
        // A file written before queues were recorded: its messages say the queue exists.
        broker
            .db
            .run(|conn| conn.execute("DELETE FROM queues", []))
            .await
            .unwrap();
        assert!(broker.queue_exists("side").await.unwrap());
        broker
            .publish_existing("side", &envelope(), None)
            .await
            .unwrap();
    }
}
