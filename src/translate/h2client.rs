//! The h2c (prior knowledge) connections JSON translation calls services over.
//!
//! Owns: one multiplexed HTTP/2 connection per instance address, reused across
//! requests and reloads, re-dialled when it closes; at most [`MAX_CONNECTIONS`].
//! Must not: choose instances (the caller picks through the service's balancer).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;

/// Addresses with a pooled connection at most; past it the pool forgets an arbitrary one
/// (its in-flight streams finish; the connection closes when its last handle drops).
pub const MAX_CONNECTIONS: usize = 4096;
/// Streams one connection carries at once before callers wait (h2's own default is the
/// server's SETTINGS; tonic allows unlimited, most servers 100+).
const INITIAL_WINDOW: u32 = 1 << 20;

/// Why no stream could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    H2(#[from] h2::Error),
}

static POOL: LazyLock<Mutex<HashMap<SocketAddr, SendRequest<Bytes>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn pooled(addr: SocketAddr) -> Option<SendRequest<Bytes>> {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&addr)
        .cloned()
}

fn forget(addr: SocketAddr) {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
}

/// A sender ready for a new stream to `addr`, dialling when no live connection exists.
pub async fn sender(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<SendRequest<Bytes>, ConnectError> {
    if let Some(s) = pooled(addr) {
        match s.ready().await {
            Ok(s) => return Ok(s),
            Err(_) => forget(addr),
        }
    }
    let stream = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let _ = stream.set_nodelay(true);
    let (send, conn) = tokio::time::timeout(
        connect_timeout,
        h2::client::Builder::new()
            .initial_window_size(INITIAL_WINDOW)
            .initial_connection_window_size(INITIAL_WINDOW * 4)
            .handshake::<_, Bytes>(stream),
    )
    .await
    .map_err(|_| ConnectError::Timeout)??;
    // The connection task ends when the peer or the last sender closes it.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, "upstream h2c connection closed: {e}");
        }
    });
    {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() >= MAX_CONNECTIONS {
            if let Some(k) = pool.keys().next().copied() {
                pool.remove(&k);
            }
        }
        pool.insert(addr, send.clone());
    }
    Ok(send.ready().await?)
}

/// Drops a connection that failed a request, so the next call dials again.
pub fn discard(addr: SocketAddr) {
    forget(addr);
}
