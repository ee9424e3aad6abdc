//! The service endpoint's listening sockets: busbar binds them before the server starts
//! (so an address in use stops busbar before it says it started), accepts on them itself,
//! and hands pingora a duplicate of each through its listen-fd table (for a later
//! `--upgrade` to take over).
//!
//! Its own accept loop, for memory: pingora's spawns each connection as a task whose
//! state includes the TLS handshake future, ~8.3 KiB a connection for the connection's
//! whole life even on plaintext (massif, RESULTS.md), and its TLS listener reads through
//! a 64 KiB buffer. busbar spawns pingora's own public per-connection loop
//! (`listening::Service::handle_event`, ~100 bytes) with the bare stream, as pingora
//! does after a handshake: TCP_NODELAY, the socket digest with the peer address, and a
//! task on one of the service's runtimes (`current_handle`). The bare stream has no L4
//! write buffer; the front door's `Lingering` wrapper buffers writes instead. Each task
//! first notes its thread as one that serves connections (`base::memory::ServingThreads`:
//! the release after a spike must run on it).
//!
//! And for draining: on SIGTERM the accept loops stop, and busbar then accepts what the
//! kernel still queued and hands it to the app (the front door answers it with
//! `Connection: close`) before it closes the sockets. Closing a listening socket resets
//! every connection still queued on it: a client whose connect had succeeded, and whose
//! request was sent, got a reset instead of an answer (defect D8). From the close on,
//! connects are refused and clients move on to other nodes.
//!
//! On a TLS listener the handshake runs on the connection's own task (`tls`), under the
//! listener's handshake timeout, before the app gets the stream. On a listener with
//! `proxy_protocol = true`, each connection's PROXY header is read first (`proxy_header`),
//! and the client it names becomes the socket digest's peer; a PROXY header comes before
//! the ClientHello. A process started with `--upgrade` gets its sockets as bare
//! descriptors that safe code cannot own; pingora accepts on those (with its larger
//! per-connection task), as plain TCP also for the TLS ones, and the app first reads
//! their PROXY headers and runs their handshakes ([`HandedOver`]), so a listener handed
//! over keeps both; busbar keeps no handle, so such a process's drain closes the old way.
//! Owns: binding the service sockets (and the registration API's, `registry::listener`),
//! the accept loops, the last accepts.
//! Must not: read a request (the app does): only a PROXY header, and a TLS handshake.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora_core::server::{ListenFds, RuntimeOpts, ShutdownWatch};
use pingora_core::services::listening::Service as ListeningService;
use pingora_core::services::Service;

use crate::base::memory::ServingThreads;
use crate::config::Config;
use crate::metrics::METRICS;
use crate::tls::TlsEndpoint;

/// The listen backlog, pingora's own (`LISTENER_BACKLOG` in pingora-core).
const BACKLOG: i32 = 65535;

/// A pingora listening service (every address after `--upgrade`) with busbar's own
/// accept loops on the service addresses.
pub struct DrainedListeners<A> {
    inner: ListeningService<A>,
    /// The app again, for the connections busbar accepts.
    app: Arc<A>,
    /// Addresses busbar accepts on; `inner` has no endpoint for them.
    addrs: Vec<SocketAddr>,
    /// Their sockets, bound by [`bind_all`]; the service takes them when it starts.
    sockets: Vec<std::net::TcpListener>,
    /// Set once busbar's handles are closed; the drain waits for it.
    closed: Arc<AtomicBool>,
    /// For each of `addrs` with `proxy_protocol`, what the current configuration says
    /// which peers are trusted and how long a header may take (a reload changes them).
    proxied: Vec<Option<Settings>>,
    /// For each of `addrs`, a TLS listener's handshake.
    tls: Vec<Option<Arc<TlsEndpoint>>>,
}

/// The configuration now serving, which says which peers may send a PROXY header and how
/// long it may take (a reload changes them). A closure over the runtime's state, so the
/// listeners need nothing of it.
pub type Settings = Arc<dyn Fn() -> Arc<Config> + Send + Sync>;

