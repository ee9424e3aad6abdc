//! The `[tracing]` section: the sampling ratio for new traces and where busbar's own spans
//! go (OTLP/HTTP, protobuf). Without the section busbar only propagates `traceparent`:
//! a caller's decision is kept, new traces are not sampled, and nothing is exported.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Validator;

/// The share of new traces sampled when `[tracing]` is present and says none: every
/// one, as OpenTelemetry's default sampler (`parentbased_always_on`) does.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// How long one export may take before it counts as failed: OpenTelemetry's
/// `OTEL_EXPORTER_OTLP_TIMEOUT` default is 10 s; a collector that slow would fill the
/// queue anyway, so busbar gives up sooner and keeps its spans moving.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Spans held for export: at 2 spans a request, 16 Ki spans are ~0.25 s of a busy node
/// at 100% sampling, enough to ride out one slow export, ~4 MB when full (allocated when
/// the first span is sampled).
pub const DEFAULT_QUEUE_SIZE: usize = 16 * 1024;
/// The smallest queue: one export batch (`otel::BATCH`).
pub const MIN_QUEUE_SIZE: usize = 512;
/// The `service.name` of busbar's spans.
pub const DEFAULT_SERVICE_NAME: &str = "busbar";
/// The OTLP/HTTP path for traces (OTLP spec: `/v1/traces`), used when the endpoint
/// names none.
pub const DEFAULT_TRACES_PATH: &str = "/v1/traces";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    pub endpoint: Option<Spanned<String>>,
    pub sample_ratio: Option<Spanned<f64>>,
    pub service_name: Option<Spanned<String>>,
    pub export_timeout: Option<Spanned<String>>,
    pub queue_size: Option<Spanned<i64>>,
}

/// How traces are sampled and exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Where spans are posted (`http://host:port/v1/traces`); `None`: nothing is exported.
    pub endpoint: Option<OtlpEndpoint>,
    /// The share of new traces (no valid `traceparent` from the caller) that are sampled.
    pub sample_ratio: f64,
    /// A new trace is sampled when the low 8 bytes of its id, big-endian, are below this
    /// (OpenTelemetry's `TraceIdRatioBased`): the decision follows from the id alone.
    pub sample_below: u64,
    pub service_name: String,
    pub export_timeout: Duration,
    /// How many finished spans wait for export at most; more are dropped and counted.
    /// Read when the process starts.
    pub queue_size: usize,
}

impl Default for TracingConfig {
    /// No `[tracing]`: propagation only; new traces are not sampled.
    fn default() -> Self {
        TracingConfig {
            endpoint: None,
            sample_ratio: 0.0,
            sample_below: 0,
            service_name: DEFAULT_SERVICE_NAME.to_string(),
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

impl TracingConfig {
    /// Are sampled spans exported?
    pub fn exports(&self) -> bool {
        self.endpoint.is_some()
    }
}

/// An OTLP/HTTP collector: plain `http` (a local collector or agent forwards over TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// `host:port`, as `TcpStream::connect` takes it (a name is resolved per connection,
    /// off the request path).
    pub authority: String,
    pub path: String,
    /// The URL as written, for logs.
    pub url: String,
}

/// [`TracingConfig::sample_below`] for a ratio in 0..=1.
pub fn sample_below(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 {
        0
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

/// Parses `http://host:port[/path]`; the error says what is wrong.
fn endpoint(url: &str) -> Result<OtlpEndpoint, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("\"{url}\" is not a URL like \"http://127.0.0.1:4318/v1/traces\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "\"{url}\": https is not supported; send to a collector on this host or network over http"
            ))
        }
        _ => {
            return Err(format!(
                "\"{url}\" is not a URL like \"http://127.0.0.1:4318/v1/traces\""
            ))
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("\"{url}\" names no host"));
    };
    if authority.as_str().ends_with(':') {
        return Err(format!("\"{url}\": the port is empty"));
    }
    if uri.query().is_some() || authority.as_str().contains('@') {
        return Err(format!(
            "\"{url}\": no user or query string, only http://host:port/path"
        ));
    }
    let port = authority.port_u16().unwrap_or(80);
    let path = match uri.path() {
        "" | "/" => DEFAULT_TRACES_PATH,
        p => p,
    };
    Ok(OtlpEndpoint {
        authority: format!("{}:{port}", authority.host()),
        path: path.to_string(),
        url: url.to_string(),
    })
}

