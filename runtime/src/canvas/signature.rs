//! The signature: Celery's description of one task invocation, as the dict Celery
//! serializes (`{"task", "args", "kwargs", "options", "subtask_type", "immutable"}`), and
//! what can be asked of it — its kind, its ids (Celery's `freeze`), whether it can run.
//!
//! Composite signatures keep their children in `kwargs`: `celery.chain` / `celery.group`
//! have `{"tasks": [...]}`, `celery.chord` has `{"header", "body"}`. Keys wasmq does not
//! interpret are kept as they are, so a signature round-trips unchanged between Python and
//! wasmq processes.
//!
//! Slightly over 400 lines for one idea, the signature dict: its parsing, kinds, ids and
//! validation, with their tests.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::CanvasError;

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
    pub(crate) fn chord_header(&self) -> Result<Signature, CanvasError> {
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

    pub(crate) fn malformed(&self, what: &str) -> CanvasError {
        CanvasError::Malformed(format!("{what}: {}", short(&self.to_value())))
    }

    pub(crate) fn set_children(&mut self, key: &str, children: &[Signature]) {
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
                // The body joins the chord's group when the chord runs, not here (Celery's
                // `chord.freeze` leaves it): a chord that is the last step of another
                // chord's header member must let the outer chord claim its body first.
                body.freeze()?;
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
}

/// A group signature holding `members`.
pub(crate) fn group_signature(members: Vec<Signature>) -> Signature {
    let mut sig = Signature::new("celery.group", vec![]);
    sig.subtask_type = Some("group".into());
    sig.set_children("tasks", &members);
    sig
}

/// Reads an option that may be one signature or a list of them (`link`, `link_error`).
pub(crate) fn option_list(options: &Map<String, Value>, key: &str) -> Vec<Value> {
    match options.get(key) {
        Some(Value::Array(items)) => items.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// A value shortened for error messages.
pub(crate) fn short(value: &Value) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canvas::chord;
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
    fn freezing_assigns_every_id_but_leaves_the_body_out_of_the_chords_group() {
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
        assert!(
            Signature::from_value(&sig.kwargs["header"])
                .unwrap()
                .task_id()
                .is_some(),
            "the header (a group) has its id"
        );
        assert!(
            !body.options.contains_key("group_id"),
            "the body joins a group when the chord runs (an outer chord may claim it first)"
        );
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