impl<A> DrainedListeners<A> {
    /// `bound` are the sockets busbar accepts on itself, from [`bind_all`] (none after
    /// `--upgrade`: `inner` has them); `app` serves like `inner`'s app; `endpoints` the
    /// handshakes of those that are TLS listeners.
    pub fn new(
        inner: ListeningService<A>,
        app: Arc<A>,
        bound: Vec<(SocketAddr, std::net::TcpListener)>,
        closed: Arc<AtomicBool>,
        proxy_protocol: (&[SocketAddr], Settings),
        endpoints: Vec<(SocketAddr, Arc<TlsEndpoint>)>,
    ) -> Self {
        let (addrs, sockets): (Vec<SocketAddr>, _) = bound.into_iter().unzip();
        let (with, settings) = proxy_protocol;
        let proxied = addrs
            .iter()
            .map(|a| with.contains(a).then(|| settings.clone()))
            .collect();
        let tls = addrs
            .iter()
            .map(|a| {
                endpoints
                    .iter()
                    .find(|(at, _)| at == a)
                    .map(|(_, acc)| acc.clone())
            })
            .collect();
        DrainedListeners {
            inner,
            app,
            addrs,
            sockets,
            closed,
            proxied,
            tls,
        }
    }

    /// Takes the sockets and lends each descriptor to pingora's fd table (what an
    /// upgrade hands on: pingora sends the table before the drain starts); busbar owns
    /// the socket and closes it.
    fn take_sockets(&mut self, fds: Option<&ListenFds>) -> Vec<std::net::TcpListener> {
        let kept = std::mem::take(&mut self.sockets);
        if let Some(fds) = fds {
            for (addr, l) in self.addrs.iter().zip(&kept) {
                fds.lock().add(addr.to_string(), l.as_raw_fd());
            }
        }
        kept
    }
}

/// Binds every address, or says which one could not be bound and why.
pub fn bind_all(
    addrs: &[SocketAddr],
) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, (SocketAddr, std::io::Error)> {
    addrs
        .iter()
        .map(|&a| bind(a).map(|l| (a, l)).map_err(|e| (a, e)))
        .collect()
}

/// A listening socket on `addr` as busbar binds them: address reuse (a restart need not
/// wait out TIME_WAIT), pingora's backlog, non-blocking.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_with(addr, false)
}

/// Like [`bind`], with SO_REUSEPORT: for a socket that pingora's upgrade can't hand over
/// (the registration API's), which the new process binds beside the old one's instead.
/// `alone`: first make sure nothing listens on `addr` at all, not even a process that
/// shares it, so a second busbar on the same address fails instead of sharing it.
pub(crate) fn bind_shared(addr: SocketAddr, alone: bool) -> std::io::Result<std::net::TcpListener> {
    if alone {
        // Binding without SO_REUSEPORT fails while any socket listens there.
        drop(bind_with(addr, false)?);
    }
    bind_with(addr, true)
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    // socket2 rather than tokio's TcpSocket: this runs before any runtime exists.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Non-blocking (as tokio wants it), which `accept_queued` relies on.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accepts on `l` until shutdown, each connection on its own task.
pub(crate) async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    app: Arc<A>,
    l: tokio::net::TcpListener,
    shutdown: ShutdownWatch,
) {
    accept_loop_with(app, l, shutdown, None, None).await
}

