//! Idle upstream HTTP/1.1 connections of busbar's own HTTP/1 path (`drivers::h1`), per thread.
//!
//! Owns: the upstream stream type ([`Conn`]: plaintext or TLS), keeping a connection
//! whose response ended cleanly for the next request to the same address (and, for TLS,
//! the same name and configuration: [`Key`]), handing one given back to a try that is
//! waiting for its own new connection ([`wait`]), and telling a live one from one the
//! upstream has closed meanwhile.
//! Must not: decide which instance to use (the phases do), or keep more than
//! [`MAX_IDLE_PER_ADDR`] connections per address or any of them past [`IDLE`].
//!
//! The pool is a thread-local map: taking and giving back is a few loads and stores
//! with no lock and no task per connection. With work stealing a request may give its
//! connection back on another thread than it took it on; that thread's pool keeps it.
//! A pooled connection is not watched: an upstream's close is seen when the connection is
//! next taken (a non-blocking read that finds the EOF), and it is dropped then. Every
//! [`SWEEP_EVERY`] give-backs a thread also drops what has been idle past [`IDLE`] for
//! every address, so connections to instances that left (registry churn) do not stay.
//! Each address's idle connections are also counted over all threads, for the per-service
//! gauge [`sample`] sets.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

/// An upstream connection: plaintext, or TLS (`protocol = "https"`, `"tls": true`).
pub enum Conn {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is large, and most connections are plaintext.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Is this idle connection still open, with nothing unread on it? A read that would
    /// block says yes; an EOF, stray bytes or an error say no. On TLS the read goes
    /// through the session (never a raw socket read, which would eat record bytes), so
    /// what the server sent meanwhile that is not data (a session ticket) is taken in
    /// and the connection stays usable; a `close_notify` reads as the EOF.
    fn alive(&mut self) -> bool {
        match self {
            Conn::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Conn::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(Waker::noop());
                Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Which idle connections a try may take: the instance's address, and for TLS the
/// instance's name and its service's configuration (`model::TlsPeer::pool_key`; 0 for
/// plaintext), so a connection is never reused for a peer it was not verified for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    pub tls: u64,
}

impl Key {
    /// The key of a try's connections.
    pub(crate) fn of(t: &crate::phases::Try) -> Key {
        Key {
            addr: t.addr,
            tls: t.tls.as_ref().map_or(0, |p| p.pool_key),
        }
    }

    /// The key of an instance's app-port connections.
    fn of_instance(i: &crate::model::Instance) -> Key {
        Key {
            addr: i.addr,
            tls: i.tls.as_ref().map_or(0, |p| p.pool_key),
        }
    }
}

impl From<SocketAddr> for Key {
    fn from(addr: SocketAddr) -> Key {
        Key { addr, tls: 0 }
    }
}

/// Most idle connections kept per upstream address (per thread): Envoy's default
/// `max_connections` per cluster. Below the connections a busy address keeps in use,
/// every give-back past the cap closes one that the next burst reopens: at 256, HTTP/2
/// clients at 30k req/s (up to 100 streams a connection) made busbar open 1,200–2,500
/// upstream connections every 3 s (issue 21; 1 at 1024, once the pool had filled).
pub const MAX_IDLE_PER_ADDR: usize = 1024;

/// How long a connection may stay idle in the pool.
pub const IDLE: Duration = crate::phases::UPSTREAM_IDLE;

/// Give-backs between two sweeps of a thread's whole pool.
const SWEEP_EVERY: u32 = 1024;

/// One address's idle connections in one thread's pool.
struct Idle {
    conns: VecDeque<(Conn, Instant)>,
    /// The address's idle connections over every thread (`busbar_upstream_idle_connections`).
    count: Arc<AtomicI64>,
    /// Tries whose new connection is still being made ([`wait`]), oldest first: a
    /// connection given back goes to the first still waiting instead of the idle list.
    waiters: VecDeque<oneshot::Sender<Conn>>,
    /// [`wait`] drops the withdrawn waits once there are this many (twice the live ones
    /// found last time, at least [`PRUNE_WAITERS`]).
    prune_at: usize,
}

/// Waits kept before [`wait`] looks for withdrawn ones to drop. Against an upstream that
/// never keeps a connection alive nothing is ever given back, which is where withdrawn
/// waits are otherwise dropped: without this, each request left one behind for good.
const PRUNE_WAITERS: usize = 64;

impl Idle {
    fn new(key: Key) -> Idle {
        Idle {
            conns: VecDeque::new(),
            count: counter(key),
            waiters: VecDeque::new(),
            prune_at: PRUNE_WAITERS,
        }
    }

    fn pop_front(&mut self) -> Option<(Conn, Instant)> {
        let c = self.conns.pop_front();
        if c.is_some() {
            self.count.fetch_sub(1, Relaxed);
        }
        c
    }

    fn pop_back(&mut self) -> Option<(Conn, Instant)> {
        let c = self.conns.pop_back();
        if c.is_some() {
            self.count.fetch_sub(1, Relaxed);
        }
        c
    }

    fn push_back(&mut self, c: (Conn, Instant)) {
        self.conns.push_back(c);
        self.count.fetch_add(1, Relaxed);
    }
}

/// Every address's count of idle connections, shared by the threads that pool
/// connections to it. Weak: an address no thread pools to any more is dropped by
/// [`sample`]. Locked only when a thread starts pooling to an address, and by [`sample`].
static COUNTS: LazyLock<Mutex<HashMap<Key, Weak<AtomicI64>>>> = LazyLock::new(Default::default);

fn counter(key: Key) -> Arc<AtomicI64> {
    let mut all = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = all.get(&key).and_then(Weak::upgrade) {
        return c;
    }
    let c = Arc::new(AtomicI64::new(0));
    all.insert(key, Arc::downgrade(&c));
    c
}

/// Sets each service's `busbar_upstream_idle_connections` from the pool (sampled, as the
/// queue gauges are: the request path only counts).
pub fn sample(snapshot: &crate::snapshot::Snapshot) {
    let mut all = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|_, w| w.strong_count() > 0);
    for svc in &snapshot.services {
        let idle: i64 = svc
            .instances()
            .instances
            .iter()
            .filter_map(|i| all.get(&Key::of_instance(i)).and_then(Weak::upgrade))
            .map(|c| c.load(Relaxed))
            .sum();
        svc.metrics.pool_idle.set(idle);
    }
}

#[derive(Default)]
struct Pool {
    /// Keyed by upstream addresses, which come from config and registrations, not
    /// from clients: foldhash instead of SipHash, whose cost showed in the profiles
    /// (`load-tests/RESULTS.md`).
    idle: HashMap<Key, Idle, foldhash::fast::RandomState>,
    /// Give-backs since the last sweep.
    puts: u32,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Drops the connections idle past [`IDLE`] at the front of `idle` (the oldest).
fn expire(idle: &mut Idle, now: Instant) {
    while idle
        .conns
        .front()
        .is_some_and(|(_, since)| now.duration_since(*since) >= IDLE)
    {
        idle.pop_front();
    }
}

/// The most recently pooled live connection under `key`, if any.
pub fn take(key: Key) -> Option<Conn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.idle.get_mut(&key)?;
        // The turn's reading (`base::clock`): an idle age needs no finer one.
        let now = crate::base::clock::now();
        while let Some((mut s, since)) = idle.pop_back() {
            if now.duration_since(since) < IDLE && s.alive() {
                return Some(s);
            }
        }
        None
    })
}

