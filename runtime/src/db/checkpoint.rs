//! Checkpoints, run beside the commits rather than inside them.
//!
//! SQLite's default copies the write-ahead log back into the database (and syncs both files)
//! inside whichever commit pushes the log past 1,000 pages, so one caller in a few hundred
//! waits for two `fsync`s — milliseconds on a VM disk, and exactly the tail a latency probe
//! sees. Here the database thread only notices the log's size (SQLite's WAL hook, after each
//! commit) and wakes a checkpointer thread with a connection of its own, which runs a `PASSIVE`
//! checkpoint: it copies what it can, and syncs, without waiting for or blocking the writer. A
//! sparse writer (a latency probe, a client) never waits for a checkpoint at all. A writer that
//! never pauses keeps appending while a passive checkpoint runs, so the log is never wholly
//! copied and never starts over; once it passes [`CHECKPOINT_CATCH_UP_PAGES`], the checkpointer
//! follows its passive pass with a `FULL` one, which holds the writer only while it copies the
//! few pages written during the passive pass, so the next commit starts the log over.

use std::path::Path;

use rusqlite::Connection;

use super::{DbError, open_connection};

/// Log pages after which the checkpointer is woken (SQLite's own auto-checkpoint threshold).
const CHECKPOINT_PAGES: i32 = 1_000;

/// Log pages (4 KiB each: 16 MiB) past which a passive checkpoint that could not copy the
/// whole log is followed by a `FULL` one (see this module's note), so a writer that never
/// pauses cannot grow the log without bound.
const CHECKPOINT_CATCH_UP_PAGES: i32 = 4_000;

/// The size the log file is cut back to when it restarts (SQLite's `journal_size_limit`).
pub(super) const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// Opens the connection the database thread writes with: SQLite's inline auto-checkpoint
/// replaced by a hook that wakes a checkpointer thread (see this module's note). The
/// checkpointer stops when this connection is dropped.
pub(super) fn open_writer(path: &Path) -> Result<Connection, DbError> {
    let wrap = |source| DbError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let mut conn = open_connection(path)?;
    let checkpointer = open_connection(path)?;
    // Capacity 1: a wake-up already waiting covers every later one.
    let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("wasmq-sqlite-checkpoint".into())
        .spawn(move || checkpoint_when_woken(&checkpointer, &woken, &shown))
        .map_err(|source| DbError::Folder {
            path: format!("{} (checkpoint thread)", path.display()),
            source,
        })?;
    // Replaces SQLite's auto-checkpoint, which is itself a WAL hook.
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            let _ = wake.try_send(());
        }
        Ok(())
    }))
    .map_err(wrap)?;
    Ok(conn)
}

/// The checkpointer thread: a `PASSIVE` checkpoint each time it is woken, followed by a
/// `FULL` one when the passive pass left part of a log past [`CHECKPOINT_CATCH_UP_PAGES`].
/// Returns when the writer's connection is gone.
fn checkpoint_when_woken(conn: &Connection, woken: &std::sync::mpsc::Receiver<()>, path: &str) {
    use rusqlite::wal::CheckpointMode;
    while woken.recv().is_ok() {
        match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((log, copied)) if copied < log && log >= CHECKPOINT_CATCH_UP_PAGES => {
                if let Err(error) = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::FULL) {
                    tracing::debug!(path, %error, "catching up with the write-ahead log");
                }
            }
            Ok(_) => {}
            // Busy: another process is checkpointing this file right now, which is as good.
            Err(error) => tracing::debug!(path, %error, "checkpoint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::db::Db;
    use std::time::{Duration, Instant};

    /// With SQLite's inline auto-checkpoint replaced, the log must still be copied back into
    /// the database file — by the checkpointer thread, while the writer stays open — and a
    /// writer that never pauses must not grow the log without bound.
    #[tokio::test]
    async fn the_checkpointer_copies_the_log_into_the_database_while_the_writer_is_open() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("checkpoint.db");
        let db = Db::open(&path, "CREATE TABLE IF NOT EXISTS blobs (b BLOB)").unwrap();
        // 6,000 rows of 4 KiB, one commit each, back to back: about 75 MiB through the log
        // if it never started over.
        for _ in 0..6_000 {
            db.run(|conn| conn.execute("INSERT INTO blobs VALUES (randomblob(4096))", []))
                .await
                .unwrap();
        }
        let database_file = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        while database_file() < 8 << 20 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            database_file() >= 8 << 20,
            "the database file holds {} bytes: the log was not checkpointed",
            database_file()
        );
        let log = std::fs::metadata(folder.path().join("checkpoint.db-wal")).map_or(0, |m| m.len());
        assert!(
            log < 40 << 20,
            "the log holds {log} bytes: it never started over"
        );
    }
}
