//! Celery message protocol v2: task messages as they travel on any broker.
//!
//! A message is an [`Envelope`]: a header table, a few AMQP-style properties and a body. For
//! a task, the headers carry `task`, `id`, `retries`, `eta`, `expires`, `timelimit`
//! (`[hard, soft]`), `root_id`, `parent_id`, `group`… and the body is the JSON array
//! `[args, kwargs, embed]` (`celery-reference.md` §2.4–2.5, captured from Celery 5.6).
//!
//! [`TaskMessage::encode`] builds the full header set Python's `as_task_v2` emits, so Python
//! workers and monitors see what they expect. [`TaskMessage::decode`] accepts what Python
//! clients send and rejects anything malformed with a typed [`DecodeError`] that carries the
//! task id whenever one can be read, so the worker can store a FAILURE the sender will see.
//!
//! Longer than 400 lines for one idea, the v2 message: encoding and decoding are two halves
//! of one format and are kept side by side so they cannot drift apart.

pub mod compression;
pub mod control;
pub mod events;
mod kombu;
mod options;
pub mod trace;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use control::{ControlCommand, ControlReplyTo};
pub use kombu::unwrap_kombu_values;
pub use options::SendOptions;
pub use trace::{TraceContext, TraceParentError};

/// The only body encoding wasmq reads and writes.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// A message as a broker carries it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Envelope {
    /// The application headers (AMQP's header table).
    pub headers: Map<String, Value>,
    /// Message properties.
    pub properties: Properties,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// The AMQP basic properties Celery uses (§2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Properties {
    /// `application/json` for every message wasmq writes.
    pub content_type: Option<String>,
    /// `utf-8`.
    pub content_encoding: Option<String>,
    /// The task id.
    pub correlation_id: Option<String>,
    /// Where an rpc result goes (the client's reply queue).
    pub reply_to: Option<String>,
    /// 0–255, higher first.
    pub priority: Option<u8>,
    /// 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Per-message TTL in milliseconds, as a string.
    pub expiration: Option<String>,
    /// The sender's message id.
    pub message_id: Option<String>,
    /// When the sender sent it (Unix seconds).
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    #[serde(rename = "type")]
    pub message_type: Option<String>,
    /// The sending application (Celery: `apply_async(app_id=…)`).
    pub app_id: Option<String>,
}

/// The `embed` element of the body: what to do after the task (canvas).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Embed {
    /// Signatures to call with the result on success (`link`).
    pub callbacks: Option<Vec<Value>>,
    /// Signatures to call on failure (`link_error`).
    pub errbacks: Option<Vec<Value>>,
    /// The remaining chain, last step first.
    pub chain: Option<Vec<Value>>,
    /// The chord body this task is a header member of.
    pub chord: Option<Value>,
}

/// A decoded task message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// The task name (`headers.task`).
    pub task: String,
    /// The task id (`headers.id`).
    pub id: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Callbacks, errbacks, chain and chord.
    pub embed: Embed,
    /// Retries so far.
    pub retries: u32,
    /// Not before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Not after this time.
    pub expires: Option<DateTime<Utc>>,
    /// The first task of the workflow.
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// The group this task belongs to.
    pub group: Option<String>,
    /// Position in the group.
    pub group_index: Option<u64>,
    /// Hard time limit in seconds (`timelimit[0]`).
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (`timelimit[1]`).
    pub soft_time_limit: Option<f64>,
    /// Whether to store the result: `Some(true)` not, `Some(false)` yes, `None` as the task
    /// declares (Celery's precedence: the message's explicit value wins).
    pub ignore_result: Option<bool>,
    /// Display name.
    pub shadow: Option<String>,
    /// The sender's node name.
    pub origin: Option<String>,
    /// Headers wasmq does not interpret (user headers, stamps…), kept for republishing.
    pub extra_headers: Map<String, Value>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// `priority` property.
    pub priority: Option<u8>,
    /// The trace position of whoever publishes the message (a worker's run of the task
    /// that caused it): [`TaskMessage::encode`] writes it as the `traceparent` header, over
    /// any in `extra_headers`. [`TaskMessage::decode`] leaves it unset; the header a
    /// message arrived with stays in `extra_headers`.
    pub trace: Option<TraceContext>,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// The task id, when the headers had a readable one.
    pub task_id: Option<String>,
    /// The task name, when readable.
    pub task: Option<String>,
    /// What is wrong.
    pub kind: DecodeErrorKind,
}

