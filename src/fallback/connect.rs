//! The service endpoint's front door: `CONNECT` tunnels to registered services, and
//! everything else to the HTTP proxy.
//!
//! pingora's HTTP proxy has no TCP tunnel for CONNECT, so the first bytes of each new
//! plaintext connection are peeked: `CONNECT <service>[.<mesh domain>]:<port>` is answered
//! here (200 and a byte-for-byte tunnel to an instance, or 403 for anything that is not a
//! configured service: busbar is not an open proxy); any other connection goes, unread, to
//! the proxy for its whole life.
//! Must not: parse more than the CONNECT head, or hold a connection the proxy should own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::state::now_ms;
use crate::metrics::METRICS;
use crate::proxy::BusbarProxy;
use crate::snapshot::State;

/// A CONNECT head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;
/// The first bytes (and a CONNECT head) must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection waiting for its first request is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Edge {
    pub proxy: Arc<HttpProxy<BusbarProxy>>,
    pub state: Arc<State>,
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut first = [0u8; 8];
        let mut watch = shutdown.clone();
        let peeked = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, stream.try_peek(&mut first)) => r,
            _ = watch.changed() => return None,
        };
        match peeked {
            Ok(Ok(true)) if &first == b"CONNECT " => {
                self.tunnel(stream).await;
                None
            }
            // Not a CONNECT, or a stream that cannot peek (TLS): the proxy owns it from here.
            Ok(Ok(_)) => {
                let mut next = Some(stream);
                while let Some(s) = next {
                    next = ServerApp::process_new(&self.proxy, s, shutdown).await;
                }
                None
            }
            _ => None,
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

async fn respond(stream: &mut Stream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.flush().await;
}

/// Reads the CONNECT head; returns its target authority.
async fn read_head(stream: &mut Stream) -> Option<String> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
    let line_end = head.iter().position(|&b| b == b'\r')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some("HTTP/1.1" | "HTTP/1.0"), None) => {
            Some(target.to_string())
        }
        _ => None,
    }
}

impl Edge {
    async fn tunnel(&self, mut stream: Stream) {
        let Ok(Some(target)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await
        else {
            respond(
                &mut stream,
                "400 Bad Request",
                "{\"error\":\"bad_request\",\"message\":\"malformed CONNECT request\"}\n",
            )
            .await;
            return;
        };
        let snap = self.state.load();
        let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
        let route = super::route_for_host(&snap.mesh_routes, host, &snap.config.mesh.domains);
        let Some(route) = route else {
            METRICS.connect_refused.inc();
            respond(
                &mut stream,
                "403 Forbidden",
                "{\"error\":\"not_a_service\",\"message\":\"CONNECT only reaches services registered with busbar\"}\n",
            )
            .await;
            return;
        };
        let svc = &route.service;
        let set = svc.instances();
        let panic = svc.panic.load(std::sync::atomic::Ordering::Relaxed);
        let Some(inst) = set
            .balancer
            .pick(&set.instances, 0, |i| {
                panic || set.instances.get(i).is_some_and(|x| x.is_available())
            })
            .and_then(|i| set.instances.get(i).cloned())
        else {
            respond(&mut stream, "503 Service Unavailable", "{\"error\":\"no_healthy_instance\",\"message\":\"the service has no healthy instance\"}\n").await;
            return;
        };
        let (addr, _path) = super::target(svc, &inst, now_ms());
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        let Ok(Ok(mut upstream)) = upstream else {
            respond(
                &mut stream,
                "502 Bad Gateway",
                "{\"error\":\"connect_failed\",\"message\":\"could not connect to the service\"}\n",
            )
            .await;
            return;
        };
        svc.metrics.fallback_connect.inc();
        if stream
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
            || stream.flush().await.is_err()
        {
            return;
        }
        inst.health.begin_request();
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        inst.health.end_request();
    }
}
