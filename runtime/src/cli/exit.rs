//! How a command ends: the documented exit statuses, the [`Failure`] a command returns to end
//! with one readable line, and the mapping of a task's final result to both
//! ([`print_ready`], shared by `send`, `result`, `chain`, `group` and `chord`).

use std::process::ExitCode;

use serde_json::Value;

use crate::client::GetError;
use crate::engine::PluginError;
use crate::results::ResultError;

/// The process exit statuses of the `wasmq` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: the command did what was asked.
    Success = 0,
    /// 1: the task failed, trapped, was revoked, asked for a retry or rejected its message.
    TaskFailed = 1,
    /// 2: bad input: arguments that are not JSON or do not fit the task, an unknown task,
    /// bad flags or configuration.
    BadInput = 2,
    /// 3: the sandbox stopped the task at a limit (fuel, memory, time, stack, output).
    LimitExceeded = 3,
    /// 4: the plugin file is unreadable, not a component, or not a wasmq plugin.
    BadPlugin = 4,
    /// 5: no result arrived within the timeout.
    Timeout = 5,
    /// 69: no worker answered a remote-control command in time (EX_UNAVAILABLE, as
    /// Celery's `inspect`/`control`).
    Unavailable = 69,
    /// 70: an internal error (EX_SOFTWARE), e.g. the broker cannot be reached.
    Internal = 70,
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(status as u8)
    }
}

/// A failure that ends the command: one line for the user and an exit status.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) status: ExitStatus,
    pub(super) error: anyhow::Error,
}

impl Failure {
    pub(super) fn new(status: ExitStatus, error: impl Into<anyhow::Error>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }

    pub(super) fn bad_input(message: impl std::fmt::Display) -> Self {
        Self::new(ExitStatus::BadInput, anyhow::anyhow!("{message}"))
    }

    pub(super) fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::new(ExitStatus::Internal, error)
    }
}

impl From<PluginError> for Failure {
    fn from(error: PluginError) -> Self {
        let status = match error {
            PluginError::Read { .. } => ExitStatus::BadInput,
            _ => ExitStatus::BadPlugin,
        };
        Failure::new(status, error)
    }
}

/// Prints a task's value on stdout, or turns its failure, revocation or a timeout into the
/// [`Failure`] that ends the command with the matching exit status.
pub(super) fn print_ready(task: &str, outcome: Result<Value, GetError>) -> Result<(), Failure> {
    match outcome {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(GetError::Failed { task_id, exception }) => Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("{task}[{task_id}] failed: {exception}"),
        )),
        Err(GetError::Revoked { task_id, exception }) => Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!("{task}[{task_id}] was revoked: {exception}"),
        )),
        Err(GetError::Backend(error @ ResultError::Timeout { .. })) => {
            Err(Failure::new(ExitStatus::Timeout, error))
        }
        Err(GetError::Backend(error)) => Err(Failure::internal(error)),
        Err(GetError::NotSent(error)) => Err(Failure::internal(error)),
    }
}
