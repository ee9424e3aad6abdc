//! TLS on the service listeners: the handshake on busbar's own accept loops, the
//! certificates a reload swaps, and the client stream the front door and pingora read.
//!
//! busbar runs the handshake itself (tokio-rustls) rather than through pingora's TLS
//! listener: pingora's keeps a 64 KiB read buffer and its handshake future in every
//! connection's task for the connection's whole life, and hands the stream on only as
//! pingora's own type. Here an idle connection costs rustls's state and its 4 KiB record
//! buffer, and the front door gets the stream (`TlsClient`) to read the head itself, as
//! on plaintext.
//!
//! Each listener's certificates sit behind an `ArcSwap` ([`ServedCerts`]): a reload
//! loads the new files whole, then swaps them in for the handshakes that start after it;
//! a file that cannot be loaded refuses the reload and the old certificates keep serving.
//!
//! Owns: the rustls server configuration (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`),
//! [`ServedCerts`], the handshake under its timeout, [`TlsClient`].
//! Must not: read a request (the front door does), choose certificates (`config::SniCerts`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
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
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::{SniCerts, TlsError, TlsListen};
use crate::metrics::METRICS;

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
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// A TLS listener's acceptor: rustls with the listener's [`ServedCerts`].
pub struct TlsEndpoint {
    acceptor: tokio_rustls::TlsAcceptor,
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
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            served,
        })
    }

    /// The handshake on an accepted connection, under the listener's handshake timeout:
    /// `None` if it failed or timed out (the connection is closed), counted in
    /// `busbar_edge_refusals_total` as `tls_handshake_failed` or `tls_handshake_timeout`.
    pub async fn handshake(&self, l4: Box<L4Stream>) -> Option<TlsClient> {
        let peer = crate::base::peer_of(&*l4);
        // Boxed: the handshake's state (a few KiB) is freed when it is done, not kept in
        // the connection's task for the connection's life.
        let accept = Box::pin(self.acceptor.accept(*l4));
        match tokio::time::timeout(self.served.handshake_timeout(), accept).await {
            Ok(Ok(s)) => Some(TlsClient::new(s)),
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

/// A client's TLS connection after its handshake, as pingora's `IO` wants it (so the
/// proxy can take it over), with the digest pingora's drivers read the TLS flag from.
/// Bytes the front door read and [`TlsClient::unread`] are read again first: a TLS
/// stream cannot be rewound below the decryption, as a TCP one can.
#[derive(Debug)]
pub struct TlsClient {
    s: tokio_rustls::server::TlsStream<L4Stream>,
    digest: Arc<SslDigest>,
    /// Put back, read before the stream; unallocated while empty.
    replay: Vec<u8>,
}

impl TlsClient {
    fn new(s: tokio_rustls::server::TlsStream<L4Stream>) -> TlsClient {
        let session = s.get_ref().1;
        let cipher = session
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
            .unwrap_or_default();
        let version = session
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let digest = Arc::new(SslDigest::new(cipher, version, None, None, Vec::new()));
        TlsClient {
            s,
            digest,
            replay: Vec::new(),
        }
    }

    /// Puts `bytes` back, to be read before anything still put back and the stream.
    pub fn unread(&mut self, bytes: &[u8]) {
        self.replay.splice(0..0, bytes.iter().copied());
    }

    /// The protocol the client chose by ALPN.
    pub fn alpn(&self) -> Option<ALPN> {
        match self.s.get_ref().1.alpn_protocol()? {
            b"h2" => Some(ALPN::H2),
            b"http/1.1" => Some(ALPN::H1),
            _ => None,
        }
    }

    /// The server name the client sent (SNI).
    pub fn server_name(&self) -> Option<&str> {
        self.s.get_ref().1.server_name()
    }

    fn l4(&self) -> &L4Stream {
        self.s.get_ref().0
    }
}

impl AsyncRead for TlsClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.drain(..n);
            if self.replay.is_empty() {
                self.replay = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.s).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.s).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.s.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.s).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.s).poll_shutdown(cx)
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
        Some(self.digest.clone())
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
        self.s.get_mut().0.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for TlsClient {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.l4().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.s.get_mut().0.set_socket_digest(digest)
    }
}
