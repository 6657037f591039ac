//! Celery's built-in tasks that a worker runs itself: `celery.starmap` (`task.starmap(it)`)
//! and `celery.map` (`task.map(it)`). Their message names another task and a list of
//! arguments; Celery's worker calls that task once per item, in order, inside the one
//! message, and returns the list of results — so does wasmq, each call in a fresh sandbox
//! under the task's own limits. The first call that does not succeed ends the whole task
//! with that call's outcome (its failure, limit or retry request), as an exception raised
//! by `task(*item)` ends Celery's.

use std::sync::Arc;

use serde_json::Value;

use super::Shared;
use super::run::{self, Ran};
use crate::broker::Delivery;
use crate::canvas::Signature;
use crate::engine::{CallReport, Outcome, Plugin};
use crate::protocol::TaskMessage;
use crate::results::ReplyTo;

/// A `celery.starmap` or `celery.map` message, read.
pub(super) struct MapCall {
    /// The task called for each item.
    pub(super) task: Signature,
    /// The items: argument lists (starmap) or single arguments (map).
    items: Vec<Value>,
    /// Each item is an argument list (`starmap`), not one argument (`map`).
    spread: bool,
}

impl MapCall {
    /// The built-in call `message` asks for: none when it is not one, an error naming what
    /// is wrong when its arguments are not `task` (a signature) and `it` (a list).
    pub(super) fn parse(message: &TaskMessage) -> Option<Result<Self, String>> {
        let spread = match message.task.as_str() {
            "celery.starmap" => true,
            "celery.map" => false,
            _ => return None,
        };
        let argument = |name: &str, position: usize| {
            message
                .kwargs
                .get(name)
                .or_else(|| message.args.get(position))
                .cloned()
        };
        Some((|| {
            let task = argument("task", 0)
                .ok_or_else(|| format!("{} needs `task`, a signature", message.task))?;
            let task = Signature::from_value(&task).map_err(|e| e.to_string())?;
            let items = match argument("it", 1) {
                Some(Value::Array(items)) => items,
                _ => return Err(format!("{} needs `it`, a list", message.task)),
            };
            if spread && !items.iter().all(Value::is_array) {
                return Err("celery.starmap needs `it` to be a list of argument lists".into());
            }
            Ok(Self {
                task,
                items,
                spread,
            })
        })())
    }

    /// What running a built-in whose arguments are wrong comes to: the task was not called
    /// (a `TypeError`, dead-lettered, as for any task given bad arguments).
    pub(super) fn refused(shared: &Shared, reason: String) -> Ran {
        Ran {
            call: Ok(CallReport {
                outcome: Outcome::InvalidArguments { message: reason },
                limits: shared.registry.sandbox().config().defaults,
                fuel_used: 0,
                cpu_time: std::time::Duration::ZERO,
                elapsed: std::time::Duration::ZERO,
            }),
            interruption: super::decision::Interruption::default(),
        }
    }

    /// Calls the task once per item on `plugin`, stopping at the first call that does not
    /// succeed; on success the report's result is the list of results.
    pub(super) async fn run(
        &self,
        shared: &Arc<Shared>,
        delivery: &Delivery,
        message: &TaskMessage,
        plugin: &Plugin,
        reply: Option<ReplyTo>,
    ) -> Ran {
        let mut results = Vec::with_capacity(self.items.len());
        let mut last: Option<CallReport> = None;
        for item in &self.items {
            let mut args = self.task.args.clone();
            match item {
                Value::Array(spread) if self.spread => args.extend(spread.iter().cloned()),
                one => args.push(one.clone()),
            }
            let mut call = message.clone();
            call.task.clone_from(&self.task.task);
            call.args = args;
            call.kwargs = self.task.kwargs.clone();
            let ran = run::run(shared, delivery, &call, plugin, reply.clone()).await;
            match &ran.call {
                Ok(report) => match &report.outcome {
                    Outcome::Success(json) => {
                        results.push(serde_json::from_str(json).unwrap_or(Value::Null));
                        last = Some(report.clone());
                    }
                    _ => return ran,
                },
                Err(_) => return ran,
            }
            if ran.interruption.shutdown || ran.interruption.terminated {
                return ran;
            }
        }
        let mut report = last.unwrap_or_else(|| CallReport {
            outcome: Outcome::Success(String::new()),
            limits: shared.registry.sandbox().config().defaults,
            fuel_used: 0,
            cpu_time: std::time::Duration::ZERO,
            elapsed: std::time::Duration::ZERO,
        });
        report.outcome = Outcome::Success(Value::Array(results).to_string());
        Ran {
            call: Ok(report),
            interruption: super::decision::Interruption::default(),
        }
    }
}