/// The most bytes a compressed task body may expand to (RabbitMQ's own limit on a message
/// is 128 MiB); a larger one is refused rather than expanded into memory.
pub const LARGEST_EXPANDED_BODY: usize = 128 << 20;

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// A content type other than JSON.
    #[error("unsupported content type {0:?} (wasmq reads application/json)")]
    UnsupportedContentType(String),
    /// A body compressed with a codec wasmq does not read (it reads zlib, kombu's
    /// `application/x-gzip`).
    #[error("unsupported compression {0:?} (wasmq reads application/x-gzip, kombu's zlib)")]
    UnsupportedCompression(String),
    /// A compressed body that cannot be read back: corrupt, or expanding beyond
    /// [`LARGEST_EXPANDED_BODY`].
    #[error("the compressed body cannot be read: {0}")]
    Compressed(String),
    /// The body is not JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON of the wrong shape.
    #[error("the body must be a JSON array [args, kwargs, embed]: {0}")]
    BodyShape(String),
    /// A required header is absent.
    #[error("the message has no {0:?} header (not a Celery protocol v2 task message)")]
    MissingHeader(&'static str),
    /// A header has the wrong type or an unparseable value.
    #[error("header {name:?} {problem}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl TaskMessage {
    /// A new message for `task` with a fresh UUID id (and `root_id` = id).
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        Self {
            task: task.into(),
            root_id: Some(id.clone()),
            correlation_id: Some(id.clone()),
            id,
            args,
            kwargs,
            embed: Embed::default(),
            retries: 0,
            eta: None,
            expires: None,
            parent_id: None,
            group: None,
            group_index: None,
            time_limit: None,
            soft_time_limit: None,
            ignore_result: None,
            shadow: None,
            origin: None,
            extra_headers: Map::new(),
            reply_to: None,
            priority: None,
            trace: None,
        }
    }

    /// Encodes the message with the full header set of Celery's `as_task_v2`.
    pub fn encode(&self) -> Envelope {
        let mut headers = self.extra_headers.clone();
        if let Some(trace) = &self.trace {
            headers.insert(trace::TRACEPARENT.into(), trace.to_string().into());
        }
        let opt = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()));
        let time =
            |t: &Option<DateTime<Utc>>| t.map_or(Value::Null, |t| Value::String(format_time(&t)));
        let num = |n: Option<f64>| n.map_or(Value::Null, |n| serde_json::json!(n));
        headers.insert("lang".into(), "py".into());
        headers.insert("task".into(), self.task.clone().into());
        headers.insert("id".into(), self.id.clone().into());
        headers.insert("shadow".into(), opt(&self.shadow));
        headers.insert("eta".into(), time(&self.eta));
        headers.insert("expires".into(), time(&self.expires));
        headers.insert("group".into(), opt(&self.group));
        headers.insert(
            "group_index".into(),
            self.group_index.map_or(Value::Null, Value::from),
        );
        headers.insert("retries".into(), self.retries.into());
        headers.insert(
            "timelimit".into(),
            Value::Array(vec![num(self.time_limit), num(self.soft_time_limit)]),
        );
        headers.insert(
            "root_id".into(),
            self.root_id
                .clone()
                .unwrap_or_else(|| self.id.clone())
                .into(),
        );
        headers.insert("parent_id".into(), opt(&self.parent_id));
        headers.insert("argsrepr".into(), args_repr(&self.args).into());
        headers.insert("kwargsrepr".into(), kwargs_repr(&self.kwargs).into());
        headers.insert("origin".into(), opt(&self.origin));
        headers.insert(
            "ignore_result".into(),
            self.ignore_result.map_or(Value::Null, Value::Bool),
        );
        headers
            .entry("replaced_task_nesting")
            .or_insert_with(|| 0.into());
        headers.entry("stamped_headers").or_insert(Value::Null);
        headers
            .entry("stamps")
            .or_insert_with(|| Value::Object(Map::new()));
        let body = serde_json::to_vec(&(&self.args, &self.kwargs, &self.embed))
            .expect("JSON values always serialize");
        Envelope {
            headers,
            properties: Properties {
                content_type: Some(CONTENT_TYPE_JSON.into()),
                content_encoding: Some("utf-8".into()),
                correlation_id: Some(
                    self.correlation_id
                        .clone()
                        .unwrap_or_else(|| self.id.clone()),
                ),
                reply_to: self.reply_to.clone(),
                priority: Some(self.priority.unwrap_or(0)),
                delivery_mode: Some(2),
                ..Properties::default()
            },
            body,
        }
    }

    /// Decodes a Celery protocol v2 task message.
    ///
    /// # Errors
    /// A [`DecodeError`] naming what is wrong, with the task id and name when readable.
    pub fn decode(envelope: &Envelope) -> Result<Self, DecodeError> {
        let headers = &envelope.headers;
        let task_id = headers.get("id").and_then(Value::as_str).map(str::to_owned);
        let task = headers
            .get("task")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let fail = |kind| DecodeError {
            task_id: task_id.clone(),
            task: task.clone(),
            kind,
        };
        let props = &envelope.properties;
        if let Some(ct) = &props.content_type
            && ct != CONTENT_TYPE_JSON
        {
            return Err(fail(DecodeErrorKind::UnsupportedContentType(ct.clone())));
        }
        // A body compressed by its sender (Celery's `task_compression = "gzip"`/"zlib"):
        // read back first; other codecs are refused by name.
        let expanded = match headers.get("compression").filter(|v| !v.is_null()) {
            None => None,
            Some(codec) => {
                let codec = codec.as_str().unwrap_or("?");
                let body = compression::decompress(&envelope.body, codec, LARGEST_EXPANDED_BODY)
                    .map_err(|error| match error {
                        compression::CompressionError::Unsupported(codec) => {
                            fail(DecodeErrorKind::UnsupportedCompression(codec))
                        }
                        other => fail(DecodeErrorKind::Compressed(other.to_string())),
                    })?;
                Some(body)
            }
        };
        let body_bytes = expanded.as_deref().unwrap_or(&envelope.body);
        let Some(task_name) = task.clone() else {
            return Err(fail(match headers.get("task") {
                None | Some(Value::Null) => DecodeErrorKind::MissingHeader("task"),
                Some(other) => bad_header("task", "must be a string", other),
            }));
        };
        let Some(id) = task_id.clone() else {
            return Err(fail(match headers.get("id") {
                None | Some(Value::Null) => DecodeErrorKind::MissingHeader("id"),
                Some(other) => bad_header("id", "must be a string", other),
            }));
        };
        if task_name.is_empty() {
            return Err(fail(DecodeErrorKind::BadHeader {
                name: "task",
                problem: "is empty".into(),
            }));
        }

        let body: Value = serde_json::from_slice(body_bytes)
            .map_err(|e| fail(DecodeErrorKind::NotJson(e.to_string())))?;
        let Value::Array(mut parts) = body else {
            return Err(fail(DecodeErrorKind::BodyShape(format!(
                "got {}",
                json_type(&body)
            ))));
        };
        if parts.len() != 3 {
            return Err(fail(DecodeErrorKind::BodyShape(format!(
                "got {} elements",
                parts.len()
            ))));
        }
        let embed = parts.pop().unwrap_or(Value::Null);
        let kwargs = parts.pop().unwrap_or(Value::Null);
        let args = parts.pop().unwrap_or(Value::Null);
        let Value::Array(args) = args else {
            return Err(fail(DecodeErrorKind::BodyShape(format!(
                "args must be an array, got {}",
                json_type(&args)
            ))));
        };
        let kwargs = match kwargs {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(fail(DecodeErrorKind::BodyShape(format!(
                    "kwargs must be an object, got {}",
                    json_type(&other)
                ))));
            }
        };
        let embed: Embed = match embed {
            Value::Null => Embed::default(),
            other @ Value::Object(_) => serde_json::from_value(other).map_err(|e| {
                fail(DecodeErrorKind::BodyShape(format!(
                    "embed is malformed: {e}"
                )))
            })?,
            other => {
                return Err(fail(DecodeErrorKind::BodyShape(format!(
                    "embed must be an object or null, got {}",
                    json_type(&other)
                ))));
            }
        };

        let header = Headers { map: headers };
        let (time_limit, soft_time_limit) = header.timelimit().map_err(&fail)?;
        // Copy only the headers that are not Celery's (most messages have none).
        let extra_headers: Map<String, Value> = headers
            .iter()
            .filter(|(name, _)| !KNOWN_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Ok(Self {
            task: task_name,
            id,
            args,
            kwargs,
            embed,
            retries: header.uint("retries").map_err(&fail)?.unwrap_or(0) as u32,
            eta: header.time("eta").map_err(&fail)?,
            expires: header.time("expires").map_err(&fail)?,
            root_id: header.string("root_id").map_err(&fail)?,
            parent_id: header.string("parent_id").map_err(&fail)?,
            group: header.string("group").map_err(&fail)?,
            group_index: header.uint("group_index").map_err(&fail)?,
            time_limit,
            soft_time_limit,
            ignore_result: header.boolean("ignore_result").map_err(&fail)?,
            shadow: header.string("shadow").map_err(&fail)?,
            origin: header.string("origin").map_err(&fail)?,
            extra_headers,
            correlation_id: props.correlation_id.clone(),
            reply_to: props.reply_to.clone(),
            priority: props.priority,
            trace: None,
        })
    }
}

