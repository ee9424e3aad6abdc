//! TLS on the service listeners: the handshake on busbar's own accept loops, the
//! certificates a reload swaps, and the client stream the front door and pingora read.
//!
//! busbar runs the handshake itself rather than through pingora's TLS listener: pingora's
//! keeps a 64 KiB read buffer and its handshake future in every connection's task for the
//! connection's whole life, and hands the stream on only as pingora's own type. And over
//! rustls's unbuffered API (`records`), not tokio-rustls: rustls's buffered connection
//! keeps a zero-filled 4 KiB read buffer per connection for its life; here an idle
//! connection costs rustls's state and no buffer (10,000 idle TLS connections: 132 →
//! 94 MiB RSS, RESULTS.md). The front door gets the stream (`TlsClient`) to read the head
//! itself, as on plaintext.
//!
//! Each listener's certificates sit behind an `ArcSwap` ([`ServedCerts`]): a reload
//! loads the new files whole, then swaps them in for the handshakes that start after it;
//! a file that cannot be loaded refuses the reload and the old certificates keep serving.
//!
//! Owns: the rustls server configuration (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`),
//! [`ServedCerts`], the handshake under its timeout, [`TlsClient`] and its buffers.
//! Must not: read a request (the front door does), choose certificates (`config::SniCerts`).

mod records;

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use rustls::server::{ClientHello, ResolvesServerCert, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::{SniCerts, TlsError, TlsListen};
use crate::metrics::METRICS;
use records::{Ask, Came, Out, Plain};

/// A TLS listener's certificates as they serve now, and its handshake timeout; a reload
/// replaces both.
#[derive(Debug)]
pub struct ServedCerts {
    current: ArcSwap<SniCerts>,
    handshake_timeout_ms: AtomicU64,
}

impl ServedCerts {
    /// Loads the certificates `tls` names.
    pub fn load(tls: &TlsListen) -> Result<ServedCerts, TlsError> {
        Ok(ServedCerts {
            current: ArcSwap::from_pointee(SniCerts::load(tls)?),
            handshake_timeout_ms: AtomicU64::new(millis(tls.handshake_timeout)),
        })
    }

    /// Serves `certs` to the handshakes that start from now on; whether they differ from
    /// what served before.
    pub fn swap(&self, certs: SniCerts, handshake_timeout: Duration) -> bool {
        self.handshake_timeout_ms
            .store(millis(handshake_timeout), Ordering::Relaxed);
        let old = self.current.swap(Arc::new(certs));
        !old.same_as(&self.current.load())
    }

    /// How long a client has to complete its handshake.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ResolvesServerCert for ServedCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        note_server_name(&hello);
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// A TLS listener's acceptor: rustls with the listener's [`ServedCerts`].
pub struct TlsEndpoint {
    config: Arc<rustls::ServerConfig>,
    /// What its handshakes serve; a reload swaps it.
    pub served: Arc<ServedCerts>,
}

impl TlsEndpoint {
    /// TLS 1.2 and 1.3 (pingora's choice too), ALPN `h2` then `http/1.1`.
    pub fn new(served: Arc<ServedCerts>) -> Result<TlsEndpoint, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(served.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsEndpoint {
            config: Arc::new(config),
            served,
        })
    }

    /// The handshake on an accepted connection, under the listener's handshake timeout:
    /// `None` if it failed or timed out (the connection is closed), counted in
    /// `busbar_edge_refusals_total` as `tls_handshake_failed` or `tls_handshake_timeout`.
    pub async fn handshake(&self, l4: Box<L4Stream>) -> Option<TlsClient> {
        let peer = crate::base::peer_of(&*l4);
        // Boxed: the handshake's state is freed when it is done, not kept in the
        // connection's task for the connection's life.
        let accept = Box::pin(accept(self.config.clone(), l4));
        match tokio::time::timeout(self.served.handshake_timeout(), accept).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&["tls_handshake_failed"])
                    .inc();
                tracing::debug!(?peer, "TLS handshake failed: {e}");
                None
            }
            Err(_) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&["tls_handshake_timeout"])
                    .inc();
                tracing::debug!(?peer, "TLS handshake timed out");
                None
            }
        }
    }
}

