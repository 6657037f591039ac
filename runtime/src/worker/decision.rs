//! Every way a delivery can end, decided in one place: which result meta is stored and how
//! the message is settled (ack, retry later, defer, dead-letter, release). The rest of the
//! worker carries decisions out; it never makes one.
//!
//! * before running: [`undecodable`], [`poison`], [`revoked`], [`expired`], [`deferred`],
//!   [`not_registered`];
//! * after running: [`after_run`] — the sandbox's outcome, or why there is none (no sandbox
//!   free, shutdown interrupted it, a revoke terminated it), through [`decide`]; a retry
//!   says what the next attempt changes ([`NextAttempt`]), a requeue releases the message.
//!
//! Exceptions are encoded the way Celery encodes them so Python clients can `except` them:
//! fuel or wall-time limits are `billiard.exceptions.TimeLimitExceeded`, the memory limit is
//! `MemoryError`, an unknown task is `celery.exceptions.NotRegistered`, bad arguments are
//! `TypeError`, and a task's own failure keeps the kind the task gave.
//!
//! Longer than 400 lines for one idea, the table of endings: about half of it is the unit
//! tests that pin every ending to its Celery state and settlement.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::engine::{CallError, CallReport, GrantError, LimitKind, Limits, Outcome, TaskFailure};
use crate::protocol::{DecodeError, TaskMessage};
use crate::results::{ExceptionInfo, ResultMeta};

/// What to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Remove it: it was handled (successfully or not).
    Ack,
    /// Publish it again with `retries + 1` after `delay`, then ack this copy.
    RetryLater {
        /// When the next attempt may start.
        delay: Duration,
        /// What the next attempt changes.
        next: NextAttempt,
    },
    /// Not yet: publish the same message again to be delivered after `delay`, then ack
    /// this copy (nothing is held unacknowledged meanwhile).
    Defer {
        /// When it may be delivered again.
        delay: Duration,
    },
    /// It must not be processed again: move it to the dead-letter store.
    DeadLetter {
        /// Why.
        reason: String,
    },
    /// Give it back unprocessed, to be delivered again (to this or another worker): at
    /// shutdown, when no sandbox is free, or when the task requeues its message.
    Release,
}

/// What a retry changes about the next attempt (Celery's `self.retry(args=…, kwargs=…,
/// expires=…)`); the default changes nothing but the retry count and the eta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextAttempt {
    /// New positional arguments.
    pub args: Option<Vec<Value>>,
    /// New keyword arguments.
    pub kwargs: Option<Map<String, Value>>,
    /// The next attempt expires this long after it is published.
    pub expires: Option<Duration>,
}

/// The decision for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The meta to store (none when there is no task id to store it under).
    pub meta: Option<ResultMeta>,
    /// How to settle the message.
    pub settlement: Settlement,
}

pub use crate::policy::RetryPolicy;

impl Decision {
    /// Settle as `settlement` with nothing stored.
    pub fn settle_only(settlement: Settlement) -> Self {
        Self {
            meta: None,
            settlement,
        }
    }
}

/// How a run that produced no ordinary outcome was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interruption {
    /// The worker's shutdown timed out and interrupted running tasks.
    pub shutdown: bool,
    /// The task was revoked with `terminate` while it ran.
    pub terminated: bool,
}

/// Decides what a sandbox call means for its message: the call's own outcome (see
/// [`decide`]), unless it could not start (released, to run when a sandbox is free), the
/// task was not found in its plugin (`NotRegistered`), its grants could not be given (a
/// `GrantError` failure), or it was interrupted — by shutdown
/// (released: it runs again elsewhere) or by a revoke with terminate (REVOKED
/// `terminated`). A task that succeeded despite an interruption keeps its success.
pub fn after_run(
    message: &TaskMessage,
    call: &Result<CallReport, CallError>,
    interruption: Interruption,
    policy: &RetryPolicy,
) -> Decision {
    let report = match call {
        Ok(report) => report,
        Err(CallError::UnknownTask { .. }) => return not_registered(message),
        Err(CallError::Unavailable(_)) => return Decision::settle_only(Settlement::Release),
        Err(CallError::Grant(error)) => return grant_refused(message, error),
    };
    if report.outcome.is_success() {
        return decide(message, &report.outcome, &report.limits, policy);
    }
    if interruption.shutdown {
        Decision::settle_only(Settlement::Release)
    } else if interruption.terminated {
        revoked(message, "terminated")
    } else {
        decide(message, &report.outcome, &report.limits, policy)
    }
}

