//! Publishing a workflow: the one routine that turns signatures into task messages on the
//! broker — used by the client to start a workflow and by the worker to continue one. It
//! knows the broker and the result backend (chord sizes), never who is publishing.
//!
//! How a workflow travels on the wire (`celery-reference.md` §1.4, §2.5):
//! * **chain** `a | b | c`: one message for `a` whose `embed.chain` is `[c, b]` (last step
//!   first), every step's id pre-assigned in `options.task_id`. The worker that runs `a`
//!   publishes `b` with `a`'s result prepended (unless `b` is immutable) and `embed.chain =
//!   [c]`, and so on.
//! * **group**: one message per member, sharing the `group` header, each with its own
//!   `group_index`.
//! * **chord** `group(h…) | body`: the backend is told the chord's size first (Redis
//!   `celery-taskset-meta-<gid>.s`), then each header member is published with `group` =
//!   gid and `embed.chord` = the body. The member that completes the chord publishes the
//!   body with the list of header results prepended.
//!
//! A group followed by more chain steps is upgraded to a chord whose body is the rest of the
//! chain, as Celery's `chain` does. Each task goes to the queue its signature names, else
//! its route, else the publisher's default queue. Publishing declares that queue, as
//! Celery's does — unless the publisher may declare only its own queues ([`Declaring`], a
//! tenant's worker): then a task for any other queue goes only into one that already exists
//! in the broker, and [`CanvasError::QueueNotFound`] names the task that could not.
//!
//! Slightly over 400 lines for one idea, publishing a workflow: its message building,
//! group and chord wiring, and the publish itself, with a test.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use super::signature::option_list;
use super::{CanvasError, Kind, Signature, chain, chord};
use crate::broker::{Broker, BrokerError};
use crate::protocol::trace::TRACESTATE;
use crate::protocol::{Embed, SendOptions, TaskMessage, TraceContext};
use crate::results::ResultBackend;
use crate::routes::TaskRoutes;

/// Which queues publishing may create.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Declaring<'a> {
    /// Any: a task's queue is declared when it is published to (Celery's behaviour; a
    /// client, the implicit tenant's worker).
    Any,
    /// Only these — a tenant's own queues, which its worker declares anyway. A task for any
    /// other queue goes only into a queue that already exists in the broker
    /// ([`Broker::publish_existing`]).
    Only(&'a [String]),
}

impl Declaring<'_> {
    /// Whether publishing to `queue` may declare it.
    pub(crate) fn may_declare(self, queue: &str) -> bool {
        match self {
            Declaring::Any => true,
            Declaring::Only(own) => own.iter().any(|q| q == queue),
        }
    }
}

/// Where and on whose behalf signatures are published.
pub(crate) struct Dispatch<'a> {
    /// Where messages go.
    pub(crate) broker: &'a dyn Broker,
    /// Where chord sizes are registered.
    pub(crate) backend: &'a dyn ResultBackend,
    /// How tasks are routed to queues when their signature names none.
    pub(crate) routes: &'a TaskRoutes,
    /// The queue of a task that neither its signature nor a route places.
    pub(crate) queue: String,
    /// Which queues publishing may create.
    pub(crate) declaring: Declaring<'a>,
    /// The workflow's first task (none: each published task is its own root).
    pub(crate) root_id: Option<String>,
    /// The task publishing (none for a client).
    pub(crate) parent_id: Option<String>,
    /// The `reply_to` of a signature without `options.reply_to`.
    pub(crate) reply_to: Option<String>,
    /// The sender's node name.
    pub(crate) origin: Option<String>,
    /// The publisher's trace position (a worker's run of the task continuing its
    /// workflow): every message published carries it as `traceparent`, with `tracestate`.
    /// None: a signature's own `headers` option decides.
    pub(crate) trace: Option<(TraceContext, Option<Value>)>,
}

type Applied<'b> = Pin<Box<dyn Future<Output = Result<(), CanvasError>> + Send + 'b>>;

/// What a walk over a signature does with each task it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Publishes it (and registers chord sizes and shapes).
    Publish,
    /// Only checks that its queue may be declared or exists; publishes and registers
    /// nothing.
    Check,
}

