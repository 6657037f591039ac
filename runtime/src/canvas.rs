//! Canvas: Celery's signatures, chains, groups and chords, encoded exactly as Celery encodes
//! them (`celery-reference.md` §1.4, §2.5), and the one routine that publishes them — used
//! by the client to start a workflow and by the worker to continue one.
//!
//! A [`Signature`] is Celery's signature dict: `{"task", "args", "kwargs", "options",
//! "subtask_type", "immutable"}`. Composite signatures keep their children in `kwargs`:
//! `celery.chain` / `celery.group` have `{"tasks": [...]}`, `celery.chord` has `{"header",
//! "body"}`.
//!
//! How a workflow travels on the wire:
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
//! chain, as Celery's `chain` does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::broker::{Broker, BrokerError};
use crate::client::{AsyncResult, Client, GetError, SendError};
use crate::protocol::{Embed, TaskMessage, parse_time};
use crate::results::{ResultBackend, ResultError};

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
    /// The result backend failed, or cannot count chords (rpc).
    #[error("the result backend failed")]
    Backend(#[from] ResultError),
}

impl CanvasError {
    /// True when trying again later may succeed (the broker or backend was unavailable);
    /// false for a canvas that can never run.
    pub fn is_transient(&self) -> bool {
        match self {
            CanvasError::Broker(_) => true,
            CanvasError::Backend(error) => !matches!(error, ResultError::ChordsUnsupported(_)),
            CanvasError::Malformed(_) | CanvasError::Unsupported(_) => false,
        }
    }
}

impl From<SendError> for CanvasError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Broker(e) => CanvasError::Broker(e),
            SendError::Backend(e) => CanvasError::Backend(e),
        }
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A task invocation as Celery serializes it: what to call, with what, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// The task name (`celery.chain`, `celery.group`, `celery.chord` for composites).
    pub task: String,
    /// Positional arguments (a parent's result is prepended to them unless immutable).
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: Vec<Value>,
    /// Keyword arguments (a composite's children live here).
    #[serde(default, deserialize_with = "null_as_default")]
    pub kwargs: Map<String, Value>,
    /// `apply_async` options: `task_id`, `queue`, `link`, `link_error`, `group_id`,
    /// `group_index`, `chord`, `reply_to`, `priority`, `countdown`, `eta`, `expires`…
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: Map<String, Value>,
    /// `null` for a task; `chain`, `group`, `chord`… for composites.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// When true the parent's result is not prepended (`.si()`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub immutable: bool,
    /// Other keys Celery writes (`chord_size`…), kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a signature stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// One task.
    Task,
    /// Steps run one after the other, each result fed to the next.
    Chain(Vec<Signature>),
    /// Members run in parallel.
    Group(Vec<Signature>),
    /// A group whose results, once all are in, go to the body.
    Chord {
        /// The parallel part.
        header: Vec<Signature>,
        /// What runs with the list of header results.
        body: Box<Signature>,
    },
}

impl Signature {
    /// A signature for `task` with positional `args` (Celery's `app.signature(name, args)`).
    ///
    /// ```
    /// use wasmq::canvas::Signature;
    /// let sig = Signature::new("math.add", vec![2.into()]).immutable();
    /// assert!(sig.immutable);
    /// ```
    pub fn new(task: impl Into<String>, args: Vec<Value>) -> Self {
        Self {
            task: task.into(),
            args,
            kwargs: Map::new(),
            options: Map::new(),
            subtask_type: None,
            immutable: false,
            extra: Map::new(),
        }
    }

