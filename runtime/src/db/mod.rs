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
//! Several processes share a file through SQLite itself: WAL mode and a busy handler
//! ([`wait_for_lock`]).
//!
//! Two neighbours of that thread have files of their own: `doorbell` (how other processes'
//! commits wake this one) and `checkpoint` (copying the write-ahead log back, beside the
//! commits rather than inside them).

mod checkpoint;
mod doorbell;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use self::checkpoint::{JOURNAL_SIZE_LIMIT, open_writer};
use self::doorbell::{Changes, Doorbell};
pub(crate) use self::doorbell::{PollEvery, watch_files_opened_from_now};

/// How long a transaction waits for another process's write lock before failing (see
/// [`wait_for_lock`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;

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

    /// Submits `f` and waits for its answer, given after its transaction's commit.
    async fn execute<T, F>(&self, writes: bool, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.submit(writes, f)?
            .await
            .map_err(|_| DbError::Stopped(self.inner.path.display().to_string()))?
    }

    /// Runs `f` on the database thread; resolves after its transaction committed.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.execute(true, f).await
    }

    /// Submits `f` to the database thread like [`Db::run`] without waiting for it: the
    /// returned future resolves after its transaction committed (it need not be polled for
    /// `f` to run). Many such writes share one transaction (group commit).
    pub(crate) fn run_soon<T, F>(
        &self,
        f: F,
    ) -> Result<impl Future<Output = Result<T, DbError>> + Send + 'static, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let answer = self.submit(true, f)?;
        let path = self.inner.path.display().to_string();
        Ok(async move { answer.await.map_err(|_| DbError::Stopped(path))? })
    }

    /// Runs `f`, which only reads, on the database thread. Alone or with other reads it runs
    /// in a read transaction, so it neither waits for nor holds up another process's writer
    /// (a result poll, a table poller); batched with writes it shares their transaction.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.execute(false, f).await
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
