//! Celery's remote control ("pidbox", kombu `pidbox.py`): the command a client broadcasts to
//! workers, who it is addressed to, and the reply a worker sends back. Brokers carry it
//! (RabbitMQ: the `celery.pidbox` fanout exchange, replies on `reply.celery.pidbox`); the
//! worker's `control` module answers it.
//!
//! A command is JSON: `{"method", "arguments", "destination", "pattern", "matcher",
//! "ticket", "reply_to": {"exchange", "routing_key"}}`. A worker runs it when `destination`
//! names it, or when `pattern` matches its name with `matcher` (`glob`, the default, or
//! `pcre`), or when neither is given; it replies only when `reply_to` is present, with
//! `{"<node>": <reply>}` and the command's `ticket` as a header.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A remote-control command as a Celery client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlCommand {
    /// The command (`ping`, `revoke`, `active`…).
    pub method: String,
    /// Its arguments.
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// The nodes it is for; none (or empty): every node, unless `pattern` says otherwise.
    #[serde(default)]
    pub destination: Option<Vec<String>>,
    /// A pattern node names must match (with `matcher`).
    #[serde(default)]
    pub pattern: Option<String>,
    /// How `pattern` matches: `glob` or `pcre`.
    #[serde(default)]
    pub matcher: Option<String>,
    /// Identifies the replies to this command (present when replies are wanted).
    #[serde(default)]
    pub ticket: Option<String>,
    /// Where replies go; none: the sender wants no reply (a "cast").
    #[serde(default)]
    pub reply_to: Option<ControlReplyTo>,
}

/// Where the replies to a command go: an exchange and a routing key (RabbitMQ:
/// `reply.celery.pidbox` and the client's id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReplyTo {
    /// The exchange.
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl ControlCommand {
    /// A command to send: `method` with `arguments`, for the nodes in `destination` (none:
    /// every node); the sender fills in `ticket` and `reply_to` when it wants replies.
    pub fn new(
        method: impl Into<String>,
        arguments: Map<String, Value>,
        destination: Option<Vec<String>>,
    ) -> Self {
        Self {
            method: method.into(),
            arguments,
            destination,
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
        }
    }

    /// The JSON body of this command, as kombu's `Mailbox._publish` sends it.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a command message body.
    ///
    /// # Errors
    /// When the body is not a JSON command.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Whether worker `node` must run this command (kombu's `Node.handle_message`): named in
    /// `destination`, else matching `pattern`, else when it names no one in particular.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(nodes) = self.destination.as_ref().filter(|nodes| !nodes.is_empty()) {
            return nodes.iter().any(|n| n == node);
        }
        match (&self.pattern, &self.matcher) {
            (Some(pattern), matcher) => matches(pattern, matcher.as_deref(), node),
            (None, _) => true,
        }
    }

    /// The JSON body of this worker's reply: `{"<node>": reply}`.
    pub fn reply_body(node: &str, reply: Value) -> Vec<u8> {
        let mut body = Map::new();
        body.insert(node.to_owned(), reply);
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    }
}

/// Whether `node` matches `pattern` with kombu's `matcher` (`glob` by default, or `pcre`:
/// a regular expression anchored at the start, as Python's `re.match`). An invalid
/// pattern matches nothing.
/// Whether a command whose `expires` header says `expires` (Unix seconds; 0: never) has
/// expired: kombu skips such commands, and so does every wasmq mailbox.
pub fn has_expired(expires: f64) -> bool {
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    expires > 0.0 && expires < now
}

fn matches(pattern: &str, matcher: Option<&str>, node: &str) -> bool {
    match matcher.unwrap_or("glob") {
        "pcre" => regex::Regex::new(&format!("^(?:{pattern})"))
            .map(|re| re.is_match(node))
            .unwrap_or(false),
        _ => glob::Pattern::new(pattern)
            .map(|glob| glob.matches(node))
            .unwrap_or(false),
    }
}

