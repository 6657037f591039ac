//! The embedded database file shared by the embedded broker and result backend.
//!
//! Each file is served in this process by **one connection on one dedicated thread**, shared
//! by every broker and backend opened on it (two connections of one process would only
//! fight over SQLite's write lock). Statements are sent to the thread as jobs; the thread
//! runs every job waiting at that moment inside one `BEGIN IMMEDIATE … COMMIT` (group
//! commit), each job in its own savepoint so one failing job does not undo the others, and
//! answers the callers only after the commit — so "stored, then acked" holds. Under load
//! this turns hundreds of tiny transactions into a few large ones; idle, a job costs one
//! thread hand-off.
//!
//! Several processes share a file through SQLite itself: WAL mode and a busy timeout.
//!
//! **Other processes' commits wake this one.** After each commit that changed rows, the database
//! thread writes one byte into a doorbell file beside the database (`<file>-wake`, never
//! read). A watch on the doorbell (inotify on Linux, through the `notify` crate) sees that
//! write and wakes whoever waits on [`Db::changed`]: an idle consumer looking for messages,
//! a client waiting for a result. So a task sent from another process is found within a
//! kernel wake-up, not a polling period. (The write-ahead log itself would do as a doorbell,
//! but it is written *during* a commit, and a reader woken by its first page reads too soon.)
//! SQLite stays the only source of truth: a wake-up only means "look again", and waiters
//! still poll (more slowly) in case one is missed or the platform has no watcher.
//!
//! **Checkpoints run beside the commits, not inside them.** SQLite's default copies the
//! write-ahead log back into the database (and syncs both files) inside whichever commit
//! pushes the log past 1,000 pages, so one caller in a few hundred waits for two `fsync`s —
//! milliseconds on a VM disk, and exactly the tail a latency probe sees. Here the database
//! thread only notices the log's size (SQLite's WAL hook, after each commit) and wakes a
//! checkpointer thread with a connection of its own, which runs a `PASSIVE` checkpoint:
//! it copies what it can, and syncs, without waiting for or blocking the writer. A sparse
//! writer (a latency probe, a client) never waits for a checkpoint at all. A writer that never
//! pauses keeps appending while a passive checkpoint runs, so the log is never wholly copied
//! and never starts over; once it passes [`CHECKPOINT_CATCH_UP_PAGES`], the checkpointer
//! follows its passive pass with a `FULL` one, which holds the writer only while it copies
//! the few pages written during the passive pass, so the next commit starts the log over.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// How long a transaction waits for another process's write lock before failing (see
/// [`wait_for_lock`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;

/// Log pages after which the checkpointer is woken (SQLite's own auto-checkpoint threshold).
const CHECKPOINT_PAGES: i32 = 1_000;

/// Log pages (4 KiB each: 16 MiB) past which a passive checkpoint that could not copy the
/// whole log is followed by a `FULL` one (see the module's note), so a writer that never
/// pauses cannot grow the log without bound.
const CHECKPOINT_CATCH_UP_PAGES: i32 = 4_000;

/// The size the log file is cut back to when it restarts (SQLite's `journal_size_limit`).
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// Errors from the embedded database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite reported an error.
    #[error("embedded database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database folder cannot be created.
    #[error("cannot create {path}")]
    Folder {
        /// The folder.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A task waiting on the database panicked or was cancelled.
    #[error("embedded database task failed: {0}")]
    Task(String),
    /// The database thread is gone.
    #[error("embedded database {0}: its thread has stopped")]
    Stopped(String),
}

impl DbError {
    /// True when retrying later may succeed: another process held SQLite's write lock past
    /// the busy timeout. A missing folder, a stopped database thread or a failing statement
    /// stay as they are.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            DbError::Folder { .. } | DbError::Task(_) | DbError::Stopped(_) => false,
        }
    }
}

/// A job's statement: runs it, reports whether it succeeded, and returns what to do once the
/// batch's commit is known.
type Statement = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;

/// A job for the database thread.
struct Job {
    run: Statement,
    /// False for a job that only reads ([`Db::read`]): a batch of such jobs runs in a read
    /// transaction, which takes no lock another process's writer waits for.
    writes: bool,
}

/// Delivers a job's result; the argument is the commit error, if the commit failed.
type Completion = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

