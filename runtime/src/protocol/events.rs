//! Celery's events (`celery/events/`): what a worker tells monitors — Flower, `celery
//! events`, celery-exporter, `wasmq events` — about itself and its tasks.
//!
//! An event is a JSON object with a `type` (`worker-heartbeat`, `task-succeeded`…), the
//! fields of its kind, and the fields every event carries: `hostname` (the node), `timestamp`
//! (Unix seconds, a float), `utcoffset` (hours *west* of UTC, as Python's `time.timezone`),
//! `pid` and `clock` (a Lamport clock; receivers require it on task events).
//!
//! On RabbitMQ events travel on the durable `celeryev` topic exchange with the type as
//! routing key (`-` → `.`); task events are batched as Celery's own workers batch them: one
//! message holding a JSON *list* of events, routing key `task.multi`. Messages are transient
//! and carry the node in a `hostname` header. Receivers accept a single object or a list
//! ([`EventMessage::events`]).
//!
//! A worker builds its task events straight into their JSON ([`EncodedEvent`], from typed
//! fields such as [`TaskSucceeded`]), so a busy worker spends one serialization per event
//! and no map; receivers read them back as [`Event`] maps.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::control::python_repr;

/// The exchange Celery's events travel on (`event_exchange`).
pub const EVENT_EXCHANGE: &str = "celeryev";

/// The routing key of a batch of task events (kombu's `task.multi`).
pub const MULTI_ROUTING_KEY: &str = "task.multi";

/// Longest `result` or argument rendering an event carries (Celery's `saferepr(…, 1024)`).
const REPR_LIMIT: usize = 1024;

/// One event: its type and its fields (the common fields included once stamped).
#[derive(Debug, Clone, PartialEq)]
pub struct Event(Map<String, Value>);

impl Event {
    /// An event of `kind` (`worker-online`, `task-received`…) with `fields`.
    pub fn new(kind: &str, fields: Value) -> Self {
        let mut map = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        map.insert("type".into(), kind.into());
        Self(map)
    }

    /// Its type.
    pub fn kind(&self) -> &str {
        self.0.get("type").and_then(Value::as_str).unwrap_or("")
    }

    /// Whether it is a task event (`task-…`), the group `-E` switches on.
    pub fn is_task_event(&self) -> bool {
        self.kind().starts_with("task-")
    }

    /// Its fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Adds the fields every event carries: `hostname`, `timestamp`, `utcoffset`, `pid`,
    /// `clock`.
    pub fn stamp(&mut self, hostname: &str, timestamp: f64, pid: u32, clock: u64) {
        self.0.insert("hostname".into(), hostname.into());
        self.0.insert("timestamp".into(), timestamp.into());
        self.0.insert("utcoffset".into(), utc_offset_hours().into());
        self.0.insert("pid".into(), pid.into());
        self.0.insert("clock".into(), clock.into());
    }

    /// The routing key it travels under alone: its type with `-` as `.`.
    pub fn routing_key(&self) -> String {
        self.kind().replace('-', ".")
    }

    /// Into its JSON object.
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

/// The fields every event carries, for one event.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stamp<'a> {
    /// The node.
    pub hostname: &'a str,
    /// Unix seconds.
    pub timestamp: f64,
    /// Hours west of UTC ([`utc_offset_hours`]).
    pub utcoffset: i64,
    /// The worker's process id.
    pub pid: u32,
    /// The Lamport clock.
    pub clock: u64,
}

/// One event already in its JSON form, as a worker buffers it until its batch is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    kind: &'static str,
    json: Vec<u8>,
}

impl EncodedEvent {
    /// The event of `kind` with `fields` (a struct or a JSON object) and `stamp`'s common
    /// fields, serialized once.
    pub fn new<T: Serialize>(kind: &'static str, fields: &T, stamp: &Stamp<'_>) -> Self {
        #[derive(Serialize)]
        struct Envelope<'a, T> {
            #[serde(rename = "type")]
            kind: &'a str,
            #[serde(flatten)]
            fields: &'a T,
            #[serde(flatten)]
            stamp: &'a Stamp<'a>,
        }
        let json = serde_json::to_vec(&Envelope {
            kind,
            fields,
            stamp,
        })
        .unwrap_or_default();
        Self { kind, json }
    }

    /// Its type.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// `task-received`'s fields.
#[derive(Debug, Serialize)]
pub struct TaskReceived<'a> {
    /// The task id.
    pub uuid: &'a str,
    /// The task name.
    pub name: &'a str,
    /// [`args_repr`] of its arguments.
    pub args: String,
    /// [`kwargs_repr`] of its keyword arguments.
    pub kwargs: String,
    /// The workflow's first task.
    pub root_id: Option<&'a str>,
    /// The task that sent it.
    pub parent_id: Option<&'a str>,
    /// Retries so far.
    pub retries: u32,
    /// When it may run (ISO 8601).
    pub eta: Option<String>,
    /// When it expires (ISO 8601).
    pub expires: Option<String>,
    /// The queue it came from (what celery-exporter labels `queue_name`).
    pub queue: &'a str,
    /// The exchange it was published to (`""`: the default exchange).
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
}

