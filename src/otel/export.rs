//! The span exporter: a background task that takes queued spans in batches, encodes them
//! as an OTLP `ExportTraceServiceRequest` (protobuf, the official messages from
//! `opentelemetry-proto`) and posts them to `[tracing] endpoint` over one kept-alive
//! HTTP/1.1 connection (hyper, on the task's own tokio runtime).
//!
//! Owns: batching, encoding, the collector connection, the exported/failed counts.
//! Must not: make the request path wait. A slow or dead collector only delays this task;
//! meanwhile the queue fills and the request path drops (and counts) what does not fit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prost::Message;

use super::{Kind, SpanRecord, BATCH, IDLE, QUEUE, READY};
use crate::config::{OtlpEndpoint, TracingConfig};
use crate::metrics::METRICS;
use crate::snapshot::State;

/// How often queued spans go out when fewer than a batch wait (the OpenTelemetry SDK's
/// `OTEL_BSP_SCHEDULE_DELAY` is 5 s; shorter keeps traces fresh in the UI at little cost).
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("the collector answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within the export timeout")]
    Timeout,
}

/// The background task (see the module header).
pub struct SpanExport {
    pub state: Arc<State>,
}

/// The connection to the collector and the task that drives it.
struct Conn {
    authority: String,
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The driver ends with its sender; a collector that hangs would keep it waiting.
        self.driver.abort();
    }
}

#[derive(Default)]
struct Exporter {
    conn: Option<Conn>,
    /// The last export failed: the next failure is not logged again.
    failing: bool,
}

#[async_trait]
impl BackgroundService for SpanExport {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut exporter = Exporter::default();
        loop {
            IDLE.store(true, Ordering::Release);
            let stop = tokio::select! {
                _ = shutdown.changed() => true,
                _ = READY.notified() => false,
                _ = tokio::time::sleep(EXPORT_EVERY) => false,
            };
            IDLE.store(false, Ordering::Release);
            let snapshot = self.state.load();
            let config = &snapshot.config.tracing;
            // A collector that hangs must not hold shutdown beyond one last export.
            let stop = stop
                || tokio::select! {
                    _ = exporter.drain(config, false) => false,
                    _ = shutdown.changed() => true,
                };
            if stop {
                exporter.drain(config, true).await;
                return;
            }
        }
    }
}

impl Exporter {
    /// Exports what is queued, a batch at a time. When stopping, gives up at the first
    /// failure: shutdown waits for one export at most.
    async fn drain(&mut self, config: &TracingConfig, stop: bool) {
        let Some(queue) = QUEUE.get() else {
            return; // nothing was ever sampled
        };
        loop {
            let mut batch = Vec::with_capacity(BATCH.min(queue.len()));
            while batch.len() < BATCH {
                match queue.pop() {
                    Some(s) => batch.push(s),
                    None => break,
                }
            }
            let n = batch.len();
            if n == 0 {
                return;
            }
            let ok = match &config.endpoint {
                // A reload turned export off with spans still queued.
                None => false,
                Some(endpoint) => {
                    let body = encode(&batch, config);
                    drop(batch);
                    self.export(endpoint, config.export_timeout, body).await
                }
            };
            if ok {
                METRICS.trace_spans_exported.inc_by(n as u64);
            } else {
                METRICS.trace_spans_failed.inc_by(n as u64);
                if stop {
                    let left = std::iter::from_fn(|| queue.pop()).count();
                    METRICS.trace_spans_failed.inc_by(left as u64);
                    return;
                }
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// Posts one encoded batch; says whether the collector took it.
    async fn export(&mut self, endpoint: &OtlpEndpoint, timeout: Duration, body: Bytes) -> bool {
        let result = match tokio::time::timeout(timeout, self.post(endpoint, body)).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::Timeout),
        };
        match result {
            Ok(()) => {
                if self.failing {
                    tracing::info!(endpoint = %endpoint.url, "span export works again");
                }
                self.failing = false;
                true
            }
            Err(e) => {
                // A connection in an unknown state is not used again.
                self.conn = None;
                if !self.failing {
                    tracing::warn!(endpoint = %endpoint.url, "span export failed: {e} (spans are dropped and counted until it works)");
                }
                self.failing = true;
                false
            }
        }
    }

    async fn post(&mut self, endpoint: &OtlpEndpoint, body: Bytes) -> Result<(), ExportError> {
        let reusable = self
            .conn
            .as_ref()
            .is_some_and(|c| c.authority == endpoint.authority && !c.sender.is_closed());
        let conn = match self.conn.take() {
            Some(c) if reusable => self.conn.insert(c),
            _ => self.conn.insert(connect(&endpoint.authority).await?),
        };
        conn.sender.ready().await?;
        let request = http::Request::post(endpoint.path.as_str())
            .header(http::header::HOST, endpoint.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))?;
        let response = conn.sender.send_request(request).await?;
        let status = response.status();
        // Read to the end, so the connection can carry the next export.
        response.into_body().collect().await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ExportError::Status(status))
        }
    }
}