struct Inner {
    jobs: mpsc::UnboundedSender<Job>,
    path: PathBuf,
    changes: Changes,
}

/// Rung after each commit that wrote: one byte written in place into `<file>-wake`, which
/// [`Changes`] watches. `None` where the file cannot be opened (then nobody is woken, and
/// other processes find this one's commits by polling).
struct Doorbell(Option<std::fs::File>);

impl Doorbell {
    fn path(database: &Path) -> PathBuf {
        let mut path = database.as_os_str().to_os_string();
        path.push("-wake");
        PathBuf::from(path)
    }

    fn open(database: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::path(database));
        Self(file.ok())
    }

    fn ring(&self) {
        #[cfg(unix)]
        if let Some(file) = &self.0 {
            use std::os::unix::fs::FileExt;
            let _ = file.write_at(&[1], 0);
        }
    }
}

/// Commits to one file reported by its doorbell, by this process or any other.
struct Changes {
    /// Woken (every waiter) each time the kernel reports writes to the log.
    notify: Arc<tokio::sync::Notify>,
    /// Keeps the watch alive; `None` where no watch could be set up (or it was turned off).
    watcher: Option<notify::RecommendedWatcher>,
}

impl Changes {
    /// Watches the doorbell of the database at `path` (which [`Doorbell::open`] created).
    fn watch(path: &Path) -> Self {
        use notify::Watcher;
        let notify = Arc::new(tokio::sync::Notify::new());
        // Off Unix the doorbell is not rung (see `Doorbell::ring`): poll at the old pace.
        if !cfg!(unix) || !watch_new_files().load(std::sync::atomic::Ordering::SeqCst) {
            return Self {
                notify,
                watcher: None,
            };
        }
        let doorbell = Doorbell::path(path);
        let wake = Arc::clone(&notify);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|event| matches!(event.kind, notify::EventKind::Modify(_))) {
                wake.notify_waiters();
            }
        })
        .and_then(|mut watcher| {
            watcher
                .watch(&doorbell, notify::RecursiveMode::NonRecursive)
                .map(|()| watcher)
        });
        match watcher {
            Ok(watcher) => Self {
                notify,
                watcher: Some(watcher),
            },
            Err(error) => {
                tracing::debug!(
                    path = %path.display(),
                    %error,
                    "no watcher on the database file: other processes' commits are found by polling"
                );
                Self {
                    notify,
                    watcher: None,
                }
            }
        }
    }
}

/// Whether files opened from now on get a watcher (see [`watch_files_opened_from_now`]).
static WATCH_NEW_FILES: std::sync::OnceLock<std::sync::atomic::AtomicBool> =
    std::sync::OnceLock::new();

fn watch_new_files() -> &'static std::sync::atomic::AtomicBool {
    WATCH_NEW_FILES.get_or_init(|| {
        // `WASMQ_SQLITE_WATCH=off`: no watcher, other processes' commits found by polling
        // only (the behaviour before watchers; for comparisons and odd filesystems).
        let off = std::env::var("WASMQ_SQLITE_WATCH").is_ok_and(|v| v == "off" || v == "0");
        std::sync::atomic::AtomicBool::new(!off)
    })
}

/// Whether the files this process opens from now on watch for other processes' commits
/// (the default, unless `WASMQ_SQLITE_WATCH=off`). A file already open keeps what it had.
/// For a side-by-side benchmark of both ways in one process.
pub(crate) fn watch_files_opened_from_now(watch: bool) {
    watch_new_files().store(watch, std::sync::atomic::Ordering::SeqCst);
}

/// The process's open database files, so every opener of a file shares one thread.
static OPEN: Mutex<Option<HashMap<PathBuf, Weak<Inner>>>> = Mutex::new(None);

/// A handle on one database file, used from async code. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection, DbError> {
    let wrap = |source| DbError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let mut conn = Connection::open(path).map_err(wrap)?;
    conn.busy_handler(Some(wait_for_lock)).map_err(wrap)?;
    // WAL lets readers and one writer work at once across processes; NORMAL sync is
    // durable across process crashes (only an OS crash can lose the last commits).
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(wrap)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(wrap)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(wrap)?;
    Ok(conn)
}

