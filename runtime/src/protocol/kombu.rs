//! kombu's JSON wrapping of Python types (`kombu/utils/json.py`, kombu ≥ 5.3):
//! `{"__type__": "datetime", "__value__": "2026-11-28T18:56:05+00:00"}` and friends. Tasks
//! are plain JSON functions, so the worker hands them the plain value.

use serde_json::{Map, Value};

/// Replaces every kombu-wrapped value inside `value` by its plain JSON form:
/// datetimes, dates, times, decimals and bytes become strings, `uuid` becomes its hex
/// string, `base64` stays the base64 text. Unknown `__type__`s are left untouched.
pub fn unwrap_kombu_values(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(unwrap_kombu_values).collect()),
        Value::Object(map) => match unwrap_one(map) {
            Ok(plain) => plain,
            Err(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (k, unwrap_kombu_values(v)))
                    .collect(),
            ),
        },
        other => other,
    }
}

/// `Ok(plain)` when `map` is exactly a kombu wrapper of a known type.
fn unwrap_one(mut map: Map<String, Value>) -> Result<Value, Map<String, Value>> {
    if map.len() != 2 {
        return Err(map);
    }
    let known = matches!(
        map.get("__type__").and_then(Value::as_str),
        Some("datetime" | "date" | "time" | "decimal" | "uuid" | "bytes" | "base64")
    );
    if !known || !map.contains_key("__value__") {
        return Err(map);
    }
    let kind = map
        .remove("__type__")
        .and_then(|v| v.as_str().map(str::to_owned));
    let value = map.remove("__value__").unwrap_or(Value::Null);
    Ok(match (kind.as_deref(), value) {
        (Some("uuid"), Value::Object(mut inner)) => inner.remove("hex").unwrap_or(Value::Null),
        (_, value) => value,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wrapped_values_become_plain_json() {
        let wrapped = json!([
            {"__type__": "datetime", "__value__": "2026-11-28T18:56:05.710508+00:00"},
            {"__type__": "decimal", "__value__": "1.50"},
            {"__type__": "uuid", "__value__": {"hex": "0123456789abcdef0123456789abcdef"}},
            {"nested": [{"__type__": "bytes", "__value__": "hi"}]},
            {"__type__": "custom", "__value__": 1},
            {"__type__": "date", "__value__": "2026-11-28", "extra": true}
        ]);
        assert_eq!(
            unwrap_kombu_values(wrapped),
            json!([
                "2026-11-28T18:56:05.710508+00:00",
                "1.50",
                "0123456789abcdef0123456789abcdef",
                {"nested": ["hi"]},
                {"__type__": "custom", "__value__": 1},
                {"__type__": "date", "__value__": "2026-11-28", "extra": true}
            ])
        );
    }
}
