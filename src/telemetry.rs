//! Logging: plain text for people, or one JSON object per line in the mozlog shape that
//! Taskcluster services write (`LOG_FORMAT=json`), so that existing log pipelines and
//! queries keep working:
//!
//! ```json
//! {"Timestamp":1795778123085000000,"Type":"monitor.generic","Logger":"taskcluster.events.broker.amqp",
//!  "Hostname":"events-7d9c","EnvVersion":"2.0","Severity":6,"severity":"INFO","Pid":1,
//!  "Fields":{"message":"broker connected","endpoint":"amqps://pulse.mozilla.org:5671/%2F"}}
//! ```
//!
//! `Severity` is the syslog level (3 error, 4 warning, 6 info, 7 debug); the fields of the
//! enclosing spans (e.g. a client connection's `peer` and `bindings`) are merged into
//! `Fields`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber. `filter` uses tracing's EnvFilter syntax.
pub fn init(filter: &str, json: bool, hostname: &str) {
    let wants_trace = filter.contains("trace");
    let mut filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // lapin logs every channel the broker closes at error level, and any client can cause
    // one (a binding on a missing exchange); the gateway reports those itself.
    filter = filter.add_directive("lapin::channel=off".parse().expect("valid directive"));
    if wants_trace {
        // lapin's trace output can show handshake frames, credentials included.
        for capped in ["lapin=debug", "amq_protocol=debug"] {
            filter = filter.add_directive(capped.parse().expect("valid directive"));
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder
            .fmt_fields(JsonFields::new())
            .event_format(MozLog::new(hostname))
            .init();
    } else {
        // Colours only on a terminal: piped or collected logs (journald, Kubernetes) would
        // otherwise be full of escape codes.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
}

/// Formats events in Taskcluster's mozlog shape.
pub struct MozLog {
    hostname: String,
    pid: u32,
}

impl MozLog {
    /// `hostname` is the configured one (`HOSTNAME`); empty: the system's.
    pub fn new(hostname: &str) -> Self {
        let hostname = Some(hostname.to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Self {
            hostname,
            pid: std::process::id(),
        }
    }
}

impl Default for MozLog {
    /// With the system's host name.
    fn default() -> Self {
        Self::new("")
    }
}

impl<S, N> FormatEvent<S, N> for MozLog
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
        let mut fields = serde_json::Map::new();
        // Span fields first (outermost to innermost), so the event's own fields win.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(formatted) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(map)) =
                    serde_json::from_str::<serde_json::Value>(formatted)
                {
                    fields.extend(map);
                }
            }
        }
        event.record(&mut Visitor(&mut fields));
        let meta = event.metadata();
        let (severity, name) = match *meta.level() {
            Level::ERROR => (3, "ERROR"),
            Level::WARN => (4, "WARNING"),
            Level::INFO => (6, "INFO"),
            Level::DEBUG => (7, "DEBUG"),
            Level::TRACE => (7, "TRACE"),
        };
        let kind = match fields.remove("type") {
            Some(serde_json::Value::String(t)) => t,
            _ => "monitor.generic".to_owned(),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let line = serde_json::json!({
            "Timestamp": timestamp,
            "Type": kind,
            "Logger": logger(meta.target()),
            "Hostname": self.hostname,
            "EnvVersion": "2.0",
            "Severity": severity,
            "severity": name,
            "Pid": self.pid,
            "Fields": fields,
        });
        writeln!(writer, "{line}")
    }
}

/// `events_gateway::broker::amqp` → `taskcluster.events.broker.amqp`; other crates keep
/// their target under `taskcluster.events.`.
fn logger(target: &str) -> String {
    let short = target
        .strip_prefix("events_gateway::")
        .or_else(|| target.strip_prefix("events_gateway"))
        .unwrap_or(target)
        .replace("::", ".");
    if short.is_empty() {
        "taskcluster.events".to_owned()
    } else {
        format!("taskcluster.events.{short}")
    }
}

struct Visitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// At most one log line a second from one place, with how many were left out since the
/// last: for lines any client can cause (a refusal, a malformed message), which must not
/// flood the logs.
pub struct RateLimited {
    /// When the last line was allowed, and how many were left out since.
    last: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl RateLimited {
    pub const fn new() -> Self {
        Self {
            last: std::sync::Mutex::new(None),
        }
    }

    /// `Some(left out since the last line)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match &mut *last {
            Some((at, suppressed))
                if now.duration_since(*at) < std::time::Duration::from_secs(1) =>
            {
                *suppressed += 1;
                None
            }
            _ => {
                let suppressed = last.map(|(_, s)| s).unwrap_or(0);
                *last = Some((now, 0));
                Some(suppressed)
            }
        }
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_have_the_mozlog_shape_with_span_fields() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(MozLog::new("test-host"))
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("connection", peer = "10.0.0.1:5000", bindings = 3);
            let _e = span.enter();
            tracing::warn!(target: "events_gateway::broker::amqp", retry = true, "broker lost");
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["Logger"], "taskcluster.events.broker.amqp");
        assert_eq!(line["Type"], "monitor.generic");
        assert_eq!(line["Severity"], 4);
        assert_eq!(line["EnvVersion"], "2.0");
        assert!(line["Timestamp"].as_u64().expect("ns") > 1_700_000_000_000_000_000);
        assert!(line["Pid"].is_u64());
        assert_eq!(line["Fields"]["message"], "broker lost");
        assert_eq!(line["Fields"]["retry"], true);
        assert_eq!(line["Fields"]["peer"], "10.0.0.1:5000");
        assert_eq!(line["Fields"]["bindings"], 3);
    }
}