impl<'a> Dispatch<'a> {
    /// Publishes `sig` with `parent` prepended to its args (unless immutable) and
    /// `rest` (remaining chain steps, last first) to run after it.
    pub(crate) fn apply<'b>(
        &'b self,
        sig: &'b Signature,
        parent: Option<&'b Value>,
        rest: Vec<Value>,
    ) -> Applied<'b> {
        self.walk(sig, parent, rest, Walk::Publish)
    }

    /// Checks, publishing and registering nothing, that every task [`Dispatch::apply`] would
    /// publish for `sig` goes to a queue it may declare or that exists in the broker: a
    /// [`CanvasError::QueueNotFound`] for the first that does not. A sender that checks all
    /// its follow-ups first publishes all of them or none (unless a queue disappears between
    /// the check and the publish). Frozen ids are kept, so the error names the task the
    /// sender will wait on; ids `apply` would assign are not.
    pub(crate) fn check<'b>(
        &'b self,
        sig: &'b Signature,
        parent: Option<&'b Value>,
        rest: Vec<Value>,
    ) -> Applied<'b> {
        match self.declaring {
            Declaring::Any => Box::pin(async { Ok(()) }),
            Declaring::Only(_) => self.walk(sig, parent, rest, Walk::Check),
        }
    }

    fn walk<'b>(
        &'b self,
        sig: &'b Signature,
        parent: Option<&'b Value>,
        rest: Vec<Value>,
        walk: Walk,
    ) -> Applied<'b> {
        Box::pin(async move {
            let parent = parent.filter(|_| !sig.immutable);
            let publishing = walk == Walk::Publish;
            match sig.kind()? {
                Kind::Task => self.publish(sig, parent, rest, walk).await,
                Kind::Chain(steps) => {
                    let Some((first, later)) = steps.split_first() else {
                        return Err(sig.malformed("an empty chain"));
                    };
                    let mut chain = rest;
                    chain.extend(later.iter().rev().map(Signature::to_value));
                    self.walk(first, parent, chain, walk).await
                }
                Kind::Group(members) if !rest.is_empty() => {
                    // A group followed by more steps: its results go, as a list, to the
                    // rest of the chain (Celery upgrades this to a chord).
                    let body = chain(
                        rest.iter()
                            .rev()
                            .map(Signature::from_value)
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                    let mut upgraded = chord(members, body.into());
                    if let Some(gid) = sig.task_id() {
                        upgraded = upgraded.with_group_id(gid);
                    }
                    upgraded.0.freeze()?;
                    self.walk(&upgraded.0, parent, Vec::new(), walk).await
                }
                Kind::Group(members) => {
                    // A group's members share its id as their `group`. A group that is the
                    // last step of a chord header member carries that chord (its `chord`
                    // option), which its members report to.
                    let gid = sig
                        .task_id()
                        .or_else(|| string_option(&sig.options, "group_id"))
                        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
                    let chord = sig.options.get("chord").filter(|c| !c.is_null());
                    let members = unroll(members)?;
                    if chord.is_some() && publishing {
                        // As Celery's `group._apply_tasks`: a group reporting to a chord
                        // counts under its own id; members that joined the chord's group
                        // when it was frozen report there instead (`group_id` is immutable).
                        let size = members.iter().map(chord_size).sum();
                        self.backend.set_chord_size(&gid, size).await?;
                    }
                    for (index, member) in members.into_iter().enumerate() {
                        let member = in_group(member, &gid, index, chord)?;
                        self.walk(&member, parent, Vec::new(), walk).await?;
                    }
                    Ok(())
                }
                Kind::Chord { header, mut body } => {
                    let gid = sig
                        .chord_header()?
                        .task_id()
                        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
                    // `group_id` is immutable, as in Celery: a chord nested in another
                    // chord's header keeps reporting its body to the outer chord.
                    body.options
                        .entry("group_id")
                        .or_insert_with(|| gid.clone().into());
                    // What follows the chord runs after its body: Celery carries it in the
                    // body's `chain` option — the rest of the chain being applied, else the
                    // chord's own (a chord that is itself a chord's body).
                    let rest = if rest.is_empty() {
                        option_list(&sig.options, "chain")
                    } else {
                        rest
                    };
                    if !rest.is_empty() {
                        body.options.insert("chain".into(), Value::Array(rest));
                    }
                    body.freeze()?;
                    let header = unroll(header)?;
                    if header.is_empty() {
                        return self
                            .walk(&body, Some(&Value::Array(Vec::new())), Vec::new(), walk)
                            .await;
                    }
                    let size = header.iter().map(chord_size).sum();
                    let body = body.to_value();
                    let members = header
                        .into_iter()
                        .enumerate()
                        .map(|(index, member)| {
                            let mut member = in_group(member, &gid, index, Some(&body))?;
                            member.freeze()?;
                            Ok(member)
                        })
                        .collect::<Result<Vec<_>, CanvasError>>()?;
                    if !publishing {
                        // The body is published later, by the header's last member: its
                        // queue is checked then.
                        for member in &members {
                            self.walk(member, parent, Vec::new(), walk).await?;
                        }
                        return Ok(());
                    }
                    self.backend.set_chord_size(&gid, size).await?;
                    // A header holding groups gives the body nested lists: save its shape,
                    // as Celery's `apply_chord` does.
                    let shapes: Vec<Value> = members.iter().map(result_shape).collect();
                    if shapes
                        .iter()
                        .any(|shape| shape.get(1).is_some_and(Value::is_array))
                    {
                        let shape = serde_json::json!([[gid, null], shapes]);
                        self.backend.save_chord_shape(&gid, &shape).await?;
                    }
                    for member in &members {
                        self.walk(member, parent, Vec::new(), walk).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    /// Publishes one task (or, checking, only looks for its queue).
    async fn publish(
        &self,
        sig: &Signature,
        parent: Option<&Value>,
        rest: Vec<Value>,
        walk: Walk,
    ) -> Result<(), CanvasError> {
        let (message, queue) = self.message(sig, parent, rest)?;
        if walk == Walk::Check {
            return if self.declaring.may_declare(&queue) || self.broker.queue_exists(&queue).await?
            {
                Ok(())
            } else {
                Err(CanvasError::QueueNotFound {
                    task: message.task,
                    task_id: message.id,
                    queue,
                })
            };
        }
        let delay = message
            .eta
            .and_then(|eta| (eta - chrono::Utc::now()).to_std().ok());
        tracing::debug!(
            task = %message.task,
            id = %message.id,
            %queue,
            group = ?message.group,
            group_index = ?message.group_index,
            chord = message.embed.chord.is_some(),
            chain = message.embed.chain.as_ref().map_or(0, Vec::len),
            "publishing a workflow step"
        );
        let envelope = message.encode();
        let published = if self.declaring.may_declare(&queue) {
            self.broker.publish(&queue, &envelope, delay).await
        } else {
            self.broker.publish_existing(&queue, &envelope, delay).await
        };
        match published {
            Err(BrokerError::QueueNotFound { queue }) => Err(CanvasError::QueueNotFound {
                task: message.task,
                task_id: message.id,
                queue,
            }),
            other => Ok(other?),
        }
    }

    /// The message `sig.apply_async((parent,), chain=rest)` would send, and its queue.
    fn message(
        &self,
        sig: &Signature,
        parent: Option<&Value>,
        rest: Vec<Value>,
    ) -> Result<(TaskMessage, String), CanvasError> {
        let options = &sig.options;
        let mut args = Vec::with_capacity(sig.args.len() + 1);
        args.extend(parent.cloned());
        args.extend(sig.args.iter().cloned());
        let send = SendOptions::from_signature(options);
        let mut message = TaskMessage::build(sig.task.clone(), args, sig.kwargs.clone(), &send);
        message.root_id = Some(self.root_id.clone().unwrap_or_else(|| message.id.clone()));
        message.parent_id.clone_from(&self.parent_id);
        let string = |key: &str| options.get(key).and_then(Value::as_str).map(str::to_owned);
        message.group = string("group_id");
        message.group_index = options.get("group_index").and_then(Value::as_u64);
        message.reply_to = string("reply_to").or_else(|| self.reply_to.clone());
        message.shadow = string("shadow");
        message.origin.clone_from(&self.origin);
        let list = |key: &str| Some(option_list(options, key)).filter(|l| !l.is_empty());
        // The steps after this task: those of the chain being applied, else the ones the
        // signature carries itself (a chord body's `chain` option).
        let chain = if rest.is_empty() {
            list("chain")
        } else {
            Some(rest)
        };
        message.embed = Embed {
            callbacks: list("link"),
            errbacks: list("link_error"),
            chain,
            chord: options.get("chord").filter(|c| !c.is_null()).cloned(),
        };
        if let Some(Value::Object(headers)) = options.get("headers") {
            for (key, value) in headers {
                message.extra_headers.insert(key.clone(), value.clone());
            }
        }
        if let Some((trace, state)) = &self.trace {
            // The publisher's trace replaces whatever a signature carried.
            message.trace = Some(*trace);
            message.extra_headers.remove(TRACESTATE);
            if let Some(state) = state {
                message
                    .extra_headers
                    .insert(TRACESTATE.into(), state.clone());
            }
        }
        let queue = self
            .routes
            .resolve(&sig.task, send.queue.as_deref(), &self.queue)
            .to_owned();
        Ok((message, queue))
    }
}

/// `member` as the `index`th of group `gid` (and, for a chord header, reporting to `chord`),
/// as Celery's `freeze(group_id=…, chord=…, group_index=…)` makes it:
/// * a task joins the group — unless it already belongs to one (`group_id` is immutable);
/// * a chain joins through its last step, whose result is the member's;
/// * a group keeps its own id (`gid` when it has none) and joins `gid`, and so do its
///   members (so they report to the same chord, which counts the header's leaves);
/// * a chord's body joins (the body's result is the chord's).
fn in_group(
    mut member: Signature,
    gid: &str,
    index: usize,
    chord: Option<&Value>,
) -> Result<Signature, CanvasError> {
    let join = |options: &mut serde_json::Map<String, Value>| {
        options.entry("group_id").or_insert_with(|| gid.into());
        options.insert("group_index".into(), index.into());
        if let Some(body) = chord {
            options.insert("chord".into(), body.clone());
        }
    };
    match member.kind()? {
        Kind::Task => {
            join(&mut member.options);
            Ok(member)
        }
        Kind::Chain(mut steps) => {
            let last = steps
                .pop()
                .ok_or_else(|| member.malformed("an empty chain"))?;
            steps.push(in_group(last, gid, index, chord)?);
            member.set_children("tasks", &steps);
            Ok(member)
        }
        Kind::Group(members) => {
            // The group keeps its own id (its result's), but its members report to the
            // enclosing group, as Celery's `_freeze_group_tasks` passes `group_id` down:
            // a chord counts the leaves of its header, and its saved shape nests them.
            member
                .options
                .entry("task_id")
                .or_insert_with(|| gid.into());
            member.options.insert("group_id".into(), gid.into());
            member.options.insert("group_index".into(), index.into());
            if let Some(body) = chord {
                member.options.insert("chord".into(), body.clone());
            }
            let members = unroll(members)?
                .into_iter()
                .enumerate()
                .map(|(i, m)| in_group(m, gid, i, chord))
                .collect::<Result<Vec<_>, _>>()?;
            member.set_children("tasks", &members);
            Ok(member)
        }
        Kind::Chord { body, .. } => {
            let body = in_group(*body, gid, index, chord)?;
            member.kwargs.insert("body".into(), body.to_value());
            Ok(member)
        }
    }
}

/// A group's members with nested groups flattened into it, as Celery's `_freeze_unroll`
/// does (`group(group(a, b), c)` is `group(a, b, c)`).
fn unroll(members: Vec<Signature>) -> Result<Vec<Signature>, CanvasError> {
    let mut flat = Vec::with_capacity(members.len());
    let mut pending: std::collections::VecDeque<Signature> = members.into();
    while let Some(member) = pending.pop_front() {
        match member.kind()? {
            Kind::Group(inner) => {
                for sig in inner.into_iter().rev() {
                    pending.push_front(sig);
                }
            }
            _ => flat.push(member),
        }
    }
    Ok(flat)
}

/// How many parts a chord header member reports (Celery's `_chord._descend`): a task one, a
/// group each of its members', a chain its last non-empty step's, a chord its body's.
fn chord_size(member: &Signature) -> usize {
    match member.kind() {
        Ok(Kind::Task) | Err(_) => 1,
        Ok(Kind::Group(members)) => members.iter().map(chord_size).sum(),
        Ok(Kind::Chain(steps)) => steps
            .iter()
            .rev()
            .map(chord_size)
            .find(|size| *size > 0)
            .unwrap_or(0),
        Ok(Kind::Chord { body, .. }) => chord_size(&body),
    }
}

/// A signature's result as Celery's `as_tuple()` writes it: `[[id, null], null]` for a
/// task, `[[gid, null], [members…]]` for a group; a chain's is its last step's, a chord's
/// its body's.
fn result_shape(sig: &Signature) -> Value {
    match sig.kind() {
        Ok(Kind::Group(members)) => serde_json::json!([
            [sig.task_id(), null],
            members.iter().map(result_shape).collect::<Vec<_>>()
        ]),
        Ok(Kind::Chain(steps)) => steps.last().map_or(Value::Null, result_shape),
        Ok(Kind::Chord { body, .. }) => result_shape(&body),
        Ok(Kind::Task) | Err(_) => serde_json::json!([[sig.task_id(), null], null]),
    }
}

/// A string option.
fn string_option<'s>(options: &'s serde_json::Map<String, Value>, key: &str) -> Option<&'s str> {
    options.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_declares_only_its_own_queues_and_a_client_any() {
        let own = vec!["work-a".to_owned(), "reports".to_owned()];
        let tenant = Declaring::Only(&own);
        assert!(tenant.may_declare("work-a"));
        assert!(tenant.may_declare("reports"));
        assert!(!tenant.may_declare("work-b"));
        assert!(!tenant.may_declare("work-a.dead"));
        assert!(Declaring::Any.may_declare("work-b"));
    }
}
