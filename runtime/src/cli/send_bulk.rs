//! `wasmq send --bulk`: one task per line of standard input, published through a
//! [`crate::client::Pipeline`] (a window of unconfirmed publishes), each id printed once the
//! broker has confirmed it.
//!
//! A line is JSON, one of:
//!
//! * an array: the positional arguments of the command line's TASK — `[2, 3]`;
//! * an object shaped as a Celery signature (what `json.dumps(sig)` writes):
//!   `{"task": "math.add", "args": [2, 3], "kwargs": {}, "options": {"countdown": 5}}`,
//!   each key optional but the task (the command line's TASK stands in for it).
//!
//! The command line's flags (`--queue`, `--countdown`, `--kwargs`…) are every line's
//! defaults; a line's own options win. Blank lines are skipped. A line that is not one of
//! these — or a workflow (`subtask_type`, `link`, `link_error`, which `wasmq chain`/`group`/
//! `chord` send) — stops the command: the tasks before it are confirmed and printed, and
//! the error names the line (exit status 2). Nothing is silently dropped.

use std::time::Instant;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::exit::Failure;
use crate::client::{Client, SendOptions};

/// What a line does not say: the command line's task, keyword arguments and options.
#[derive(Debug, Default)]
pub(super) struct Defaults {
    /// The task of lines that name none.
    pub(super) task: Option<String>,
    /// The keyword arguments of lines that give none.
    pub(super) kwargs: Map<String, Value>,
    /// The options under every line's own.
    pub(super) options: SendOptions,
}

/// One line, read.
#[derive(Debug)]
struct Line {
    task: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    options: SendOptions,
}

/// The keys of a Celery signature a line may have.
const SIGNATURE_KEYS: [&str; 7] = [
    "task",
    "args",
    "kwargs",
    "options",
    "subtask_type",
    "immutable",
    "chord_size",
];

impl Defaults {
    /// Reads one line (see the module's documentation).
    fn read(&self, text: &str) -> Result<Line, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let task_of_command = || {
            self.task.clone().ok_or_else(|| {
                "an args array needs the task on the command line (wasmq send --bulk TASK)"
                    .to_owned()
            })
        };
        let (task, args, kwargs, options) = match value {
            Value::Array(args) => (task_of_command()?, args, None, Map::new()),
            Value::Object(mut signature) => {
                if let Some(key) = signature
                    .keys()
                    .find(|k| !SIGNATURE_KEYS.contains(&k.as_str()))
                {
                    return Err(format!(
                        "unknown key {key:?} (a line has task, args, kwargs and options)"
                    ));
                }
                if !signature.get("subtask_type").is_none_or(Value::is_null) {
                    return Err("a workflow: send it with wasmq chain, group or chord".into());
                }
                let task = match signature.remove("task") {
                    Some(Value::String(task)) => task,
                    None | Some(Value::Null) => task_of_command()?,
                    Some(_) => return Err("\"task\" must be a string".into()),
                };
                let args = match signature.remove("args") {
                    Some(Value::Array(args)) => args,
                    None | Some(Value::Null) => Vec::new(),
                    Some(_) => return Err("\"args\" must be an array".into()),
                };
                let kwargs = match signature.remove("kwargs") {
                    Some(Value::Object(kwargs)) => Some(kwargs),
                    None | Some(Value::Null) => None,
                    Some(_) => return Err("\"kwargs\" must be an object".into()),
                };
                let options = match signature.remove("options") {
                    Some(Value::Object(options)) => options,
                    None | Some(Value::Null) => Map::new(),
                    Some(_) => return Err("\"options\" must be an object".into()),
                };
                if let Some(link) = ["link", "link_error"]
                    .iter()
                    .find(|k| options.contains_key(**k))
                {
                    return Err(format!(
                        "options.{link}: a workflow: send it with wasmq chain, group or chord"
                    ));
                }
                (task, args, kwargs, options)
            }
            _ => return Err("a line is an args array or a signature object".into()),
        };
        Ok(Line {
            task,
            args,
            kwargs: kwargs.unwrap_or_else(|| self.kwargs.clone()),
            options: self.options_with(&options),
        })
    }

    /// A line's options over the command line's.
    fn options_with(&self, line: &Map<String, Value>) -> SendOptions {
        let own = SendOptions::from_signature(line);
        let under = &self.options;
        SendOptions {
            task_id: own.task_id.or_else(|| under.task_id.clone()),
            countdown: own.countdown.or(under.countdown),
            eta: own.eta.or(under.eta),
            expires: own.expires.or(under.expires),
            expires_at: own.expires_at.or(under.expires_at),
            queue: own.queue.or_else(|| under.queue.clone()),
            priority: own.priority.or(under.priority),
            time_limit: own.time_limit.or(under.time_limit),
            soft_time_limit: own.soft_time_limit.or(under.soft_time_limit),
            ignore_result: own.ignore_result.or(under.ignore_result),
            headers: own.headers,
        }
    }
}

