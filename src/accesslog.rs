//! The access log: one JSON line per request, to stdout or a file.
//!
//! Owns: the line format and a buffered writer flushed by a background task (and at
//! exit), so the request path appends to memory and never waits on a disk; reopening a
//! file target (`SIGUSR1`, `POST /v1/logs/reopen`) for logrotate.
//! Must not: decide what a request was; it writes what the proxy hands it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::AccessLogTarget;
use crate::proxy::grpc::Caller;
use crate::text::{self, Sink};

/// Buffered bytes that force a flush from the request path.
const FLUSH_AT: usize = 64 * 1024;
/// How often the background flusher empties the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The access log's writer; one per process.
pub struct AccessLog {
    out: Option<Mutex<BufWriter<Box<dyn Write + Send>>>>,
    /// The file target's path, opened again by [`AccessLog::reopen`].
    path: Option<PathBuf>,
}

/// The name of the request id header busbar keeps (or sets) and sends upstream.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The longest client-sent request id kept; a longer (or non-printable) one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// What the access log needs of a request as the client sent it, taken when the
/// request starts (the request itself is edited on its way upstream).
#[derive(Debug, Clone)]
pub struct Seen {
    /// `x-request-id` as the client sent it, when it is kept; `None`: the request id is
    /// the trace id in hex (written where it is needed, so a request that brings none
    /// costs no allocation). Sent upstream either way ([`Seen::request_id`]).
    pub kept_id: Option<http::HeaderValue>,
    /// `http/1.1`, `http/1.0`, `h2`, `h2c`, `grpc` or `grpc-web`.
    pub protocol: &'static str,
    pub user_agent: Option<http::HeaderValue>,
}

impl Seen {
    /// The facts of a request with `headers`, `version`, on a TLS connection or not, from
    /// `caller` (its `content-type`, read once in setup). The request id is always taken
    /// (it goes upstream); the protocol and the user agent only when `logged` (the access
    /// log is on), as nothing else reads them.
    pub fn from_headers(
        headers: &http::HeaderMap,
        version: http::Version,
        tls: bool,
        caller: Caller,
        logged: bool,
    ) -> Seen {
        let kept_id = headers
            .get(&REQUEST_ID)
            .filter(|v| {
                let b = v.as_bytes();
                !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
            })
            .cloned();
        if !logged {
            return Seen {
                kept_id,
                protocol: "",
                user_agent: None,
            };
        }
        Seen {
            kept_id,
            protocol: protocol(caller, version, tls),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
        }
    }

    /// The request id: the kept client value, else `trace_id` (the trace id in hex).
    pub fn request_id<'a>(&'a self, trace_id: &'a [u8; 32]) -> &'a [u8] {
        self.kept_id
            .as_ref()
            .map_or(&trace_id[..], |v| v.as_bytes())
    }
}

/// The protocol the client spoke, as the access log names it.
fn protocol(caller: Caller, version: http::Version, tls: bool) -> &'static str {
    match (caller, version, tls) {
        (Caller::GrpcWeb | Caller::GrpcWebText, _, _) => "grpc-web",
        (Caller::Grpc, _, _) => "grpc",
        (Caller::Http, http::Version::HTTP_2, true) => "h2",
        (Caller::Http, http::Version::HTTP_2, false) => "h2c",
        (Caller::Http, http::Version::HTTP_10, _) => "http/1.0",
        (Caller::Http, _, _) => "http/1.1",
    }
}

/// One request as the access log records it.
pub struct Entry<'a> {
    pub client: Option<std::net::SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub service: &'a str,
    pub instance: Option<std::net::SocketAddr>,
    pub status: u16,
    pub bytes: usize,
    pub total: Duration,
    pub upstream: Option<Duration>,
    pub tries: u32,
    pub trace_id: &'a [u8; 32],
    /// busbar's reason code when busbar answered itself (a refusal, a failure).
    pub error: Option<&'a str>,
    /// The request's facts; `None` for a refusal before the head was read whole.
    pub seen: Option<&'a Seen>,
    /// The query string as sent (without `?`).
    pub query: Option<&'a str>,
    /// Query parameter names (lower case) whose values are written as `REDACTED`.
    pub redact: &'a [String],
    /// The authenticated user admission let through.
    pub user: Option<&'a str>,
    /// The release version of the instance that served the request.
    pub version: Option<&'a str>,
    /// A gRPC call's `grpc-status` as the caller got it (written only when known).
    pub grpc_status: Option<u16>,
}

