//! The ids of revoked tasks a worker remembers (Celery's revoked set, persisted as with
//! `--statedb`).
//!
//! Revocations arrive from the broker (a table on the embedded broker, a fanout exchange on
//! RabbitMQ) and are kept for [`REVOKE_EXPIRES`]. With a state file they are also written to
//! disk, so a worker that restarts still refuses tasks revoked before, even when its broker
//! only broadcasts them once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use serde_json::{Map, Value};

use crate::broker::{REVOKE_EXPIRES, Revocation};

/// Revoked task ids, with when they were revoked and whether running copies are terminated;
/// and revoked stamps (Celery's `revoke_by_stamped_headers`).
#[derive(Debug, Default)]
pub struct RevokedSet {
    ids: Mutex<HashMap<String, Revocation>>,
    /// Per stamped header, the revoked values (in memory only, as Celery's
    /// `revoked_stamps`).
    stamps: Mutex<Map<String, Value>>,
    state_file: Option<PathBuf>,
    /// Held while the state file is written: revocations arrive on several tasks at once
    /// (the revoke queue, remote control), and two writers would race on the same
    /// temporary file.
    saving: Mutex<()>,
    /// How many times the state file could not be written.
    failed_saves: std::sync::atomic::AtomicUsize,
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
            stamps: Mutex::default(),
            state_file,
            saving: Mutex::default(),
            failed_saves: std::sync::atomic::AtomicUsize::new(0),
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

    /// The revoked ids, oldest first.
    pub fn ids(&self) -> Vec<String> {
        let mut revocations: Vec<(i64, String)> = self
            .lock()
            .values()
            .map(|r| (r.revoked_at_ms, r.task_id.clone()))
            .collect();
        revocations.sort();
        revocations.into_iter().map(|(_, id)| id).collect()
    }

    /// Revokes the tasks stamped with any of these values (Celery's
    /// `revoke_by_stamped_headers`: per header, a value or a list of values, added to those
    /// revoked before).
    pub fn revoke_stamps(&self, headers: &Map<String, Value>) {
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        for (header, values) in headers {
            let entry = stamps
                .entry(header.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            if !entry.is_array() {
                *entry = Value::Array(vec![entry.take()]);
            }
            if let Value::Array(revoked) = entry {
                revoked.extend(as_list(values).iter().cloned());
            }
        }
    }

    /// The stamp that revokes a message stamped with `stamps` (its `stamps` header, for
    /// the headers named in `stamped_headers`), as Celery's `Request.revoked` decides:
    /// `{header: value}` when one of its values was revoked.
    pub fn revoking_stamp(
        &self,
        stamped_headers: &[Value],
        stamps: &Map<String, Value>,
    ) -> Option<(String, Value)> {
        let revoked = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if revoked.is_empty() {
            return None;
        }
        for header in stamped_headers.iter().filter_map(Value::as_str) {
            let (Some(revoked_values), Some(stamped)) = (revoked.get(header), stamps.get(header))
            else {
                continue;
            };
            let revoked_values = as_list(revoked_values);
            if let Some(value) = as_list(stamped)
                .iter()
                .find(|value| revoked_values.contains(value))
            {
                return Some((header.to_owned(), value.clone()));
            }
        }
        None
    }

    /// How many times writing the state file failed (each failure is also logged).
    pub fn failed_saves(&self) -> usize {
        self.failed_saves.load(std::sync::atomic::Ordering::Relaxed)
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
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
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
        let _saving = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
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
            self.failed_saves
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%error, path = %path.display(), "cannot write the state file");
        }
    }
}

/// `value` as a list: itself when it is one, else a list of it (Python's `maybe_list`).
fn as_list(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        other => std::slice::from_ref(other),
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

    #[test]
    fn revocations_arriving_at_once_are_all_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let set = std::sync::Arc::new(RevokedSet::open(Some(path.clone())));
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let set = std::sync::Arc::clone(&set);
                std::thread::spawn(move || {
                    for n in 0..50 {
                        set.insert(revocation(&format!("{writer}-{n}"), Duration::ZERO));
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(set.failed_saves(), 0, "writers raced on the state file");
        assert_eq!(RevokedSet::open(Some(path)).len(), 200);
    }

    #[test]
    fn stamps_revoke_as_celery_matches_them() {
        let set = RevokedSet::open(None);
        let stamped = |value: Value| {
            let mut stamps = Map::new();
            stamps.insert("monitoring_id".into(), value);
            stamps
        };
        let headers = [Value::from("monitoring_id")];
        assert!(
            set.revoking_stamp(&headers, &stamped("4242".into()))
                .is_none()
        );
        let mut revoke = Map::new();
        revoke.insert("monitoring_id".into(), "4242".into());
        set.revoke_stamps(&revoke);
        assert_eq!(
            set.revoking_stamp(&headers, &stamped("4242".into())),
            Some(("monitoring_id".into(), "4242".into()))
        );
        assert!(
            set.revoking_stamp(&headers, &stamped(4242.into()))
                .is_none(),
            "a number is not the string"
        );
        assert!(
            set.revoking_stamp(&[], &stamped("4242".into())).is_none(),
            "only stamped headers count"
        );
        revoke.insert("monitoring_id".into(), serde_json::json!([1234, "abc"]));
        set.revoke_stamps(&revoke);
        assert!(
            set.revoking_stamp(&headers, &stamped(1234.into()))
                .is_some()
        );
        assert!(
            set.revoking_stamp(&headers, &stamped(serde_json::json!(["x", "abc"])))
                .is_some(),
            "any of a list of stamps"
        );
        assert!(
            set.revoking_stamp(&headers, &stamped("4242".into()))
                .is_some(),
            "added to"
        );
    }
}