    /// With keyword arguments.
    #[must_use]
    pub fn with_kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Makes it immutable (Celery's `.si()`): no parent result is prepended.
    #[must_use]
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Sets an `apply_async` option (e.g. `queue`, `task_id`, `priority`).
    #[must_use]
    pub fn with_option(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.options.insert(name.to_owned(), value.into());
        self
    }

    /// Adds a callback, called with this task's result on success (Celery's `link`).
    #[must_use]
    pub fn link(self, callback: Signature) -> Self {
        self.push_option("link", callback)
    }

    /// Adds an errback, called with this task's id on failure (Celery's `link_error`).
    #[must_use]
    pub fn link_error(self, errback: Signature) -> Self {
        self.push_option("link_error", errback)
    }

    fn push_option(mut self, name: &str, sig: Signature) -> Self {
        let entry = self
            .options
            .entry(name.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !entry.is_array() {
            let single = entry.take();
            *entry = Value::Array(if single.is_null() {
                vec![]
            } else {
                vec![single]
            });
        }
        if let Value::Array(list) = entry {
            list.push(sig.to_value());
        }
        self
    }

    /// Reads a signature dict.
    ///
    /// # Errors
    /// [`CanvasError::Malformed`] when it is not one.
    pub fn from_value(value: &Value) -> Result<Self, CanvasError> {
        Signature::deserialize(value)
            .map_err(|e| CanvasError::Malformed(format!("{e} in {}", short(value))))
    }

    /// The signature dict.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The pre-assigned task id (`options.task_id`), if any.
    pub fn task_id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }

    /// What this signature stands for, with its children parsed.
    ///
    /// # Errors
    /// [`CanvasError::Malformed`] for a composite without its children,
    /// [`CanvasError::Unsupported`] for a composite kind wasmq does not run.
    pub fn kind(&self) -> Result<Kind, CanvasError> {
        let kind = match self.subtask_type.as_deref() {
            Some(kind) => kind,
            None => match self.task.as_str() {
                "celery.chain" => "chain",
                "celery.group" => "group",
                "celery.chord" => "chord",
                _ => return Ok(Kind::Task),
            },
        };
        match kind {
            "chain" => Ok(Kind::Chain(self.children("tasks")?)),
            "group" => Ok(Kind::Group(self.children("tasks")?)),
            "chord" => {
                let Kind::Group(header) = self.chord_header()?.kind()? else {
                    return Err(CanvasError::Unsupported(
                        "a chord header that is not a group".into(),
                    ));
                };
                let body = self
                    .kwargs
                    .get("body")
                    .filter(|b| b.is_object())
                    .ok_or_else(|| self.malformed("a chord needs kwargs.body"))?;
                Ok(Kind::Chord {
                    header,
                    body: Box::new(Signature::from_value(body)?),
                })
            }
            other => Err(CanvasError::Unsupported(format!(
                "{other:?} signatures ({}) are not run by wasmq workers",
                self.task
            ))),
        }
    }

    /// A chord's header as a group signature (Celery sends a group dict; a bare list or a
    /// single task is accepted too).
    fn chord_header(&self) -> Result<Signature, CanvasError> {
        match self.kwargs.get("header") {
            Some(Value::Array(_)) => Ok(group_signature(self.children("header")?)),
            Some(value @ Value::Object(_)) => {
                let header = Signature::from_value(value)?;
                Ok(match header.kind()? {
                    Kind::Group(_) => header,
                    _ => group_signature(vec![header]),
                })
            }
            _ => Err(self.malformed("a chord needs kwargs.header")),
        }
    }

    fn children(&self, key: &str) -> Result<Vec<Signature>, CanvasError> {
        match self.kwargs.get(key) {
            Some(Value::Array(items)) => items.iter().map(Signature::from_value).collect(),
            _ => Err(self.malformed(&format!("a {} needs kwargs.{key} (a list)", self.task))),
        }
    }

    fn malformed(&self, what: &str) -> CanvasError {
        CanvasError::Malformed(format!("{what}: {}", short(&self.to_value())))
    }

    fn set_children(&mut self, key: &str, children: &[Signature]) {
        self.kwargs.insert(
            key.to_owned(),
            Value::Array(children.iter().map(Signature::to_value).collect()),
        );
    }

    /// Checks that this signature and every signature it holds can be run.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), CanvasError> {
        match self.kind()? {
            Kind::Task => {
                for key in ["link", "link_error"] {
                    for value in option_list(&self.options, key) {
                        Signature::from_value(&value)?.validate()?;
                    }
                }
                if let Some(body) = self.options.get("chord").filter(|c| !c.is_null()) {
                    Signature::from_value(body)?.validate()?;
                }
                Ok(())
            }
            Kind::Chain(steps) if steps.is_empty() => Err(self.malformed("an empty chain")),
            Kind::Chain(items) | Kind::Group(items) => {
                items.iter().try_for_each(Signature::validate)
            }
            Kind::Chord { header, body } => {
                header.iter().try_for_each(Signature::validate)?;
                body.validate()
            }
        }
    }

