//! `CONNECT` tunnels for callers whose sidecar is down: `CONNECT <service>[.<mesh
//! domain>]:<port>` gets 200 and a byte-for-byte TCP tunnel to one of the service's
//! instances (clients speak TLS end to end); anything that is not a configured service
//! gets 403 and opens nothing: busbar is not an open proxy.
//! The front door (`edge`) reads the head and calls [`tunnel`]; the bytes go through
//! `drivers::tunnel` (the copy an upgrade uses too), closed after the service's
//! `tunnel_idle_timeout` without a byte either way, and at the end of a drain's grace
//! period.
//! Must not: parse more than the CONNECT head.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drivers::tunnel::{self, Bounds};
use crate::metrics::METRICS;
use crate::model::health::now_ms;
use crate::snapshot::State;

/// Connecting to the chosen instance must succeed within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, status: &str, code: &str, message: &str) {
    let body = crate::base::reply::Refusal::new(code, message).to_json();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// The target authority of a CONNECT head.
fn target_of(head: &[u8]) -> Option<&str> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some("HTTP/1.1" | "HTTP/1.0"), None) => Some(target),
        _ => None,
    }
}

/// Answers a CONNECT whose head is `head` (`rest`: bytes the client sent after it), on a
/// plaintext or TLS client connection. `drain`: the server's shutdown watch.
pub async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    mut stream: Box<S>,
    head: &[u8],
    rest: &[u8],
    drain: &tokio::sync::watch::Receiver<bool>,
) {
    {
        let Some(target) = target_of(head) else {
            respond(
                &mut stream,
                "400 Bad Request",
                "bad_request",
                "malformed CONNECT request",
            )
            .await;
            return;
        };
        let snap = state.load();
        let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
        let route = super::route_for_host(&snap.mesh_routes, host, &snap.config.mesh.domains);
        let Some(route) = route else {
            METRICS.connect_refused.inc();
            respond(
                &mut stream,
                "403 Forbidden",
                "not_a_service",
                "CONNECT only reaches services registered with busbar",
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
            respond(
                &mut stream,
                "503 Service Unavailable",
                "no_healthy_instance",
                "the service has no healthy instance",
            )
            .await;
            return;
        };
        let (addr, _path) = super::target(svc, &inst, now_ms());
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        let Ok(Ok(mut upstream)) = upstream else {
            respond(
                &mut stream,
                "502 Bad Gateway",
                "connect_failed",
                "could not connect to the service",
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
        if rest.is_empty() || upstream.write_all(rest).await.is_ok() {
            let bounds = Bounds {
                idle: svc.config.tunnel_idle_timeout,
                drain: drain.clone(),
                grace: snap.config.server.grace_period,
            };
            tunnel::copy(&mut *stream, &mut upstream, bounds).await;
        }
        inst.health.end_request();
    }
}