/// Python's built-in exception names: failures of these kinds get `exc_module: builtins`
/// so a Python client raises the real class.
const PYTHON_BUILTINS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BrokenPipeError",
    "ConnectionAbortedError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "EOFError",
    "Exception",
    "FileExistsError",
    "FileNotFoundError",
    "IndexError",
    "InterruptedError",
    "IsADirectoryError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "NotADirectoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "RuntimeError",
    "TimeoutError",
    "TypeError",
    "UnicodeError",
    "ValueError",
    "ZeroDivisionError",
];

fn module_for(kind: &str) -> &'static str {
    if PYTHON_BUILTINS.contains(&kind) {
        "builtins"
    } else {
        "wasmq.exceptions"
    }
}

/// Celery's encoding of an exception a task raised, as Celery stores it: a dotted kind
/// (`proj.tasks.QuotaError`) splits into `exc_module` and `exc_type`, so a Python client
/// raises that very class; a bare kind is a builtin (`builtins`) or wasmq's own
/// (`wasmq.exceptions`). `exc_message` holds the exception's arguments, else `[message]`.
pub fn exception_of(failure: &TaskFailure) -> ExceptionInfo {
    let kind = failure.kind.as_str();
    let (module, class) = match kind.rsplit_once('.') {
        Some((module, class)) if !module.is_empty() && !class.is_empty() => (module, class),
        _ => (module_for(kind), kind),
    };
    ExceptionInfo {
        exc_type: class.to_owned(),
        exc_module: module.to_owned(),
        exc_message: failure
            .args
            .clone()
            .unwrap_or_else(|| vec![failure.message.clone().into()]),
    }
}

/// Decides what a finished call means for its message.
pub fn decide(
    message: &TaskMessage,
    outcome: &Outcome,
    limits: &Limits,
    policy: &RetryPolicy,
) -> Decision {
    let id = message.id.as_str();
    let failed = |exception: ExceptionInfo| Decision {
        meta: Some(ResultMeta::failure(id, &exception)),
        settlement: Settlement::Ack,
    };
    match outcome {
        Outcome::Success(json) => Decision {
            meta: Some(ResultMeta::success(
                id,
                serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
            )),
            settlement: Settlement::Ack,
        },
        Outcome::Failed(failure) => {
            let exception = exception_of(failure);
            // Celery's autoretry_for: retried like a retry request; past max_retries the
            // failure itself is the result (Celery re-raises the original exception).
            let listed =
                policy.autoretries(&failure.kind) || policy.autoretries(&exception.exc_type);
            if listed && message.retries < policy.max_retries {
                let delay = policy.automatic_delay(message.retries);
                Decision {
                    meta: Some(ResultMeta::retry(id, &exception)),
                    settlement: Settlement::RetryLater {
                        delay,
                        next: NextAttempt::default(),
                    },
                }
            } else {
                failed(exception)
            }
        }
        Outcome::InvalidArguments { message: text } => Decision {
            meta: Some(ResultMeta::failure(
                id,
                &ExceptionInfo::new("TypeError", "builtins", text.clone()),
            )),
            settlement: Settlement::DeadLetter {
                reason: format!("invalid arguments: {text}"),
            },
        },
        Outcome::Retry {
            countdown,
            reason,
            exc,
            args,
            kwargs,
            max_retries,
            expires,
        } => {
            // Celery's `retry(max_retries=…)` overrides the task's limit for this call.
            let max_retries = max_retries.unwrap_or(policy.max_retries);
            if message.retries >= max_retries {
                // Celery's `retry(exc=…)` raises the given exception once retries are spent.
                if let Some(exc) = exc {
                    return failed(exception_of(exc));
                }
                failed(ExceptionInfo::new(
                    "MaxRetriesExceededError",
                    "celery.exceptions",
                    format!(
                        "Can't retry {}[{id}] args:{:?} kwargs:{:?}: {reason} (max retries {max_retries})",
                        message.task,
                        args.as_ref().unwrap_or(&message.args),
                        kwargs.as_ref().unwrap_or(&message.kwargs),
                    ),
                ))
            } else {
                let delay = countdown.unwrap_or(policy.default_delay);
                Decision {
                    meta: Some(ResultMeta::retry(
                        id,
                        &ExceptionInfo::new(
                            "Retry",
                            "celery.exceptions",
                            format!("Retry in {delay:?}: {reason}"),
                        ),
                    )),
                    settlement: Settlement::RetryLater {
                        delay,
                        next: NextAttempt {
                            args: args.clone(),
                            kwargs: kwargs.clone(),
                            expires: *expires,
                        },
                    },
                }
            }
        }
        // Celery's `Reject(requeue=True)`: nothing is stored, the message goes back to its
        // queue (poison protection counts its deliveries).
        Outcome::Rejected { requeue: true, .. } => Decision::settle_only(Settlement::Release),
        Outcome::Rejected {
            reason,
            requeue: false,
        } => Decision {
            meta: Some(ResultMeta::failure(
                id,
                &ExceptionInfo::new("Reject", "celery.exceptions", reason.clone()),
            )),
            settlement: Settlement::DeadLetter {
                reason: format!("rejected by the task: {reason}"),
            },
        },
        Outcome::LimitExceeded(limit) => match limit.kind {
            // Celery's hard time limit is TimeLimitExceeded(<seconds>); running out of fuel
            // is the CPU form of the same limit and carries its message.
            LimitKind::WallTime => failed(ExceptionInfo::new(
                "TimeLimitExceeded",
                "billiard.exceptions",
                limits.timeout.as_secs_f64(),
            )),
            LimitKind::Fuel => failed(ExceptionInfo::new(
                "TimeLimitExceeded",
                "billiard.exceptions",
                limit.message.clone(),
            )),
            LimitKind::Memory => failed(ExceptionInfo::new(
                "MemoryError",
                "builtins",
                limit.message.clone(),
            )),
            LimitKind::Stack => failed(ExceptionInfo::new(
                "RecursionError",
                "builtins",
                limit.message.clone(),
            )),
            LimitKind::Output => failed(ExceptionInfo::new(
                "OutputLimitExceeded",
                "wasmq.exceptions",
                limit.message.clone(),
            )),
        },
        Outcome::Trap { message: text } => failed(ExceptionInfo::new(
            "WasmTrap",
            "wasmq.exceptions",
            text.clone(),
        )),
    }
}