async fn accept(config: Arc<rustls::ServerConfig>, l4: Box<L4Stream>) -> io::Result<TlsClient> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut client = TlsClient {
        l4: *l4,
        conn,
        digest: None,
        server_name: None,
        incoming: Vec::new(),
        plain: Plain::default(),
        out: Out::default(),
        peer_closed: false,
        shut: false,
        failed: None,
    };
    std::future::poll_fn(|cx| client.poll_handshake(cx)).await?;
    let cipher = client
        .conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or_default();
    let version = client
        .conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    client.digest = Some(Arc::new(SslDigest::new(
        cipher,
        version,
        None,
        None,
        Vec::new(),
    )));
    Ok(client)
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Bytes read from the socket at a time, into a buffer on the stack: a full record and
/// the start of the next.
const READ_CHUNK: usize = 20 * 1024;

/// Most received bytes held unprocessed: a handshake message rustls joins from several
/// records (at most 64 KiB) and a record. A peer that sends more is cut off.
const MAX_INCOMING: usize = 0xffff + 18 * 1024 + READ_CHUNK;

/// A client's TLS connection after its handshake, as pingora's `IO` wants it (so the
/// proxy can take it over), with the digest pingora's drivers read the TLS flag from.
///
/// Over rustls's unbuffered API (`records`): reads decrypt what arrived and hand the
/// plaintext out; writes encrypt and send, and `poll_flush` sends what a full socket
/// held back. Idle, it holds no buffer: the received bytes of a partial record, the
/// plaintext a reader had no room for (and bytes put back with [`TlsClient::unread`]),
/// and the encrypted bytes not yet sent are each kept only while there are some.
pub struct TlsClient {
    l4: L4Stream,
    conn: UnbufferedServerConnection,
    /// Set once the handshake is done.
    digest: Option<Arc<SslDigest>>,
    /// The client's SNI, caught as the certificate was chosen (`ServedCerts::resolve`):
    /// the unbuffered connection has no accessor for it.
    server_name: Option<Box<str>>,
    /// Received, not yet processed: a partial record (or handshake message); empty and
    /// unallocated otherwise.
    incoming: Vec<u8>,
    plain: Plain,
    out: Out,
    /// The peer's close_notify came: reads are at EOF.
    peer_closed: bool,
    /// close_notify was queued (`poll_shutdown`): nothing more is encrypted.
    shut: bool,
    /// A fatal TLS error; every later read and write fails with it.
    failed: Option<rustls::Error>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("l4", &self.l4)
            .field("server_name", &self.server_name)
            .field("incoming", &self.incoming.len())
            .field("out", &self.out.pending().len())
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Puts `bytes` back, to be read before anything still put back and the stream.
    pub fn unread(&mut self, bytes: &[u8]) {
        self.plain.unread(bytes);
    }

    /// The protocol the client chose by ALPN.
    pub fn alpn(&self) -> Option<ALPN> {
        match self.conn.alpn_protocol()? {
            b"h2" => Some(ALPN::H2),
            b"http/1.1" => Some(ALPN::H1),
            _ => None,
        }
    }

    /// The server name the client sent (SNI).
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    fn l4(&self) -> &L4Stream {
        &self.l4
    }