/// [`accept_loop`], reading each connection's PROXY header under `proxied`.
async fn accept_loop_with<A: ServerApp + Send + Sync + 'static>(
    app: Arc<A>,
    l: tokio::net::TcpListener,
    mut shutdown: ShutdownWatch,
    proxied: Option<Settings>,
    tls: Option<Arc<TlsEndpoint>>,
) {
    loop {
        let accepted = tokio::select! {
            r = l.accept() => r,
            changed = shutdown.changed() => match changed {
                // The watch's first value, not a shutdown.
                Ok(()) if !*shutdown.borrow() => continue,
                _ => return,
            },
        };
        match accepted {
            Ok((s, peer)) => serve(&app, s, peer, &shutdown, proxied.as_ref(), tls.as_ref()),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                // Out of descriptors: accept would fail at once again; let some close
                // (pingora's own loop does the same).
                if e.raw_os_error() == Some(24) {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Hands an accepted connection to the app on its own task, as pingora's accept loop does
/// after its handshake; first, on a `proxied` listener, its PROXY header, and on a TLS
/// one the handshake.
fn serve<A: ServerApp + Send + Sync + 'static>(
    app: &Arc<A>,
    s: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: &ShutdownWatch,
    proxied: Option<&Settings>,
    tls: Option<&Arc<TlsEndpoint>>,
) {
    // What pingora sets on every accepted stream; a failure only costs latency.
    let _ = s.set_nodelay(true);
    if proxied.is_none() && tls.is_none() {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        // The connection's future is made inside the task, not captured by it: an async
        // block that awaits a future it captured keeps room for it twice.
        pingora_runtime::current_handle().spawn(async move {
            ServingThreads::note();
            ListeningService::handle_event(stream(s, peer), app, shutdown).await
        });
        return;
    }
    let (app, shutdown, proxied, tls) = (
        app.clone(),
        shutdown.clone(),
        proxied.cloned(),
        tls.cloned(),
    );
    pingora_runtime::current_handle().spawn(async move {
        ServingThreads::note();
        let opening = Opening::new();
        // Boxed: its state is freed once the connection is the app's.
        let before = Box::pin(before_app(
            stream(s, peer),
            peer,
            proxied.as_ref(),
            tls.as_deref(),
        ));
        if let Some(s) = before.await {
            let serve = ListeningService::handle_event(s, app, shutdown);
            // The app counts the connection from its first poll, right after this.
            drop(opening);
            serve.await;
        }
    });
}

/// Counts a connection in `busbar_downstream_connections` while its PROXY header or TLS
/// handshake is under way, before the app counts it: a drain waits for it too (it was
/// accepted, maybe from the kernel's queue as the listeners closed, and its client
/// expects an answer).
struct Opening;

impl Opening {
    fn new() -> Opening {
        METRICS.connections.inc();
        Opening
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        METRICS.connections.dec();
    }
}

/// What comes before the app on a connection from `peer`: on a `proxied` listener its
/// PROXY header, read under the running config's trust list and `header_timeout` (the
/// client it names made the socket digest's peer, the bytes read past the header put
/// back); on a TLS listener the handshake, under its timeout. `None`: closed (untrusted,
/// malformed or too slow a header, counted in `busbar_edge_refusals_total`; a failed or
/// timed-out handshake). The own accept loops and the listeners handed over by an upgrade
/// both come through here.
async fn before_app(
    mut l4: Box<L4Stream>,
    peer: SocketAddr,
    proxied: Option<&Settings>,
    tls: Option<&TlsEndpoint>,
) -> Option<Stream> {
    if let Some(settings) = proxied {
        let config = settings();
        let timeout = config.limits.header_timeout;
        let accepted =
            crate::proxy_header::accept(&mut *l4, peer, &config.listen.trusted_proxies, timeout)
                .await;
        drop(config);
        let a = match accepted {
            Ok(a) => a,
            Err(refusal) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&[refusal.reason()])
                    .inc();
                tracing::debug!(%peer, reason = refusal.reason(), "PROXY protocol: connection closed");
                return None;
            }
        };
        name_peer(&mut l4, a.client);
        l4.rewind(&a.rest);
    }
    match tls {
        None => Some(l4),
        Some(tls) => Some(Box::new(tls.handshake(l4).await?)),
    }
}

/// The app's stream for an accepted socket; the socket digest names `peer`.
fn stream(s: tokio::net::TcpStream, peer: SocketAddr) -> Box<L4Stream> {
    let mut stream = L4Stream::from(s);
    name_peer(&mut stream, peer);
    Box::new(stream)
}

/// Makes `peer` the stream's peer in its socket digest: what the app reads as the client
/// (the socket's, or the one a PROXY header named).
fn name_peer(stream: &mut L4Stream, peer: SocketAddr) {
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(peer)));
    stream.set_socket_digest(digest);
}

