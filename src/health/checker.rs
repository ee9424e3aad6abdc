//! The background health checker: probes instances, ends ejections whose time is up,
//! recomputes panic mode and the instance gauges.
//!
//! Owns: probe scheduling and the probes themselves (HTTP/1.1, HTTP/2, TCP; over TLS, with
//! the service's TLS client, for instances reached over TLS).
//! Must not: block the request path; it only writes the atomics in `InstanceHealth`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::config::{HealthCheck, ProbeKind, Protocol};
use crate::model::health::{now_ms, HealthState, Transition};
use crate::model::{Instance, Service, TlsPeer};
use crate::snapshot::State;

/// How often the checker looks at every instance (ejection expiry, due probes).
const TICK: Duration = Duration::from_millis(100);
/// Gauges are refreshed every this many ticks.
const GAUGE_EVERY: u32 = 10;
/// Probes in flight at once, whatever the number of instances.
const MAX_PROBES: usize = 256;

pub struct HealthChecker {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut next_due: HashMap<(String, SocketAddr), Instant> = HashMap::new();
        let mut probes = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        let mut generation = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            while probes.try_join_next().is_some() {}
            let snap = self.state.load();
            if snap.generation != generation {
                generation = snap.generation;
                next_due.retain(|(svc, addr), _| {
                    snap.service(svc)
                        .is_some_and(|s| s.instances().instances.iter().any(|i| i.addr == *addr))
                });
            }
            let now = now_ms();
            let instant = Instant::now();
            for svc in &snap.services {
                let set = svc.instances();
                for inst in &set.instances {
                    if inst.health.expire_ejection(now) == Transition::Unejected {
                        tracing::info!(service = svc.name(), instance = %inst.addr, "ejection ended");
                    }
                    if let Some((sidecar, _)) = &inst.sidecar {
                        let key = (svc.name().to_string(), *sidecar);
                        if next_due.get(&key).is_none_or(|due| *due <= instant)
                            && probes.len() < MAX_PROBES
                        {
                            let hc = sidecar_check(svc.config.health.as_ref());
                            next_due.insert(key, instant + hc.interval);
                            probes.spawn(probe_sidecar(svc.clone(), inst.clone(), hc));
                        }
                    }
                    let Some(hc) = &svc.config.health else {
                        continue;
                    };
                    let key = (svc.name().to_string(), inst.addr);
                    if next_due.get(&key).is_some_and(|due| *due > instant)
                        || probes.len() >= MAX_PROBES
                    {
                        continue;
                    }
                    next_due.insert(key, instant + hc.interval);
                    probes.spawn(probe_and_record(svc.clone(), inst.clone(), hc.clone()));
                }
                svc.refresh_panic();
                if ticks.is_multiple_of(GAUGE_EVERY) {
                    update_gauges(svc);
                }
            }
            ticks = ticks.wrapping_add(1);
        }
        probes.abort_all();
    }
}

fn update_gauges(svc: &Service) {
    let set = svc.instances();
    let mut counts = [0i64; 3];
    for i in &set.instances {
        counts[match i.health.state() {
            HealthState::Healthy => 0,
            HealthState::Unhealthy => 1,
            HealthState::Ejected => 2,
        }] += 1;
    }
    for (gauge, n) in svc.metrics.instances.iter().zip(counts) {
        gauge.set(n);
    }
    svc.metrics
        .panic_mode
        .set(svc.panic.load(std::sync::atomic::Ordering::Relaxed) as i64);
}

/// Sidecars are probed like their service's instances, or by TCP every second when the
/// service has no health check (so a failed sidecar can come back).
fn sidecar_check(service: Option<&HealthCheck>) -> HealthCheck {
    service.cloned().unwrap_or(HealthCheck {
        kind: ProbeKind::Tcp,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    })
}

async fn probe_sidecar(svc: Arc<Service>, inst: Arc<Instance>, hc: HealthCheck) {
    let Some((addr, state)) = &inst.sidecar else {
        return;
    };
    let ok = probe(*addr, &hc, svc.config.protocol, inst.tls.as_deref()).await;
    match state.record_probe(ok, hc.healthy_threshold, hc.unhealthy_threshold, now_ms()) {
        Some(true) => tracing::info!(service = svc.name(), instance = %inst.id, sidecar = %addr,
            hold_down = ?svc.config.hold_down, "sidecar passed its probes: back after the hold-down"),
        Some(false) => tracing::warn!(service = svc.name(), instance = %inst.id, sidecar = %addr,
            "sidecar failed its probes: traffic goes to the app port"),
        None => {}
    }
}