    /// Buffer memory the connection holds now (zero when idle).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.out.capacity()
    }

    /// One pass of rustls over what was received (see `records::turn`); the bytes it used
    /// are dropped, the buffer given back when empty. A fatal error is kept, with the
    /// alert rustls encodes for it queued to be sent.
    fn turn(&mut self, ask: &mut Ask<'_, '_>) -> Result<Came, rustls::Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let TlsClient {
            conn,
            incoming,
            plain,
            out,
            peer_closed,
            ..
        } = self;
        let (used, came) = records::turn(conn, incoming, out, plain, peer_closed, ask);
        self.consume(used);
        came.inspect_err(|e| {
            self.fail(e.clone());
        })
    }

    fn consume(&mut self, used: usize) {
        self.incoming.drain(..used.min(self.incoming.len()));
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
    }

    /// One read from the socket into `read` (a buffer on the caller's stack); refused once
    /// `MAX_INCOMING` bytes wait unprocessed. `Ok(false)`: the peer closed the TCP
    /// connection.
    fn poll_read_socket(
        &mut self,
        cx: &mut Context<'_>,
        read: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message too large",
            )));
        }
        ready!(Pin::new(&mut self.l4).poll_read(cx, read))?;
        Poll::Ready(Ok(!read.filled().is_empty()))
    }

    /// Reads what the socket has and runs rustls over it, plaintext into `ask`'s buffer.
    /// `Ok(false)`: the peer closed the TCP connection.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        ask: &mut Ask<'_, '_>,
    ) -> Poll<io::Result<bool>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut stack);
        if !ready!(self.poll_read_socket(cx, &mut read))? {
            return Poll::Ready(Ok(false));
        }
        let came = if self.incoming.is_empty() && self.failed.is_none() {
            // The usual case: whole records, processed where they were read; only a
            // record's start that has not fully arrived is kept.
            let TlsClient {
                conn,
                plain,
                out,
                peer_closed,
                ..
            } = self;
            let input = read.filled_mut();
            let (used, came) = records::turn(conn, input, out, plain, peer_closed, ask);
            if let Some(rest) = input.get(used..) {
                self.incoming.extend_from_slice(rest);
            }
            if let Err(e) = came {
                return Poll::Ready(Err(self.fail(e)));
            }
            came
        } else {
            self.incoming.extend_from_slice(read.filled());
            self.turn(ask)
        };
        match came {
            Ok(_) => Poll::Ready(Ok(true)),
            Err(e) => Poll::Ready(Err(invalid(e))),
        }
    }

    /// Records `e` as the connection's failure, with the alert rustls queued for it
    /// encoded to be sent; what else was received is dropped.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        records::alerts(&mut self.conn, &mut self.incoming, &mut self.out);
        self.incoming = Vec::new();
        self.failed = Some(e.clone());
        invalid(e)
    }

    /// Sends what is encrypted; `Ready(Ok)` once all of it went (the buffer is given back).
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match ready!(Pin::new(&mut self.l4).poll_write(cx, self.out.pending())) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out.sent(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The handshake: the server's flights are sent before each wait for the client's.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_out(cx))?;
            if let Some(e) = &self.failed {
                return Poll::Ready(Err(invalid(e.clone())));
            }
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            HELLO_NAME.with(|n| n.borrow_mut().take());
            let came = self.turn(&mut Ask::Nothing);
            if let Some(name) = HELLO_NAME.with(|n| n.borrow_mut().take()) {
                self.server_name = Some(name);
            }
            match came {
                Err(_) => continue, // its alert goes out first
                Ok(Came::Closed) => {
                    return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                }
                Ok(_) => {}
            }
            if !self.out.is_empty() || !self.conn.is_handshaking() {
                continue;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut stack);
            if !ready!(self.poll_read_socket(cx, &mut read))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            self.incoming.extend_from_slice(read.filled());
        }
    }
}

thread_local! {
    /// The server name of the last ClientHello this thread's resolver saw: rustls calls
    /// `ServedCerts::resolve` inside `process_tls_records`, on the handshake's own thread,
    /// and the handshake takes the name right after that call.
    static HELLO_NAME: RefCell<Option<Box<str>>> = const { RefCell::new(None) };
}

/// Keeps the ClientHello's server name for the handshake running on this thread.
fn note_server_name(hello: &ClientHello<'_>) {
    HELLO_NAME.with(|n| *n.borrow_mut() = hello.server_name().map(Box::from));
}

