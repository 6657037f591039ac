//! Canvas: Celery's signatures, chains, groups and chords, encoded exactly as Celery encodes
//! them (`celery-reference.md` §1.4, §2.5), and the routine that publishes them.
//!
//! * [`signature`] — the model: a [`Signature`] dict, its [`Kind`], ids and validation;
//! * [`workflows`] — the builders [`chain`], [`group`] and [`chord`];
//! * [`dispatch`] — publishing signatures as task messages, used by the client to start a
//!   workflow (`client::apply`) and by the worker to continue one (`worker::continuation`).
//!
//! The canvas knows the broker and the result backend (through their traits), never the
//! client or the worker.

mod dispatch;
mod signature;
mod workflows;

pub(crate) use dispatch::{Declaring, Dispatch};
pub(crate) use signature::option_list;
pub use signature::{Kind, Signature};
pub use workflows::{Chain, Chord, Group, chain, chord, group};

use crate::broker::BrokerError;
use crate::results::ResultError;

/// Errors building or publishing a canvas.
#[derive(Debug, thiserror::Error)]
pub enum CanvasError {
    /// A signature is not a Celery signature dict, or lacks what its kind needs.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// A canvas wasmq does not run (e.g. `chunks`, `xmap`).
    #[error("unsupported canvas: {0}")]
    Unsupported(String),
    /// A step could not be published.
    #[error("cannot publish a canvas step")]
    Broker(#[from] BrokerError),
    /// A task names a queue that does not exist in the broker, and its publisher may not
    /// create it (a tenant's worker publishing a follow-up; see `Declaring`). Nothing of
    /// that task was published.
    #[error("{task} [{task_id}] names queue {queue:?}, which does not exist")]
    QueueNotFound {
        /// The task's name.
        task: String,
        /// Its pre-assigned id, which whoever waits for it waits on.
        task_id: String,
        /// The queue it names.
        queue: String,
    },
    /// The result backend failed, or cannot count chords (rpc).
    #[error("the result backend failed")]
    Backend(#[from] ResultError),
}

impl CanvasError {
    /// True when trying again later may succeed (the broker or backend was unavailable);
    /// false for a canvas that can never run, or a step the broker or backend refuses for
    /// good (the rpc backend cannot count chords, RabbitMQ refuses the message, a queue a
    /// tenant may not create does not exist).
    pub fn is_transient(&self) -> bool {
        match self {
            CanvasError::Broker(error) => error.is_transient(),
            CanvasError::Backend(error) => error.is_transient(),
            CanvasError::Malformed(_)
            | CanvasError::Unsupported(_)
            | CanvasError::QueueNotFound { .. } => false,
        }
    }
}
