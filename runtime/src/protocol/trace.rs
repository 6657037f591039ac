//! W3C trace context: the `traceparent` header (and its companion `tracestate`) that
//! OpenTelemetry's Celery instrumentation puts at the top level of a task message's
//! headers, so one trace covers a workflow across Python and wasmq.
//!
//! `traceparent` is `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`, 55
//! characters (<https://www.w3.org/TR/trace-context/#traceparent-header>). It is parsed and
//! formatted here by hand: a [`TraceContext`] is three small arrays, `Copy`, and costs no
//! allocation until it is written into a header. A header that does not parse is
//! [`TraceParentError`]: whoever reads it starts a new trace instead (the specification's
//! rule), it never fails a task.

use std::fmt;
use std::str::FromStr;

/// The header naming the trace and the span a message was published from.
pub const TRACEPARENT: &str = "traceparent";
/// The header carrying vendor-specific trace state; passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// The id of a trace: 16 bytes, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// The id of a span within a trace: 8 bytes, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

/// A position in a trace: the trace, the span (the publisher's, in a `traceparent` header;
/// a run's own, for the run), and the trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The span.
    pub span_id: SpanId,
    /// The trace flags (`01`: sampled).
    pub flags: u8,
}

/// Why a `traceparent` header was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// The header is not a string.
    #[error("the traceparent header is not a string")]
    NotAString,
    /// Version 00 has exactly 55 characters; later versions at least 55, then `-`.
    #[error("a traceparent of version {version} cannot have {length} characters")]
    Length {
        /// The version read.
        version: String,
        /// The header's length.
        length: usize,
    },
    /// A field is not lowercase hexadecimal, or the fields are not separated by `-`.
    #[error("the {0} of a traceparent is not lowercase hexadecimal")]
    NotHex(&'static str),
    /// Version `ff` is forbidden.
    #[error("traceparent version ff is invalid")]
    Version,
    /// An all-zero trace or span id.
    #[error("the {0} of a traceparent is all zeros")]
    Zero(&'static str),
}

impl TraceContext {
    /// A new trace: random trace and span ids, sampled.
    pub fn start() -> Self {
        Self {
            trace_id: TraceId(nonzero()),
            span_id: SpanId(nonzero()),
            flags: 1,
        }
    }

    /// A new span in the same trace (a run of a task published from this one), with the
    /// same flags.
    pub fn child(&self) -> Self {
        Self {
            span_id: SpanId(nonzero()),
            ..*self
        }
    }

    /// Reads a `traceparent` header value (a JSON string, as message headers hold it).
    ///
    /// # Errors
    /// [`TraceParentError`] when it is not a string or not a valid traceparent.
    pub fn from_header(value: &serde_json::Value) -> Result<Self, TraceParentError> {
        value.as_str().ok_or(TraceParentError::NotAString)?.parse()
    }
}

impl FromStr for TraceContext {
    type Err = TraceParentError;

    /// Parses `00-<trace id>-<span id>-<flags>`. A later version is read the same way and
    /// anything after its 55th character ignored, as the specification asks.
    fn from_str(header: &str) -> Result<Self, TraceParentError> {
        let bytes = header.as_bytes();
        let version = bytes.get(..2).ok_or(TraceParentError::NotHex("version"))?;
        let [v] = hex::<1>(version, "version")?;
        if v == 0xff {
            return Err(TraceParentError::Version);
        }
        let length = header.len();
        let fits = if v == 0 {
            length == 55
        } else {
            length == 55 || (length > 55 && bytes[55] == b'-')
        };
        if !fits {
            return Err(TraceParentError::Length {
                version: header[..2].to_owned(),
                length,
            });
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceParentError::NotHex("separator"));
        }
        let trace_id = hex::<16>(&bytes[3..35], "trace id")?;
        let span_id = hex::<8>(&bytes[36..52], "parent id")?;
        let [flags] = hex::<1>(&bytes[53..55], "flags")?;
        if trace_id == [0; 16] {
            return Err(TraceParentError::Zero("trace id"));
        }
        if span_id == [0; 8] {
            return Err(TraceParentError::Zero("parent id"));
        }
        Ok(Self {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            flags,
        })
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header naming this span: `00-<trace id>-<span id>-<flags>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// `N` bytes from `2N` lowercase hex digits (the specification allows no uppercase).
fn hex<const N: usize>(digits: &[u8], field: &'static str) -> Result<[u8; N], TraceParentError> {
    if digits.len() != 2 * N {
        return Err(TraceParentError::NotHex(field));
    }
    let digit = |d: u8| match d {
        b'0'..=b'9' => Ok(d - b'0'),
        b'a'..=b'f' => Ok(d - b'a' + 10),
        _ => Err(TraceParentError::NotHex(field)),
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(out)
}

/// Random bytes, not all zeros (an all-zero id is invalid).
fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes.iter().any(|b| *b != 0) {
            return bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let context: TraceContext = HEADER.parse().unwrap();
        assert_eq!(
            context.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(context.flags, 1);
        assert_eq!(context.to_string(), HEADER);
        assert_eq!(
            TraceContext::from_header(&serde_json::json!(HEADER)),
            Ok(context)
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent: TraceContext = HEADER.parse().unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.span_id, parent.span_id);
        let started = TraceContext::start();
        assert_ne!(started.trace_id, TraceContext::start().trace_id);
        let header = started.to_string();
        assert_eq!(header.len(), 55);
        assert_eq!(header.parse(), Ok(started));
    }

    #[test]
    fn a_later_version_is_read_and_its_extra_fields_ignored() {
        let later = HEADER.replacen("00", "cc", 1) + "-what-comes-next";
        let context: TraceContext = later.parse().unwrap();
        assert_eq!(context.to_string(), HEADER, "written back as version 00");
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        use TraceParentError::*;
        let cases: &[(&str, TraceParentError)] = &[
            ("", NotHex("version")),
            ("garbage", NotHex("version")),
            (
                &HEADER[..54],
                Length {
                    version: "00".into(),
                    length: 54,
                },
            ),
            (
                &format!("{HEADER}-x"),
                Length {
                    version: "00".into(),
                    length: 57,
                },
            ),
            (&HEADER.replacen("00", "ff", 1), Version),
            (&HEADER.to_uppercase(), NotHex("trace id")),
            (&HEADER.replace('-', "_"), NotHex("separator")),
            (&HEADER.replace("00f067aa", "00f067ag"), NotHex("parent id")),
            (&HEADER.replace("-01", "-0x"), NotHex("flags")),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Zero("trace id"),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Zero("parent id"),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
                Length {
                    version: "00".into(),
                    length: 57,
                },
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(
                header.parse::<TraceContext>().as_ref(),
                Err(expected),
                "{header}"
            );
        }
        assert_eq!(
            TraceContext::from_header(&serde_json::json!(42)),
            Err(NotAString)
        );
    }
}