    /// Assigns an id to every task (and group) that has none, so results can be waited on
    /// before anything runs — Celery's `freeze`.
    ///
    /// # Errors
    /// When the signature is malformed.
    pub fn freeze(&mut self) -> Result<(), CanvasError> {
        match self.kind()? {
            Kind::Task => {
                if self.task_id().is_none() {
                    self.options
                        .insert("task_id".into(), uuid::Uuid::new_v4().to_string().into());
                }
            }
            Kind::Chain(mut steps) => {
                for step in &mut steps {
                    step.freeze()?;
                }
                self.set_children("tasks", &steps);
            }
            Kind::Group(mut members) => {
                if self.task_id().is_none() {
                    self.options
                        .insert("task_id".into(), uuid::Uuid::new_v4().to_string().into());
                }
                for member in &mut members {
                    member.freeze()?;
                }
                self.set_children("tasks", &members);
            }
            Kind::Chord { mut body, .. } => {
                let mut group = self.chord_header()?;
                group.freeze()?;
                body.freeze()?;
                if let Some(gid) = group.task_id() {
                    body.options.insert("group_id".into(), gid.into());
                }
                self.kwargs.insert("header".into(), group.to_value());
                self.kwargs.insert("body".into(), body.to_value());
            }
        }
        Ok(())
    }

    /// The id whose result is this signature's result: a task's own, a chain's last
    /// step's, a group's group id, a chord's body's. Known once frozen.
    pub fn result_id(&self) -> Option<String> {
        match self.kind().ok()? {
            Kind::Task | Kind::Group(_) => self.task_id().map(str::to_owned),
            Kind::Chain(steps) => steps.last()?.result_id(),
            Kind::Chord { body, .. } => body.result_id(),
        }
    }

    /// Every pre-assigned task id in this signature (its own and its children's), for
    /// marking them failed when the workflow cannot reach them.
    pub fn task_ids(&self) -> Vec<String> {
        match self.kind() {
            Ok(Kind::Task) => self.task_id().map(str::to_owned).into_iter().collect(),
            Ok(Kind::Chain(items) | Kind::Group(items)) => {
                items.iter().flat_map(Signature::task_ids).collect()
            }
            Ok(Kind::Chord { header, body }) => header
                .iter()
                .chain(std::iter::once(&*body))
                .flat_map(Signature::task_ids)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sends this signature as one task (after freezing it) and returns its result.
    ///
    /// # Errors
    /// When it is malformed or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        apply_frozen(self.clone(), client).await
    }
}

fn group_signature(members: Vec<Signature>) -> Signature {
    let mut sig = Signature::new("celery.group", vec![]);
    sig.subtask_type = Some("group".into());
    sig.set_children("tasks", &members);
    sig
}

async fn apply_frozen(mut sig: Signature, client: &Client) -> Result<AsyncResult, CanvasError> {
    sig.validate()?;
    sig.freeze()?;
    let id = sig
        .result_id()
        .ok_or_else(|| sig.malformed("no result id"))?;
    Dispatch::for_client(client)
        .await?
        .apply(&sig, None, Vec::new())
        .await?;
    Ok(client.result(&id))
}

/// A chain: each step's result is prepended to the next step's args.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain(Signature);

/// Celery's `chain(a, b, c)` (`a | b | c`).
pub fn chain(steps: impl IntoIterator<Item = Signature>) -> Chain {
    let mut sig = Signature::new("celery.chain", vec![]);
    sig.subtask_type = Some("chain".into());
    sig.set_children("tasks", &steps.into_iter().collect::<Vec<_>>());
    Chain(sig)
}

impl Chain {
    /// Starts the chain; the result is the last step's.
    ///
    /// # Errors
    /// When it is empty or malformed, or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        apply_frozen(self.0.clone(), client).await
    }
}

impl From<Chain> for Signature {
    fn from(chain: Chain) -> Self {
        chain.0
    }
}