impl AsyncRead for TlsClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // rustls's own messages (a KeyUpdate's answer) go out as the connection is read.
        if !this.out.is_empty() {
            if let Poll::Ready(Err(e)) = this.poll_send_out(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if this.plain.take_into(buf) {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(invalid(e.clone())));
        }
        let before = buf.filled().len();
        loop {
            if this.peer_closed || buf.filled().len() > before {
                break;
            }
            let alive = ready!(this.poll_receive(cx, &mut Ask::Read(buf)))?;
            if !this.out.is_empty() {
                if let Poll::Ready(Err(e)) = this.poll_send_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if !alive {
                // Closed without close_notify: the data may have been cut short.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(invalid(e.clone())));
        }
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What was encrypted before goes first: a connection holds one batch at most.
        ready!(this.poll_send_out(cx))?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        let n = match this.turn(&mut Ask::Write(bufs)) {
            Ok(Came::Wrote(n)) => n,
            Ok(_) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Err(e) => return Poll::Ready(Err(invalid(e))),
        };
        // Sent now if the socket takes it; else by the next write or the flush.
        if let Poll::Ready(Err(e)) = this.poll_send_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_out(cx))?;
        Pin::new(&mut self.l4).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // No close_notify after a fatal error (its alert was the last word).
            let _ = self.turn(&mut Ask::Close);
        }
        ready!(self.poll_send_out(cx))?;
        Pin::new(&mut self.l4).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for TlsClient {
    async fn shutdown(&mut self) {
        // close_notify, then FIN; a client already gone is no error worth a line.
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for TlsClient {
    fn id(&self) -> UniqueIDType {
        self.l4().id()
    }
}

impl Ssl for TlsClient {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.digest.clone()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn()
    }
}

#[async_trait]
impl Peek for TlsClient {}

impl GetTimingDigest for TlsClient {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.l4().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.l4().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.l4().get_write_pending_time()
    }
}

impl GetProxyDigest for TlsClient {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.l4().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.l4.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for TlsClient {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.l4().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.l4.set_socket_digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    /// One certificate, the server name noted as `ServedCerts` notes it.
    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);

    impl ResolvesServerCert for One {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            note_server_name(&hello);
            Some(self.0.clone())
        }
    }

    /// A handshaken pair over loopback: busbar's side and a rustls client (TLS 1.3).
    async fn pair() -> (
        TlsClient,
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
        let key = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        let one = Arc::new(CertifiedKey::new(vec![c.cert.der().clone()], key));
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(One(one)));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(Arc::new(server), Box::new(L4Stream::from(tcp)))
                .await
                .unwrap()
        };
        let (c, s) = tokio::join!(connect, accept);
        (s, c)
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut s, mut c) = pair().await;
        assert_eq!(s.alpn(), Some(ALPN::H1));
        assert_eq!(s.server_name(), Some("localhost"));
        assert!(s.get_ssl_digest().is_some());
        // Session tickets went out with the handshake: nothing waits.
        assert_eq!(s.held(), 0, "{s:?}");

        // A request read through a buffer too small for it, then a large answer.
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        c.flush().await.unwrap();
        let mut small = [0u8; 5];
        s.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET /");
        assert!(s.held() > 0, "the rest of the record is kept");
        s.unread(b"GET /");
        let mut head = [0u8; 18];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n\r\n");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let read = async {
            let mut got = vec![0u8; big.len()];
            c.read_exact(&mut got).await.unwrap();
            got
        };
        let write = async {
            s.write_all(&big).await.unwrap();
            s.flush().await.unwrap();
        };
        let (got, ()) = tokio::join!(read, write);
        assert!(got == big, "the answer arrived changed");
        // Idle again: no read, plaintext or write buffer.
        assert_eq!(s.held(), 0, "{s:?}");

        // close_notify from the client reads as EOF.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(s.held(), 0);
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_an_error_not_a_panic() {
        let (mut s, mut c) = pair().await;
        c.get_mut()
            .0
            .write_all(b"\x17\x03\x03\x00\x10not a real record, nor this")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // And it stays failed.
        assert!(s.read(&mut buf).await.is_err());
        assert!(s.write(b"x").await.is_err());
    }
}
