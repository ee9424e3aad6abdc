//! The upstream side of one try on busbar's own engine: a pooled or new connection, the
//! request head out, the response head in.
//!
//! Owns: the connect (TCP, then the TLS handshake for an instance reached over TLS, under
//! one connect timeout, raced against a connection given back meanwhile), connection
//! reuse and the stale-connection case (a pooled connection the upstream had closed: the
//! try goes again on a fresh one, for an idempotent request whose body is still all
//! held), the head's deadline over the whole head, when a streaming body
//! (`body::Streamer`) is pumped and when it stops (an answer before its end), and telling
//! the orchestration how a try failed, in the words the phases' outcome calls take.
//! Must not: decide retries or count failures against instances (`phases::attempt`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::{BodyFail, PumpFail, Streamer};
use super::client::ClientStream;
use super::pool::{self, Conn};
use super::response::{parse_head, Head};
use crate::base::clock;
use crate::base::deadline::{within, within_by};
use crate::metrics::ServiceMetrics;
use crate::model::TlsPeer;
use crate::phases::Try;

/// Read buffer for the response.
pub(crate) const BUF: usize = 4096;

/// Why a try failed after it was connected.
#[derive(Clone, Copy)]
pub(super) enum TripError {
    /// Nothing came back on a pooled connection: the upstream had closed it. Not the
    /// instance's fault; the same try goes again on a fresh connection.
    Stale,
    /// The upstream failed (error, close, timeout).
    Upstream { timed_out: bool },
    /// The upstream answered with a head busbar cannot frame (see [`parse_head`]), a
    /// head over [`MAX_RESPONSE_HEAD`], or an upgrade nobody asked for.
    Malformed,
    /// The client's body failed while it streamed (the connection is dropped).
    Body(BodyFail),
}

/// What every try of one request sends, and how its response is read.
pub(crate) struct Ask<'a> {
    /// The upstream request head.
    pub(crate) wire: &'a [u8],
    pub(crate) head_request: bool,
    pub(crate) idempotent: bool,
    /// busbar sets `RateLimit-*` on the response (see [`parse_head`]).
    pub(crate) own_rate: bool,
    /// The request asks for an upgrade: a `101` is its final answer.
    pub(crate) upgrade: bool,
    /// When the response head must have come, over all tries: the route's `timeout`.
    pub(crate) head_by: Instant,
}

/// Sends the request head (and the body held after it), pumps the rest of a streaming
/// `body`, and reads the response head (skipping 1xx ones) into `buf`; the head's lines
/// for the client go into `lines` ([`parse_head`]). A final answer that comes before
/// the body has all gone stops the body and is not reusable.
pub(super) async fn round_trip<S: ClientStream>(
    up: &mut Conn,
    ask: &Ask<'_>,
    read_timeout: Duration,
    reused: bool,
    buf: &mut Vec<u8>,
    lines: &mut Vec<u8>,
    mut body: Option<&mut Streamer<'_, S>>,
) -> Result<Head, TripError> {
    let failed = TripError::Upstream { timed_out: false };
    let timed_out = TripError::Upstream { timed_out: true };
    // Each wait ends at `read_timeout` or at the head's deadline, whichever is first: the
    // deadline bounds the whole head, so an upstream trickling header lines (each read
    // well within `read_timeout`) does not get through it. Worked out only for a wait
    // that has to wait (`within_by`).
    let limit = || read_timeout.min(ask.head_by.saturating_duration_since(clock::now()));
    // A TLS session buffers what it encrypts: the flush sends it (a no-op on TCP).
    let sent = async {
        up.write_all(ask.wire).await?;
        up.flush().await
    };
    match within_by(read_timeout, ask.head_by, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) if reused => return Err(TripError::Stale),
        Ok(Err(_)) => return Err(failed),
        Err(_) => return Err(timed_out),
    }
    buf.clear();
    loop {
        if let Some(st) = body.as_deref_mut().filter(|st| st.pending()) {
            let spoke = st.pump(up, buf, limit()).await;
            match spoke {
                Ok(_) => {}
                Err(PumpFail::Client(f)) => return Err(TripError::Body(f)),
                Err(PumpFail::Upstream { .. }) if reused && !st.started && buf.is_empty() => {
                    return Err(TripError::Stale)
                }
                Err(PumpFail::Upstream { timed_out }) => {
                    return Err(TripError::Upstream { timed_out })
                }
            }
        }
        // What came: the final head, or (nothing yet, or only a 1xx) not yet.
        if let Some(head) = head_of(buf, ask, lines, &mut body)? {
            return Ok(head);
        }
        if body.as_deref().is_some_and(|st| st.pending()) {
            // The pump reads the upstream while it sends.
            continue;
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(BUF);
        }
        let n = match within_by(read_timeout, ask.head_by, up.read_buf(buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) if reused && buf.is_empty() => return Err(TripError::Stale),
            Ok(Err(_)) => return Err(failed),
            Err(_) => return Err(timed_out),
        };
        if n == 0 {
            return Err(if reused && buf.is_empty() {
                TripError::Stale
            } else {
                TripError::Upstream { timed_out: false }
            });
        }
    }
}

