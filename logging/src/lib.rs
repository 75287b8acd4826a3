//! The log lines of both chatgate binaries, the service and the operator, in one
//! schema: human-readable text, or one JSON object per line with `severity`,
//! `message`, `time` and `target` — the fields Google Cloud Logging (and most
//! collectors) read without a parser — plus the event's fields and those of the spans
//! it happened in. `RUST_LOG` filters as usual; each binary gives its default.
//!
//! On Cloud Run (or Knative) each JSON line also carries what Cloud Logging uses to
//! group and correlate it: `serviceContext` from `K_SERVICE`/`K_REVISION`, and,
//! for lines logged while serving a request that came with `X-Cloud-Trace-Context`,
//! `logging.googleapis.com/trace` (as `projects/P/traces/T` when the project is known
//! from `GOOGLE_CLOUD_PROJECT`, the bare trace id otherwise), `.../spanId` and
//! `.../trace_sampled`.

use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{
    FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter, SubscriberBuilder,
};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// From `CHATGATE_LOG_FORMAT` or the operator's `--log-format`; an invalid value
    /// falls back to text here and is reported by the caller's validation.
    pub fn from_config(value: Option<&str>) -> LogFormat {
        match value.map(str::trim) {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// Span field holding the trace id of the request being served.
pub const TRACE_ID_FIELD: &str = "trace_id";
/// Span field holding the span id (16 hex digits) of the request being served.
pub const SPAN_ID_FIELD: &str = "span_id";
/// Span field: whether the request's trace is sampled.
pub const TRACE_SAMPLED_FIELD: &str = "trace_sampled";
/// The request header Google's front ends set: `TRACE_ID/SPAN_ID;o=OPTIONS`.
pub const CLOUD_TRACE_HEADER: &str = "x-cloud-trace-context";

/// What a JSON line says about where it runs, read once from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudContext {
    /// `GOOGLE_CLOUD_PROJECT` (or `GCP_PROJECT`): makes traces full resource names.
    pub project: Option<String>,
    /// `K_SERVICE`, set by Cloud Run and Knative.
    pub service: Option<String>,
    /// `K_REVISION`, set by Cloud Run and Knative.
    pub revision: Option<String>,
}

impl CloudContext {
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> CloudContext {
        let mut c = CloudContext::default();
        let mut fallback_project = None;
        for (key, value) in vars {
            let value = value.trim().to_owned();
            if value.is_empty() {
                continue;
            }
            match key.as_str() {
                "GOOGLE_CLOUD_PROJECT" => c.project = Some(value),
                "GCP_PROJECT" | "GCLOUD_PROJECT" => fallback_project = Some(value),
                "K_SERVICE" => c.service = Some(value),
                "K_REVISION" => c.revision = Some(value),
                _ => {}
            }
        }
        c.project = c.project.or(fallback_project);
        c
    }

    /// Rewrites the trace span fields of one line into Cloud Logging's keys and adds
    /// `serviceContext`.
    fn apply(&self, object: &mut Map<String, Value>) {
        if let Some(Value::String(trace)) = object.remove(TRACE_ID_FIELD) {
            let trace = match &self.project {
                Some(p) => format!("projects/{p}/traces/{trace}"),
                None => trace,
            };
            object.insert("logging.googleapis.com/trace".into(), Value::String(trace));
        }
        if let Some(span) = object.remove(SPAN_ID_FIELD) {
            object.insert("logging.googleapis.com/spanId".into(), span);
        }
        if let Some(sampled) = object.remove(TRACE_SAMPLED_FIELD) {
            object.insert("logging.googleapis.com/trace_sampled".into(), sampled);
        }
        if self.service.is_some() || self.revision.is_some() {
            let mut context = Map::new();
            if let Some(s) = &self.service {
                context.insert("service".into(), Value::String(s.clone()));
            }
            if let Some(r) = &self.revision {
                context.insert("version".into(), Value::String(r.clone()));
            }
            object.insert("serviceContext".into(), Value::Object(context));
        }
    }
}

/// The trace of one request, from its `X-Cloud-Trace-Context` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudTrace {
    /// 32 hex digits.
    pub trace_id: String,
    /// The span id as Cloud Logging wants it: 16 hex digits (the header has decimal).
    pub span_id: Option<String>,
    pub sampled: bool,
}

impl CloudTrace {
    /// `None` for a header that is not `TRACE_ID[/SPAN_ID][;o=N]`: a malformed header
    /// is ignored rather than copied into every line.
    pub fn parse(header: &str) -> Option<CloudTrace> {
        let (ids, options) = match header.trim().split_once(';') {
            Some((ids, options)) => (ids, Some(options)),
            None => (header.trim(), None),
        };
        let (trace_id, span) = match ids.split_once('/') {
            Some((t, s)) => (t, Some(s)),
            None => (ids, None),
        };
        if trace_id.len() != 32 || !trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let span_id = match span {
            Some(s) => Some(format!("{:016x}", s.parse::<u64>().ok()?)),
            None => None,
        };
        let sampled = options.is_some_and(|o| o.trim() == "o=1");
        Some(CloudTrace {
            trace_id: trace_id.to_ascii_lowercase(),
            span_id,
            sampled,
        })
    }
}