impl Validator<'_> {
    pub(super) fn tracing(&mut self, f: Option<&TracingFile>) -> TracingConfig {
        let Some(f) = f else {
            return TracingConfig::default();
        };
        let ctx = "tracing";
        let endpoint = f
            .endpoint
            .as_ref()
            .and_then(|e| match endpoint(e.get_ref()) {
                Ok(e) => Some(e),
                Err(why) => {
                    self.err(e.span(), ctx, format!("endpoint: {why}"));
                    None
                }
            });
        let sample_ratio = match &f.sample_ratio {
            None => DEFAULT_SAMPLE_RATIO,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                self.err(
                    r.span(),
                    ctx,
                    "sample_ratio must be between 0.0 and 1.0 (0.01: one new trace in a hundred)",
                );
                DEFAULT_SAMPLE_RATIO
            }
        };
        let service_name = match &f.service_name {
            None => DEFAULT_SERVICE_NAME.to_string(),
            Some(n) if !n.get_ref().trim().is_empty() => n.get_ref().clone(),
            Some(n) => {
                self.err(n.span(), ctx, "service_name must not be empty");
                DEFAULT_SERVICE_NAME.to_string()
            }
        };
        let export_timeout = self.duration(&f.export_timeout, ctx, DEFAULT_EXPORT_TIMEOUT);
        let queue_size = self
            .int(&f.queue_size, ctx, MIN_QUEUE_SIZE as i64, 1 << 24)
            .map_or(DEFAULT_QUEUE_SIZE, |n| n as usize);
        TracingConfig {
            endpoint,
            sample_ratio,
            sample_below: sample_below(sample_ratio),
            service_name,
            export_timeout,
            queue_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn parsed(tracing: &str) -> Result<super::TracingConfig, Vec<String>> {
        let src = format!(
            "[listen]\nhttp = [\"127.0.0.1:8080\"]\n[tracing]\n{tracing}\n[[service]]\nname = \"s\"\nendpoints = [{{ addr = \"127.0.0.1:9001\" }}]\n[[route]]\nname = \"r\"\nservice = \"s\"\n"
        );
        match super::super::parse(Path::new("t.toml"), &src) {
            Ok(c) => Ok(c.tracing),
            Err(e) => Err(e.0.iter().map(|e| e.to_string()).collect()),
        }
    }

    #[test]
    fn tracing_settings_are_read() {
        let t = parsed("endpoint = \"http://collector:4318\"\nsample_ratio = 0.25").unwrap();
        let e = t.endpoint.unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("collector:4318", "/v1/traces")
        );
        assert_eq!(t.sample_ratio, 0.25);
        assert!(t.sample_below.abs_diff(u64::MAX / 4) < 1 << 12);
        let t = parsed("sample_ratio = 1").unwrap();
        assert!(t.endpoint.is_none());
        assert_eq!(t.sample_below, u64::MAX);
        assert_eq!(parsed("").unwrap().sample_ratio, 1.0);
    }

    #[test]
    fn tracing_errors_name_their_place() {
        assert_eq!(
            parsed("sample_ratio = 1.5").unwrap_err(),
            ["t.toml:4:16: tracing: sample_ratio must be between 0.0 and 1.0 (0.01: one new trace in a hundred)"]
        );
        let e = parsed("endpoint = \"https://c:4318\"").unwrap_err();
        assert!(
            e[0].starts_with("t.toml:4:12: tracing: endpoint: "),
            "{e:?}"
        );
        assert!(e[0].contains("https is not supported"), "{e:?}");
        let e = parsed("endpoint = \"http://127.0.0.1:/v1/traces\"").unwrap_err();
        assert!(e[0].contains("the port is empty"), "{e:?}");
        let e = parsed("endpoint = \"c:4318\"").unwrap_err();
        assert!(e[0].contains("is not a URL"), "{e:?}");
        let e = parsed("queue_size = 10").unwrap_err();
        assert!(e[0].starts_with("t.toml:4:14: tracing: "), "{e:?}");
        let e = parsed("sample = 1").unwrap_err();
        assert!(e[0].contains("unknown field `sample`"), "{e:?}");
    }
}
