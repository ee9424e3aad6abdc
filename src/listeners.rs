//! The service endpoint's plaintext listening sockets: busbar binds them and hands pingora
//! a duplicate of each through its listen-fd table, keeping its own handle, so that a
//! drain answers the connections the kernel had already queued.
//!
//! On SIGTERM pingora's accept loop stops and drops its listener. Closing a listening
//! socket resets every connection still in the kernel's accept queue: a client whose
//! connect had succeeded, and whose request was sent, got a reset instead of an answer
//! (defect D8). With its own handle busbar keeps the socket open until pingora's loops
//! have stopped, then accepts what is queued and hands it to the app like any connection
//! (the front door answers it with `Connection: close`), and only then closes the socket:
//! from there on connects are refused and clients move on to other nodes. What remains is
//! the few microseconds between busbar's last, empty accept and the close.
//!
//! Not covered: TLS listeners (their handshake is pingora's), and a process started with
//! `--upgrade`, whose sockets arrive as bare descriptors that safe code cannot hold twice.
//! Owns: binding the plaintext sockets, the kept handles, the last accepts.
//! Must not: read from a connection (the app does).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest};
use pingora_core::server::{ListenFds, RuntimeOpts, ShutdownWatch};
use pingora_core::services::listening::Service as ListeningService;
use pingora_core::services::Service;

/// The listen backlog, pingora's own (`LISTENER_BACKLOG` in pingora-core).
const BACKLOG: u32 = 65535;

/// A pingora listening service whose plaintext sockets busbar also holds.
pub struct DrainedListeners<A> {
    inner: ListeningService<A>,
    /// The app again, for the connections accepted after pingora's loops stopped.
    app: Arc<A>,
    addrs: Vec<SocketAddr>,
    /// Set once busbar's handles are closed; the drain waits for it.
    closed: Arc<AtomicBool>,
}

impl<A> DrainedListeners<A> {
    /// `addrs` are the plaintext addresses `inner` listens on; `app` serves like its app.
    pub fn new(
        inner: ListeningService<A>,
        app: Arc<A>,
        addrs: Vec<SocketAddr>,
        closed: Arc<AtomicBool>,
    ) -> Self {
        DrainedListeners {
            inner,
            app,
            addrs,
            closed,
        }
    }

    /// Binds every address pingora has no socket for yet (none was inherited), as
    /// pingora would, and puts a duplicate in its table; returns busbar's handles.
    fn bind(&self, fds: &ListenFds) -> Vec<std::net::TcpListener> {
        let mut kept = Vec::new();
        for addr in &self.addrs {
            let key = addr.to_string();
            if fds.lock().get(&key).is_some() {
                continue;
            }
            match bind(*addr) {
                Ok((mine, theirs)) => {
                    fds.lock().add(key, theirs.into_raw_fd());
                    kept.push(mine);
                }
                Err(e) => tracing::warn!(
                    %addr,
                    "listening socket left to pingora; a drain may reset connections queued at its close: {e}"
                ),
            }
        }
        kept
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<(std::net::TcpListener, std::net::TcpListener)> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Non-blocking (tokio's), which `accept_queued` relies on.
    let mine = socket.listen(BACKLOG)?.into_std()?;
    let theirs = mine.try_clone()?;
    Ok((mine, theirs))
}

impl<A: ServerApp + Send + Sync + 'static> DrainedListeners<A> {
    /// Accepts every connection waiting on `l` and hands each to the app; returns how many.
    fn accept_queued(&self, l: &std::net::TcpListener, shutdown: &ShutdownWatch) -> usize {
        let mut n = 0;
        loop {
            let s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) => match e.kind() {
                    ErrorKind::WouldBlock => return n,
                    // A queued connection its client gave up on, or a signal: go on.
                    ErrorKind::ConnectionAborted | ErrorKind::Interrupted => continue,
                    _ => {
                        tracing::warn!("drain: accept failed, closing the listener: {e}");
                        return n;
                    }
                },
            };
            let s = match s
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(s))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("drain: dropping an accepted connection: {e}");
                    continue;
                }
            };
            n += 1;
            let mut stream = L4Stream::from(s);
            stream.set_socket_digest(SocketDigest::from_raw_fd(stream.as_raw_fd()));
            // Served as pingora's accept loop serves a connection: its own task.
            tokio::spawn(ListeningService::handle_event(
                Box::new(stream),
                self.app.clone(),
                shutdown.clone(),
            ));
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> Service for DrainedListeners<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let kept = fds.as_ref().map(|f| self.bind(f)).unwrap_or_default();
        // Returns once shutdown has stopped pingora's accept loops.
        Service::start_service(&mut self.inner, fds, shutdown.clone(), listeners_per_fd).await;
        let mut accepted = 0;
        for l in kept {
            accepted += self.accept_queued(&l, &shutdown);
            // Closed here: connects are refused from now on.
            drop(l);
        }
        if accepted > 0 {
            tracing::info!(
                accepted,
                "draining: answered connections queued when the listeners closed"
            );
        }
        self.closed.store(true, Ordering::Release);
    }

    fn name(&self) -> &str {
        Service::name(&self.inner)
    }

    fn threads(&self) -> Option<usize> {
        Service::threads(&self.inner)
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        Service::runtime_opts_override(&self.inner, global)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Service::listen_addresses(&self.inner)
    }
}
