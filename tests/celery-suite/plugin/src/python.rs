//! Python's semantics for the JSON values the suite's tasks handle: `+`, `*`, `sum()`,
//! truthiness, `repr()`, an exception's `str()`, and numbers of seconds.
//!
//! The Python tasks are one-liners over whatever arguments they get (`add` concatenates
//! strings and lists as readily as it adds numbers), so a faithful port needs these
//! operators rather than typed parameters: same results, and the same `TypeError` message
//! where Python refuses. One deliberate difference: integers are 64-bit here (Python's are
//! unbounded), and a result that does not fit fails with `OverflowError`.

use serde_json::{Map, Number, Value};
use wasmq_sdk::TaskError;

/// A JSON number as Python sees it (`bool` is an `int` in Python).
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(Self::Int(i64::from(*b))),
            Value::Number(n) => Some(match n.as_i64() {
                Some(i) => Self::Int(i),
                // u64 beyond i64, or a float.
                None => Self::Float(n.as_f64().unwrap_or(f64::NAN)),
            }),
            _ => None,
        }
    }

    fn float(self) -> f64 {
        match self {
            // Lossy above 2^53, as Python's int-to-float conversion is.
            #[allow(clippy::cast_precision_loss)]
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Self::Int(i) => Value::from(i),
            // NaN and infinities have no JSON form; Python's json module would write them as
            // bare NaN/Infinity, which Celery's JSON decoder refuses too.
            Self::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        }
    }
}

/// Python's type name of a JSON value, as its error messages spell it.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn type_error(message: String) -> TaskError {
    TaskError::failed("TypeError", message)
}

fn overflow(op: &str, x: i64, y: i64) -> TaskError {
    TaskError::failed(
        "OverflowError",
        format!("{x} {op} {y} does not fit in 64 bits (Python integers are unbounded)"),
    )
}

/// `x + y`.
pub(crate) fn add(x: &Value, y: &Value) -> Result<Value, TaskError> {
    if let (Some(a), Some(b)) = (Num::of(x), Num::of(y)) {
        return Ok(match (a, b) {
            (Num::Int(a), Num::Int(b)) => {
                Value::from(a.checked_add(b).ok_or_else(|| overflow("+", a, b))?)
            }
            _ => Num::Float(a.float() + b.float()).into_value(),
        });
    }
    match (x, y) {
        (Value::String(a), Value::String(b)) => Ok(Value::String(format!("{a}{b}"))),
        (Value::Array(a), Value::Array(b)) => {
            Ok(Value::Array(a.iter().chain(b).cloned().collect()))
        }
        (Value::String(_), _) => Err(type_error(format!(
            "can only concatenate str (not \"{}\") to str",
            type_name(y)
        ))),
        (Value::Array(_), _) => Err(type_error(format!(
            "can only concatenate list (not \"{}\") to list",
            type_name(y)
        ))),
        _ => Err(type_error(format!(
            "unsupported operand type(s) for +: '{}' and '{}'",
            type_name(x),
            type_name(y)
        ))),
    }
}

/// `x * y`: numbers, or a `str`/`list` repeated an `int` number of times.
pub(crate) fn mul(x: &Value, y: &Value) -> Result<Value, TaskError> {
    if let (Some(a), Some(b)) = (Num::of(x), Num::of(y)) {
        return Ok(match (a, b) {
            (Num::Int(a), Num::Int(b)) => {
                Value::from(a.checked_mul(b).ok_or_else(|| overflow("*", a, b))?)
            }
            _ => Num::Float(a.float() * b.float()).into_value(),
        });
    }
    let (sequence, times) = match (x, y) {
        (Value::String(_) | Value::Array(_), _) => (x, y),
        _ => (y, x),
    };
    let count = match (sequence, Num::of(times)) {
        (Value::String(_) | Value::Array(_), Some(Num::Int(n))) => usize::try_from(n).unwrap_or(0),
        (Value::String(_) | Value::Array(_), _) => {
            return Err(type_error(format!(
                "can't multiply sequence by non-int of type '{}'",
                type_name(times)
            )));
        }
        _ => {
            return Err(type_error(format!(
                "unsupported operand type(s) for *: '{}' and '{}'",
                type_name(x),
                type_name(y)
            )));
        }
    };
    Ok(match sequence {
        Value::String(s) => Value::String(s.repeat(count)),
        Value::Array(items) => Value::Array(
            std::iter::repeat_n(items, count)
                .flatten()
                .cloned()
                .collect(),
        ),
        _ => unreachable!("the sequence is a str or a list"),
    })
}

/// The items `for item in value` yields.
pub(crate) fn iterate(value: &Value) -> Result<Vec<Value>, TaskError> {
    match value {
        Value::Array(items) => Ok(items.clone()),
        Value::Object(map) => Ok(map.keys().cloned().map(Value::String).collect()),
        Value::String(s) => Ok(s.chars().map(|c| Value::String(c.to_string())).collect()),
        _ => Err(type_error(format!(
            "'{}' object is not iterable",
            type_name(value)
        ))),
    }
}