impl TaskMessage {
    /// True when the result of a successful run is not stored (the message's
    /// `ignore_result`, once the task's declaration filled it in).
    pub fn ignores_result(&self) -> bool {
        self.ignore_result == Some(true)
    }

    /// The headers that are not Celery's own (Celery's `request.headers`): the ones a
    /// sender added, e.g. with `apply_async(headers=…)`, without Celery's protocol headers
    /// and wasmq's own bookkeeping (`x-wasmq-*`).
    pub fn custom_headers(&self) -> Map<String, Value> {
        self.extra_headers
            .iter()
            .filter(|(name, _)| {
                !CELERY_REQUEST_FIELDS.contains(&name.as_str()) && !name.starts_with("x-wasmq-")
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }
}

/// The names Celery's `Context` leaves out of `request.headers` besides [`KNOWN_HEADERS`]:
/// the request's own fields and the protocol's other headers.
const CELERY_REQUEST_FIELDS: &[&str] = &[
    "args",
    "callbacks",
    "called_directly",
    "chain",
    "chord",
    "compression",
    "correlation_id",
    "delivery_info",
    "errbacks",
    "headers",
    "hostname",
    "is_eager",
    "kwargs",
    "logfile",
    "loglevel",
    "properties",
    "replaced_task_nesting",
    "reply_to",
    "soft_time_limit",
    "stamped_headers",
    "stamps",
    "taskset",
    "time_limit",
    "utc",
];

/// Headers `decode` interprets; everything else is kept in `extra_headers`.
const KNOWN_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    // Read while decoding: the body a message keeps is the expanded one.
    "compression",
];

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bad_header(name: &'static str, expected: &str, value: &Value) -> DecodeErrorKind {
    DecodeErrorKind::BadHeader {
        name,
        problem: format!("{expected}, got {}", json_type(value)),
    }
}

/// Typed access to optional headers; null and absent are the same.
struct Headers<'a> {
    map: &'a Map<String, Value>,
}

