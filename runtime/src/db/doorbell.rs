//! The doorbell: how other processes' commits wake this one.
//!
//! After each commit that changed rows, the database thread writes one byte into a doorbell file beside the database (`<file>-wake`, never
//! read). A watch on the doorbell (inotify on Linux, through the `notify` crate) sees that
//! write and wakes whoever waits on [`Db::changed`]: an idle consumer looking for messages,
//! a client waiting for a result. So a task sent from another process is found within a
//! kernel wake-up, not a polling period. (The write-ahead log itself would do as a doorbell,
//! but it is written *during* a commit, and a reader woken by its first page reads too soon.)
//! SQLite stays the only source of truth: a wake-up only means "look again", and waiters
//! still poll (more slowly) in case one is missed or the platform has no watcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Db;

/// Rung after each commit that changed rows: one byte written in place into `<file>-wake`, which
/// [`Changes`] watches. `None` where the file cannot be opened (then nobody is woken, and
/// other processes find this one's commits by polling).
pub(super) struct Doorbell(Option<std::fs::File>);

impl Doorbell {
    fn path(database: &Path) -> PathBuf {
        let mut path = database.as_os_str().to_os_string();
        path.push("-wake");
        PathBuf::from(path)
    }

    pub(super) fn open(database: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::path(database));
        Self(file.ok())
    }

    pub(super) fn ring(&self) {
        #[cfg(unix)]
        if let Some(file) = &self.0 {
            use std::os::unix::fs::FileExt;
            let _ = file.write_at(&[1], 0);
        }
    }
}

/// Commits to one file reported by its doorbell, by this process or any other.
pub(super) struct Changes {
    /// Woken (every waiter) each time the kernel reports writes to the log.
    notify: Arc<tokio::sync::Notify>,
    /// Keeps the watch alive; `None` where no watch could be set up (or it was turned off).
    watcher: Option<notify::RecommendedWatcher>,
}

impl Changes {
    /// Watches the doorbell of the database at `path` (which [`Doorbell::open`] created).
    pub(super) fn watch(path: &Path) -> Self {
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

impl Db {
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
