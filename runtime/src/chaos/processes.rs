//! The `wasmq` processes a chaos run starts, kills and restarts: workers (`wasmq worker`,
//! JSON logs to a file each life) and publishers (`wasmq send --bulk`, whose printed ids
//! are the tasks the broker confirmed). Every child is SIGKILLed when dropped, so an early
//! error never leaves one running.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How to run `wasmq`: this binary, in a folder of the run's own (where a worker's relative
/// defaults land), sharing one artifact cache so a restarted worker loads plugins at once.
#[derive(Debug, Clone)]
pub struct Wasmq {
    /// The `wasmq` executable.
    pub exe: PathBuf,
    /// The working directory of every child.
    pub dir: PathBuf,
}

impl Wasmq {
    /// A command for `wasmq`, in the run's folder, with the shared artifact cache.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .current_dir(&self.dir)
            .env("WASMQ_CACHE_DIR", self.dir.join("artifact-cache"))
            .env_remove("WASMQ_LOG")
            .env_remove("WASMQ_CONFIG");
        command
    }

    /// Starts `wasmq worker` as `spec` says, its JSON log written to `log`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_worker(&self, spec: &WorkerSpec, log: &Path) -> anyhow::Result<Killable> {
        let mut command = self.command();
        command
            .args(["--log-format", "json", "worker", "--broker", &spec.broker])
            .args(["--result-backend", &spec.results, "--queues", &spec.queue])
            .arg("--plugins")
            .arg(self.dir.join("plugins"))
            .args([
                "--name",
                &spec.node,
                "--concurrency",
                &spec.concurrency.to_string(),
            ])
            .args(["--shutdown-timeout", "5s", "--result-expires", "1h"])
            .args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(log)
                    .with_context(|| format!("cannot create {}", log.display()))?,
            );
        let child = command.spawn().context("cannot start wasmq worker")?;
        Ok(Killable(child))
    }

    /// Starts `wasmq send --bulk math.add` publishing `lines` into `queue`; the ids it
    /// prints (each confirmed by the broker) are collected as they come.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_publisher(
        &self,
        broker: &str,
        results: &str,
        queue: &str,
        lines: Vec<String>,
    ) -> anyhow::Result<Publisher> {
        let mut child = self
            .command()
            .args(["send", "--bulk", "math.add", "--broker", broker])
            .args(["--result-backend", results, "--queue", queue])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start wasmq send --bulk")?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        // Written from a thread of its own: a pipe that fills must not stall the caller, and
        // a killed publisher ends the writes with a broken pipe, which is expected.
        std::thread::spawn(move || {
            for line in lines {
                if writeln!(stdin, "{line}").is_err() {
                    return;
                }
            }
        });
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let confirmed = Arc::clone(&confirmed);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(id) = line else { return };
                    confirmed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(id);
                }
            })
        };
        Ok(Publisher {
            child: Killable(child),
            confirmed,
            reader: Some(reader),
        })
    }
}

/// What a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Its broker URL.
    pub broker: String,
    /// Its result backend URL.
    pub results: String,
    /// The queue it consumes.
    pub queue: String,
    /// Its node name; the same across its lives, so it leaves one set of broker queues.
    pub node: String,
    /// Its task slots.
    pub concurrency: usize,
    /// More `wasmq worker` flags.
    pub extra: Vec<String>,
}

/// A child process, SIGKILLed when dropped.
#[derive(Debug)]
pub struct Killable(Child);

impl Killable {
    /// Kills it with SIGKILL and reaps it: no clean-up of any kind runs.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Asks it to stop (SIGTERM) and waits up to `within`, then kills it; its exit status
    /// when it stopped by itself.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        // `kill -TERM`, as an operator stops a worker gracefully.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl From<Child> for Killable {
    fn from(child: Child) -> Self {
        Self(child)
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `wasmq send --bulk`.
#[derive(Debug)]
pub struct Publisher {
    child: Killable,
    confirmed: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// The ids confirmed so far.
    pub fn confirmed(&self) -> Vec<String> {
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Kills it (SIGKILL) and returns every id it printed before it died.
    pub fn kill(mut self) -> Vec<String> {
        self.child.kill();
        self.finish_reading()
    }

    /// Waits for it to publish everything and exit; the ids it printed.
    ///
    /// # Errors
    /// When it exits with an error or does not finish within `within`.
    pub fn wait(mut self, within: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.exited() {
                break status;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "wasmq send --bulk did not finish within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        anyhow::ensure!(status.success(), "wasmq send --bulk failed: {status}");
        Ok(self.finish_reading())
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.exited().is_some()
    }

    fn finish_reading(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.confirmed()
    }
}