/// A message that could not be decoded: FAILURE when it has an id, and dead-lettered.
pub fn undecodable(error: &DecodeError) -> Decision {
    Decision {
        meta: error.task_id.as_deref().map(|id| {
            ResultMeta::failure(
                id,
                &ExceptionInfo::new("DecodeError", "kombu.exceptions", error.to_string()),
            )
        }),
        settlement: Settlement::DeadLetter {
            reason: format!("malformed message: {error}"),
        },
    }
}

/// A task no loaded plugin offers: FAILURE `NotRegistered`, dead-lettered (as Celery
/// rejects it).
pub fn not_registered(message: &TaskMessage) -> Decision {
    Decision {
        meta: Some(ResultMeta::failure(
            &message.id,
            &ExceptionInfo::new("NotRegistered", "celery.exceptions", message.task.clone()),
        )),
        settlement: Settlement::DeadLetter {
            reason: format!("unknown task {}", message.task),
        },
    }
}

/// A task whose grants cannot be given (a granted folder is missing, say): FAILURE
/// `wasmq.exceptions.GrantError` naming what is wrong, acked. It is not retried: the same
/// grants fail the same way until the worker's configuration changes.
pub fn grant_refused(message: &TaskMessage, error: &GrantError) -> Decision {
    Decision {
        meta: Some(ResultMeta::failure(
            &message.id,
            &ExceptionInfo::new("GrantError", "wasmq.exceptions", error.to_string()),
        )),
        settlement: Settlement::Ack,
    }
}

/// A message whose eta is further away than the worker holds messages: back to the broker,
/// delayed by `wait`.
pub fn deferred(wait: Duration) -> Decision {
    Decision::settle_only(Settlement::Defer { delay: wait })
}

/// A message past its `expires`: REVOKED `TaskRevokedError("expired")`, acked.
pub fn expired(message: &TaskMessage) -> Decision {
    revoked(message, "expired")
}

/// A revoked task (`reason` is `revoked`, or `terminated` when it was interrupted):
/// REVOKED `TaskRevokedError(reason)`, acked.
pub fn revoked(message: &TaskMessage, reason: &str) -> Decision {
    Decision {
        meta: Some(ResultMeta::revoked(&message.id, reason)),
        settlement: Settlement::Ack,
    }
}