/// `sum(values)`: `0 + v0 + v1 + …`.
pub(crate) fn sum(values: &Value) -> Result<Value, TaskError> {
    iterate(values)?
        .iter()
        .try_fold(Value::from(0), |total, item| add(&total, item))
}

/// `isinstance(value, collections.abc.Iterable)` for JSON values.
pub(crate) fn is_iterable(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Array(_) | Value::Object(_))
}

/// `bool(value)`.
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(_) => Num::of(value).is_some_and(|n| n.float() != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// `repr(value)`.
pub(crate) fn repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => match Num::of(value) {
            Some(Num::Float(f)) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
                format!("{f:.1}")
            }
            _ => n.to_string(),
        },
        Value::String(s) => repr_str(s),
        Value::Array(items) => format!("[{}]", join(items.iter())),
        Value::Object(map) => repr_dict(map),
    }
}

fn join<'a>(values: impl Iterator<Item = &'a Value>) -> String {
    values.map(repr).collect::<Vec<_>>().join(", ")
}

fn repr_dict(map: &Map<String, Value>) -> String {
    let entries: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{}: {}", repr_str(k), repr(v)))
        .collect();
    format!("{{{}}}", entries.join(", "))
}

/// Python's `repr` of a `str`: single quotes unless the text has one and no double quote.
fn repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
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

/// `repr(exc)` of an exception `name(*args)`, e.g. `ExpectedException('x', 1)`.
pub(crate) fn exception_repr(name: &str, args: &[Value]) -> String {
    format!("{name}({})", join(args.iter()))
}

/// A duration as a number of seconds, as a Python client writes one: `30` when whole (an
/// `int`), `1.5` otherwise. (`request.time_limit` is whatever number the client sent.)
pub(crate) fn seconds(duration: std::time::Duration) -> Value {
    if duration.subsec_nanos() == 0 {
        Value::from(duration.as_secs())
    } else {
        Num::Float(duration.as_secs_f64()).into_value()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn failure(result: Result<Value, TaskError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn add_follows_python() {
        assert_eq!(add(&json!(1), &json!(2)).unwrap(), json!(3));
        assert_eq!(add(&json!(1), &json!(0.5)).unwrap(), json!(1.5));
        assert_eq!(add(&json!(true), &json!(1)).unwrap(), json!(2));
        assert_eq!(
            add(&json!("Hello "), &json!("world")).unwrap(),
            json!("Hello world")
        );
        assert_eq!(add(&json!([1]), &json!([2, 3])).unwrap(), json!([1, 2, 3]));
        assert_eq!(
            failure(add(&json!(1), &json!("x"))),
            "TypeError: unsupported operand type(s) for +: 'int' and 'str'"
        );
        assert_eq!(
            failure(add(&json!([1]), &json!(5))),
            "TypeError: can only concatenate list (not \"int\") to list"
        );
        assert!(failure(add(&json!(i64::MAX), &json!(1))).starts_with("OverflowError"));
    }

    #[test]
    fn mul_and_sum_follow_python() {
        assert_eq!(mul(&json!(6), &json!(7)).unwrap(), json!(42));
        assert_eq!(mul(&json!("ab"), &json!(2)).unwrap(), json!("abab"));
        assert_eq!(mul(&json!(2), &json!([1])).unwrap(), json!([1, 1]));
        assert_eq!(mul(&json!([1]), &json!(-1)).unwrap(), json!([]));
        assert_eq!(sum(&json!([1, 2, 3.5])).unwrap(), json!(6.5));
        assert_eq!(sum(&json!([])).unwrap(), json!(0));
        assert_eq!(
            failure(sum(&json!([[1]]))),
            "TypeError: unsupported operand type(s) for +: 'int' and 'list'"
        );
        assert_eq!(
            failure(sum(&json!(5))),
            "TypeError: 'int' object is not iterable"
        );
    }

    #[test]
    fn whole_seconds_are_ints() {
        use std::time::Duration;
        assert_eq!(seconds(Duration::from_secs(30)), json!(30));
        assert_eq!(seconds(Duration::from_millis(1500)), json!(1.5));
    }

    #[test]
    fn repr_follows_python() {
        assert_eq!(repr(&json!(null)), "None");
        assert_eq!(repr(&json!(2.0)), "2.0");
        assert_eq!(repr(&json!("it's")), "\"it's\"");
        assert_eq!(repr(&json!({"a": [1, true]})), "{'a': [1, True]}");
        assert_eq!(
            exception_repr("ExpectedException", &[]),
            "ExpectedException()"
        );
        assert_eq!(
            exception_repr("UnpickleableException", &[json!("foo")]),
            "UnpickleableException('foo')"
        );
        assert!(!truthy(&json!(0)) && !truthy(&json!("")) && truthy(&json!([0])));
    }
}
