//! A TCP forwarder standing in for a sidecar: accepts on its own port and pipes bytes to
//! a target. Counts requests it carried for a marker path, so a test can tell traffic
//! that went through the "sidecar" from traffic that went straight to the app.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Forwarder {
    pub addr: SocketAddr,
    target: SocketAddr,
    marker: &'static [u8],
    carried: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Forwards to `target`; counts client bytes containing `marker` (e.g. `b"GET /work"`).
    pub async fn start(target: SocketAddr, marker: &'static [u8]) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut f = Forwarder {
            addr,
            target,
            marker,
            carried: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        f.serve(listener);
        f
    }

    fn serve(&mut self, listener: TcpListener) {
        let (target, marker, carried) = (self.target, self.marker, self.carried.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let carried = carried.clone();
                conns.spawn(async move {
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut ur, mut uw) = up.split();
                    let to_up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let seen = buf[..n]
                                .windows(marker.len())
                                .filter(|w| *w == marker)
                                .count();
                            carried.fetch_add(seen, Ordering::SeqCst);
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = uw.shutdown().await;
                    };
                    let to_client = async {
                        let _ = tokio::io::copy(&mut ur, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(to_up, to_client);
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Requests carried that contained the marker.
    pub fn carried(&self) -> usize {
        self.carried.load(Ordering::SeqCst)
    }

    /// Closes the port and every connection through it.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