/// What busbar ended outside the request phases, as its access log line has it: a
/// refusal before the head was read whole, an HTTP/2 stream reset for its head, a
/// `CONNECT`. No path, query, request id or user; a fresh trace id.
pub struct Bare<'a> {
    pub client: Option<std::net::SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub route: &'a str,
    pub service: &'a str,
    /// The instance reached (counted as one try), if any.
    pub instance: Option<std::net::SocketAddr>,
    pub status: u16,
    pub bytes: usize,
    pub started: std::time::Instant,
    pub error: Option<&'a str>,
    pub protocol: &'static str,
}

fn open_file(p: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// What [`AccessLog::reopen`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reopened {
    /// The file at the configured path is open (a new one if it had been moved away).
    File(PathBuf),
    /// The access log goes to stdout or nowhere: nothing to reopen.
    NotAFile,
}

impl AccessLog {
    /// Opens `target` (a file is created, and appended to).
    pub fn open(target: &AccessLogTarget) -> io::Result<AccessLog> {
        let (out, path): (Option<Box<dyn Write + Send>>, _) = match target {
            AccessLogTarget::Off => (None, None),
            AccessLogTarget::Stdout => (Some(Box::new(io::stdout())), None),
            AccessLogTarget::File(p) => (Some(Box::new(open_file(p)?)), Some(p.clone())),
        };
        Ok(AccessLog {
            out: out.map(|w| Mutex::new(BufWriter::with_capacity(2 * FLUSH_AT, w))),
            path,
        })
    }

    /// Opens the file target's path again and writes there from now on: after logrotate
    /// renamed the file, the lines buffered so far go to the renamed file and every later
    /// one to the new file, none lost and none in both. On an error the old file stays in
    /// use.
    pub fn reopen(&self) -> io::Result<Reopened> {
        let (Some(out), Some(path)) = (&self.out, &self.path) else {
            return Ok(Reopened::NotAFile);
        };
        // Opened before the lock: the request path never waits on the open.
        let file = open_file(path)?;
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        // A flush error keeps the buffer; the lines then go to the new file.
        if let Err(e) = w.flush() {
            tracing::warn!("access log flush before reopening failed: {e}");
        }
        *w.get_mut() = Box::new(file);
        Ok(Reopened::File(path.clone()))
    }