/// Installs the global subscriber. Called once, before anything logs.
/// `default_filter` applies when `RUST_LOG` is unset or invalid (e.g. `info`).
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // A second init (tests in one process) is harmless; ignore it.
    let _ = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .try_init(),
        LogFormat::Json => json_lines(
            filter,
            CloudContext::from_env(std::env::vars()),
            std::io::stderr,
        )
        .try_init(),
    };
}

/// The JSON-lines subscriber, writing to `writer`: the one place the schema is wired.
fn json_lines<W>(
    filter: EnvFilter,
    context: CloudContext,
    writer: W,
) -> SubscriberBuilder<JsonFields, CloudJson, EnvFilter, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .fmt_fields(JsonFields::new())
        .event_format(CloudJson { context })
}

/// One JSON object per event: `time`, `severity`, `message`, the event's other
/// fields, and the fields of the spans it happened in (e.g. `connection_id`).
struct CloudJson {
    context: CloudContext,
}

impl<S, N> FormatEvent<S, N> for CloudJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        object.insert("time".into(), Value::String(time));
        object.insert(
            "severity".into(),
            Value::String(severity(*event.metadata().level()).into()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields)
                {
                    object.extend(map);
                }
            }
        }
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);
        object
            .entry("message")
            .or_insert_with(|| Value::String(String::new()));
        object.insert(
            "target".into(),
            Value::String(event.metadata().target().into()),
        );
        self.context.apply(&mut object);
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Cloud Logging's severity names.
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Lines written to memory, for reading back what a subscriber printed.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_has_the_schema_fields_its_own_and_its_spans() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = json_lines(
            EnvFilter::new("info"),
            CloudContext::from_env(env(&[("K_SERVICE", "chat")])),
            move || writer.clone(),
        )
        .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("reconcile", object = "ns/chat", trace_id = "abc");
            let _entered = span.enter();
            tracing::warn!(attempt = 3, "stepping down");
            tracing::debug!("filtered out at info");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "one line per event at or above the filter: {text}"
        );
        let line: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["severity"], "WARNING");
        assert_eq!(line["message"], "stepping down");
        assert_eq!(line["attempt"], 3);
        assert_eq!(line["object"], "ns/chat");
        assert_eq!(line["logging.googleapis.com/trace"], "abc");
        assert_eq!(line["serviceContext"]["service"], "chat");
        assert!(
            line["target"]
                .as_str()
                .unwrap()
                .starts_with("chatgate_logging")
        );
        let time = line["time"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "time is RFC 3339: {time}"
        );
    }

    #[test]
    fn the_cloud_trace_header_is_parsed_with_a_hex_span_id() {
        let t = CloudTrace::parse("105445aa7843bc8bf206b12000100000/1;o=1").unwrap();
        assert_eq!(t.trace_id, "105445aa7843bc8bf206b12000100000");
        assert_eq!(t.span_id.as_deref(), Some("0000000000000001"));
        assert!(t.sampled);
        let t = CloudTrace::parse("105445AA7843BC8BF206B12000100000").unwrap();
        assert_eq!((t.span_id, t.sampled), (None, false));
        assert_eq!(CloudTrace::parse("not-a-trace/1;o=1"), None);
        assert_eq!(
            CloudTrace::parse("105445aa7843bc8bf206b12000100000/x"),
            None
        );
    }

    #[test]
    fn a_trace_is_a_resource_name_when_the_project_is_known() {
        let c = CloudContext::from_env(env(&[("GOOGLE_CLOUD_PROJECT", "acme")]));
        let mut line = Map::new();
        line.insert(TRACE_ID_FIELD.into(), Value::String("abc".into()));
        line.insert(
            SPAN_ID_FIELD.into(),
            Value::String("00000000000000ff".into()),
        );
        line.insert(TRACE_SAMPLED_FIELD.into(), Value::Bool(true));
        c.apply(&mut line);
        assert_eq!(
            line["logging.googleapis.com/trace"],
            "projects/acme/traces/abc"
        );
        assert_eq!(line["logging.googleapis.com/spanId"], "00000000000000ff");
        assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
        assert!(!line.contains_key(TRACE_ID_FIELD));
    }

    #[test]
    fn without_a_project_the_trace_is_the_raw_id() {
        let c = CloudContext::from_env(env(&[]));
        let mut line = Map::new();
        line.insert(TRACE_ID_FIELD.into(), Value::String("abc".into()));
        c.apply(&mut line);
        assert_eq!(line["logging.googleapis.com/trace"], "abc");
        assert!(!line.contains_key("serviceContext"));
    }

    #[test]
    fn k_service_and_k_revision_go_into_every_line() {
        let c = CloudContext::from_env(env(&[
            ("K_SERVICE", "chat"),
            ("K_REVISION", "chat-00002-xyz"),
            ("GCP_PROJECT", "fallback"),
        ]));
        assert_eq!(c.project.as_deref(), Some("fallback"));
        let mut line = Map::new();
        c.apply(&mut line);
        assert_eq!(line["serviceContext"]["service"], "chat");
        assert_eq!(line["serviceContext"]["version"], "chat-00002-xyz");
    }
}