/// A group: members run in parallel.
#[derive(Debug, Clone, PartialEq)]
pub struct Group(Signature);

/// Celery's `group(a, b, …)`.
pub fn group(members: impl IntoIterator<Item = Signature>) -> Group {
    Group(group_signature(members.into_iter().collect()))
}

impl Group {
    /// Sends every member; the result holds each member's result in order.
    ///
    /// # Errors
    /// When a member is malformed or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<GroupResult, CanvasError> {
        let mut sig = self.0.clone();
        sig.validate()?;
        sig.freeze()?;
        let Kind::Group(members) = sig.kind()? else {
            return Err(sig.malformed("not a group"));
        };
        let id = sig
            .task_id()
            .ok_or_else(|| sig.malformed("no group id"))?
            .to_owned();
        let results = members
            .iter()
            .map(|m| {
                m.result_id()
                    .map(|id| client.result(&id))
                    .ok_or_else(|| m.malformed("no result id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Dispatch::for_client(client)
            .await?
            .apply(&sig, None, Vec::new())
            .await?;
        Ok(GroupResult { id, results })
    }
}

impl From<Group> for Signature {
    fn from(group: Group) -> Self {
        group.0
    }
}

/// A chord: a group whose results, once all are in, are passed as one list to the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Chord(Signature);

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

    /// Registers the chord's size with the backend, sends the header; the result is the
    /// body's.
    ///
    /// # Errors
    /// [`CanvasError::Backend`] with [`ResultError::ChordsUnsupported`] on the rpc backend;
    /// otherwise when malformed or unpublishable.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        apply_frozen(self.0.clone(), client).await
    }
}

impl From<Chord> for Signature {
    fn from(chord: Chord) -> Self {
        chord.0
    }
}

/// The results of a group's members (Celery's `GroupResult`).
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// The group id (each member's `group` header).
    pub id: String,
    /// Each member's result, in order.
    pub results: Vec<AsyncResult>,
}

impl GroupResult {
    /// Waits for every member and returns their values in order; the whole wait is bounded
    /// by `timeout`.
    ///
    /// # Errors
    /// The first member's failure, or a timeout.
    pub async fn get(&self, timeout: Duration) -> Result<Vec<Value>, GetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut values = Vec::with_capacity(self.results.len());
        for result in &self.results {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            values.push(result.get(left).await?);
        }
        Ok(values)
    }
}