/// Waits for the next connection given back under `key` on this thread: a try that
/// found none idle waits here while its own connect is under way, and takes whichever
/// comes first (`upstream::one_try`). When streams bunch up, a connection freed a
/// moment later serves a waiting request sooner than a new connect whose SYN the
/// upstream's full listen queue dropped (Linux sends it again after 1 s). Dropping the
/// receiver withdraws the wait.
pub(crate) fn wait(key: Key) -> oneshot::Receiver<Conn> {
    let (tx, rx) = oneshot::channel();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.idle.entry(key).or_insert_with(|| Idle::new(key));
        if idle.waiters.len() >= idle.prune_at {
            idle.waiters.retain(|w| !w.is_closed());
            idle.prune_at = (2 * idle.waiters.len()).max(PRUNE_WAITERS);
        }
        idle.waiters.push_back(tx);
    });
    rx
}

/// Waits kept under `key` on this thread, withdrawn or not.
#[cfg(test)]
fn waiters(key: Key) -> usize {
    POOL.with(|p| p.borrow().idle.get(&key).map_or(0, |i| i.waiters.len()))
}

/// Keeps `s` for the next request under `key` (the oldest try still [`wait`]ing for
/// one, if any); drops the oldest past the cap or the idle time.
pub fn give_back(key: Key, s: Conn) {
    give_back_at(key, s, crate::base::clock::now());
}

