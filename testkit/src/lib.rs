//! A real tonic gRPC backend for busbar's translation tests: the `bookstore.v1` service
//! of `tests/protos/bookstore.proto`, served over h2c on a run-time port.
//!
//! Every call is recorded (method and the request's Debug text), so a test can check
//! what the backend saw and that a refused request never reached it.
//!
//! [`fidelity`]: the `fidelity.v1` service of the JSON↔gRPC fidelity tests.
//! [`otlp`]: an OTLP/HTTP trace receiver for the tracing tests.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub mod fidelity;
pub mod otlp;

pub mod pb {
    tonic::include_proto!("bookstore.v1");
}

/// The descriptor set of the test proto, with imports and `google.api.http` options.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bookstore.pb"));

use pb::bookstore_server::{Bookstore, BookstoreServer};
use pb::*;

/// One call the backend received.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    /// `format!("{:?}", request)`.
    pub request: String,
    /// The request's metadata as `name: value` lines.
    pub metadata: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Svc {
    name: i64,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Off for load tests: the call log would grow without bound and cost more than a call.
    recording: bool,
}

impl Svc {
    fn record<T: std::fmt::Debug>(&self, method: &'static str, req: &Request<T>) {
        if !self.recording {
            return;
        }
        let metadata = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().unwrap_or("").to_string()))
                }
                _ => None,
            })
            .collect();
        self.calls.lock().unwrap().push(Call {
            method,
            request: format!("{:?}", req.get_ref()),
            metadata,
        });
    }
}

type BookStream = Pin<Box<dyn Stream<Item = Result<Book, Status>> + Send>>;

#[tonic::async_trait]
impl Bookstore for Svc {
    async fn get_book(&self, req: Request<GetBookRequest>) -> Result<Response<Book>, Status> {
        self.record("GetBook", &req);
        let r = req.into_inner();
        if r.id == 404 {
            return Err(Status::not_found(format!("book {} does not exist", r.id)));
        }
        Ok(Response::new(Book {
            id: r.id,
            title: format!(
                "shelf={} reviews={} tags={} genre={}",
                r.shelf,
                r.with_reviews,
                r.tags.join(","),
                r.genre
            ),
            ..Default::default()
        }))
    }

    async fn create_book(&self, req: Request<CreateBookRequest>) -> Result<Response<Book>, Status> {
        self.record("CreateBook", &req);
        let r = req.into_inner();
        let mut book = r.book.unwrap_or_default();
        book.title = format!("{} (shelf {})", book.title, r.shelf);
        Ok(Response::new(book))
    }

    async fn update_book(&self, req: Request<UpdateBookRequest>) -> Result<Response<Book>, Status> {
        self.record("UpdateBook", &req);
        Ok(Response::new(req.into_inner().book.unwrap_or_default()))
    }

    async fn echo(&self, req: Request<Book>) -> Result<Response<Book>, Status> {
        self.record("Echo", &req);
        Ok(Response::new(req.into_inner()))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<Book>, Status> {
        self.record("Fail", &req);
        let r = req.into_inner();
        Err(Status::new(tonic::Code::from(r.code), r.message))
    }

    type ListBooksStream = BookStream;

    async fn list_books(
        &self,
        req: Request<ListBooksRequest>,
    ) -> Result<Response<BookStream>, Status> {
        self.record("ListBooks", &req);
        let r = req.into_inner();
        let shelf = r.shelf;
        let items: Vec<Result<Book, Status>> = (0..r.count.max(0) as i64)
            .map(|i| {
                Ok(Book {
                    id: shelf * 100 + i,
                    title: format!("book {i}"),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn collect_books(&self, req: Request<Streaming<Book>>) -> Result<Response<Book>, Status> {
        let mut stream = req.into_inner();
        let mut n = 0;
        while let Some(b) = stream.message().await? {
            n += b.id;
        }
        Ok(Response::new(Book {
            id: n,
            ..Default::default()
        }))
    }

    /// `text: "sleep:N"` answers after N ms (a slow method: deadlines, cancellation).
    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        self.record("Ping", &req);
        let ms = req.get_ref().text.strip_prefix("sleep:");
        if let Some(ms) = ms.and_then(|ms| ms.parse().ok()) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Ok(Response::new(PingReply {
            text: req.into_inner().text,
            served_by: self.name,
        }))
    }
}

/// A running backend; stops when dropped.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Option<oneshot::Sender<()>>,
    /// TLS connections whose client and server agreed on ALPN `h2` ([`GrpcBackend::serve_tls`]).
    h2_handshakes: Arc<AtomicUsize>,
}

/// A TLS connection as tonic's server takes it.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl GrpcBackend {
    /// Starts the bookstore on 127.0.0.1 and a port the OS picks; `name` is returned by
    /// `Ping` as `served_by`.
    pub async fn start(name: i64) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, name, true)
    }

    /// Serves on a listener the caller bound; `recording = false` keeps no call log
    /// ([`GrpcBackend::calls`] stays empty), for load tests.
    pub fn serve(listener: TcpListener, name: i64, recording: bool) -> GrpcBackend {
        let addr = listener.local_addr().expect("local addr");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        Self::serve_incoming(addr, incoming, name, recording, Arc::default())
    }

    /// Serves over TLS with `config` (whose ALPN should offer `h2`: tonic speaks HTTP/2
    /// only), on 127.0.0.1 and a port the OS picks.
    pub async fn start_tls(
        name: i64,
        config: Arc<tokio_rustls::rustls::ServerConfig>,
    ) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let h2 = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsIo, std::io::Error>>(64);
        let counted = h2.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                    // The server stopped and dropped the stream of connections.
                    _ = tx.closed() => break,
                };
                let (acceptor, tx, counted) = (acceptor.clone(), tx.clone(), counted.clone());
                tokio::spawn(async move {
                    // A client that fails the handshake is no connection for tonic.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                });
            }
        });
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
        Self::serve_incoming(addr, incoming, name, true, h2)
    }

    fn serve_incoming<S, IO>(
        addr: SocketAddr,
        incoming: S,
        name: i64,
        recording: bool,
        h2_handshakes: Arc<AtomicUsize>,
    ) -> GrpcBackend
    where
        S: Stream<Item = Result<IO, std::io::Error>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
    {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let svc = Svc {
            name,
            calls: calls.clone(),
            recording,
        };
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(BookstoreServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        GrpcBackend {
            addr,
            calls,
            stop: Some(tx),
            h2_handshakes,
        }
    }

    /// TLS connections made with ALPN `h2` ([`GrpcBackend::start_tls`]).
    pub fn h2_handshakes(&self) -> usize {
        self.h2_handshakes.load(Ordering::SeqCst)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