    /// [`AccessLog::reopen`], logged: for the signal and the admin call.
    pub fn reopen_logged(&self, by: &str) -> io::Result<Reopened> {
        let r = self.reopen();
        match &r {
            Ok(Reopened::File(p)) => {
                tracing::info!(path = %p.display(), "{by}: access log reopened")
            }
            Ok(Reopened::NotAFile) => {
                tracing::info!("{by}: the access log is not a file, nothing to reopen")
            }
            Err(e) => tracing::error!(
                "{by}: cannot reopen the access log, still writing to the old file: {e}"
            ),
        }
        r
    }

    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    pub fn write(&self, e: &Entry<'_>) {
        use std::cell::RefCell;
        thread_local! {
            /// The line, formatted before the lock is taken; kept for the thread's next one.
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let Some(out) = &self.out else {
            return;
        };
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            write_entry(&mut line, e);
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            // A failed log write must never fail the request; the flusher will report errors.
            let _ = w.write_all(&line);
            if w.buffer().len() >= FLUSH_AT {
                let _ = w.flush();
            }
        });
    }

    /// The line of a request the front door refused before busbar read its head whole
    /// (400, 408, 414, 431): no route, and only what is known of the request. Also
    /// counted in `busbar_requests_total` with the `reason`.
    pub fn refusal(
        &self,
        client: Option<std::net::SocketAddr>,
        method: &str,
        status: u16,
        reason: &'static str,
        started: std::time::Instant,
    ) {
        crate::metrics::count_refusal(status, reason, method);
        self.early(client, method, status, reason, started, "http/1.1");
    }

    /// The line of an HTTP/2 stream busbar reset for what its head carried (a stream
    /// error, RFC 9113 §8.1.1: `malformed_request`) before it reached the phases: status
    /// 0 (nothing was answered), the reason, and `protocol` (`h2` or `h2c`). The
    /// refusal is counted where it happens (`busbar_edge_refusals_total`).
    pub fn stream_reset(
        &self,
        client: Option<std::net::SocketAddr>,
        method: &str,
        reason: &'static str,
        started: std::time::Instant,
        protocol: &'static str,
    ) {
        self.early(client, method, 0, reason, started, protocol);
    }

    /// The line of a request ended before it had a route.
    fn early(
        &self,
        client: Option<std::net::SocketAddr>,
        method: &str,
        status: u16,
        reason: &'static str,
        started: std::time::Instant,
        protocol: &'static str,
    ) {
        self.bare(&Bare {
            client,
            method,
            host: "",
            route: crate::metrics::NO_ROUTE,
            service: "",
            instance: None,
            status,
            bytes: 0,
            started,
            error: Some(reason),
            protocol,
        });
    }

    /// The line of what busbar ended outside the request phases (see [`Bare`]).
    pub fn bare(&self, b: &Bare<'_>) {
        if !self.enabled() {
            return;
        }
        let trace = crate::proxy::trace::new_trace_id_hex();
        let seen = Seen {
            kept_id: None,
            protocol: b.protocol,
            user_agent: None,
        };
        self.write(&Entry {
            client: b.client,
            method: b.method,
            host: b.host,
            path: "",
            route: b.route,
            service: b.service,
            instance: b.instance,
            status: b.status,
            bytes: b.bytes,
            total: b.started.elapsed(),
            upstream: None,
            tries: u32::from(b.instance.is_some()),
            trace_id: &trace,
            error: b.error,
            seen: Some(&seen),
            query: None,
            redact: &[],
            user: None,
            version: None,
            grpc_status: None,
        });
    }

    pub fn flush(&self) {
        if let Some(out) = &self.out {
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = w.flush() {
                tracing::warn!("access log flush failed: {e}");
            }
        }
    }
}

/// Reopens the access log on `SIGUSR1` (logrotate's `postrotate`).
pub struct ReopenOnSignal {
    pub access_log: Arc<AccessLog>,
}

#[async_trait]
impl BackgroundService for ReopenOnSignal {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "cannot listen for SIGUSR1, reopen the access log with POST /v1/logs/reopen: {e}"
                );
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = usr1.recv() => {
                    let _ = self.access_log.reopen_logged("SIGUSR1");
                }
            }
        }
    }
}

/// One JSON line, by hand: the formatting machinery (`write!`) cost more than the
/// rest of the request path's own work (~6.7k instructions a line, 2.6k of them for the
/// two socket addresses).
fn write_entry(w: &mut Vec<u8>, e: &Entry<'_>) {
    w.put(b"{\"time\":\"");
    write_time(w, SystemTime::now());
    w.put(b"\",\"client\":");
    client_or_null(w, e.client);
    // Each string field: one piece with the previous field's closing quote, the key and
    // the opening quote, then the escaped text.
    for (start, text) in [
        (&b",\"method\":\""[..], e.method),
        (b"\",\"host\":\"", e.host),
        (b"\",\"path\":\"", e.path),
        (b"\",\"route\":\"", e.route),
        (b"\",\"service\":\"", e.service),
    ] {
        w.put(start);
        json_text(w, text);
    }
    w.put(b"\",\"instance\":");
    addr_or_null(w, e.instance);
    w.put(b",\"status\":");
    text::decimal(w, u64::from(e.status));
    w.put(b",\"bytes\":");
    text::decimal(w, e.bytes as u64);
    w.put(b",\"duration_ms\":");
    write_ms(w, e.total);
    w.put(b",\"upstream_ms\":");
    match e.upstream {
        Some(u) => write_ms(w, u),
        None => w.put(b"null"),
    }
    w.put(b",\"tries\":");
    text::decimal(w, u64::from(e.tries));
    w.put(b",\"trace_id\":\"");
    w.put(e.trace_id);
    w.put(b"\",\"protocol\":");
    text_or_null(w, e.seen.map(|s| s.protocol));
    w.put(b",\"request_id\":");
    text_or_null(
        w,
        e.seen
            .and_then(|s| std::str::from_utf8(s.request_id(e.trace_id)).ok()),
    );
    w.put(b",\"user_agent\":");
    text_or_null(
        w,
        e.seen
            .and_then(|s| s.user_agent.as_ref())
            .and_then(|v| v.to_str().ok()),
    );
    w.put(b",\"query\":");
    match e.query {
        Some(q) => {
            w.put(b"\"");
            write_query(w, q, e.redact);
            w.put(b"\"");
        }
        None => w.put(b"null"),
    }
    w.put(b",\"user\":");
    text_or_null(w, e.user);
    w.put(b",\"version\":");
    text_or_null(w, e.version.filter(|v| !v.is_empty()));
    if let Some(g) = e.grpc_status {
        w.put(b",\"grpc_status\":");
        text::decimal(w, u64::from(g));
    }
    if let Some(err) = e.error {
        w.put(b",\"error\":\"");
        json_text(w, err);
        w.put(b"\"");
    }
    w.put(b"}\n");
}

