//! `CONNECT` tunnels for callers whose sidecar is down: `CONNECT <service>[.<mesh
//! domain>]:<port>` gets 200 and a byte-for-byte TCP tunnel to one of the service's
//! instances (clients speak TLS end to end); anything that is not a configured service
//! gets 403 and opens nothing: busbar is not an open proxy.
//! The front door (`edge`) reads the head and calls [`tunnel`]; the bytes go through
//! `drivers::tunnel` (the copy an upgrade uses too), closed after the service's
//! `tunnel_idle_timeout` without a byte either way, and at the end of a drain's grace
//! period.
//! Every CONNECT gets one access log line when it ends, as Envoy and HAProxy log a
//! tunnel: a refusal at once (and counted in `busbar_requests_total` with its reason), a
//! tunnel when it closes (status 200, `bytes` the upstream sent the client, `duration_ms`
//! its life, `error` busbar's reason when busbar ended it: `tunnel_idle`,
//! `tunnel_drained`).
//! Must not: parse more than the CONNECT head.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::accesslog::{AccessLog, Bare};
use crate::base::reply::Refusal;
use crate::drivers::tunnel::{self, Bounds};
use crate::metrics::METRICS;
use crate::model::health::now_ms;
use crate::snapshot::State;

/// Connecting to the chosen instance must succeed within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Where a CONNECT's access log line goes, and what busbar knows of its caller.
pub struct Log<'a> {
    pub log: &'a AccessLog,
    pub client: Option<std::net::SocketAddr>,
    /// When the head had been read.
    pub started: std::time::Instant,
}

/// How a CONNECT ended, for its access log line and `busbar_requests_total`.
struct Ended<'a> {
    /// The authority the client asked for (`""` when the head was malformed).
    target: &'a str,
    route: &'a str,
    service: &'a str,
    instance: Option<std::net::SocketAddr>,
    status: u16,
    /// Bytes sent to the client: the refusal's body, or what the tunnel carried.
    bytes: u64,
    /// busbar's reason code when busbar refused or ended it.
    error: Option<&'static str>,
}

impl Log<'_> {
    /// Answers a refusal (`e`'s status and reason code, `message` for a person) and
    /// writes its line, with the bytes of the answer's body.
    async fn refuse<S: AsyncWrite + Unpin>(&self, stream: &mut S, e: Ended<'_>, message: &str) {
        let status = http::StatusCode::from_u16(e.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        let code = e.error.unwrap_or("");
        let (answer, body) = Refusal::new(code, message).to_closing_answer(status);
        let _ = stream.write_all(&answer).await;
        let _ = stream.flush().await;
        self.ended(Ended {
            bytes: body as u64,
            ..e
        });
    }

    /// The line of one CONNECT, and a refusal counted as busbar's own answers are.
    fn ended(&self, e: Ended<'_>) {
        if e.status >= 400 {
            if let Some(reason) = e.error {
                crate::metrics::count_answer(e.route, e.service, e.status, reason, "CONNECT");
            }
        }
        self.log.bare(&Bare {
            client: self.client,
            method: "CONNECT",
            host: e.target,
            route: e.route,
            service: e.service,
            instance: e.instance,
            status: e.status,
            bytes: e.bytes as usize,
            started: self.started,
            error: e.error,
            protocol: "http/1.1",
        });
    }
}

/// A CONNECT to `target` refused before it named a service: no route, no service, no
/// instance.
fn not_a_service<'a>(target: &'a str, status: u16, error: &'static str) -> Ended<'a> {
    Ended {
        target,
        route: crate::metrics::NO_ROUTE,
        service: "",
        instance: None,
        status,
        bytes: 0,
        error: Some(error),
    }
}

/// Answers a CONNECT whose head is `head` (`rest`: bytes the client sent after it), on a
/// plaintext or TLS client connection, and writes its access log line when it ends.
/// `drain`: the server's shutdown watch.
pub async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    mut stream: Box<S>,
    head: &[u8],
    rest: &[u8],
    drain: &tokio::sync::watch::Receiver<bool>,
    log: Log<'_>,
) {
    let Some(target) = target_of(head) else {
        let e = not_a_service("", 400, "bad_request");
        log.refuse(&mut stream, e, "malformed CONNECT request")
            .await;
        return;
    };
    let snap = state.load();
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let route = super::route_for_host(&snap.mesh_routes, host, &snap.config.mesh.domains);
    let Some(route) = route else {
        METRICS.connect_refused.inc();
        let message = "CONNECT only reaches services registered with busbar";
        let e = not_a_service(target, 403, "not_a_service");
        log.refuse(&mut stream, e, message).await;
        return;
    };
    let svc = &route.service;
    let refused = |status, error| Ended {
        target,
        route: route.name(),
        service: &svc.config.name,
        instance: None,
        status,
        bytes: 0,
        error: Some(error),
    };
    let set = svc.instances();
    let panic = svc.panic.load(std::sync::atomic::Ordering::Relaxed);
    let Some(inst) = set
        .balancer
        .pick(&set.instances, 0, |i| {
            panic || set.instances.get(i).is_some_and(|x| x.is_available())
        })
        .and_then(|i| set.instances.get(i).cloned())
    else {
        let e = refused(503, "no_healthy_instance");
        log.refuse(&mut stream, e, "the service has no healthy instance")
            .await;
        return;
    };
    let (addr, _path) = super::target(svc, &inst, now_ms());
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
    let Ok(Ok(mut upstream)) = upstream else {
        let e = Ended {
            instance: Some(addr),
            ..refused(502, "connect_failed")
        };
        log.refuse(&mut stream, e, "could not connect to the service")
            .await;
        return;
    };
    svc.metrics.fallback_connect.inc();
    let mut ended = Ended {
        instance: Some(addr),
        error: None,
        ..refused(200, "")
    };
    if stream
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
        || stream.flush().await.is_err()
    {
        log.ended(ended);
        return;
    }
    inst.health.begin_request();
    if rest.is_empty() || upstream.write_all(rest).await.is_ok() {
        let bounds = Bounds {
            idle: svc.config.tunnel_idle_timeout,
            drain: drain.clone(),
            grace: snap.config.server.grace_period,
        };
        let copied = tunnel::copy(&mut *stream, &mut upstream, bounds).await;
        ended.bytes = copied.to_client;
        ended.error = copied.end.code();
    }
    inst.health.end_request();
    log.ended(ended);
}
