//! Chain, group and chord: the composite signatures, built as Celery builds them.
//!
//! Each is a typed wrapper around its [`Signature`] (so `chain(...)` cannot be confused with
//! a task), convertible into one to nest it in another workflow. Starting one is the
//! client's business (`apply(&client)`, in `client::apply`); continuing one is the worker's.

use serde_json::{Map, Value};

use super::Signature;
use super::signature::group_signature;

/// A chain: each step's result is prepended to the next step's args.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain(pub(crate) Signature);

/// Celery's `chain(a, b, c)` (`a | b | c`).
pub fn chain(steps: impl IntoIterator<Item = Signature>) -> Chain {
    let mut sig = Signature::new("celery.chain", vec![]);
    sig.subtask_type = Some("chain".into());
    sig.set_children("tasks", &steps.into_iter().collect::<Vec<_>>());
    Chain(sig)
}

impl From<Chain> for Signature {
    fn from(chain: Chain) -> Self {
        chain.0
    }
}

/// A group: members run in parallel.
#[derive(Debug, Clone, PartialEq)]
pub struct Group(pub(crate) Signature);

/// Celery's `group(a, b, …)`.
pub fn group(members: impl IntoIterator<Item = Signature>) -> Group {
    Group(group_signature(members.into_iter().collect()))
}

impl From<Group> for Signature {
    fn from(group: Group) -> Self {
        group.0
    }
}

/// A chord: a group whose results, once all are in, are passed as one list to the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Chord(pub(crate) Signature);

/// Celery's `chord(header)(body)`.
pub fn chord(header: impl IntoIterator<Item = Signature>, body: Signature) -> Chord {
    let mut sig = Signature::new("celery.chord", vec![]);
    sig.subtask_type = Some("chord".into());
    sig.kwargs.insert(
        "header".into(),
        group_signature(header.into_iter().collect()).to_value(),
    );
    sig.kwargs.insert("body".into(), body.to_value());
    sig.kwargs
        .insert("kwargs".into(), Value::Object(Map::new()));
    Chord(sig)
}

impl Chord {
    /// Uses `group_id` as the chord's group id (each header member's `group` header, and
    /// the key of its counter) instead of a fresh one.
    #[must_use]
    pub fn with_group_id(mut self, group_id: &str) -> Self {
        if let Some(Value::Object(header)) = self.0.kwargs.get_mut("header") {
            let options = header
                .entry("options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                options.insert("task_id".into(), group_id.into());
            }
        }
        self
    }
}

impl From<Chord> for Signature {
    fn from(chord: Chord) -> Self {
        chord.0
    }
}
