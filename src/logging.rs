//! busbar's own log: the `tracing` subscriber writing to stderr, pingora's `log` records
//! bridged into it, and the level a reload changes while busbar runs.
//!
//! Owns: the filter (`[log] level`, or `BUSBAR_LOG` when set) and its reload handle; the
//! format (`[log] format`: text, with ANSI colours only on a terminal, or JSON lines).
//! Must not: write the access log (`accesslog`).

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The environment variable whose filter, when set, replaces `[log] level`.
pub const FILTER_ENV: &str = "BUSBAR_LOG";

/// The running log level, and the means to change it.
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `[log] level` as applied; `None` while `BUSBAR_LOG` decides.
    level: Mutex<Option<String>>,
}

/// The filter for a bare level: pingora's own chatter stays at warn, the redis crate's
/// two steps under busbar's level.
fn filter_for(level: &str) -> EnvFilter {
    EnvFilter::new(format!(
        "{level},pingora_core=warn,pingora_proxy=warn,redis={}",
        redis_level(level)
    ))
}

/// The redis crate's own level for busbar's `level`: two steps quieter. During a Redis
/// Cluster failover it logs every reconnect attempt at WARN and INFO (hundreds of lines a
/// second); busbar logs each shard's switch once with what an operator needs, so the
/// crate's lines show only when busbar itself logs at debug (its WARN) or trace (all).
fn redis_level(level: &str) -> &'static str {
    match level.split(',').next().unwrap_or("").trim() {
        "trace" => "trace",
        "debug" => "warn",
        _ => "error",
    }
}

/// The most verbose `log` record worth handing to the bridge for `level`. pingora logs
/// through `log`: without a max level every `debug!` on its request path would reach the
/// bridge (about 25 calls per request) only to be dropped. A bare level caps it; a
/// filter with directives ("warn,rustls=debug") lets everything through to the tracing
/// filter. Never below warn: pingora's warnings pass the filter above.
fn log_max(level: &str) -> log::LevelFilter {
    level
        .parse::<log::LevelFilter>()
        .unwrap_or(log::LevelFilter::Trace)
        .max(log::LevelFilter::Warn)
}

/// Installs the subscriber for `level` (or `BUSBAR_LOG`), writing `format`. `None` when
/// one was already installed (a test process): then a reload cannot change the level.
pub fn init(level: &str, format: LogFormat) -> Option<LogLevel> {
    let from_env = EnvFilter::try_from_env(FILTER_ENV).ok();
    let env_decides = from_env.is_some();
    let max = if env_decides {
        log::LevelFilter::Trace
    } else {
        log_max(level)
    };
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| filter_for(level)));
    let _ = tracing_log::LogTracer::builder().with_max_level(max).init();
    // Colour codes in a file or a journal are noise a reader has to strip.
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(JsonLines)
    });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    // Not `try_init`: it would install the `log` bridge again, fail, and say so.
    tracing::subscriber::set_global_default(subscriber).ok()?;
    Some(LogLevel {
        handle,
        level: Mutex::new((!env_decides).then(|| level.to_string())),
    })
}

/// What [`LogLevel::set`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// Already at that level.
    Same,
    Applied,
    /// `BUSBAR_LOG` decides the level; the file's is not used.
    Overridden,
}

impl LogLevel {
    /// Runs at `level` (one of error, warn, info, debug, trace, as config validated).
    pub fn set(&self, level: &str) -> Result<LevelChange, String> {
        let mut current = self.level.lock().unwrap_or_else(|e| e.into_inner());
        match current.as_deref() {
            None => return Ok(LevelChange::Overridden),
            Some(l) if l == level => return Ok(LevelChange::Same),
            Some(_) => {}
        }
        self.handle
            .reload(filter_for(level))
            .map_err(|e| format!("log.level: {e}"))?;
        log::set_max_level(log_max(level));
        *current = Some(level.to_string());
        Ok(LevelChange::Applied)
    }
}

/// The process log as JSON lines: `time`, `level`, `target`, the enclosing spans' names
/// (`spans`), then the event's fields (`message` among them). pingora's `log` records
/// carry their own target, not `log`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = serde_json::Map::new();
        line.insert(
            "time".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<serde_json::Value> = scope
                .from_root()
                .map(|s| s.name().to_string().into())
                .collect();
            line.insert("spans".into(), spans.into());
        }
        event.record(&mut JsonFields(&mut line));
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// An event's fields into the line's object; the `log` bridge's own (`log.target`, …)
/// are left out, as the line's `target` already says where the record came from.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonFields<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if !field.name().starts_with("log.") {
            self.0.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_records_are_capped_but_never_below_warn() {
        assert_eq!(log_max("info"), log::LevelFilter::Info);
        assert_eq!(log_max("error"), log::LevelFilter::Warn);
        assert_eq!(log_max("warn,rustls=debug"), log::LevelFilter::Trace);
    }
}