/// The final response head at the start of `buf`, once it is complete. 1xx heads before
/// it are dropped (103 Early Hints and the like); a `100 Continue` lets a waiting `body`
/// go on. A final head while the body is still pending stops the body, and the upstream
/// connection, left mid-request, is not reusable.
fn head_of<S: ClientStream>(
    buf: &mut Vec<u8>,
    ask: &Ask<'_>,
    lines: &mut Vec<u8>,
    body: &mut Option<&mut Streamer<'_, S>>,
) -> Result<Option<Head>, TripError> {
    while !buf.is_empty() {
        match parse_head(buf, ask.head_request, lines, ask.own_rate) {
            Ok(None) => break,
            Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                // Nothing asked for an upgrade, or the body has not all gone: the switch
                // cannot be where the request ends.
                if !ask.upgrade || body.as_deref().is_some_and(|st| st.pending()) {
                    return Err(TripError::Malformed);
                }
                return Ok(Some(head));
            }
            Ok(Some(head)) if head.status.is_informational() => {
                if head.status == StatusCode::CONTINUE {
                    if let Some(st) = body.as_deref_mut() {
                        st.continued = true;
                    }
                }
                buf.drain(..head.len);
            }
            Ok(Some(mut head)) => {
                if let Some(st) = body.as_deref_mut().filter(|st| st.pending()) {
                    st.stopped = true;
                    head.reusable = false;
                }
                return Ok(Some(head));
            }
            Err(()) => return Err(TripError::Malformed),
        }
    }
    Ok(None)
}

/// Why a try failed.
pub(crate) enum TryFail {
    Connect {
        timed_out: bool,
    },
    /// The instance's TLS certificate failed verification (`Phases::on_certificate_failure`).
    Certificate,
    Trip {
        timed_out: bool,
    },
    /// An answer busbar cannot frame: never retried (`Phases::on_malformed_response`).
    Malformed,
    /// The client's streaming body failed: the try ends, the connection is dropped.
    Body(BodyFail),
}

/// One try on instance `t`: a pooled connection if there is a live one, the request
/// (with its `body` streamed, if it has to be), the response head. If the upstream had
/// closed the pooled connection (nothing came back), an idempotent request whose body has
/// not begun to stream goes again on a fresh one; another request fails the try, as it
/// may have been acted on.
pub(crate) async fn one_try<S: ClientStream>(
    t: &Try,
    ask: &Ask<'_>,
    metrics: &ServiceMetrics,
    buf: &mut Vec<u8>,
    lines: &mut Vec<u8>,
    mut body: Option<&mut Streamer<'_, S>>,
) -> Result<(Conn, Head), TryFail> {
    let key = pool::Key::of(t);
    let mut pooled = pool::take(key);
    loop {
        let (mut up, reused) = match pooled.take() {
            Some(up) => {
                metrics.connection_pooled.inc();
                (up, true)
            }
            // Boxed: a connect's state (~2.5 KB: rustls's client connection and its
            // handshake) inline would make every request's future that much larger, and
            // the front door boxes that future (copying it whole) for each request. A
            // new connection is the rare case on keep-alive; it pays the allocation.
            None => match Box::pin(connect_or_given(t, key, metrics)).await {
                Fresh::Given(up) => {
                    metrics.connection_pooled.inc();
                    (up, true)
                }
                Fresh::Made(Ok(up)) => {
                    metrics.connection_new.inc();
                    (up, false)
                }
                Fresh::Made(Err(ConnectError::Certificate)) => return Err(TryFail::Certificate),
                Fresh::Made(Err(ConnectError::Failed)) => {
                    return Err(TryFail::Connect { timed_out: false })
                }
                Fresh::TimedOut => return Err(TryFail::Connect { timed_out: true }),
            },
        };
        let trip = round_trip(
            &mut up,
            ask,
            t.read_timeout,
            reused,
            buf,
            lines,
            body.as_deref_mut(),
        );
        match trip.await {
            Ok(head) => return Ok((up, head)),
            Err(TripError::Stale)
                if ask.idempotent && !body.as_ref().is_some_and(|b| b.started) => {}
            Err(TripError::Stale) => return Err(TryFail::Trip { timed_out: false }),
            Err(TripError::Upstream { timed_out }) => return Err(TryFail::Trip { timed_out }),
            Err(TripError::Malformed) => return Err(TryFail::Malformed),
            Err(TripError::Body(f)) => return Err(TryFail::Body(f)),
        }
    }
}

