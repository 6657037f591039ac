//! Where every command's log goes (stderr) and how it reads: `--log-format text` (the
//! default), tracing's human format — `INFO task{task_id=… task=math.add …}: task
//! math.add[…] succeeded in 1.2ms outcome="succeeded" …` — or `--log-format json`, one JSON
//! object a line for a log pipeline to index.
//!
//! A JSON line is flat: `timestamp`, `level`, `target`, `message`, then the fields of every
//! span the line was emitted in, outermost first (a tenant's `tenant`; a task's `task_id`,
//! `task`, `root_id`, `parent_id`, `trace_id`, `span_id`…), then the event's own fields,
//! which win a clash. So `jq 'select(.task_id == "…")'` finds everything a task logged,
//! the guest's lines included, and `trace_id` joins them with the rest of a trace.
//!
//! Which lines are written is `WASMQ_LOG` (an `EnvFilter`), else each command's default.
//! Nothing is formatted for a line the filter drops.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: a line of text each, with the fields of its spans.
    #[default]
    Text,
    /// For machines: one flat JSON object a line.
    Json,
}

/// Installs the process's log subscriber: lines `WASMQ_LOG` selects (else `default`), in
/// `format`, to stderr.
pub(super) fn init(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
    };
}

/// Formats an event as one flat JSON object: its metadata, its spans' fields and its own.
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                // `JsonFields` keeps each span's fields as a JSON object.
                let fields = extensions
                    .get::<FormattedFields<JsonFields>>()
                    .and_then(|fields| {
                        serde_json::from_str::<Map<String, Value>>(&fields.fields).ok()
                    });
                line.extend(fields.into_iter().flatten());
            }
        }
        event.record(&mut Fields(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into a JSON object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error with its causes, as the text format's `{:#}` would show them.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.0.insert(field.name().into(), text.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_is_flat_with_its_spans_fields_and_its_own() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let tenant = tracing::info_span!("tenant", tenant = "acme");
            let _tenant = tenant.enter();
            let task = tracing::info_span!("task", task_id = "t-1", root_id = "r-1", id = 1);
            let _task = task.enter();
            let error = std::io::Error::other("disk full");
            tracing::warn!(
                id = 2,
                runtime_ms = 1.5,
                error = &error as &dyn std::error::Error,
                "task {} failed",
                "math.add"
            );
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "task math.add failed");
        assert_eq!(line["tenant"], "acme");
        assert_eq!(line["task_id"], "t-1");
        assert_eq!(line["root_id"], "r-1");
        assert_eq!(line["id"], 2, "the event's own field wins");
        assert_eq!(line["runtime_ms"], 1.5);
        assert_eq!(line["error"], "disk full");
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