/// A message delivered more than `max_deliveries` times without being settled (its worker
/// died each time): FAILURE `WorkerLostError`, dead-lettered instead of looping forever.
pub fn poison(message: &TaskMessage, deliveries: u32, max_deliveries: u32) -> Decision {
    let reason = format!(
        "poison message: delivered {deliveries} times without finishing (max_deliveries {max_deliveries})"
    );
    Decision {
        meta: Some(ResultMeta::failure(
            &message.id,
            &ExceptionInfo::new("WorkerLostError", "billiard.exceptions", reason.clone()),
        )),
        settlement: Settlement::DeadLetter { reason },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;
    use crate::engine::LimitExceeded;
    use crate::results::TaskState;

    fn message(retries: u32) -> TaskMessage {
        let mut m = TaskMessage::new("math.add", vec![json!(1)], Map::new());
        m.retries = retries;
        m
    }

    fn limit(kind: LimitKind, text: &str) -> Outcome {
        Outcome::LimitExceeded(LimitExceeded {
            kind,
            message: text.into(),
        })
    }

    #[test]
    fn outcomes_map_to_celery_states_and_settlements() {
        let limits = Limits {
            fuel: 100,
            memory_bytes: 1 << 20,
            timeout: Duration::from_secs(2),
        };
        let policy = RetryPolicy::default();
        let m = message(0);
        let exc = |d: &Decision| d.meta.as_ref().unwrap().exception().unwrap();

        let d = decide(&m, &Outcome::Success("5".into()), &limits, &policy);
        assert_eq!(d.meta.as_ref().unwrap().result, json!(5));
        assert_eq!(d.settlement, Settlement::Ack);

        let d = decide(
            &m,
            &limit(LimitKind::WallTime, "exceeded its time limit (2s)"),
            &limits,
            &policy,
        );
        assert_eq!(exc(&d).exc_type, "TimeLimitExceeded");
        assert_eq!(exc(&d).exc_module, "billiard.exceptions");
        assert_eq!(exc(&d).exc_message[0], json!(2.0));

        let d = decide(
            &m,
            &limit(LimitKind::Fuel, "ran out of fuel (budget 100)"),
            &limits,
            &policy,
        );
        assert_eq!(exc(&d).exc_type, "TimeLimitExceeded");
        assert_eq!(exc(&d).exc_message, [json!("ran out of fuel (budget 100)")]);

        let d = decide(
            &m,
            &limit(LimitKind::Memory, "exceeded its memory limit (1 MiB)"),
            &limits,
            &policy,
        );
        assert_eq!(
            (exc(&d).exc_type.as_str(), exc(&d).exc_module.as_str()),
            ("MemoryError", "builtins")
        );

        let failed = Outcome::Failed(TaskFailure::new("ZeroDivisionError", "division by zero"));
        let d = decide(&m, &failed, &limits, &policy);
        assert_eq!(exc(&d).to_string(), "ZeroDivisionError: division by zero");
        assert_eq!(exc(&d).exc_module, "builtins");
        let custom = Outcome::Failed(TaskFailure::new("QuotaError", "over"));
        assert_eq!(
            exc(&decide(&m, &custom, &limits, &policy)).exc_module,
            "wasmq.exceptions"
        );

        let d = decide(
            &m,
            &Outcome::InvalidArguments {
                message: "math.add takes 2".into(),
            },
            &limits,
            &policy,
        );
        assert_eq!(exc(&d).exc_type, "TypeError");
        assert!(matches!(d.settlement, Settlement::DeadLetter { .. }));

        let retry = Outcome::Retry {
            countdown: Some(Duration::from_secs(1)),
            reason: "later".into(),
            exc: None,
            args: None,
            kwargs: None,
            max_retries: None,
            expires: None,
        };
        let d = decide(&m, &retry, &limits, &policy);
        assert_eq!(d.meta.as_ref().unwrap().status, TaskState::Retry);
        assert_eq!(
            d.settlement,
            Settlement::RetryLater {
                delay: Duration::from_secs(1),
                next: NextAttempt::default(),
            }
        );
        let d = decide(&message(3), &retry, &limits, &policy);
        assert_eq!(exc(&d).exc_type, "MaxRetriesExceededError");
        assert_eq!(d.settlement, Settlement::Ack);

        let autoretry = RetryPolicy {
            autoretry_for: vec!["ConnectionError".into()],
            backoff: Some(Duration::from_millis(100)),
            jitter: false,
            max_retries: 2,
            ..RetryPolicy::default()
        };
        let refused = Outcome::Failed(TaskFailure::new("ConnectionError", "refused"));
        let d = decide(&message(1), &refused, &limits, &autoretry);
        assert_eq!(d.meta.as_ref().unwrap().status, TaskState::Retry);
        assert_eq!(exc(&d).exc_type, "ConnectionError");
        assert_eq!(
            d.settlement,
            Settlement::RetryLater {
                delay: Duration::from_millis(200),
                next: NextAttempt::default(),
            },
            "backoff factor × 2^retries"
        );
        let d = decide(&message(2), &refused, &limits, &autoretry);
        assert_eq!(d.meta.as_ref().unwrap().status, TaskState::Failure);
        assert_eq!(
            exc(&d).exc_type,
            "ConnectionError",
            "the failure itself, once retries are spent"
        );
        let d = decide(&message(0), &failed, &limits, &autoretry);
        assert_eq!(
            d.meta.as_ref().unwrap().status,
            TaskState::Failure,
            "not listed"
        );

        let d = decide(
            &m,
            &Outcome::Rejected {
                reason: "never".into(),
                requeue: false,
            },
            &limits,
            &policy,
        );
        assert!(matches!(d.settlement, Settlement::DeadLetter { .. }));
        assert_eq!(exc(&d).exc_type, "Reject");

        let d = not_registered(&m);
        assert_eq!(exc(&d).exc_message, [json!("math.add")]);
        let d = expired(&m);
        assert_eq!(d.meta.as_ref().unwrap().status, TaskState::Revoked);
    }

    #[test]
    fn runs_without_an_ordinary_outcome_are_decided_here_too() {
        let limits = Limits {
            fuel: 100,
            memory_bytes: 1 << 20,
            timeout: Duration::from_secs(2),
        };
        let report = |outcome: Outcome| {
            Ok(CallReport {
                outcome,
                limits,
                fuel_used: 0,
                cpu_time: Duration::ZERO,
                elapsed: Duration::ZERO,
            })
        };
        let policy = RetryPolicy::default();
        let m = message(0);
        let interrupted = report(limit(LimitKind::WallTime, "interrupted"));
        let shutdown = Interruption {
            shutdown: true,
            terminated: true,
        };
        let terminated = Interruption {
            shutdown: false,
            terminated: true,
        };

        let busy = Err(CallError::Unavailable("every pool slot is in use".into()));
        let d = after_run(&m, &busy, Interruption::default(), &policy);
        assert_eq!(d, Decision::settle_only(Settlement::Release));

        let unknown = Err(CallError::UnknownTask {
            plugin: "math".into(),
            task: "math.add".into(),
            available: String::new(),
        });
        let d = after_run(&m, &unknown, Interruption::default(), &policy);
        assert!(matches!(d.settlement, Settlement::DeadLetter { .. }));

        let refused = Err(CallError::Grant(GrantError::NotADirectory {
            host: "/srv/tenant-a/data.txt".into(),
        }));
        let d = after_run(&m, &refused, Interruption::default(), &policy);
        assert_eq!(d.settlement, Settlement::Ack, "a failure, not a release");
        let meta = d.meta.as_ref().unwrap();
        assert_eq!(meta.status, TaskState::Failure);
        let exception = meta.exception().unwrap();
        assert_eq!(
            (exception.exc_type.as_str(), exception.exc_module.as_str()),
            ("GrantError", "wasmq.exceptions")
        );
        assert_eq!(
            exception.exc_message,
            [json!(
                "the granted path /srv/tenant-a/data.txt is not a folder"
            )]
        );

        let d = after_run(&m, &interrupted, shutdown, &policy);
        assert_eq!(
            d.settlement,
            Settlement::Release,
            "shutdown: runs again elsewhere"
        );
        assert!(d.meta.is_none());

        let d = after_run(&m, &interrupted, terminated, &policy);
        assert_eq!(d.meta.as_ref().unwrap().status, TaskState::Revoked);
        assert_eq!(
            d.meta.as_ref().unwrap().exception().unwrap().exc_message,
            [json!("terminated")]
        );

        let done = report(Outcome::Success("5".into()));
        let d = after_run(&m, &done, shutdown, &policy);
        assert_eq!(
            d.meta.as_ref().unwrap().status,
            TaskState::Success,
            "a success that beat the interruption is kept"
        );

        let d = after_run(&m, &interrupted, Interruption::default(), &policy);
        assert_eq!(
            d.meta.as_ref().unwrap().exception().unwrap().exc_type,
            "TimeLimitExceeded"
        );
    }

    #[test]
    fn exceptions_keep_their_module_class_and_arguments() {
        let limits = Limits {
            fuel: 100,
            memory_bytes: 1 << 20,
            timeout: Duration::from_secs(2),
        };
        let policy = RetryPolicy::default();
        let exc = |d: &Decision| d.meta.as_ref().unwrap().exception().unwrap();
        let expected = TaskFailure {
            kind: "t.integration.tasks.ExpectedException".into(),
            message: "Task expected to fail, 42".into(),
            args: Some(vec![json!("Task expected to fail"), json!(42)]),
        };
        let d = decide(
            &message(0),
            &Outcome::Failed(expected.clone()),
            &limits,
            &policy,
        );
        let e = exc(&d);
        assert_eq!(e.exc_module, "t.integration.tasks");
        assert_eq!(e.exc_type, "ExpectedException");
        assert_eq!(e.exc_message, [json!("Task expected to fail"), json!(42)]);
        assert_eq!(
            exc(&decide(
                &message(0),
                &Outcome::Failed(TaskFailure::new("KeyError", "k")),
                &limits,
                &policy
            ))
            .exc_module,
            "builtins"
        );

        let retry = Outcome::Retry {
            countdown: None,
            reason: "down".into(),
            exc: Some(expected),
            args: None,
            kwargs: None,
            max_retries: None,
            expires: None,
        };
        let spent = decide(&message(3), &retry, &limits, &policy);
        assert_eq!(spent.settlement, Settlement::Ack);
        assert_eq!(
            exc(&spent).exc_type,
            "ExpectedException",
            "retry(exc=…) raises exc"
        );
        let again = decide(&message(0), &retry, &limits, &policy);
        assert_eq!(again.meta.as_ref().unwrap().status, TaskState::Retry);

        let autoretry = RetryPolicy {
            autoretry_for: vec!["ExpectedException".into()],
            ..RetryPolicy::default()
        };
        let failed = Outcome::Failed(TaskFailure::new("proj.ExpectedException", "x"));
        assert_eq!(
            decide(&message(0), &failed, &limits, &autoretry)
                .meta
                .unwrap()
                .status,
            TaskState::Retry,
            "autoretry_for matches the class name as well as the dotted path"
        );
    }

    /// Celery's `retry(args=…, kwargs=…, max_retries=…, expires=…)` and
    /// `Reject(requeue=True)`.
    #[test]
    fn a_retry_says_what_the_next_attempt_changes_and_a_requeue_releases() {
        let limits = Limits {
            fuel: 100,
            memory_bytes: 1 << 20,
            timeout: Duration::from_secs(2),
        };
        let policy = RetryPolicy::default();
        let retry = |max_retries| Outcome::Retry {
            countdown: Some(Duration::ZERO),
            reason: "again".into(),
            exc: None,
            args: Some(vec![json!(2), json!(3)]),
            kwargs: Some(json!({"label": "kept"}).as_object().unwrap().clone()),
            max_retries,
            expires: Some(Duration::from_secs(60)),
        };
        let d = decide(&message(0), &retry(None), &limits, &policy);
        assert_eq!(
            d.settlement,
            Settlement::RetryLater {
                delay: Duration::ZERO,
                next: NextAttempt {
                    args: Some(vec![json!(2), json!(3)]),
                    kwargs: Some(json!({"label": "kept"}).as_object().unwrap().clone()),
                    expires: Some(Duration::from_secs(60)),
                },
            }
        );
        let d = decide(&message(1), &retry(Some(1)), &limits, &policy);
        let exception = d.meta.as_ref().unwrap().exception().unwrap();
        assert_eq!(
            exception.exc_type, "MaxRetriesExceededError",
            "this call allows one retry, the policy three"
        );
        assert!(
            exception.exc_message[0]
                .as_str()
                .unwrap()
                .contains(r#"args:[Number(2), Number(3)]"#),
            "names the arguments it would have run with: {exception}"
        );
        assert!(
            matches!(
                decide(&message(5), &retry(Some(10)), &limits, &policy).settlement,
                Settlement::RetryLater { .. }
            ),
            "this call allows more retries than the policy"
        );

        let requeue = Outcome::Rejected {
            reason: "not yet".into(),
            requeue: true,
        };
        assert_eq!(
            decide(&message(0), &requeue, &limits, &policy),
            Decision::settle_only(Settlement::Release),
            "nothing stored, back to the queue"
        );
    }
}