/// How a try that found no idle connection got one.
enum Fresh {
    /// Its own new connection, or why there is none.
    Made(Result<Conn, ConnectError>),
    /// Its own connect did not complete within the connect timeout.
    TimedOut,
    /// A connection another request gave back while the connect was under way.
    Given(Conn),
}

/// A new connection to the try's instance, or one given back to the pool meanwhile,
/// whichever comes first (as hyper's client races a checkout against a connect). When
/// streams bunch up, the connections in use come back within a response time, while a
/// connect whose SYN an upstream's full listen queue dropped waits for the kernel's
/// retransmission (1 s, then 3 s), and a connect timeout of 1 s turned that into a 504.
/// A connect that loses goes on by itself and pools its connection (or hands it to the
/// next waiting try); if it fails, it counts as a connect failure of the service, not of
/// any request.
async fn connect_or_given(t: &Try, key: pool::Key, metrics: &ServiceMetrics) -> Fresh {
    let mut made = Box::pin(within(t.connect_timeout, connect_to(t.addr, t.tls.clone())));
    let mut given = pool::wait(key);
    let first = tokio::select! {
        biased;
        r = &mut made => Ok(r),
        Ok(up) = &mut given => Err(up),
    };
    match first {
        Ok(r) => {
            // A connection given back just as the connect completed stays pooled.
            if let Ok(up) = given.try_recv() {
                pool::give_back(key, up);
            }
            match r {
                Ok(r) => Fresh::Made(r),
                Err(_) => Fresh::TimedOut,
            }
        }
        Err(up) => {
            let failures = metrics.connect_failures.clone();
            tokio::spawn(async move {
                match made.await {
                    Ok(Ok(up)) => pool::give_back(key, up),
                    _ => failures.inc(),
                }
            });
            Fresh::Given(up)
        }
    }
}

/// Why a new connection could not be made.
pub(crate) enum ConnectError {
    /// Refused, reset, or a TLS handshake that failed for another reason than the
    /// certificate (the server refused busbar's client certificate, no common version).
    Failed,
    /// The instance's certificate did not verify.
    Certificate,
}

/// A new connection to the try's instance: TCP, then TLS when the instance speaks it,
/// with its service's client configuration (whose session cache resumes sessions, and
/// whose ALPN is the service's protocol: `drivers::h2::pool` connects through here too).
pub(crate) async fn connect(t: &Try) -> Result<Conn, ConnectError> {
    connect_to(t.addr, t.tls.clone()).await
}

/// [`connect`] from owned parts, so a connect can go on after its try has taken another
/// connection ([`connect_or_given`]).
async fn connect_to(addr: SocketAddr, tls: Option<Arc<TlsPeer>>) -> Result<Conn, ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|_| ConnectError::Failed)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &tls else {
        return Ok(Conn::Plain(tcp));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.client.clone());
    match connector.connect(tls.name.clone(), tcp).await {
        Ok(s) => Ok(Conn::Tls(Box::new(s))),
        Err(e) if certificate_rejected(&e) => {
            tracing::debug!(upstream = %addr, name = ?tls.name, "upstream TLS certificate verification failed: {e}");
            Err(ConnectError::Certificate)
        }
        Err(e) => {
            tracing::debug!(upstream = %addr, "upstream TLS handshake failed: {e}");
            Err(ConnectError::Failed)
        }
    }
}

/// Did a handshake fail on the peer's certificate (rather than on the network or the
/// peer refusing busbar)? tokio-rustls carries rustls's error inside the I/O error.
pub(crate) fn certificate_rejected(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
}