fn give_back_at(key: Key, s: Conn, now: Instant) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.puts += 1;
        if p.puts >= SWEEP_EVERY {
            p.puts = 0;
            p.idle.retain(|_, idle| {
                expire(idle, now);
                idle.waiters.retain(|w| !w.is_closed());
                !idle.conns.is_empty() || !idle.waiters.is_empty()
            });
        }
        let idle = p.idle.entry(key).or_insert_with(|| Idle::new(key));
        let mut s = s;
        // Waits withdrawn (their own connect came first) are dropped on the way.
        while let Some(waiter) = idle.waiters.pop_front() {
            match waiter.send(s) {
                Ok(()) => return,
                Err(back) => s = back,
            }
        }
        expire(idle, now);
        if idle.conns.len() >= MAX_IDLE_PER_ADDR {
            idle.pop_front();
        }
        idle.push_back((s, now));
    })
}

/// Addresses with idle connections in this thread's pool.
#[cfg(test)]
fn addresses() -> usize {
    POOL.with(|p| p.borrow().idle.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A TLS pair over loopback: busbar's side (trusting the server's self-signed
    /// certificate) and the server's.
    async fn tls_pair() -> (Conn, tokio_rustls::server::TlsStream<TcpStream>) {
        use rustls::pki_types::{PrivateKeyDer, ServerName};
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![c.cert.der().clone()],
                PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .unwrap()
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        };
        let (server, client) = tokio::join!(accept, connect);
        (Conn::Tls(Box::new(client)), server)
    }

    /// What a TLS server sends unasked (TLS 1.3 session tickets, after the handshake)
    /// is taken in by the liveness check, not taken for stray data; a `close_notify` is
    /// the close it is.
    #[tokio::test(flavor = "current_thread")]
    async fn a_tls_connection_is_live_until_the_upstream_closes_it() {
        let key = Key {
            addr: "127.0.0.1:12".parse().unwrap(),
            tls: 7,
        };
        let (conn, mut server) = tls_pair().await;
        // The tickets are on the wire by now.
        server.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        give_back(key, conn);
        let mut conn = take(key).expect("a live TLS connection, tickets and all");
        // Still usable: a request and its answer go through.
        conn.write_all(b"ping").await.unwrap();
        conn.flush().await.unwrap();
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"ping");
        give_back(key, conn);
        assert!(
            take(Key { tls: 0, ..key }).is_none(),
            "a plaintext key never gets it"
        );
        server.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(key).is_none(), "closed by the upstream");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let a = TcpStream::connect(addr).await.unwrap();
        let (server_a, _) = listener.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (mut server_b, _) = listener.accept().await.unwrap();
        give_back(addr.into(), Conn::Plain(a));
        give_back(addr.into(), Conn::Plain(b));
        // b (the newest) is closed by its server; a is still open.
        server_b.shutdown().await.unwrap();
        drop(server_b);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(Conn::Plain(got)) = take(addr.into()) else {
            panic!("the open connection")
        };
        assert_eq!(
            got.local_addr().unwrap().port(),
            server_a.peer_addr().unwrap().port()
        );
        assert!(take(addr.into()).is_none(), "nothing else is pooled");
    }

    /// A connection given back goes to the oldest try still waiting; a wait withdrawn
    /// (its own connect came first) is passed over; with nobody waiting it is pooled.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_given_back_goes_to_the_oldest_waiting_try() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key: Key = "127.0.0.1:13".parse::<SocketAddr>().unwrap().into();
        let mut peers = Vec::new();
        let conn = || async {
            let s = TcpStream::connect(addr).await.unwrap();
            (Conn::Plain(s), listener.accept().await.unwrap())
        };
        let withdrawn = wait(key);
        let mut first = wait(key);
        let mut second = wait(key);
        drop(withdrawn);
        let (a, pa) = conn().await;
        let a_port = pa.1.port();
        peers.push(pa);
        give_back(key, a);
        let Ok(Conn::Plain(got)) = first.try_recv() else {
            panic!("the oldest live waiter gets it")
        };
        assert_eq!(got.local_addr().unwrap().port(), a_port);
        assert!(second.try_recv().is_err(), "one connection, one waiter");
        drop(second);
        let (b, pb) = conn().await;
        peers.push(pb);
        give_back(key, b);
        assert!(take(key).is_some(), "nobody waits: pooled");
    }

    /// Against an upstream that closes every connection nothing is given back: the waits
    /// of tries that ended must not pile up (before: one kept for every request).
    #[test]
    fn withdrawn_waits_do_not_pile_up_when_nothing_is_given_back() {
        let key: Key = "127.0.0.1:14".parse::<SocketAddr>().unwrap().into();
        for _ in 0..10_000 {
            drop(wait(key));
        }
        assert!(waiters(key) <= PRUNE_WAITERS, "{} waits kept", waiters(key));
        // Live waits are kept, however many, and withdrawn ones still go.
        let live: Vec<_> = (0..500).map(|_| wait(key)).collect();
        for _ in 0..10_000 {
            drop(wait(key));
        }
        assert!(
            waiters(key) <= 2 * live.len() + 1,
            "{} waits kept",
            waiters(key)
        );
        assert!(waiters(key) >= live.len());
    }

    /// The count over threads follows what is pooled, taken, capped and expired.
    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_are_counted_per_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peers = Vec::new();
        let key: Key = "127.0.0.1:11".parse::<SocketAddr>().unwrap().into();
        let now = Instant::now();
        for _ in 0..3 {
            let s = TcpStream::connect(addr).await.unwrap();
            peers.push(listener.accept().await.unwrap());
            give_back_at(key, Conn::Plain(s), now);
        }
        let count = counter(key);
        assert_eq!(count.load(Relaxed), 3);
        assert!(take(key).is_some());
        assert_eq!(count.load(Relaxed), 2);
        // Past the idle time: the next give-back expires the two.
        let s = TcpStream::connect(addr).await.unwrap();
        peers.push(listener.accept().await.unwrap());
        give_back_at(key, Conn::Plain(s), now + IDLE);
        assert_eq!(count.load(Relaxed), 1);
    }

    /// An address nobody asks for again loses its idle connections at a sweep.
    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_to_an_address_no_longer_used_are_swept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let a = TcpStream::connect(addr).await.unwrap();
        let _peer_a = listener.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let _peer_b = listener.accept().await.unwrap();
        // Keys stand for instances; the sockets only need to be real.
        let left: Key = "127.0.0.1:9".parse::<SocketAddr>().unwrap().into();
        let busy: Key = "127.0.0.1:10".parse::<SocketAddr>().unwrap().into();
        let now = Instant::now();
        give_back_at(left, Conn::Plain(a), now);
        assert_eq!(addresses(), 1);
        // Later than IDLE: each give-back to `busy` is taken again; `left` is never asked for.
        let later = now + IDLE + Duration::from_secs(1);
        let mut b = Conn::Plain(b);
        for _ in 0..SWEEP_EVERY {
            give_back_at(busy, b, later);
            b = take(busy).expect("the busy address's connection");
        }
        assert!(
            POOL.with(|p| !p.borrow().idle.contains_key(&left)),
            "the address no longer used is swept"
        );
    }
}