/// `task-started`'s and other single-id events' fields.
#[derive(Debug, Serialize)]
pub struct TaskId<'a> {
    /// The task id.
    pub uuid: &'a str,
}

/// `task-succeeded`'s fields.
#[derive(Debug, Serialize)]
pub struct TaskSucceeded<'a> {
    /// The task id.
    pub uuid: &'a str,
    /// [`result_repr`] of the result.
    pub result: String,
    /// Seconds the task ran.
    pub runtime: f64,
}

/// One broker message of events: a single event, or a batch of task events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
    /// The routing key (`worker.heartbeat`, `task.multi`…).
    pub routing_key: String,
    /// The node that sent it (the `hostname` header).
    pub hostname: String,
    /// The JSON body: an event object or a list of them.
    pub body: Vec<u8>,
}

impl EventMessage {
    /// A message carrying one event.
    pub fn single(event: Event) -> Self {
        let hostname = hostname_of(&event);
        let routing_key = event.routing_key();
        Self {
            routing_key,
            hostname,
            body: serde_json::to_vec(&event.into_value()).unwrap_or_default(),
        }
    }

    /// A message carrying encoded `events` from `hostname` as one list (`task.multi`); one
    /// event travels alone, as kombu sends it.
    pub fn encoded(hostname: &str, mut events: Vec<EncodedEvent>) -> Self {
        if events.len() == 1
            && let Some(event) = events.pop()
        {
            return Self {
                routing_key: event.kind.replace('-', "."),
                hostname: hostname.to_owned(),
                body: event.json,
            };
        }
        let length = events.iter().map(|e| e.json.len() + 1).sum::<usize>() + 1;
        let mut body = Vec::with_capacity(length);
        body.push(b'[');
        for (index, event) in events.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&event.json);
        }
        body.push(b']');
        Self {
            routing_key: MULTI_ROUTING_KEY.to_owned(),
            hostname: hostname.to_owned(),
            body,
        }
    }

    /// How many events it holds, counted without building them (what a receiver that only
    /// counts needs).
    pub fn count(&self) -> usize {
        use serde::de::IgnoredAny;
        match self.body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => {
                serde_json::from_slice::<Vec<IgnoredAny>>(&self.body).map_or(0, |l| l.len())
            }
            Some(b'{') => 1,
            _ => 0,
        }
    }

    /// The events it holds (a receiver accepts an object or a list of objects); a body
    /// that is neither holds none.
    pub fn events(&self) -> Vec<Event> {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(map)) => vec![Event(map)],
            Ok(Value::Array(items)) => items
                .into_iter()
                .filter_map(|item| match item {
                    Value::Object(map) => Some(Event(map)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn hostname_of(event: &Event) -> String {
    event
        .fields()
        .get("hostname")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Hours west of UTC, as Python's `time.timezone // 3600` (Celery's `utcoffset`): 0 in a
/// UTC container, -1 in Paris in winter.
pub fn utc_offset_hours() -> i64 {
    let east = i64::from(chrono::Local::now().offset().local_minus_utc());
    (-east).div_euclid(3600)
}

/// Celery's `saferepr(value, 1024)` of a JSON value, as `result` carries it.
pub fn result_repr(value: &Value) -> String {
    truncate(python_repr(value))
}

/// Positional arguments as Celery's `argsrepr` renders a tuple: `(2, 3)`, `(1,)`.
pub fn args_repr(args: &[Value]) -> String {
    let items: Vec<String> = args.iter().map(python_repr).collect();
    let text = match items.len() {
        1 => format!("({},)", items[0]),
        _ => format!("({})", items.join(", ")),
    };
    truncate(text)
}

/// Keyword arguments as Celery's `kwargsrepr`: `{'x': 1}`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    truncate(python_repr(&Value::Object(kwargs.clone())))
}

/// An exception as Celery's `safe_repr(exc)` shows it: `ZeroDivisionError('division by
/// zero')` — what Flower shows and celery-exporter reads the `exception` label from.
pub fn exception_repr(kind: &str, message: &str) -> String {
    if message.is_empty() {
        return format!("{kind}()");
    }
    truncate(format!(
        "{kind}({})",
        python_repr(&Value::from(message.to_owned()))
    ))
}

/// The exception a stored failure describes (`{"exc_type", "exc_message"}`), as
/// [`exception_repr`] shows it.
pub fn exception_of_result(result: &Value) -> String {
    let kind = result
        .get("exc_type")
        .and_then(Value::as_str)
        .unwrap_or("Exception");
    let message = match result.get("exc_message") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => {
            return truncate(format!(
                "{kind}({})",
                items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
            ));
        }
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    exception_repr(kind, &message)
}

/// The fields of the worker events (`worker-online/heartbeat/offline`).
pub fn worker_fields(freq: f64, active: usize, processed: u64) -> Value {
    json!({
        "freq": freq,
        "active": active,
        "processed": processed,
        "loadavg": load_average(),
        "sw_ident": "wasmq",
        "sw_ver": env!("CARGO_PKG_VERSION"),
        "sw_sys": system_name(),
    })
}

/// `platform.system()`: `Linux`, `Darwin`, `Windows`.
fn system_name() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages rounded up to two decimals, as Celery sends them;
/// zeros where the system does not say (`/proc/loadavg` is Linux's).
fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        let value: f64 = field.parse().unwrap_or(0.0);
        *slot = (value * 100.0).ceil() / 100.0;
    }
    out
}