fn text_or_null(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            w.put(b"\"");
            json_text(w, s);
            w.put(b"\"");
        }
        None => w.put(b"null"),
    }
}

/// The query with the values of the `redact` parameters replaced by `REDACTED` (names
/// compared without regard to ASCII case, as sent: a percent-encoded name is not decoded).
fn write_query(w: &mut Vec<u8>, q: &str, redact: &[String]) {
    if redact.is_empty() {
        json_text(w, q);
        return;
    }
    for (i, pair) in q.split('&').enumerate() {
        if i > 0 {
            w.put(b"&");
        }
        let name = pair.split('=').next().unwrap_or("");
        if redact.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            json_text(w, name);
            w.put(b"=REDACTED");
        } else {
            json_text(w, pair);
        }
    }
}

/// The client as `ip:port`, or `ip` when its port is unknown (0: a trusted proxy named
/// the client in a forwarding header).
fn client_or_null(w: &mut Vec<u8>, a: Option<std::net::SocketAddr>) {
    match a {
        Some(a) if a.port() == 0 => {
            w.put(b"\"");
            text::ip(w, a.ip());
            w.put(b"\"");
        }
        _ => addr_or_null(w, a),
    }
}

fn addr_or_null(w: &mut Vec<u8>, a: Option<std::net::SocketAddr>) {
    match a {
        Some(a) => {
            w.put(b"\"");
            text::socket_addr(w, a);
            w.put(b"\"");
        }
        None => w.put(b"null"),
    }
}

/// Milliseconds with three decimals, from integers (float formatting is slow).
fn write_ms(w: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros().min(u128::from(u64::MAX)) as u64;
    text::decimal(w, micros / 1000);
    w.put(b".");
    text::three_digits(w, (micros % 1000) as u32);
}

/// RFC 3339 UTC with milliseconds. The date and time of day are formatted once per
/// second (per thread); each line adds only the milliseconds.
fn write_time(w: &mut Vec<u8>, now: SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let prefix = SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            // "YYYY-MM-DDTHH:MM:SS" from humantime's "YYYY-MM-DDTHH:MM:SSZ" (which
            // refuses years past 9999: then the epoch stands in, never a panic).
            use std::fmt::Write as _;
            let mut text = String::with_capacity(20);
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            if write!(text, "{}", humantime::format_rfc3339_seconds(at)).is_err() || text.len() < 19
            {
                text = "1970-01-01T00:00:00".to_string();
            }
            c.1.copy_from_slice(&text.as_bytes()[..19]);
            c.0 = secs;
        }
        c.1
    });
    w.put(&prefix);
    w.put(b".");
    text::three_digits(w, since.subsec_millis());
    w.put(b"Z");
}

