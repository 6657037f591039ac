//! The tasks of one chaos run and what became of them: each task is `math.add(i, i)` with
//! the id `<run>-<i>`, so its right result (`2i`) follows from its id alone; the workers'
//! JSON logs say which ran, and how often; the result backend says what was stored.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::results::{ResultBackend, TaskState};

/// The tasks of one run.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// The run's id: the prefix of its task ids, its queue's name.
    pub run: String,
    /// How many tasks it sends.
    pub tasks: usize,
}

impl Ledger {
    /// A run of `tasks` tasks with an id of its own.
    pub fn new(tasks: usize) -> Self {
        let run = format!("chaos-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Self { run, tasks }
    }

    /// The id of task `i`.
    pub fn id(&self, i: usize) -> String {
        format!("{}-{i}", self.run)
    }

    /// Task `i` as a line of `wasmq send --bulk math.add`.
    pub fn line(&self, i: usize) -> String {
        json!({"args": [i, i], "options": {"task_id": self.id(i)}}).to_string()
    }

    /// Which task `id` is, when it is one of this run's.
    pub fn index(&self, id: &str) -> Option<usize> {
        let i = id
            .strip_prefix(&self.run)?
            .strip_prefix('-')?
            .parse()
            .ok()?;
        (i < self.tasks).then_some(i)
    }

    /// Checks every task in `confirmed` (ids a publisher printed) against `backend`:
    /// `(completed, lost, wrong)`.
    ///
    /// # Errors
    /// When the backend cannot be read.
    pub async fn verify(
        &self,
        backend: &dyn ResultBackend,
        confirmed: &[String],
    ) -> anyhow::Result<(usize, usize, usize)> {
        let (mut completed, mut lost, mut wrong) = (0, 0, 0);
        for id in confirmed {
            let expected = self.index(id).map(|i| json!(2 * i));
            match backend.get(id).await? {
                Some(meta)
                    if meta.status == TaskState::Success
                        && Some(&meta.result) == expected.as_ref() =>
                {
                    completed += 1
                }
                Some(meta) if meta.status.is_ready() => wrong += 1,
                _ => lost += 1,
            }
        }
        Ok((completed, lost, wrong))
    }
}

/// The successes the workers of a run logged (`--log-format json`), read as the logs grow.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// The run whose tasks are counted.
    run: String,
    /// Each log, how far it has been read and how many successes it held.
    logs: Vec<(PathBuf, u64, usize)>,
    /// How many times each task's success was logged.
    successes: HashMap<String, u32>,
    /// When the last new task finished.
    last_progress: Option<Instant>,
    /// When the last success of any task (a repeat too) was read.
    last_success: Option<Instant>,
}

impl Outcomes {
    /// Counts the successes of `ledger`'s tasks.
    pub fn new(ledger: &Ledger) -> Self {
        Self {
            run: ledger.run.clone(),
            ..Self::default()
        }
    }

    /// Reads `log` too, from its start.
    pub fn watch(&mut self, log: PathBuf) {
        self.logs.push((log, 0, 0));
    }

    /// Reads what the logs gained since the last call: whole lines only, so a line being
    /// written is read next time.
    pub fn refresh(&mut self) -> std::io::Result<()> {
        let before = self.successes.len();
        for (path, offset, logged) in &mut self.logs {
            let mut file = match std::fs::File::open(&*path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(*offset))?;
            let mut grown = Vec::new();
            file.read_to_end(&mut grown)?;
            let Some(end) = grown.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            *offset += end as u64 + 1;
            for line in grown[..end].split(|b| *b == b'\n') {
                let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(line) else {
                    continue;
                };
                if fields.get("outcome").and_then(Value::as_str) != Some("succeeded") {
                    continue;
                }
                if let Some(id) = fields.get("task_id").and_then(Value::as_str)
                    && id.starts_with(&self.run)
                {
                    *self.successes.entry(id.to_owned()).or_default() += 1;
                    *logged += 1;
                    self.last_success = Some(Instant::now());
                }
            }
        }
        if self.successes.len() > before {
            self.last_progress = Some(Instant::now());
        }
        Ok(())
    }

    /// How long since the logs last showed a success (of any task, a repeat too).
    pub fn quiet_for(&self) -> Duration {
        self.last_success.map_or(Duration::MAX, |at| at.elapsed())
    }

    /// Tasks whose success was logged at least once.
    pub fn finished(&self) -> usize {
        self.successes.len()
    }

    /// Whether task `id` finished.
    pub fn has_finished(&self, id: &str) -> bool {
        self.successes.contains_key(id)
    }

    /// Successes `log` holds (as far as it has been read).
    pub fn logged_in(&self, log: &std::path::Path) -> usize {
        self.logs
            .iter()
            .find(|(path, ..)| path == log)
            .map_or(0, |(.., logged)| *logged)
    }

    /// Tasks whose success was logged more than once.
    pub fn duplicated(&self) -> usize {
        self.successes.values().filter(|n| **n > 1).count()
    }

    /// Waits until `done` holds of what the logs say, reading them every 10 ms; gives up
    /// (false) once no new task has finished for `stall`.
    pub async fn wait_until(
        &mut self,
        stall: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> std::io::Result<bool> {
        let started = Instant::now();
        loop {
            self.refresh()?;
            if done(self) {
                return Ok(true);
            }
            let quiet_since = self.last_progress.map_or(started, |at| at.max(started));
            if quiet_since.elapsed() > stall {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_id_names_its_task_and_its_right_result() {
        let ledger = Ledger::new(10);
        assert_eq!(ledger.index(&ledger.id(7)), Some(7));
        assert_eq!(
            ledger.index(&format!("{}-10", ledger.run)),
            None,
            "out of range"
        );
        assert_eq!(ledger.index("chaos-other-1"), None);
        let line: Value = serde_json::from_str(&ledger.line(7)).unwrap();
        assert_eq!(line["args"], json!([7, 7]));
        assert_eq!(line["options"]["task_id"], json!(ledger.id(7)));
    }

    #[test]
    fn outcomes_count_successes_once_per_line_and_skip_a_line_being_written() {
        let ledger = Ledger::new(10);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let success = |i: usize| {
            format!(
                "{}\n",
                json!({"message": "task succeeded", "outcome": "succeeded", "task_id": ledger.id(i)})
            )
        };
        let mut file = std::fs::File::create(&log).unwrap();
        write!(file, "{}{}", success(1), success(2)).unwrap();
        writeln!(
            file,
            "{{\"outcome\": \"failed\", \"task_id\": \"{}\"}}",
            ledger.id(3)
        )
        .unwrap();
        write!(file, "not json\n{}", &success(1)[..20]).unwrap();
        let mut outcomes = Outcomes::new(&ledger);
        outcomes.watch(log.clone());
        outcomes.refresh().unwrap();
        assert_eq!((outcomes.finished(), outcomes.duplicated()), (2, 0));
        write!(file, "{}", &success(1)[20..]).unwrap();
        outcomes.refresh().unwrap();
        assert_eq!(
            (outcomes.finished(), outcomes.duplicated()),
            (2, 1),
            "task 1 ran twice"
        );
        assert!(outcomes.has_finished(&ledger.id(2)));
        assert_eq!(outcomes.logged_in(&log), 3);
        assert!(!outcomes.has_finished(&ledger.id(3)));
    }
}
