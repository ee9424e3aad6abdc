//! The service endpoint's front door, before pingora's HTTP parser.
//!
//! For each request on a plaintext HTTP/1 connection (it runs the keep-alive loop
//! pingora would otherwise run) it reads the request head under a total
//! deadline (a client trickling header bytes is cut off: slowloris), refuses ambiguous
//! framing and oversize heads itself (see `head`), sends `CONNECT` to the mesh tunnel,
//! and hands everything else — unchanged, bytes rewound — to the pingora HTTP proxy.
//! h2c connections (the HTTP/2 preface) go to the proxy whole. TLS connections cannot be
//! rewound, so they get pingora's own parsing and per-read timeouts only.
//! Must not: interpret more than the head, or keep any state between connections.

pub mod head;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Limits;
use crate::metrics::METRICS;
use crate::proxy::BusbarProxy;
use crate::snapshot::State;
use head::{HeadLimits, Refusal};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

pub struct Edge {
    pub proxy: Arc<HttpProxy<BusbarProxy>>,
    pub state: Arc<State>,
}

/// What the front door decided for the next request on a connection.
enum Next {
    /// An HTTP/1 request whose head passed: the proxy handles it.
    Request(Stream),
    /// HTTP/2 with prior knowledge: the proxy owns the connection from here.
    H2(Stream),
    /// Closed, refused, or tunnelled: nothing left to do.
    Done,
}

async fn refuse(stream: &mut L4Stream, status: u16, reason: &str) {
    let text = match status {
        408 => "408 Request Timeout",
        414 => "414 URI Too Long",
        431 => "431 Request Header Fields Too Large",
        _ => "400 Bad Request",
    };
    let code = match status {
        408 => "header_timeout",
        414 => "request_line_too_long",
        431 => "headers_too_large",
        _ => "malformed_request",
    };
    let body = format!("{{\"error\":\"{code}\",\"message\":\"{reason}\"}}\n");
    let head = format!(
        "HTTP/1.1 {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    METRICS.edge_refusals.with_label_values(&[code]).inc();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.flush().await;
}

impl Edge {
    /// Reads and judges the next request head of a plaintext connection.
    async fn front(&self, mut s: Box<L4Stream>, limits: Limits, shutdown: &ShutdownWatch) -> Next {
        let hl = HeadLimits {
            max_request_line: limits.max_request_line,
            max_head_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
        };
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let mut watch = shutdown.clone();
        // Idle until the first byte; from then on the whole head has `header_timeout`.
        let first = tokio::select! {
            r = tokio::time::timeout(limits.idle_timeout, s.read(&mut chunk)) => r,
            _ = watch.changed() => return Next::Done,
        };
        let n = match first {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Next::Done,
        };
        buf.extend_from_slice(&chunk[..n]);
        let deadline = tokio::time::Instant::now() + limits.header_timeout;
        let end = loop {
            if buf.starts_with(H2_PREFACE)
                || H2_PREFACE.starts_with(&buf) && buf.len() < H2_PREFACE.len()
            {
                if buf.len() >= H2_PREFACE.len() {
                    s.rewind(&buf);
                    return Next::H2(s);
                }
            } else if let Some(end) = head::head_end(&buf) {
                break end;
            } else if let Some(r) = head::too_long(&buf, &hl) {
                refuse(&mut s, r.status, r.reason).await;
                return Next::Done;
            }
            match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return Next::Done,
                Err(_) => {
                    refuse(&mut s, 408, "the request head did not arrive in time").await;
                    return Next::Done;
                }
            }
        };
        if buf.starts_with(b"CONNECT ") {
            crate::fallback::connect::tunnel(&self.state, s, &buf[..end], &buf[end..]).await;
            return Next::Done;
        }
        match head::check(&buf[..end], &hl) {
            Ok(()) => {
                s.rewind(&buf);
                Next::Request(s)
            }
            Err(Refusal { status, reason }) => {
                refuse(&mut s, status, reason).await;
                Next::Done
            }
        }
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !stream.as_any().is::<L4Stream>() {
            // TLS: pingora parses it, for the connection's whole life.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let limits = self.state.load().config.limits;
        let mut stream = stream;
        let mut persistent: Option<HttpPersistentSettings> = None;
        // The HTTP/1 keep-alive loop pingora would run, with the front door before each request.
        loop {
            let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
                return None;
            };
            let s = match self.front(l4, limits, shutdown).await {
                Next::Request(s) => s,
                // The proxy sees the preface again (it was rewound) and speaks h2c.
                Next::H2(s) => return ServerApp::process_new(&self.proxy, s, shutdown).await,
                Next::Done => return None,
            };
            let mut session = ServerSession::new_http1(s);
            match persistent.take() {
                Some(p) => p.apply_to_session(&mut session),
                None => {
                    let keepalive =
                        (!*shutdown.borrow()).then_some(limits.idle_timeout.as_secs().max(1));
                    session.set_keepalive(keepalive);
                    session.set_keepalive_reuses_remaining(
                        self.proxy
                            .server_options
                            .as_ref()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            let (next, settings) = self
                .proxy
                .process_new_http(session, shutdown)
                .await?
                .consume();
            stream = next;
            persistent = settings;
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

/// How long a refused connection's reply may take to leave.
pub const REFUSAL_FLUSH: Duration = Duration::from_millis(100);