impl Headers<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &'static str) -> Result<Option<String>, DecodeErrorKind> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad_header(name, "must be a string", other)),
        }
    }

    fn uint(&self, name: &'static str) -> Result<Option<u64>, DecodeErrorKind> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| bad_header(name, "must be a non-negative integer", v)),
        }
    }

    fn boolean(&self, name: &'static str) -> Result<Option<bool>, DecodeErrorKind> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad_header(name, "must be a boolean", other)),
        }
    }

    fn time(&self, name: &'static str) -> Result<Option<DateTime<Utc>>, DecodeErrorKind> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => {
                parse_time(text)
                    .map(Some)
                    .ok_or_else(|| DecodeErrorKind::BadHeader {
                        name,
                        problem: format!("is not an ISO-8601 time: {text:?}"),
                    })
            }
            Some(other) => Err(bad_header(name, "must be an ISO-8601 string", other)),
        }
    }

    /// `timelimit`: `[hard, soft]`, each a number of seconds or null.
    fn timelimit(&self) -> Result<(Option<f64>, Option<f64>), DecodeErrorKind> {
        let Some(value) = self.get("timelimit") else {
            return Ok((None, None));
        };
        let Value::Array(items) = value else {
            return Err(bad_header("timelimit", "must be [hard, soft]", value));
        };
        let limit = |i: usize| -> Result<Option<f64>, DecodeErrorKind> {
            match items.get(i) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(Some)
                    .ok_or_else(|| {
                        bad_header("timelimit", "must hold non-negative numbers or null", v)
                    }),
            }
        };
        Ok((limit(0)?, limit(1)?))
    }
}

/// Formats a time as Celery does: `2026-11-28T18:56:05.710508+00:00`.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// Parses an ISO-8601 time; a naive time is taken as UTC (the worker's timezone).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|fmt| NaiveDateTime::parse_from_str(text, fmt).ok())
        .map(|naive| naive.and_utc())
}

/// `(2, 2)`-style rendering for the `argsrepr` header (informational, truncated at 1024).
fn args_repr(args: &[Value]) -> String {
    let inner: Vec<String> = args.iter().map(Value::to_string).collect();
    let text = if inner.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    };
    truncate_repr(text)
}

fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    truncate_repr(Value::Object(kwargs.clone()).to_string())
}

fn truncate_repr(mut text: String) -> String {
    if text.len() > 1024 {
        let mut end = 1021;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests;
