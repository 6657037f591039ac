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
//! its route, else the publisher's default queue.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use super::signature::option_list;
use super::{CanvasError, Kind, Signature, chain, chord};
use crate::broker::Broker;
use crate::protocol::{Embed, SendOptions, TaskMessage};
use crate::results::ResultBackend;
use crate::routes::TaskRoutes;

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
    /// The workflow's first task (none: each published task is its own root).
    pub(crate) root_id: Option<String>,
    /// The task publishing (none for a client).
    pub(crate) parent_id: Option<String>,
    /// The `reply_to` of a signature without `options.reply_to`.
    pub(crate) reply_to: Option<String>,
    /// The sender's node name.
    pub(crate) origin: Option<String>,
}

type Applied<'b> = Pin<Box<dyn Future<Output = Result<(), CanvasError>> + Send + 'b>>;

impl<'a> Dispatch<'a> {
    /// Publishes `sig` with `parent` prepended to its args (unless immutable) and
    /// `rest` (remaining chain steps, last first) to run after it.
    pub(crate) fn apply<'b>(
        &'b self,
        sig: &'b Signature,
        parent: Option<&'b Value>,
        rest: Vec<Value>,
    ) -> Applied<'b> {
        Box::pin(async move {
            let parent = parent.filter(|_| !sig.immutable);
            match sig.kind()? {
                Kind::Task => self.publish(sig, parent, rest).await,
                Kind::Chain(steps) => {
                    let Some((first, later)) = steps.split_first() else {
                        return Err(sig.malformed("an empty chain"));
                    };
                    let mut chain = rest;
                    chain.extend(later.iter().rev().map(Signature::to_value));
                    self.apply(first, parent, chain).await
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
                    self.apply(&upgraded.0, parent, Vec::new()).await
                }
                Kind::Group(members) => {
                    let gid = sig
                        .task_id()
                        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
                    for (index, member) in members.iter().enumerate() {
                        let member = in_group(member.clone(), &gid, index, None)?;
                        self.apply(&member, parent, Vec::new()).await?;
                    }
                    Ok(())
                }
                Kind::Chord { header, mut body } => {
                    let gid = sig
                        .chord_header()?
                        .task_id()
                        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
                    body.options.insert("group_id".into(), gid.clone().into());
                    body.freeze()?;
                    if header.is_empty() {
                        return self
                            .apply(&body, Some(&Value::Array(Vec::new())), rest)
                            .await;
                    }
                    self.backend.set_chord_size(&gid, header.len()).await?;
                    let body = body.to_value();
                    for (index, member) in header.iter().enumerate() {
                        let member = in_group(member.clone(), &gid, index, Some(&body))?;
                        self.apply(&member, parent, Vec::new()).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    /// Publishes one task.
    async fn publish(
        &self,
        sig: &Signature,
        parent: Option<&Value>,
        rest: Vec<Value>,
    ) -> Result<(), CanvasError> {
        let (message, queue) = self.message(sig, parent, rest)?;
        let delay = message
            .eta
            .and_then(|eta| (eta - chrono::Utc::now()).to_std().ok());
        self.broker
            .publish(&queue, &message.encode(), delay)
            .await?;
        Ok(())
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
        message.embed = Embed {
            callbacks: list("link"),
            errbacks: list("link_error"),
            chain: Some(rest).filter(|r| !r.is_empty()),
            chord: options.get("chord").filter(|c| !c.is_null()).cloned(),
        };
        if let Some(Value::Object(headers)) = options.get("headers") {
            for (key, value) in headers {
                message.extra_headers.insert(key.clone(), value.clone());
            }
        }
        let queue = self
            .routes
            .resolve(&sig.task, send.queue.as_deref(), &self.queue)
            .to_owned();
        Ok((message, queue))
    }
}

/// `member` as the `index`th of group `gid` (and, for a chord header, reporting to `chord`).
/// For a chain member, the options go on its last step, whose result is the member's.
fn in_group(
    mut member: Signature,
    gid: &str,
    index: usize,
    chord: Option<&Value>,
) -> Result<Signature, CanvasError> {
    match member.kind()? {
        Kind::Task => {
            member.options.insert("group_id".into(), gid.into());
            member.options.insert("group_index".into(), index.into());
            if let Some(body) = chord {
                member.options.insert("chord".into(), body.clone());
            }
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
        Kind::Group(_) | Kind::Chord { .. } => Err(CanvasError::Unsupported(
            "a group or chord nested directly inside a group or chord header".into(),
        )),
    }
}