/// Sends one task per line of `lines` with up to `window` publishes unconfirmed, printing
/// each id on stdout once confirmed and a summary on stderr.
pub(super) async fn run(
    client: &Client,
    lines: impl AsyncBufRead + Unpin,
    defaults: Defaults,
    window: usize,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut pipeline = client.pipeline(window);
    let mut sent = 0_usize;
    let mut stopped = None;
    let mut lines = lines.lines();
    let mut number = 0_usize;
    let broker_failure = |e: crate::client::SendError| Failure::internal(anyhow::anyhow!("{e:#}"));
    loop {
        let text = match lines.next_line().await {
            Ok(Some(text)) => text,
            Ok(None) => break,
            Err(e) => {
                stopped = Some(format!("cannot read standard input: {e}"));
                break;
            }
        };
        number += 1;
        if text.trim().is_empty() {
            continue;
        }
        let line = match defaults.read(&text) {
            Ok(line) => line,
            Err(reason) => {
                stopped = Some(format!("line {number}: {reason}"));
                break;
            }
        };
        let confirmed = pipeline
            .send(&line.task, line.args, line.kwargs, line.options)
            .await
            .map_err(broker_failure)?;
        if let Some(id) = confirmed {
            println!("{id}");
        }
        sent += 1;
    }
    for id in pipeline.finish().await.map_err(broker_failure)? {
        println!("{id}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tasks = |n: usize| format!("{n} task{}", if n == 1 { "" } else { "s" });
    eprintln!(
        "sent {}, all confirmed, in {elapsed:.2} s ({:.0}/s)",
        tasks(sent),
        sent as f64 / elapsed.max(1e-9)
    );
    match stopped {
        Some(reason) => Err(Failure::bad_input(format!(
            "{reason}; stopped there ({} before it {} sent)",
            tasks(sent),
            if sent == 1 { "was" } else { "were" }
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            task: Some("math.add".into()),
            kwargs: Map::new(),
            options: SendOptions {
                queue: Some("bulk".into()),
                countdown: Some(Duration::from_secs(5)),
                ..SendOptions::default()
            },
        }
    }

    #[test]
    fn an_array_is_the_args_of_the_command_lines_task() {
        let line = defaults().read("[2, 3]").unwrap();
        assert_eq!(line.task, "math.add");
        assert_eq!(line.args, vec![json!(2), json!(3)]);
        assert_eq!(line.options.queue.as_deref(), Some("bulk"));
        assert_eq!(line.options.countdown, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_signature_names_its_task_and_its_options_win() {
        let line = defaults()
            .read(r#"{"task": "math.mul", "args": [4], "kwargs": {"b": 2}, "options": {"queue": "other", "priority": 7}, "subtask_type": null, "immutable": false}"#)
            .unwrap();
        assert_eq!(line.task, "math.mul");
        assert_eq!(line.kwargs, json!({"b": 2}).as_object().cloned().unwrap());
        assert_eq!(line.options.queue.as_deref(), Some("other"));
        assert_eq!(line.options.priority, Some(7));
        assert_eq!(line.options.countdown, Some(Duration::from_secs(5)));
    }

    #[test]
    fn lines_that_are_not_a_task_say_why() {
        let no_task = Defaults::default();
        for (text, reason) in [
            ("[1", "not JSON"),
            ("7", "args array or a signature"),
            ("[1, 2]", "needs the task on the command line"),
            (r#"{"args": [1]}"#, "needs the task on the command line"),
            (r#"{"task": "t", "kwarg": {}}"#, "unknown key \"kwarg\""),
            (r#"{"task": "t", "args": {}}"#, "\"args\" must be an array"),
            (r#"{"task": "t", "subtask_type": "chain"}"#, "a workflow"),
            (
                r#"{"task": "t", "options": {"link": {"task": "u"}}}"#,
                "options.link: a workflow",
            ),
        ] {
            let error = no_task.read(text).unwrap_err();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }
}
