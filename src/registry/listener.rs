//! The registration API's listening socket, which a reload opens, moves or closes as the
//! set of services with `registration = true` and `registry.listen` change.
//!
//! pingora can't add a listener to a running server, so this one is busbar's own: bound by
//! [`RegistrationListener::set`] (at start-up, or in a reload, so that a bind error refuses
//! the start or the reload and changes nothing), and served by [`RegistrationService`], a
//! pingora service on its own thread that accepts on whatever socket is current and closes
//! it with the server. Its socket is not in pingora's upgrade table (a reload may move it,
//! and the table can't forget an address): it has SO_REUSEPORT, and after `--upgrade` the
//! new process binds beside the old one, which closes its own when it shuts down.
//! Owns: binding, moving and closing that socket, and its accept loop.
//! Must not: read a request (each connection goes to the API app, `registry::api`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::Service;
use tokio::sync::watch;

/// How long a process started with `--upgrade` keeps trying to bind the registration
/// address while it is in use without SO_REUSEPORT (by a busbar from before it had it,
/// which lets go when it shuts down, pingora's 5 s after the handover).
pub const UPGRADE_BIND_WAIT: Duration = Duration::from_secs(15);

/// A bound registration socket.
#[derive(Debug)]
struct Bound {
    addr: SocketAddr,
    socket: std::net::TcpListener,
}

/// Where the registration API listens, and the means to change it.
#[derive(Debug)]
pub struct RegistrationListener {
    current: watch::Sender<Option<Arc<Bound>>>,
    /// Serialises changes (a reload and an upgrade's start-up bind).
    change: Mutex<()>,
}

impl Default for RegistrationListener {
    fn default() -> Self {
        RegistrationListener {
            current: watch::Sender::new(None),
            change: Mutex::new(()),
        }
    }
}

impl RegistrationListener {
    /// The address it listens on now; `None` while it is closed.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.current.borrow().as_ref().map(|b| b.addr)
    }

    /// Listens on `want`, or closes the listener for `None`. A new address is bound before
    /// the old one closes, so an error leaves the running listener as it was. Returns
    /// whether anything changed. The old socket closes once the service has moved on
    /// (at once on an idle node; connections it accepted keep their answers).
    /// Nothing else may listen on a new address, not even another busbar.
    pub fn set(&self, want: Option<SocketAddr>) -> std::io::Result<bool> {
        self.open(want, true)
    }

    fn open(&self, want: Option<SocketAddr>, alone: bool) -> std::io::Result<bool> {
        let _serial = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if self.addr() == want {
            return Ok(false);
        }
        let next = match want {
            Some(addr) => Some(Arc::new(Bound {
                addr,
                socket: crate::listeners::bind_shared(addr, alone)?,
            })),
            None => None,
        };
        self.current.send_replace(next);
        Ok(true)
    }

    /// After `--upgrade`: binds `addr` beside the process being replaced (both accept until
    /// it shuts down), trying again until `within` has passed while the address is held
    /// by a socket that does not share.
    pub fn join_upgrade(&self, addr: SocketAddr, within: Duration) -> std::io::Result<bool> {
        let deadline = Instant::now() + within;
        loop {
            match self.open(Some(addr), false) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }
}

/// Serves the registration API on the current registration socket, moving with it.
pub struct RegistrationService<A> {
    listener: Arc<RegistrationListener>,
    app: Arc<A>,
    /// After `--upgrade`: the address to bind once started (see [`UPGRADE_BIND_WAIT`]).
    bind_on_start: Option<SocketAddr>,
}