/// Writes `s` as the inside of a JSON string; request-controlled text is escaped, never
/// trusted. Text with nothing to escape (the usual case) is copied as it is; the rest
/// is escaped by serde_json, less the quotes it adds (the caller writes its own).
fn json_text(w: &mut Vec<u8>, s: &str) {
    // A fold without an early exit: the compiler checks many bytes at a time.
    let plain = s
        .bytes()
        .fold(true, |ok, c| ok & (c >= 0x20) & (c != b'"') & (c != b'\\'));
    if plain {
        w.put(s.as_bytes());
    } else if let Ok(quoted) = serde_json::to_vec(s) {
        w.put(&quoted[1..quoted.len() - 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_escaped_fields() {
        let mut out = Vec::new();
        let e = Entry {
            client: Some("127.0.0.1:5000".parse().unwrap()),
            method: "GET",
            host: "h",
            path: "/a\"b\n",
            route: "r",
            service: "s",
            instance: None,
            status: 200,
            bytes: 5,
            total: Duration::from_micros(1500),
            upstream: Some(Duration::from_micros(1000)),
            tries: 1,
            trace_id: &[b'a'; 32],
            error: None,
            seen: None,
            query: Some("a=1&Token=s3cret&b&token"),
            redact: &["token".to_string()],
            user: Some("alice"),
            version: Some(""),
            grpc_status: Some(14),
        };
        write_entry(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["instance"], serde_json::Value::Null);
        assert_eq!(v["upstream_ms"], 1.0);
        assert_eq!(v["query"], "a=1&Token=REDACTED&b&token=REDACTED");
        assert_eq!(v["user"], "alice");
        assert_eq!(v["version"], serde_json::Value::Null);
        assert_eq!(v["protocol"], serde_json::Value::Null);
        assert_eq!(v["grpc_status"], 14);
        // Not a gRPC call: no `grpc_status` key at all.
        let mut out = Vec::new();
        write_entry(
            &mut out,
            &Entry {
                grpc_status: None,
                ..e
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("grpc_status").is_none(), "{v}");
    }

    #[test]
    fn protocols_and_request_ids() {
        let id = [b'f'; 32];
        let mut h = http::HeaderMap::new();
        let seen = |h: &http::HeaderMap, v, tls| Seen::from_headers(h, v, tls, Caller::of(h), true);
        assert_eq!(seen(&h, http::Version::HTTP_11, false).protocol, "http/1.1");
        assert_eq!(seen(&h, http::Version::HTTP_2, true).protocol, "h2");
        assert_eq!(seen(&h, http::Version::HTTP_2, false).protocol, "h2c");
        assert_eq!(
            seen(&h, http::Version::HTTP_2, false).request_id(&id),
            &id[..]
        );
        h.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert_eq!(seen(&h, http::Version::HTTP_2, false).protocol, "grpc");
        h.insert("content-type", "application/grpc-web-text".parse().unwrap());
        assert_eq!(seen(&h, http::Version::HTTP_11, false).protocol, "grpc-web");
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(
            seen(&h, http::Version::HTTP_11, false).request_id(&id),
            b"abc-123"
        );
        // With the access log off the request id is still kept (it goes upstream).
        let quiet = Seen::from_headers(&h, http::Version::HTTP_11, false, Caller::Grpc, false);
        assert_eq!(quiet.request_id(&id), b"abc-123");
        assert!(quiet.user_agent.is_none());
        // Spaces, or too long: replaced.
        h.insert("x-request-id", "a b".parse().unwrap());
        assert_eq!(
            seen(&h, http::Version::HTTP_11, false).request_id(&id),
            &id[..]
        );
        h.insert("x-request-id", "x".repeat(129).parse().unwrap());
        assert_eq!(
            seen(&h, http::Version::HTTP_11, false).request_id(&id),
            &id[..]
        );
    }

    #[test]
    fn every_character_survives_the_escaping() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀");
        let mut out = b"\"".to_vec();
        json_text(&mut out, &all);
        out.push(b'"');
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, all);
        // As serde_json writes it.
        assert_eq!(out, serde_json::to_vec(&all).unwrap());
    }

    #[test]
    fn time_is_rfc3339_with_milliseconds() {
        let mut out = Vec::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        write_time(&mut out, t);
        write_time(&mut out, t + Duration::from_millis(5));
        write_time(&mut out, t + Duration::from_millis(1_000));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-18T11:06:40.123Z2026-11-18T11:06:40.128Z2026-11-18T11:06:41.123Z"
        );
    }
}
