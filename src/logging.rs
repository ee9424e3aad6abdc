//! busbar's own log: the `tracing` subscriber writing to stderr, pingora's `log` records
//! bridged into it, and the level a reload changes while busbar runs.
//!
//! Owns: the filter (`[log] level`, or `BUSBAR_LOG` when set) and its reload handle.
//! Must not: write the access log (`accesslog`).

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

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

/// Installs the subscriber for `level` (or `BUSBAR_LOG`). `None` when one was already
/// installed (a test process): then a reload cannot change the level.
pub fn init(level: &str) -> Option<LogLevel> {
    let from_env = EnvFilter::try_from_env(FILTER_ENV).ok();
    let env_decides = from_env.is_some();
    let max = if env_decides {
        log::LevelFilter::Trace
    } else {
        log_max(level)
    };
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| filter_for(level)));
    let _ = tracing_log::LogTracer::builder().with_max_level(max).init();
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
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