impl<A> RegistrationService<A> {
    /// Serves `app` on `listener`'s socket; `bind_on_start`: the address to bind when the
    /// service starts rather than before (a graceful upgrade's, once pingora has closed
    /// the descriptors the old process handed over that nothing claims).
    pub fn new(
        listener: Arc<RegistrationListener>,
        app: A,
        bind_on_start: Option<SocketAddr>,
    ) -> Self {
        RegistrationService {
            listener,
            app: Arc::new(app),
            bind_on_start,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> Service for RegistrationService<A> {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        if let Some(addr) = self.bind_on_start {
            let listener = self.listener.clone();
            let bound =
                tokio::task::spawn_blocking(move || listener.join_upgrade(addr, UPGRADE_BIND_WAIT))
                    .await;
            match bound {
                Ok(Ok(_)) => {}
                // A listener that cannot start stops busbar (the supervisor exits).
                Ok(Err(e)) => panic!("registration API: cannot listen on {addr}: {e}"),
                Err(e) => panic!("registration API: binding {addr}: {e}"),
            }
        }
        let mut changes = self.listener.current.subscribe();
        let mut was_open = false;
        loop {
            // A duplicate of the current socket: the service's own handle, dropped when
            // the socket changes; the socket closes once both handles are gone.
            let accepting = match changes.borrow_and_update().as_ref() {
                None => {
                    if was_open {
                        tracing::info!("registration API closed: no service takes registrations");
                    }
                    None
                }
                Some(b) => match b
                    .socket
                    .try_clone()
                    .and_then(tokio::net::TcpListener::from_std)
                {
                    Ok(l) => {
                        tracing::info!(addr = %b.addr, "registration API listening");
                        Some(l)
                    }
                    Err(e) => panic!("registration API: cannot accept on {}: {e}", b.addr),
                },
            };
            was_open = accepting.is_some();
            let (app, watch) = (self.app.clone(), shutdown.clone());
            let serve = async move {
                match accepting {
                    Some(l) => crate::listeners::accept_loop(app, l, watch).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(serve);
            let moved = loop {
                tokio::select! {
                    _ = &mut serve => break false,
                    changed = changes.changed() => break changed.is_ok(),
                    stop = shutdown.changed() => if stop.is_err() || *shutdown.borrow() {
                        break false;
                    },
                }
            };
            if !moved {
                break;
            }
        }
        // Closed with the server (not when the process exits, after the drain): a process
        // taking over after an upgrade is the one that accepts now.
        let _ = self.listener.set(None);
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        "busbar registration"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    /// None of pingora's: the socket is busbar's (see the module header).
    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    }

    #[test]
    fn opens_moves_and_closes() {
        let l = RegistrationListener::default();
        assert_eq!(l.addr(), None);
        assert!(!l.set(None).unwrap());
        let (a, b) = (free(), free());
        assert!(l.set(Some(a)).unwrap());
        assert_eq!(l.addr(), Some(a));
        assert!(!l.set(Some(a)).unwrap(), "same address: nothing to do");
        assert!(l.set(Some(b)).unwrap());
        assert_eq!(l.addr(), Some(b));
        // Nothing else holds `a`'s socket: it is closed and can be bound again.
        std::net::TcpListener::bind(a).expect("the old address is free again");
        assert!(l.set(None).unwrap());
        assert_eq!(l.addr(), None);
    }

    #[test]
    fn a_bind_error_changes_nothing() {
        let l = RegistrationListener::default();
        let a = free();
        l.set(Some(a)).unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let e = l.set(Some(busy)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(l.addr(), Some(a), "still on the old address");
        assert!(std::net::TcpStream::connect(a).is_ok(), "still listening");
    }

    #[test]
    fn an_upgrade_binds_beside_the_old_process_and_nothing_else_does() {
        let old = RegistrationListener::default();
        let a = free();
        old.set(Some(a)).unwrap();
        let new = RegistrationListener::default();
        let e = new.set(Some(a)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "a second busbar");
        assert!(
            new.join_upgrade(a, Duration::ZERO).unwrap(),
            "the upgrade's"
        );
        // A socket that does not share keeps it from an upgrade too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = new
            .join_upgrade(plain.local_addr().unwrap(), Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }
}