/// SQLite's busy handler: whether to try again for a lock another process holds, after a
/// pause. SQLite's own (`busy_timeout`) first sleeps a whole millisecond, and another
/// process's commit usually takes tens of microseconds, so a waiter would sleep far past the
/// moment the lock is free: the delay every cross-process round trip paid. This one checks
/// every 20 µs for the first millisecond, every 100 µs up to 10 ms, then every millisecond,
/// and gives up after [`BUSY_TIMEOUT`] in all.
fn wait_for_lock(attempt: i32) -> bool {
    const FAST: i32 = 50; // 50 × 20 µs = 1 ms
    const MEDIUM: i32 = FAST + 90; // + 90 × 100 µs = 10 ms
    let slow_ms = i32::try_from(BUSY_TIMEOUT.as_millis()).unwrap_or(i32::MAX) - 10;
    let pause = match attempt {
        a if a < FAST => Duration::from_micros(20),
        a if a < MEDIUM => Duration::from_micros(100),
        a if a < MEDIUM + slow_ms => Duration::from_millis(1),
        _ => return false,
    };
    std::thread::sleep(pause);
    true
}

/// Opens the connection the database thread writes with: SQLite's inline auto-checkpoint
/// replaced by a hook that wakes a checkpointer thread (see the module's note). The
/// checkpointer stops when this connection is dropped.
fn open_writer(path: &Path) -> Result<Connection, DbError> {
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

/// The database thread: runs waiting jobs in one transaction, answers after the commit.
fn serve(conn: Connection, doorbell: Doorbell, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Only a batch that writes takes the write lock (at once, so it cannot fail half
        // way on another process's lock); a batch of reads reads one snapshot of the log.
        let writes = batch.iter().any(|job| job.writes);
        // The doorbell rings only for a batch that changed rows: a lease of an empty queue
        // writes nothing, and ringing for it would wake its own consumer for ever.
        let changes_before = conn.total_changes();
        let begin = if writes {
            "BEGIN IMMEDIATE"
        } else {
            "BEGIN DEFERRED"
        };
        if conn.execute_batch(begin).is_err() {
            // Could not start a transaction (e.g. the lock stayed busy): run each job on
            // its own, in autocommit mode.
            for job in batch {
                let (_, done) = (job.run)(&conn);
                done(None);
            }
            if conn.total_changes() != changes_before {
                doorbell.ring();
            }
            continue;
        }
        let mut completions = Vec::with_capacity(batch.len());
        if batch.len() == 1 {
            // Alone in its transaction: no savepoint needed.
            for job in batch {
                let (ok, done) = (job.run)(&conn);
                if !ok {
                    let _ = conn.execute_batch("ROLLBACK");
                    done(None);
                    continue;
                }
                completions.push(done);
            }
            if completions.is_empty() {
                continue;
            }
        } else {
            for job in batch {
                let _ = conn.execute_batch("SAVEPOINT job");
                let (ok, done) = (job.run)(&conn);
                let _ = conn.execute_batch(if ok {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                });
                completions.push(done);
            }
        }
        let commit = conn.execute_batch("COMMIT");
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        } else if conn.total_changes() != changes_before {
            doorbell.ring();
        }
        for done in completions {
            done(commit.as_ref().err());
        }
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path` and runs `schema`.
    pub(crate) fn open(path: &Path, schema: &'static str) -> Result<Self, DbError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| DbError::Folder {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let key = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .and_then(|p| p.canonicalize().ok())
            .and_then(|dir| path.file_name().map(|name| dir.join(name)))
            .unwrap_or_else(|| path.to_path_buf());
        let mut open = OPEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let files = open.get_or_insert_with(HashMap::new);
        files.retain(|_, inner| inner.strong_count() > 0);
        let inner = match files.get(&key).and_then(Weak::upgrade) {
            Some(inner) => inner,
            None => {
                let conn = open_writer(path)?;
                let doorbell = Doorbell::open(path);
                let (jobs, receiver) = mpsc::unbounded_channel();
                std::thread::Builder::new()
                    .name("wasmq-sqlite".into())
                    .spawn(move || serve(conn, doorbell, receiver))
                    .map_err(|source| DbError::Folder {
                        path: format!("{} (database thread)", path.display()),
                        source,
                    })?;
                let inner = Arc::new(Inner {
                    jobs,
                    path: path.to_path_buf(),
                    changes: Changes::watch(path),
                });
                files.insert(key, Arc::downgrade(&inner));
                inner
            }
        };
        drop(open);
        // The schema is applied on a short-lived connection of its own: opening is
        // synchronous and may happen inside an async context.
        let wrap = |source| DbError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        open_connection(path)?.execute_batch(schema).map_err(wrap)?;
        Ok(Self { inner })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Woken (every waiter at that moment) after a commit to this file by any process, as
    /// the kernel reports writes to its log. Enable a `notified()` future before reading, as
    /// with any [`tokio::sync::Notify`], so a commit between the read and the wait is not
    /// missed. Never woken where [`Db::sees_commits`] is false.
    pub(crate) fn changed(&self) -> &tokio::sync::Notify {
        &self.inner.changes.notify
    }

    /// True when other processes' commits wake [`Db::changed`]; false where the platform
    /// gave no file watcher, and waiters must poll at their old pace.
    pub(crate) fn sees_commits(&self) -> bool {
        self.inner.changes.watcher.is_some()
    }

    /// Starts watching for the next commit to this file: call it *before* reading a table
    /// that other processes append to, then [`CommitWatch::wait`] after the read, so a row
    /// committed in between is not missed.
    pub(crate) fn watch_commits(&self) -> CommitWatch<'_> {
        let mut committed = Box::pin(self.changed().notified());
        committed.as_mut().enable();
        CommitWatch {
            committed,
            watched: self.sees_commits(),
        }
    }

    fn submit<T, F>(
        &self,
        writes: bool,
        f: F,
    ) -> Result<oneshot::Receiver<Result<T, DbError>>, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let path = self.inner.path.display().to_string();
        let run: Statement = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let done: Completion = Box::new(move |commit_error| {
                let outcome = match (result, commit_error) {
                    (Ok(_), Some(error)) => Err(DbError::Sqlite {
                        path,
                        source: rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                            Some(format!("commit failed: {error}")),
                        ),
                    }),
                    (Ok(value), None) => Ok(value),
                    (Err(source), _) => Err(DbError::Sqlite { path, source }),
                };
                let _ = reply.send(outcome);
            });
            (ok, done)
        });
        self.inner
            .jobs
            .send(Job { run, writes })
            .map_err(|_| DbError::Stopped(self.inner.path.display().to_string()))?;
        Ok(answer)
    }

    /// Runs `f` on the database thread; resolves after its transaction committed.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.submit(true, f)?
            .await
            .map_err(|_| DbError::Stopped(self.inner.path.display().to_string()))?
    }

    /// Runs `f`, which only reads, on the database thread. Alone or with other reads it runs
    /// in a read transaction, so it neither waits for nor holds up another process's writer
    /// (a result poll, a table poller); batched with writes it shares their transaction.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.submit(false, f)?
            .await
            .map_err(|_| DbError::Stopped(self.inner.path.display().to_string()))?
    }
}

/// How often a poller looks at a table when nothing wakes it: `unwatched` where the file has
/// no watcher (the only way to see other processes' rows), `watched` where it has one (the
/// fallback should a wake-up be missed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollEvery {
    /// Without a watcher.
    pub(crate) unwatched: Duration,
    /// With a watcher.
    pub(crate) watched: Duration,
}

/// A registered wait for the next commit to a file (see [`Db::watch_commits`]).
pub(crate) struct CommitWatch<'a> {
    committed: std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>,
    watched: bool,
}

impl CommitWatch<'_> {
    /// Returns at the next commit reported since the watch began (then after `spacing`, so a
    /// file committed to thousands of times a second is not read as often), or after the
    /// poll period of `every`, whichever comes first.
    pub(crate) async fn wait(self, every: PollEvery, spacing: Duration) {
        let period = if self.watched {
            every.watched
        } else {
            every.unwatched
        };
        let committed = async {
            self.committed.await;
            tokio::time::sleep(spacing).await;
        };
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = committed => {}
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Parses `sqlite://PATH` (`sqlite:///abs/path` or `sqlite://relative/path`).
pub(crate) fn parse_url(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://")?;
    (!path.is_empty()).then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::Db;
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
