//! Is this node up, and is it ready for traffic: what `/livez` and `/readyz` answer, and
//! what systemd hears through its notify protocol (`Type=notify`).
//!
//! Live: the process answers its admin API. Ready: the configuration is loaded (it is,
//! or the process would not have started) and every plaintext service listener, the admin
//! API and the registration API (when started) accept connections; TLS listeners are
//! bound by the same service as the plaintext ones, in the same step. Not ready again
//! once a drain (SIGTERM) or an upgrade handover starts, so a load balancer stops sending.
//! When ready, systemd is told `READY=1` with this process's pid as the unit's main pid:
//! after a graceful upgrade (`upgrade`), that moves the unit over to the new process.
//! Owns: [`Readiness`], the start-up probe, `sd_notify`. Must not: serve HTTP (`admin`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// How often the start-up probe tries the listeners.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// One probe connect's limit (loopback answers in microseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

/// Where the node is in its life, shared by the probe and the admin API.
#[derive(Debug, Default)]
pub struct Readiness {
    phase: AtomicU8,
}

impl Readiness {
    /// "starting", "ready" or "draining".
    pub fn phase(&self) -> &'static str {
        match self.phase.load(Ordering::Acquire) {
            STARTING => "starting",
            READY => "ready",
            _ => "draining",
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase.load(Ordering::Acquire) == READY
    }

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::Release);
    }
}

/// The background task that flips [`Readiness`]: ready once the listeners accept, draining
/// at shutdown.
pub struct ReadyWatch {
    pub readiness: Arc<Readiness>,
    /// The addresses to probe: plaintext service listeners, admin, registration.
    pub addrs: Vec<SocketAddr>,
}

/// The address to connect to for a listener: a wildcard bind is reached on loopback.
fn probe_addr(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
        }
        _ => a,
    }
}

async fn accepts(a: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(probe_addr(a))).await,
        Ok(Ok(_))
    )
}

#[async_trait]
impl BackgroundService for ReadyWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut pending = self.addrs.clone();
        loop {
            let mut still = Vec::new();
            for a in pending {
                if !accepts(a).await {
                    still.push(a);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            tokio::select! {
                _ = shutdown.changed() => {
                    self.readiness.set(DRAINING);
                    return;
                }
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
        self.readiness.set(READY);
        tracing::info!(
            pid = std::process::id(),
            "ready: every listener accepts connections"
        );
        notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving",
            std::process::id()
        ));
        let _ = shutdown.changed().await;
        self.readiness.set(DRAINING);
    }
}

/// Sends `state` to systemd's notify socket when there is one (`sd_notify`); a no-op
/// outside systemd. Errors are logged: the service manager then times the start out.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return;
    };
    if let Err(e) = send(&path, state.as_bytes()) {
        tracing::warn!("cannot notify systemd at {}: {e}", path.to_string_lossy());
    }
}

fn send(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // "@name" is a socket in the abstract namespace (systemd's usual choice).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = UnixAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg, &addr)?;
    } else {
        sock.send_to(msg, std::path::Path::new(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_probed_on_loopback() {
        assert_eq!(
            probe_addr("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            probe_addr("[::]:8080".parse().unwrap()),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            probe_addr("10.1.2.3:8080".parse().unwrap()),
            "10.1.2.3:8080".parse().unwrap()
        );
    }

    #[test]
    fn phases_read_as_words() {
        let r = Readiness::default();
        assert_eq!(r.phase(), "starting");
        r.set(READY);
        assert!(r.is_ready());
        r.set(DRAINING);
        assert_eq!(r.phase(), "draining");
        assert!(!r.is_ready());
    }

    #[test]
    fn notify_reaches_a_path_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
