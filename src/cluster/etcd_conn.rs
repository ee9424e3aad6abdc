//! What every etcd user in busbar shares: a lazily connected client with bounded calls,
//! and the list-then-watch loop that mirrors a key prefix into local state.
//!
//! The loop lists the prefix, then watches from the next revision; after a disconnect it
//! resumes from the last revision it saw (checking that etcd answers first), and re-lists
//! when that revision was compacted away. Nothing on the request path awaits any of it.
//! Owns: connection handling, timeouts, the watch loop. Must not: interpret keys.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, Event, GetOptions, KeyValue, WatchOptions};
use pingora_core::server::ShutdownWatch;
use tokio::sync::Mutex as AsyncMutex;

/// Each etcd call gives up after this long (a write then answers 503).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC keep-alive: etcd refuses pings more often than every 5 s (FIELD-NOTES).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts of a watch loop.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Runs one etcd call with [`CALL_TIMEOUT`]; the error is a message for the caller's reply.
pub async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("etcd did not answer in time".to_string()),
    }
}

/// A client connected on first use; a failed call should [`EtcdConn::forget`] it.
pub struct EtcdConn {
    endpoints: Vec<String>,
    client: AsyncMutex<Option<Client>>,
}

impl EtcdConn {
    pub fn new(endpoints: Vec<String>) -> EtcdConn {
        EtcdConn {
            endpoints,
            client: AsyncMutex::new(None),
        }
    }

    pub async fn client(&self) -> Result<Client, String> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(KEEPALIVE, CALL_TIMEOUT);
        let c = timed(Client::connect(&self.endpoints, Some(opts))).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    pub async fn forget(&self) {
        *self.client.lock().await = None;
    }
}

/// Local state that mirrors an etcd prefix.
#[async_trait]
pub trait Mirror: Send + Sync {
    fn prefix(&self) -> &str;
    /// A full listing: it replaces whatever was known.
    fn reset(&self, kvs: &[KeyValue]);
    /// The events of one watch response, in order.
    fn apply(&self, events: &[Event]);
    /// etcd became reachable (`true`) or unreachable (`false`, with why).
    fn reachable(&self, up: bool, why: &str);
}

/// Mirrors `m`'s prefix until shutdown.
pub async fn mirror(conn: &EtcdConn, m: &dyn Mirror, shutdown: &mut ShutdownWatch) {
    let mut resume: Option<i64> = None;
    let mut up: Option<bool> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = async {
            let mut client = conn.client().await?;
            let from = match resume {
                Some(r) => {
                    // Resuming: make sure etcd answers before saying we are caught up.
                    let probe = GetOptions::new().with_prefix().with_count_only();
                    timed(client.get(m.prefix(), Some(probe))).await?;
                    r
                }
                None => {
                    let resp = timed(client.get(m.prefix(), Some(GetOptions::new().with_prefix())))
                        .await?;
                    m.reset(resp.kvs());
                    resp.header().map_or(0, |h| h.revision()) + 1
                }
            };
            Ok::<_, String>((client, from))
        }
        .await;
        match attempt {
            Ok((mut client, from)) => {
                if up != Some(true) {
                    m.reachable(true, "");
                    up = Some(true);
                }
                resume = watch(&mut client, m, from, shutdown).await;
                // The stream broke: check etcd is really there before trusting it again.
                conn.forget().await;
            }
            Err(e) => {
                conn.forget().await;
                if up != Some(false) {
                    m.reachable(false, &e);
                    up = Some(false);
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// Watches until the stream breaks; returns the revision to resume from, or `None` when
/// the history was compacted and a re-list is needed.
async fn watch(
    client: &mut Client,
    m: &dyn Mirror,
    from: i64,
    shutdown: &mut ShutdownWatch,
) -> Option<i64> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_prev_key();
    let mut stream = match timed(client.watch(m.prefix(), Some(opts))).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(prefix = m.prefix(), "etcd watch not started: {e}");
            return Some(from);
        }
    };
    let mut next = from;
    loop {
        let msg = tokio::select! {
            _ = shutdown.changed() => return Some(next),
            m = stream.message() => m,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return Some(next),
        };
        if resp.compact_revision() > 0 {
            tracing::warn!(
                prefix = m.prefix(),
                compacted = resp.compact_revision(),
                "etcd history compacted: re-listing"
            );
            return None;
        }
        if resp.canceled() {
            return Some(next);
        }
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                next = next.max(kv.mod_revision() + 1);
            }
        }
        m.apply(resp.events());
    }
}
