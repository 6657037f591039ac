//! The AMQP codec: [`Envelope`] ⇄ AMQP basic properties, and JSON header values ⇄ AMQP
//! field tables, typed as py-amqp types them so Python workers read wasmq's headers (and
//! wasmq reads theirs) without surprises.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::{Map, Value};

use crate::protocol::{Envelope, Properties};

/// JSON header values → AMQP field values (py-amqp's typing: `I` for ints that fit 32 bits,
/// `L` beyond, `d` floats, `A` arrays, `F` tables, `V` null).
fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i32::try_from(i).map_or(AMQPValue::LongLongInt(i), AMQPValue::LongInt),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(to_table(map)),
    }
}

fn to_table(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Ok(key) = ShortString::try_new(key.as_str()) {
            table.insert(key, to_amqp(value));
        }
    }
    table
}

/// AMQP field values of any type → JSON.
fn from_amqp(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10_f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(from_amqp).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(from_table(table)),
        AMQPValue::Void => Value::Null,
    }
}

fn from_table(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), from_amqp(v)))
        .collect()
}

/// The AMQP properties (and headers) `envelope` is published with.
pub(crate) fn properties_of(envelope: &Envelope) -> BasicProperties {
    let p = &envelope.properties;
    let mut properties = BasicProperties::default()
        .with_content_type(
            p.content_type
                .as_deref()
                .unwrap_or("application/json")
                .into(),
        )
        .with_content_encoding(p.content_encoding.as_deref().unwrap_or("utf-8").into())
        .with_delivery_mode(p.delivery_mode.unwrap_or(2))
        .with_priority(p.priority.unwrap_or(0))
        .with_headers(to_table(&envelope.headers));
    if let Some(id) = &p.correlation_id {
        properties = properties.with_correlation_id(id.as_str().into());
    }
    if let Some(reply_to) = &p.reply_to {
        properties = properties.with_reply_to(reply_to.as_str().into());
    }
    if let Some(expiration) = &p.expiration {
        properties = properties.with_expiration(expiration.as_str().into());
    }
    if let Some(id) = &p.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(timestamp) = p.timestamp {
        properties = properties.with_timestamp(timestamp);
    }
    if let Some(kind) = &p.message_type {
        properties = properties.with_type(kind.as_str().into());
    }
    if let Some(app_id) = &p.app_id {
        properties = properties.with_app_id(app_id.as_str().into());
    }
    properties
}

/// The envelope of a message received with `properties` and `body`.
pub(super) fn envelope_of(properties: &BasicProperties, body: Vec<u8>) -> Envelope {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    Envelope {
        headers: properties
            .headers()
            .as_ref()
            .map(from_table)
            .unwrap_or_default(),
        properties: Properties {
            content_type: text(properties.content_type()),
            content_encoding: text(properties.content_encoding()),
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            priority: *properties.priority(),
            delivery_mode: *properties.delivery_mode(),
            expiration: text(properties.expiration()),
            message_id: text(properties.message_id()),
            timestamp: *properties.timestamp(),
            message_type: text(properties.kind()),
            app_id: text(properties.app_id()),
        },
        body,
    }
}

/// Header names and values as a sorted map, for tests and tools.
pub fn headers_to_amqp_and_back(headers: &Map<String, Value>) -> BTreeMap<String, Value> {
    from_table(&to_table(headers)).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_header_type_decodes_to_json() {
        let mut table = FieldTable::default();
        table.insert("void".into(), AMQPValue::Void);
        table.insert("int32".into(), AMQPValue::LongInt(-5));
        table.insert("int64".into(), AMQPValue::LongLongInt(1 << 40));
        table.insert("double".into(), AMQPValue::Double(1.5));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("short".into(), AMQPValue::ShortString("s".into()));
        table.insert("long".into(), AMQPValue::LongString("l".into()));
        table.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongInt(30),
            ])),
        );
        let mut nested = FieldTable::default();
        nested.insert("k".into(), AMQPValue::ShortShortUInt(7));
        table.insert("table".into(), AMQPValue::FieldTable(nested));
        assert_eq!(
            Value::Object(from_table(&table)),
            json!({"void": null, "int32": -5, "int64": 1_i64 << 40, "double": 1.5, "flag": true,
                   "short": "s", "long": "l", "array": [null, 30], "table": {"k": 7}})
        );
        // The captured Celery header set survives a round trip.
        let headers = json!({"task": "proj.tasks.add", "timelimit": [30, 20.5], "group": null,
                             "stamps": {}, "retries": 3_000_000_000_i64, "ignore_result": false});
        let map = headers.as_object().unwrap();
        assert_eq!(
            headers_to_amqp_and_back(map),
            map.clone().into_iter().collect()
        );
    }

    #[test]
    fn the_properties_celery_exposes_survive_a_round_trip() {
        let envelope = Envelope {
            properties: Properties {
                correlation_id: Some("T1".into()),
                priority: Some(7),
                message_id: Some("m-1".into()),
                timestamp: Some(1_700_000_000),
                message_type: Some("task".into()),
                app_id: Some("1234".into()),
                ..Properties::default()
            },
            ..Envelope::default()
        };
        let received = envelope_of(&properties_of(&envelope), Vec::new());
        assert_eq!(
            received.properties,
            Properties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                delivery_mode: Some(2),
                ..envelope.properties
            }
        );
    }
}