/// Reads an option that may be one signature or a list of them (`link`, `link_error`).
pub(crate) fn option_list(options: &Map<String, Value>, key: &str) -> Vec<Value> {
    match options.get(key) {
        Some(Value::Array(items)) => items.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// Where and on whose behalf signatures are published.
pub(crate) struct Dispatch<'a> {
    /// Where messages go.
    pub(crate) broker: &'a dyn Broker,
    /// Where chord sizes are registered.
    pub(crate) backend: &'a dyn ResultBackend,
    /// The queue of a signature without `options.queue`.
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
    async fn for_client(client: &'a Client) -> Result<Dispatch<'a>, CanvasError> {
        let backend = client.backend_ref();
        backend.prepare().await?;
        Ok(Dispatch {
            broker: client.broker_ref(),
            backend,
            queue: client.default_queue().to_owned(),
            root_id: None,
            parent_id: None,
            reply_to: backend.reply_to(),
            origin: Some(client.origin().to_owned()),
        })
    }

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
        let mut message = TaskMessage::new(sig.task.clone(), args, sig.kwargs.clone());
        if let Some(id) = sig.task_id() {
            message.id = id.to_owned();
            message.correlation_id = Some(id.to_owned());
        }
        message.root_id = Some(self.root_id.clone().unwrap_or_else(|| message.id.clone()));
        message.parent_id.clone_from(&self.parent_id);
        let string = |key: &str| options.get(key).and_then(Value::as_str).map(str::to_owned);
        let seconds = |key: &str| options.get(key).and_then(Value::as_f64);
        message.group = string("group_id");
        message.group_index = options.get("group_index").and_then(Value::as_u64);
        message.reply_to = string("reply_to").or_else(|| self.reply_to.clone());
        message.priority = options
            .get("priority")
            .and_then(Value::as_u64)
            .and_then(|p| u8::try_from(p).ok());
        message.shadow = string("shadow");
        message.origin.clone_from(&self.origin);
        message.time_limit = seconds("time_limit");
        message.soft_time_limit = seconds("soft_time_limit");
        message.ignore_result = options
            .get("ignore_result")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let now = chrono::Utc::now();
        let after = |secs: f64| {
            chrono::Duration::from_std(Duration::try_from_secs_f64(secs.max(0.0)).ok()?)
                .ok()
                .map(|d| now + d)
        };
        message.eta = match (seconds("countdown"), string("eta")) {
            (Some(countdown), _) => after(countdown),
            (None, Some(eta)) => parse_time(&eta),
            (None, None) => None,
        };
        message.expires = match options.get("expires") {
            Some(Value::Number(n)) => n.as_f64().and_then(after),
            Some(Value::String(text)) => parse_time(text),
            _ => None,
        };
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
        let queue = string("queue").unwrap_or_else(|| self.queue.clone());
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

/// A value shortened for error messages.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    }
}

/// A handle on the broker and backend for canvas publishing outside a client (the worker).
pub(crate) fn worker_dispatch<'a>(
    broker: &'a Arc<dyn Broker>,
    backend: &'a Arc<dyn ResultBackend>,
    message: &TaskMessage,
    queue: &str,
) -> Dispatch<'a> {
    Dispatch {
        broker: broker.as_ref(),
        backend: backend.as_ref(),
        queue: queue.to_owned(),
        root_id: Some(
            message
                .root_id
                .clone()
                .unwrap_or_else(|| message.id.clone()),
        ),
        parent_id: Some(message.id.clone()),
        reply_to: message.reply_to.clone(),
        origin: message.origin.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_python_signature_dicts() {
        let python = json!({"task":"proj.tasks.add","args":[10],"kwargs":{},"options":{"task_id":"L2"},
            "subtask_type":null,"immutable":false,"chord_size":null});
        let sig = Signature::from_value(&python).unwrap();
        assert_eq!(sig.task_id(), Some("L2"));
        assert_eq!(sig.kind().unwrap(), Kind::Task);
        assert_eq!(sig.to_value(), python, "round-trips unknown keys");
        let group = json!({"task":"celery.group","args":[],"kwargs":{"tasks":[python]},"options":{},
            "subtask_type":"group","immutable":false});
        assert!(
            matches!(Signature::from_value(&group).unwrap().kind().unwrap(), Kind::Group(m) if m.len() == 1)
        );
        let chunks = json!({"task":"celery.chunks","args":[],"kwargs":{},"options":{},"subtask_type":"chunks"});
        assert!(matches!(
            Signature::from_value(&chunks).unwrap().kind(),
            Err(CanvasError::Unsupported(_))
        ));
        assert!(Signature::from_value(&json!([1])).is_err());
    }

    #[test]
    fn freezing_assigns_every_id_and_a_chord_body_its_group() {
        let mut sig: Signature = chord(
            [
                Signature::new("math.add", vec![1.into(), 1.into()]),
                Signature::new("math.add", vec![2.into(), 2.into()]),
            ],
            Signature::new("math.sum", vec![]),
        )
        .into();
        sig.freeze().unwrap();
        let Kind::Chord { header, body } = sig.kind().unwrap() else {
            panic!()
        };
        assert!(header.iter().all(|m| m.task_id().is_some()));
        let gid = Signature::from_value(&sig.kwargs["header"])
            .unwrap()
            .task_id()
            .unwrap()
            .to_owned();
        assert_eq!(body.options["group_id"], json!(gid));
        assert_eq!(sig.result_id(), body.task_id().map(str::to_owned));
        assert_eq!(sig.task_ids().len(), 3);
    }

    #[test]
    fn link_accumulates_a_list() {
        let sig = Signature::new("math.add", vec![])
            .link(Signature::new("a", vec![]))
            .link(Signature::new("b", vec![]))
            .link_error(Signature::new("c", vec![]).immutable());
        assert_eq!(option_list(&sig.options, "link").len(), 2);
        assert_eq!(
            option_list(&sig.options, "link_error")[0]["immutable"],
            true
        );
    }
}