async fn connect(authority: &str) -> Result<Conn, ExportError> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(ExportError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn {
        authority: authority.to_string(),
        sender,
        driver,
    })
}

/// The method names of `metrics::method_index`, as OpenTelemetry's HTTP conventions
/// spell them (`_OTHER` for the rest).
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// One export request for a batch: busbar's resource, one scope, the spans.
pub fn encode(batch: &[SpanRecord], config: &TracingConfig) -> Bytes {
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", config.service_name.as_str()),
                    text("service.version", crate::version::VERSION),
                    text("service.instance.id", crate::via::node().id()),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "busbar".to_string(),
                    version: crate::version::VERSION.to_string(),
                    ..Default::default()
                }),
                spans: batch.iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    Bytes::from(request.encode_to_vec())
}

/// One OTLP span from its record, with OpenTelemetry's HTTP attribute names where one
/// exists and `busbar.*` for the rest.
fn span(r: &SpanRecord) -> Span {
    let route = r.route.as_deref();
    let service = route.map_or("", |r| r.service.name());
    let version = match (&r.set, r.instance) {
        (Some(set), Some((idx, _))) => set.versions.name_of(idx as usize),
        _ => "",
    };
    let mut attributes = Vec::with_capacity(10);
    if r.status > 0 {
        attributes.push(int("http.response.status_code", i64::from(r.status)));
    }
    if let Some(route) = route {
        attributes.push(text("busbar.route", route.name()));
        attributes.push(text("busbar.service", service));
    }
    if !version.is_empty() {
        attributes.push(text("busbar.release.version", version));
    }
    if let Some(e) = r.error {
        attributes.push(text("error.type", e));
    }
    let failed = match r.kind {
        Kind::Server => r.status >= 500 || (r.status == 0 && r.error.is_some()),
        Kind::Client => r.status >= 400 || r.status == 0,
    };
    let (name, kind) = match r.kind {
        Kind::Server => {
            let method = METHODS.get(r.method as usize).copied().unwrap_or("_OTHER");
            attributes.push(text("http.request.method", method));
            attributes.push(int("busbar.tries", i64::from(r.tries)));
            if let Some((_, addr)) = r.instance {
                attributes.push(text("busbar.instance", addr.to_string()));
            }
            let user = r.user.as_str();
            if !user.is_empty() {
                attributes.push(text("user.id", user));
            }
            let name = match route {
                Some(route) => format!("{method} {}", route.name()),
                None => method.to_string(),
            };
            (name, SpanKind::Server)
        }
        Kind::Client => {
            if let Some((_, addr)) = r.instance {
                attributes.push(text("server.address", addr.ip().to_string()));
                attributes.push(int("server.port", i64::from(addr.port())));
            }
            if r.tries > 1 {
                attributes.push(int("http.request.resend_count", i64::from(r.tries - 1)));
            }
            (format!("try {service}"), SpanKind::Client)
        }
    };
    Span {
        trace_id: r.trace_id.to_vec(),
        span_id: r.span_id.to_vec(),
        parent_span_id: if r.parent_id == [0; 8] {
            Vec::new()
        } else {
            r.parent_id.to_vec()
        },
        // The W3C trace flags, and "the parent is remote" for the server span of a
        // caller's trace (OTLP's SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE | IS_REMOTE).
        flags: u32::from(r.flags)
            | match (r.kind, r.parent_id == [0; 8]) {
                (Kind::Server, false) => 0x300,
                _ => 0x100,
            },
        name,
        kind: kind as i32,
        start_time_unix_nano: r.start_unix_nano,
        end_time_unix_nano: r.end_unix_nano,
        attributes,
        status: failed.then(|| Status {
            message: String::new(),
            code: StatusCode::Error as i32,
        }),
        ..Default::default()
    }
}
