//! A small OTLP/HTTP trace receiver for busbar's tracing tests: `POST /v1/traces` with a
//! protobuf `ExportTraceServiceRequest`, decoded with the official messages
//! (`opentelemetry-proto`), every span kept for the test to read. It can also hang:
//! accept connections and read requests, and never answer (a collector that is stuck).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
pub use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Received {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl Received {
    /// The span's attribute `key` as text (ints as their decimal text).
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    /// The resource's attribute `key` as text.
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        attr(&self.resource, key)
    }
}

fn attr(list: &[KeyValue], key: &str) -> Option<String> {
    let v = list.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<Received>>,
    /// Export requests received (answered or, when hanging, not).
    requests: AtomicUsize,
    /// Requests whose body did not decode.
    bad: AtomicUsize,
    /// Connections accepted.
    connections: AtomicUsize,
}

/// The receiver, on a loopback port chosen at run time; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// A receiver that answers `200` with an empty `ExportTraceServiceResponse`.
    pub async fn start() -> OtlpReceiver {
        Self::spawn(false).await
    }

    /// A receiver that accepts and reads, and never answers.
    pub async fn hanging() -> OtlpReceiver {
        Self::spawn(true).await
    }

    async fn spawn(hang: bool) -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let (stop, mut stopped) = oneshot::channel();
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { continue };
                        s.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(serve(conn, s.clone(), hang));
                    }
                }
            }
        });
        OtlpReceiver {
            addr,
            shared,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT/v1/traces`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.shared.spans.lock().expect("spans").clone()
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    pub fn bad_requests(&self) -> usize {
        self.shared.bad.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Polls until `done(spans)` holds, or `within` passes; returns the spans either way.
    pub async fn wait_for(
        &self,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One HTTP/1.1 connection: requests with a `Content-Length` body, kept alive.
async fn serve(mut conn: TcpStream, shared: Arc<Shared>, hang: bool) {
    let mut buf = Vec::new();
    loop {
        let (head_end, length) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, length);
            }
            if !read_more(&mut conn, &mut buf).await {
                return;
            }
        };
        while buf.len() < head_end + length {
            if !read_more(&mut conn, &mut buf).await {
                return;
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
        shared.requests.fetch_add(1, Ordering::Relaxed);
        match ExportTraceServiceRequest::decode(body.as_slice()) {
            Ok(req) => {
                let mut spans = shared.spans.lock().expect("spans");
                for rs in req.resource_spans {
                    let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            spans.push(Received {
                                span,
                                resource: resource.clone(),
                            });
                        }
                    }
                }
            }
            Err(_) => {
                shared.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        if hang {
            // Keep reading (and counting) whatever comes, never answer.
            continue;
        }
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match conn.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}
