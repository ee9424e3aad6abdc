//! An HTTP/1.1 + h2c backend that records what it receives.
//!
//! Behaviour by request: `/healthz` answers 200 (503 after `set_healthy(false)`);
//! `?sleep_ms=N` waits before answering; header `x-respond-status: N` sets the status;
//! anything else echoes JSON: `{"backend": name, "method", "path", "headers": {...}}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

struct Shared {
    name: String,
    healthy: AtomicBool,
    hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(name, listener)
    }

    /// Starts on a given address (to bring a stopped backend back on its port).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind {addr}: {e}"),
            }
        };
        Self::serve(name, listener)
    }

    fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            hits: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Dropping this set (when the task is aborted) aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            addr,
            shared,
            task: Some(task),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Requests answered, health checks excluded.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Closes the listener and every connection: the port refuses from now on.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn query_param(path: &str, key: &str) -> Option<u64> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

async fn handle(
    s: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if req.uri().path() == "/healthz" {
        let ok = s.healthy.load(Ordering::SeqCst);
        return Ok(Response::builder()
            .status(if ok { 200 } else { 503 })
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap());
    }
    s.hits.fetch_add(1, Ordering::SeqCst);
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    // A name sent more than once reads as its values joined (RFC 9110 §5.3), so a test
    // sees a header busbar should have replaced but only added to.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes());
        headers
            .entry(k.as_str().to_string())
            .and_modify(|all| {
                all.push_str(", ");
                all.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let status: u16 = headers
        .get("x-respond-status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    s.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        version: version.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = query_param(&path, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let json = serde_json::json!({
        "backend": s.name,
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_bytes": body.len(),
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", s.name.as_str())
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap())
}
