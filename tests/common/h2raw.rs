//! A raw HTTP/2 upstream (the `h2` crate's server, h2c) on a run-time port: each stream
//! handed to the test's function in a task of its own. Stopped when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpListener;

pub struct RawH2 {
    pub addr: SocketAddr,
    /// Streams it accepted.
    pub streams: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawH2 {
    /// Serves every stream of every connection with `each(request, respond)`.
    pub async fn start<F, Fut>(each: F) -> RawH2
    where
        F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let s = streams.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (s, each) = (s.clone(), each.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        s.fetch_add(1, SeqCst);
                        tokio::spawn(each(req, respond));
                    }
                });
            }
        });
        RawH2 {
            addr,
            streams,
            task,
        }
    }
}