fn truncate(mut text: String) -> String {
    if text.len() > REPR_LIMIT {
        let mut end = REPR_LIMIT - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_celerys_common_fields_and_routing_keys() {
        let mut event = Event::new("task-succeeded", json!({"uuid": "t1", "runtime": 0.5}));
        event.stamp("wasmq@box", 1_700_000_000.25, 42, 7);
        assert_eq!(event.routing_key(), "task.succeeded");
        assert!(event.is_task_event());
        let fields = event.fields();
        assert_eq!(fields["hostname"], "wasmq@box");
        assert_eq!(fields["timestamp"], 1_700_000_000.25);
        assert_eq!(fields["pid"], 42);
        assert_eq!(fields["clock"], 7);
        assert!(fields["utcoffset"].is_i64());
        let message = EventMessage::single(event.clone());
        assert_eq!(message.hostname, "wasmq@box");
        assert_eq!(message.events(), vec![event]);
    }

    #[test]
    fn a_batch_is_a_list_under_task_multi_and_one_event_travels_alone() {
        let stamp = |clock| Stamp {
            hostname: "w@h",
            timestamp: 1.5,
            utcoffset: 0,
            pid: 7,
            clock,
        };
        let event = |id: &str, clock| {
            EncodedEvent::new("task-started", &TaskId { uuid: id }, &stamp(clock))
        };
        let batch = EventMessage::encoded("w@h", vec![event("a", 1), event("b", 2)]);
        assert_eq!(batch.routing_key, MULTI_ROUTING_KEY);
        assert_eq!(batch.hostname, "w@h");
        assert_eq!(batch.count(), 2);
        let events = batch.events();
        assert_eq!(events.len(), 2);
        let mut expected = Event::new("task-started", json!({"uuid": "b"}));
        expected.stamp("w@h", 1.5, 7, 2);
        let mut second = events[1].fields().clone();
        // The offset is stamped from the machine's zone by `Event::stamp`, 0 above.
        second.insert("utcoffset".into(), expected.fields()["utcoffset"].clone());
        assert_eq!(second, *expected.fields());
        let alone = EventMessage::encoded(
            "w@h",
            vec![EncodedEvent::new(
                "task-succeeded",
                &TaskSucceeded {
                    uuid: "c",
                    result: "5".into(),
                    runtime: 0.25,
                },
                &stamp(3),
            )],
        );
        assert_eq!(alone.routing_key, "task.succeeded");
        assert_eq!(alone.count(), 1);
        let fields = alone.events()[0].fields().clone();
        assert_eq!(fields["result"], "5");
        assert_eq!(fields["runtime"], 0.25);
        assert_eq!(fields["type"], "task-succeeded");
        assert_eq!(fields["clock"], 3);
        let junk = EventMessage {
            routing_key: "x".into(),
            hostname: "h".into(),
            body: b"[1, \"no\"]".to_vec(),
        };
        assert!(junk.events().is_empty());
        let broken = EventMessage {
            body: b"not json".to_vec(),
            ..junk
        };
        assert_eq!(broken.count(), 0);
    }

    #[test]
    fn exceptions_and_values_read_as_python_prints_them() {
        assert_eq!(
            exception_repr("ZeroDivisionError", "division by zero"),
            "ZeroDivisionError('division by zero')"
        );
        assert_eq!(
            exception_of_result(&json!({"exc_type": "KeyError", "exc_message": ["k"]})),
            "KeyError('k')"
        );
        assert_eq!(
            exception_of_result(&json!({"exc_type": "TimeLimitExceeded", "exc_message": [2.5]})),
            "TimeLimitExceeded(2.5)"
        );
        assert_eq!(args_repr(&[json!(2), json!(3)]), "(2, 3)");
        assert_eq!(args_repr(&[json!("a")]), "('a',)");
        assert_eq!(result_repr(&json!({"ok": true})), "{'ok': True}");
        assert!(result_repr(&json!("x".repeat(5000))).len() <= REPR_LIMIT);
    }

    #[test]
    fn worker_fields_say_wasmq() {
        let fields = worker_fields(2.0, 1, 10);
        assert_eq!(fields["sw_ident"], "wasmq");
        assert_eq!(fields["loadavg"].as_array().unwrap().len(), 3);
        assert_eq!(fields["freq"], 2.0);
    }
}