/// The listeners with `proxy_protocol` or TLS that a process started with `--upgrade`
/// got from its predecessor: pingora accepts on them (their sockets arrive as bare
/// descriptors), as plain TCP, so the app reads their PROXY headers and runs their
/// handshakes through [`HandedOver::accept`] before anything else.
pub struct HandedOver {
    /// Each address, whether it has `proxy_protocol`, and a TLS listener's handshake.
    pub listeners: Vec<(SocketAddr, bool, Option<Arc<TlsEndpoint>>)>,
    /// The running configuration (trusted proxies and the header timeout follow a reload).
    pub settings: Settings,
}

impl HandedOver {
    /// The stream the app serves: `stream` itself when it did not come through one of
    /// these listeners; else after its PROXY header (the client it names is the socket
    /// digest's peer) and, on a TLS listener, the handshake. `None`: closed, as the own
    /// accept loops close it (untrusted, malformed, too slow, a failed handshake).
    pub async fn accept(&self, stream: Stream) -> Option<Stream> {
        let digest = stream.get_socket_digest();
        let addr = |a: Option<&PeerAddr>| a.and_then(|a| a.as_inet()).copied();
        let local = digest.as_ref().and_then(|d| addr(d.local_addr()));
        let Some((_, proxied, tls)) = self.listeners.iter().find(|(a, ..)| Some(*a) == local)
        else {
            return Some(stream);
        };
        let peer = digest.as_ref().and_then(|d| addr(d.peer_addr()))?;
        let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        let proxied = proxied.then_some(&self.settings);
        Box::pin(before_app(l4, peer, proxied, tls.as_deref())).await
    }
}

impl<A: ServerApp + Send + Sync + 'static> DrainedListeners<A> {
    /// Accepts every connection waiting on `l` and hands each to the app; returns how many.
    fn accept_queued(
        &self,
        l: &std::net::TcpListener,
        shutdown: &ShutdownWatch,
        proxied: Option<&Settings>,
        tls: Option<&Arc<TlsEndpoint>>,
    ) -> usize {
        let mut n = 0;
        loop {
            let (s, peer) = match l.accept() {
                Ok(accepted) => accepted,
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
            match s
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(s))
            {
                Ok(s) => {
                    n += 1;
                    serve(&self.app, s, peer, shutdown, proxied, tls);
                }
                Err(e) => tracing::warn!("drain: dropping an accepted connection: {e}"),
            }
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
        let kept = self.take_sockets(fds.as_ref());
        let mut loops = Vec::new();
        for l in &kept {
            match l.try_clone().and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => loops.push(l),
                // The supervisor ends the process: nothing else would serve this port.
                Err(e) => panic!("cannot accept on a listening socket: {e}"),
            }
        }
        let own: Vec<_> = loops
            .into_iter()
            .zip(self.proxied.iter().cloned().zip(self.tls.iter().cloned()))
            .map(|(l, (p, t))| {
                tokio::spawn(accept_loop_with(
                    self.app.clone(),
                    l,
                    shutdown.clone(),
                    p,
                    t,
                ))
            })
            .collect();
        let own = async {
            for handle in own {
                crate::supervisor::join_part(handle).await;
            }
        };
        // pingora's loops (after --upgrade) return once shutdown stopped them, and then
        // clean the app up. With none, that cleanup is busbar's to call.
        let pingora_listens = Service::listen_addresses(&self.inner).is_some_and(|a| !a.is_empty());
        if pingora_listens {
            let inner =
                Service::start_service(&mut self.inner, fds, shutdown.clone(), listeners_per_fd);
            tokio::join!(inner, own);
        } else {
            own.await;
            self.app.cleanup().await;
        }
        let mut accepted = 0;
        for ((l, p), t) in kept
            .into_iter()
            .zip(self.proxied.iter())
            .zip(self.tls.iter())
        {
            accepted += self.accept_queued(&l, &shutdown, p.as_ref(), t.as_ref());
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

    /// pingora's endpoints and busbar's own.
    fn listen_addresses(&self) -> Option<Vec<String>> {
        let mut all = Service::listen_addresses(&self.inner)?;
        all.extend(self.addrs.iter().map(SocketAddr::to_string));
        Some(all)
    }
}