async fn probe_and_record(svc: Arc<Service>, inst: Arc<Instance>, hc: HealthCheck) {
    let ok = probe(inst.addr, &hc, svc.config.protocol, inst.tls.as_deref()).await;
    match inst
        .health
        .record_probe(ok, hc.healthy_threshold, hc.unhealthy_threshold)
    {
        Transition::BecameHealthy => {
            tracing::info!(service = svc.name(), instance = %inst.addr, "instance passed its health checks");
            svc.refresh_panic();
        }
        Transition::BecameUnhealthy => {
            tracing::warn!(service = svc.name(), instance = %inst.addr, "instance failed its health checks");
            svc.refresh_panic();
        }
        _ => {}
    }
}

/// One probe: true if the instance answered as expected within the timeout. An instance
/// reached over TLS is probed over TLS (a TCP probe included: as Envoy's health checks
/// use the cluster's transport socket, a certificate that fails verification fails the
/// probe).
pub async fn probe(
    addr: SocketAddr,
    hc: &HealthCheck,
    protocol: Protocol,
    tls: Option<&TlsPeer>,
) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let Some(tls) = tls else {
            return match &hc.kind {
                ProbeKind::Tcp => Some(true),
                ProbeKind::Http { path } if protocol.is_h2() => {
                    h2_status(stream, "http", &addr, path).await
                }
                ProbeKind::Http { path } => http1_status(stream, &addr, path).await,
            };
        };
        let connector = tokio_rustls::TlsConnector::from(tls.config.client.clone());
        let stream = match connector.connect(tls.name.clone(), stream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(instance = %addr, "health probe: TLS handshake failed: {e}");
                return None;
            }
        };
        match &hc.kind {
            ProbeKind::Tcp => Some(true),
            // The service's TLS client offers `h2` alone to an HTTP/2 service's instances.
            // An instance asked for by its IP address gets `ip:port` (an IPv6 one bracketed).
            ProbeKind::Http { path } if protocol.is_h2() => match tls.name {
                rustls::pki_types::ServerName::DnsName(_) => {
                    h2_status(stream, "https", &tls.sni, path).await
                }
                _ => h2_status(stream, "https", &addr, path).await,
            },
            ProbeKind::Http { path } => http1_status(stream, &tls.sni, path).await,
        }
    };
    matches!(
        tokio::time::timeout(hc.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Sends `GET path` over HTTP/1.1 and reports whether the status is 2xx.
async fn http1_status(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    host: &(dyn std::fmt::Display + Sync),
    path: &str,
) -> Option<bool> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: busbar-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    s.flush().await.ok()?;
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        let read = s.read(&mut buf[n..]).await.ok()?;
        if read == 0 {
            return None;
        }
        n += read;
    }
    // "HTTP/1.1 200"
    let status = buf.get(9..12)?;
    Some(
        buf.starts_with(b"HTTP/1.")
            && status[0] == b'2'
            && status[1..].iter().all(u8::is_ascii_digit),
    )
}

/// Sends `GET path` over HTTP/2 (prior knowledge on cleartext, ALPN `h2` on TLS) and
/// reports whether the status is 2xx.
async fn h2_status(
    s: impl AsyncRead + AsyncWrite + Unpin,
    scheme: &str,
    host: &(dyn std::fmt::Display + Sync),
    path: &str,
) -> Option<bool> {
    let (mut client, conn) = h2::client::handshake(s).await.ok()?;
    let request = http::Request::get(format!("{scheme}://{host}{path}"))
        .header(http::header::USER_AGENT, "busbar-health")
        .body(())
        .ok()?;
    let exchange = async {
        let (resp, _) = client.send_request(request, true).ok()?;
        let resp = resp.await.ok()?;
        Some(resp.status().is_success())
    };
    tokio::select! {
        r = exchange => r,
        _ = conn => None,
    }
}