/// `value` as Python's `repr()` prints it (Celery's replies quote sets and dicts that way,
/// e.g. `headers {'myheader': ['myvalue']} flagged as revoked`).
pub fn python_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => python_str_repr(text),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(entries) => {
            let entries: Vec<String> = entries
                .iter()
                .map(|(key, value)| format!("{}: {}", python_str_repr(key), python_repr(value)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
    }
}

/// A set of strings as Python's `repr()` prints it: `{'a', 'b'}` (`set()` when empty).
pub fn python_set_repr<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(python_str_repr).collect();
    if items.is_empty() {
        "set()".to_owned()
    } else {
        format!("{{{}}}", items.join(", "))
    }
}

/// A string as Python's `repr()` quotes it: single quotes unless the text holds a single
/// quote and no double quote.
fn python_str_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn commands_parse_as_celery_sends_them() {
        let body = br#"{"method":"ping","arguments":{},"destination":null,"pattern":null,"matcher":null,"ticket":"t-1","reply_to":{"exchange":"reply.celery.pidbox","routing_key":"abc"}}"#;
        let command = ControlCommand::parse(body).unwrap();
        assert_eq!(command.method, "ping");
        assert_eq!(command.ticket.as_deref(), Some("t-1"));
        assert_eq!(
            command.reply_to,
            Some(ControlReplyTo {
                exchange: "reply.celery.pidbox".into(),
                routing_key: "abc".into()
            })
        );
        assert!(command.is_for("w1@host"));
        let again = ControlCommand::parse(&command.body()).unwrap();
        assert_eq!(again, command, "a command survives its own body");
        let sent: Value =
            serde_json::from_slice(&ControlCommand::new("ping", Map::new(), None).body()).unwrap();
        assert_eq!(
            sent,
            json!({"method": "ping", "arguments": {}, "destination": null, "pattern": null,
                "matcher": null, "ticket": null, "reply_to": null})
        );
        let cast = ControlCommand::parse(br#"{"method":"enable_events","arguments":{}}"#).unwrap();
        assert!(cast.reply_to.is_none());
        assert!(ControlCommand::parse(b"not json").is_err());
    }

    #[test]
    fn destination_then_pattern_decide_who_runs_a_command() {
        let command = |extra: Value| {
            let mut value = json!({"method": "ping", "arguments": {}});
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            ControlCommand::parse(&serde_json::to_vec(&value).unwrap()).unwrap()
        };
        let named = command(json!({"destination": ["a@h", "b@h"]}));
        assert!(named.is_for("a@h") && !named.is_for("c@h"));
        assert!(command(json!({"destination": []})).is_for("c@h"));
        let glob = command(json!({"pattern": "wasmq@*", "matcher": "glob"}));
        assert!(glob.is_for("wasmq@host") && !glob.is_for("celery@host"));
        let default_glob = command(json!({"pattern": "w?@h"}));
        assert!(default_glob.is_for("w1@h"));
        let pcre = command(json!({"pattern": "w[0-9]+", "matcher": "pcre"}));
        assert!(pcre.is_for("w12@h") && !pcre.is_for("x@w1"));
        assert!(!command(json!({"pattern": "(", "matcher": "pcre"})).is_for("("));
    }

    #[test]
    fn replies_quote_values_as_python_prints_them() {
        assert_eq!(
            python_repr(&json!({"myheader": ["myvalue"], "n": [1, null, true]})),
            "{'myheader': ['myvalue'], 'n': [1, None, True]}"
        );
        assert_eq!(python_repr(&json!("it's")), "\"it's\"");
        assert_eq!(python_repr(&json!("a'\"b")), "'a\\'\"b'");
        assert_eq!(python_set_repr(["x"]), "{'x'}");
        assert_eq!(python_set_repr(Vec::<&str>::new()), "set()");
        let body = ControlCommand::reply_body("w@h", json!({"ok": "pong"}));
        assert_eq!(body, br#"{"w@h":{"ok":"pong"}}"#);
    }
}
