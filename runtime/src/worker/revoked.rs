//! The ids of revoked tasks a worker remembers (Celery's revoked set, persisted as with
//! `--statedb`).
//!
//! Revocations arrive from the broker (a table on the embedded broker, a fanout exchange on
//! RabbitMQ) and are kept for [`REVOKE_EXPIRES`]. With a state file they are also written to
//! disk, so a worker that restarts still refuses tasks revoked before, even when its broker
//! only broadcasts them once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::broker::{REVOKE_EXPIRES, Revocation};

/// Revoked task ids, with when they were revoked and whether running copies are terminated.
#[derive(Debug, Default)]
pub struct RevokedSet {
    ids: Mutex<HashMap<String, Revocation>>,
    state_file: Option<PathBuf>,
}

impl RevokedSet {
    /// A set persisted in `state_file` (loaded now when it exists), or in memory only.
    pub fn open(state_file: Option<PathBuf>) -> Self {
        let mut ids = HashMap::new();
        if let Some(path) = &state_file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<Revocation>>(&bytes) {
                    Ok(list) => ids.extend(list.into_iter().map(|r| (r.task_id.clone(), r))),
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "ignoring an unreadable state file");
                    }
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "cannot read the state file");
                }
            }
        }
        let set = Self {
            ids: Mutex::new(ids),
            state_file,
        };
        set.forget_expired();
        set
    }

    /// Remembers `revocation`; returns false when it was already known.
    pub fn insert(&self, revocation: Revocation) -> bool {
        let new = self
            .lock()
            .insert(revocation.task_id.clone(), revocation)
            .is_none();
        if new {
            self.forget_expired();
            self.save();
        }
        new
    }

    /// Whether `task_id` was revoked.
    pub fn get(&self, task_id: &str) -> Option<Revocation> {
        self.lock().get(task_id).cloned()
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Revocation>> {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget_expired(&self) {
        let oldest = chrono::Utc::now().timestamp_millis()
            - i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
        self.lock().retain(|_, r| r.revoked_at_ms >= oldest);
    }

    fn save(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let list: Vec<Revocation> = self.lock().values().cloned().collect();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&tmp, bytes)
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = written {
            tracing::warn!(%error, path = %path.display(), "cannot write the state file");
        }
    }
}

/// Remembers revocations as they arrive and interrupts running tasks revoked with
/// `terminate`.
pub(super) async fn listen(
    shared: std::sync::Arc<super::Shared>,
    mut revocations: tokio::sync::mpsc::Receiver<Revocation>,
) {
    while let Some(revocation) = revocations.recv().await {
        let task_id = revocation.task_id.clone();
        let terminate = revocation.terminate;
        if shared.revoked.insert(revocation) {
            tracing::info!(task_id = %task_id, terminate, "task revoked");
        }
        if terminate && shared.running.cancel(&task_id) {
            tracing::warn!(task_id = %task_id, "terminating the running task (revoked)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn revocation(id: &str, age: Duration) -> Revocation {
        Revocation {
            task_id: id.into(),
            terminate: false,
            revoked_at_ms: chrono::Utc::now().timestamp_millis()
                - i64::try_from(age.as_millis()).unwrap(),
        }
    }

    #[test]
    fn revocations_persist_in_the_state_file_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("revoked.json");
        let set = RevokedSet::open(Some(path.clone()));
        assert!(set.insert(revocation("a", Duration::ZERO)));
        assert!(
            !set.insert(revocation("a", Duration::ZERO)),
            "known already"
        );
        assert!(set.insert(revocation("old", REVOKE_EXPIRES * 2)));
        assert!(set.get("old").is_none(), "expired at once");
        let reopened = RevokedSet::open(Some(path));
        assert!(reopened.get("a").is_some(), "remembered across a restart");
        assert_eq!(reopened.len(), 1);
        assert!(RevokedSet::open(None).is_empty());
    }
}
