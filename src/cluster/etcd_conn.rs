//! What every etcd user in busbar shares: a client pinned to one member with bounded
//! calls that fail over to the next member, and the list-then-watch loop that mirrors a
//! key prefix into local state.
//!
//! etcd-client spreads calls over all endpoints and keeps sending some to a member that
//! is down, so a call is pinned to one member instead and moves on to the next when that
//! member can't take it: one member of three down costs nothing.
//! The loop lists the prefix, then watches from the next revision; after a disconnect it
//! resumes from the last revision it saw (checking that etcd answers first), and re-lists
//! when that revision was compacted away. Nothing on the request path awaits any of it.
//! Owns: connection handling, failover, timeouts, the watch loop. Must not: interpret keys.

use std::future::Future;
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
/// gRPC's UNAVAILABLE status code, fixed by the gRPC spec: what a member that is down or
/// unreachable (the connection fails) or without a leader answers.
const GRPC_UNAVAILABLE: i32 = 14;

/// Why an etcd call did not succeed; its text is a message for the caller's reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The member could not take the call (down, unreachable, no leader); another may.
    #[error("{0}")]
    Unavailable(String),
    #[error("etcd did not answer in time")]
    Timeout,
    #[error("{0}")]
    Failed(String),
}

impl From<etcd_client::Error> for CallError {
    fn from(e: etcd_client::Error) -> Self {
        match &e {
            etcd_client::Error::GRpcStatus(s) if i32::from(s.code()) == GRPC_UNAVAILABLE => {
                CallError::Unavailable(e.to_string())
            }
            etcd_client::Error::TransportError(_) => CallError::Unavailable(e.to_string()),
            _ => CallError::Failed(e.to_string()),
        }
    }
}

/// Runs one etcd call with [`CALL_TIMEOUT`].
pub async fn timed<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CallError::Timeout),
    }
}

/// The member in use: its index in the endpoints and its client, connected on first use.
struct Pinned {
    at: usize,
    client: Option<Client>,
}

/// A client of one member at a time, moving on to the next when a call fails.
pub struct EtcdConn {
    endpoints: Vec<String>,
    pinned: AsyncMutex<Pinned>,
}

impl EtcdConn {
    pub fn new(endpoints: Vec<String>) -> EtcdConn {
        EtcdConn {
            endpoints,
            pinned: AsyncMutex::new(Pinned {
                at: 0,
                client: None,
            }),
        }
    }

    async fn client(&self) -> Result<(usize, Client), CallError> {
        let mut pinned = self.pinned.lock().await;
        if let Some(c) = pinned.client.as_ref() {
            return Ok((pinned.at, c.clone()));
        }
        // Leader required: a member that lost its quorum refuses calls at once (UNAVAILABLE,
        // "no leader": the next member is tried) and cancels its watches, instead of
        // holding them open with nothing to say, so the node notices and says degraded.
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(KEEPALIVE, CALL_TIMEOUT)
            .with_require_leader(true);
        let endpoint = &self.endpoints[pinned.at % self.endpoints.len().max(1)];
        let c = timed(Client::connect([endpoint], Some(opts))).await?;
        pinned.client = Some(c.clone());
        Ok((pinned.at, c))
    }

    /// Drops the client of member `at` after a failure: the next call goes to the next
    /// member. (A failure seen on a member already left behind changes nothing.)
    async fn forget(&self, at: usize) {
        let mut pinned = self.pinned.lock().await;
        if pinned.at == at {
            pinned.at = (at + 1) % self.endpoints.len().max(1);
            pinned.client = None;
        }
    }

    /// Drops the client but stays on its member: the next call connects afresh (a client
    /// whose member went away would not connect again by itself).
    async fn reconnect(&self) {
        self.pinned.lock().await.client = None;
    }

    /// Runs `op` on the member in use. When that member can't take it ([`CallError::Unavailable`]),
    /// `op` runs again on the next member, each member once at most. A timeout or any other
    /// error ends the call (so a write waits [`CALL_TIMEOUT`] per step at most); the next
    /// call starts on the next member. `op` may run more than once: it must be safe to
    /// repeat (a put of the same value, a lease grant whose lease then just expires).
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, CallError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut tries = self.endpoints.len().max(1);
        loop {
            let (at, client) = self.client().await?;
            match op(client).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.forget(at).await;
                    tries -= 1;
                    if tries == 0 || !matches!(e, CallError::Unavailable(_)) {
                        return Err(e);
                    }
                }
            }
        }
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
        let attempt = conn
            .run(|mut client| async move {
                let from = match resume {
                    Some(r) => {
                        // Resuming: make sure etcd answers before saying we are caught up.
                        let probe = GetOptions::new().with_prefix().with_count_only();
                        timed(client.get(m.prefix(), Some(probe))).await?;
                        r
                    }
                    None => {
                        let all = GetOptions::new().with_prefix();
                        let resp = timed(client.get(m.prefix(), Some(all))).await?;
                        m.reset(resp.kvs());
                        resp.header().map_or(0, |h| h.revision()) + 1
                    }
                };
                Ok((client, from))
            })
            .await;
        match attempt {
            Ok((mut client, from)) => {
                if up != Some(true) {
                    m.reachable(true, "");
                    up = Some(true);
                }
                resume = watch(&mut client, m, from, shutdown).await;
                // The stream broke: check etcd is really there before trusting it again.
                conn.reconnect().await;
            }
            Err(e) => {
                if up != Some(false) {
                    m.reachable(false, &e.to_string());
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
