//! `h2pace`: a paced (open-loop) HTTP/2 load client for `load-tests/bench.sh`'s latency
//! scenario (`lat`), where h2load cannot serve: `h2load --rps` starts every client's timer
//! at the same moment (its connections fire in step) and prints no percentiles.
//!
//! Owns: the Poisson schedule, the requests over C multiplexed HTTP/2 connections (h2c with
//! prior knowledge, or TLS with ALPN `h2`), the latency samples and the one-line report.
//! Must not: touch anything outside its own process (it only connects to `--url`).
//!
//! Usage: `h2pace --url URL --rate R --conns C --duration S [--body N] [--grpc] [--ca FILE]
//! [--seed N]`
//!
//! - Schedule: each of the C connections gets its own Poisson stream (exponential gaps,
//!   mean C/R s), so together they send a Poisson stream of R requests per second, out of
//!   phase. The arrivals come from one pacer thread (the whole stream, each arrival sent to
//!   a connection chosen uniformly at random, which splits a Poisson stream into C
//!   independent ones) that sleeps with `std::thread::sleep` (the kernel's high-resolution
//!   timer; tokio's timer ticks in whole milliseconds, which would add up to 1 ms to every
//!   latency). Each arrival is its own stream; many are in flight on a connection at once.
//! - Latency is measured from the *scheduled* send time to the end of the response
//!   (trailers included), never from the moment the request was written: a request sent
//!   late (the pacer woke late, the connection was at its stream limit, the load CPU was
//!   busy) counts its lateness, so there is no coordinated omission. The pacer's wake-up
//!   slack (~50–60 µs on Linux) is in every target's figures alike.
//! - `--grpc`: a unary call `POST` with `content-type: application/grpc`, `te: trailers`
//!   and one frame `PingRequest { text }` (`text` = "hello", or N bytes of `x` with
//!   `--body N`), the request grpc-bench.sh sends; a call counts as an error unless the
//!   status is 200 and `grpc-status` (trailers, or the headers of a Trailers-Only answer)
//!   is 0. Without `--grpc`: `GET`, or `POST` with an N-byte body with `--body N`; any
//!   status outside 2xx is an error.
//! - Each request has 5 s (as bench.sh's wrk `--timeout 5s`); a connection that fails is
//!   not reopened (its requests count as errors).
//! - Output, one line on stdout (latencies in µs, from every completed request):
//!   `H2PACE asked=R achieved=A requests=N errors=E p50=… p90=… p99=… p99.9=… max=…
//!   send_p99=…` where `achieved` is requests answered without error per second of the
//!   schedule and `send_p99` is the p99 of how late requests were handed to h2 (the
//!   generator's own lateness). The first few errors go to stderr.
//!
//! Run it pinned to one CPU (it uses one thread for the connections, one for the pacer).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls;

/// A request's deadline from its scheduled time: bench.sh's wrk runs use `--timeout 5s`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Stream and connection windows: h2load's defaults are 2^30 − 1 for both; large enough
/// that a small exchange never waits for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = (1 << 24) - 1;
const CONN_WINDOW: u32 = (1 << 30) - 1;
/// Errors printed to stderr, so a broken target says why without flooding the log.
const ERRORS_SHOWN: usize = 5;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    target: Target,
    /// Requests per second, in total over all connections.
    rate: f64,
    conns: usize,
    duration: Duration,
    /// `--body N`: a POST body of N bytes (with `--grpc`: N bytes of message text).
    body: Option<usize>,
    grpc: bool,
    ca: Option<String>,
    seed: u64,
}

/// The parsed `--url`.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// Path and query, `/` when the URL has none.
    path: String,
}

const USAGE: &str = "usage: h2pace --url URL --rate R --conns C --duration S [--body N] [--grpc] [--ca FILE] [--seed N]";

fn parse_args(args: &[String]) -> Result<Config, String> {
    let (mut url, mut rate, mut conns, mut duration) = (None, None, None, None);
    let (mut body, mut grpc, mut ca, mut seed) = (None, false, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--grpc" {
            grpc = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag}: needs a value"))?
            .as_str();
        match flag.as_str() {
            "--url" => url = Some(parse_url(value)?),
            "--rate" => rate = Some(positive_f64("--rate", value)?),
            "--conns" => {
                conns = Some(
                    value
                        .parse::<usize>()
                        .ok()
                        .filter(|c| *c >= 1)
                        .ok_or("--conns: a whole number >= 1")?,
                )
            }
            "--duration" => {
                duration = Some(Duration::from_secs_f64(positive_f64("--duration", value)?))
            }
            "--body" => body = Some(value.parse::<usize>().map_err(|_| "--body: a byte count")?),
            "--ca" => ca = Some(value.to_string()),
            "--seed" => seed = Some(value.parse::<u64>().map_err(|_| "--seed: a number")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let target: Target = url.ok_or("--url is required")?;
    if target.tls && ca.is_none() {
        return Err(
            "https:// needs --ca FILE (the CA that signed the server's certificate)".into(),
        );
    }
    Ok(Config {
        target,
        rate: rate.ok_or("--rate is required")?,
        conns: conns.ok_or("--conns is required")?,
        duration: duration.ok_or("--duration is required")?,
        body,
        grpc,
        ca,
        seed: seed.unwrap_or_else(time_seed),
    })
}

fn positive_f64(flag: &str, v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0 && *x < 1e9)
        .ok_or_else(|| format!("{flag}: a positive number"))
}

fn time_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

/// `http://host[:port][/path]` or `https://…`; `[v6]` hosts too.
fn parse_url(url: &str) -> Result<Target, String> {
    let bad = || format!("--url: expected http://HOST[:PORT]/PATH or https://…, got {url:?}");
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
            None => (authority, default_port),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Target {
        tls,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// The schedule.

/// SplitMix64: a small, fast generator, plenty for spacing requests (no dependency).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1), 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The arrivals of a Poisson stream at `rate` per second, each given to one of `conns`
/// connections uniformly at random (so each connection's arrivals are a Poisson stream
/// at rate / conns, independent of the others). Times are offsets from the start, summed
/// from the previous *scheduled* time, never from "now": a pacer that wakes late does not
/// push the rest of the schedule back.
struct Schedule {
    rng: Rng,
    mean_gap_ns: f64,
    conns: usize,
    at_ns: f64,
}

impl Schedule {
    fn new(rate: f64, conns: usize, seed: u64) -> Schedule {
        Schedule {
            rng: Rng(seed),
            mean_gap_ns: 1e9 / rate,
            conns,
            at_ns: 0.0,
        }
    }

    /// The next arrival: (connection index, offset from the start).
    fn next_arrival(&mut self) -> (usize, Duration) {
        // Inverse transform: −mean·ln(1 − U), U in [0, 1), so the log's argument is > 0.
        self.at_ns += -self.mean_gap_ns * (1.0 - self.rng.unit()).ln();
        let conn = (self.rng.next_u64() % self.conns as u64) as usize;
        (conn, Duration::from_nanos(self.at_ns as u64))
    }
}

/// One request to send: on which connection, and when it was due.
struct Job {
    conn: usize,
    due: Instant,
}

/// The pacer thread: hands each arrival to the runtime at its time (or at once when it is
/// already due), until `duration` from `start`. Closing the channel ends the dispatch.
fn pace(
    mut schedule: Schedule,
    start: Instant,
    duration: Duration,
    tx: mpsc::UnboundedSender<Job>,
) {
    loop {
        let (conn, offset) = schedule.next_arrival();
        if offset >= duration {
            return;
        }
        let due = start + offset;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if tx.send(Job { conn, due }).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Samples and percentiles.

/// What the requests came to.
#[derive(Default)]
struct Recorder {
    /// µs from the scheduled time to the end of the response, one per answered request.
    latency_us: Vec<u64>,
    /// µs from the scheduled time to the moment the request was handed to h2.
    send_late_us: Vec<u64>,
    errors: u64,
    shown: Vec<String>,
}

impl Recorder {
    fn ok(&mut self, due: Instant, sent: Instant, done: Instant) {
        self.latency_us
            .push(micros(done.saturating_duration_since(due)));
        self.send_late_us
            .push(micros(sent.saturating_duration_since(due)));
    }
    fn error(&mut self, why: String) {
        self.errors += 1;
        if self.shown.len() < ERRORS_SHOWN {
            self.shown.push(why);
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The nearest-rank percentile (`p` in 0..=100) of sorted samples: the smallest sample
/// with at least p% of all samples at or below it. `None` when there are none.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps float error (0.999 × 1000 = 999.000…1) from moving up a rank.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The report line's figures.
#[derive(Debug)]
struct Report {
    asked: f64,
    achieved: f64,
    requests: usize,
    errors: u64,
    /// p50, p90, p99, p99.9, max (µs); `None` with no answered request.
    pcts: Option<[u64; 5]>,
    send_p99: Option<u64>,
}

impl Report {
    fn from(mut rec: Recorder, asked: f64, duration: Duration) -> Report {
        rec.latency_us.sort_unstable();
        rec.send_late_us.sort_unstable();
        let s = &rec.latency_us;
        let pcts = match (
            percentile(s, 50.0),
            percentile(s, 90.0),
            percentile(s, 99.0),
            percentile(s, 99.9),
            s.last(),
        ) {
            (Some(a), Some(b), Some(c), Some(d), Some(&e)) => Some([a, b, c, d, e]),
            _ => None,
        };
        Report {
            asked,
            achieved: s.len() as f64 / duration.as_secs_f64(),
            requests: s.len(),
            errors: rec.errors,
            pcts,
            send_p99: percentile(&rec.send_late_us, 99.0),
        }
    }

    fn line(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let p = |i: usize| opt(self.pcts.map(|p| p[i]));
        format!(
            "H2PACE asked={:.0} achieved={:.1} requests={} errors={} p50={} p90={} p99={} p99.9={} max={} send_p99={}",
            self.asked,
            self.achieved,
            self.requests,
            self.errors,
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            opt(self.send_p99)
        )
    }
}

// ---------------------------------------------------------------------------------------
// The requests.

/// What every request carries, built once.
struct Shape {
    uri: http::Uri,
    method: http::Method,
    content_type: Option<&'static str>,
    grpc: bool,
    body: Bytes,
}

impl Shape {
    fn new(cfg: &Config) -> Result<Shape, String> {
        let t = &cfg.target;
        let host = if t.host.contains(':') {
            format!("[{}]", t.host)
        } else {
            t.host.clone()
        };
        let scheme = if t.tls { "https" } else { "http" };
        let uri: http::Uri = format!("{scheme}://{host}:{}{}", t.port, t.path)
            .parse()
            .map_err(|e| format!("--url: {e}"))?;
        Ok(if cfg.grpc {
            Shape {
                uri,
                method: http::Method::POST,
                content_type: Some("application/grpc"),
                grpc: true,
                body: grpc_ping_frame(cfg.body),
            }
        } else if let Some(n) = cfg.body {
            Shape {
                uri,
                method: http::Method::POST,
                content_type: Some("application/octet-stream"),
                grpc: false,
                body: Bytes::from(vec![b'x'; n]),
            }
        } else {
            Shape {
                uri,
                method: http::Method::GET,
                content_type: None,
                grpc: false,
                body: Bytes::new(),
            }
        })
    }

    fn request(&self) -> Result<http::Request<()>, http::Error> {
        let mut b = http::Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone());
        if let Some(ct) = self.content_type {
            b = b.header(http::header::CONTENT_TYPE, ct);
        }
        if self.grpc {
            b = b.header(http::header::TE, "trailers");
        }
        b.body(())
    }
}

/// A gRPC frame holding `bookstore.v1.PingRequest { text }` (field 1, a string): "hello"
/// (what grpc-bench.sh sends), or `text_len` bytes of `x`.
fn grpc_ping_frame(text_len: Option<usize>) -> Bytes {
    let text: Vec<u8> = match text_len {
        Some(n) => vec![b'x'; n],
        None => b"hello".to_vec(),
    };
    let mut msg = vec![0x0a];
    let mut n = text.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            msg.push(byte);
            break;
        }
        msg.push(byte | 0x80);
    }
    msg.extend_from_slice(&text);
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

/// One request on `send`, from its scheduled time `due` to the end of its answer.
async fn exchange(
    send: SendRequest<Bytes>,
    shape: &Shape,
    due: Instant,
    rec: &Mutex<Recorder>,
) -> Result<(), String> {
    let mut send = send.ready().await.map_err(|e| format!("connection: {e}"))?;
    let req = shape.request().map_err(|e| format!("request: {e}"))?;
    let sent = Instant::now();
    let (response, mut body_tx) = send
        .send_request(req, shape.body.is_empty())
        .map_err(|e| format!("send: {e}"))?;
    if !shape.body.is_empty() {
        body_tx
            .send_data(shape.body.clone(), true)
            .map_err(|e| format!("send body: {e}"))?;
    }
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let status = response.status();
    let header_grpc_status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?;
    let done = Instant::now();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    if shape.grpc {
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(header_grpc_status);
        match grpc_status.as_ref().map(|v| v.as_bytes()) {
            Some(b"0") => {}
            Some(other) => return Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
            None => return Err("no grpc-status".into()),
        }
    }
    rec.lock()
        .map_err(|_| "recorder poisoned".to_string())?
        .ok(due, sent, done);
    Ok(())
}

/// Opens one HTTP/2 connection (TLS with ALPN h2 when `tls` is set) and spawns its driver.
async fn connect(
    addr: SocketAddr,
    tls: Option<(
        &tokio_rustls::TlsConnector,
        &rustls::pki_types::ServerName<'static>,
    )>,
) -> Result<SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => handshake(tcp).await,
        Some((connector, name)) => {
            let stream = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(format!("{addr} did not agree to ALPN h2"));
            }
            handshake(stream).await
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    // The connection's errors surface in its streams' results.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn tls_connector(ca_file: &str) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(ca_file).map_err(|e| format!("--ca {ca_file}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("--ca {ca_file}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("--ca {ca_file}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca {ca_file}: no certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The whole run, on the current (single-threaded) runtime: connect, pace, wait for the
/// last answers, report.
async fn run(cfg: Config) -> Result<Report, String> {
    let t = &cfg.target;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("resolve {}: {e}", t.host))?
        .collect();
    let tls = match &cfg.ca {
        Some(ca) if t.tls => {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| format!("--url host as a TLS name: {e}"))?;
            Some((tls_connector(ca)?, name))
        }
        _ => None,
    };
    // The first address that takes a connection (localhost may resolve to ::1 first).
    let mut conns = Vec::with_capacity(cfg.conns);
    let mut last_err = format!("{} resolved to no address", t.host);
    for addr in &addrs {
        match connect(*addr, tls.as_ref().map(|(c, n)| (c, n))).await {
            Ok(first) => {
                conns.push(first);
                for _ in 1..cfg.conns {
                    conns.push(connect(*addr, tls.as_ref().map(|(c, n)| (c, n))).await?);
                }
                break;
            }
            Err(e) => last_err = e,
        }
    }
    if conns.is_empty() {
        return Err(last_err);
    }

    let shape = Arc::new(Shape::new(&cfg)?);
    let rec = Arc::new(Mutex::new(Recorder {
        latency_us: Vec::with_capacity((cfg.rate * cfg.duration.as_secs_f64() * 1.1) as usize),
        send_late_us: Vec::with_capacity((cfg.rate * cfg.duration.as_secs_f64() * 1.1) as usize),
        ..Recorder::default()
    }));
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Every request task holds a clone; recv() returning None means all have finished.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let start = Instant::now() + Duration::from_millis(20);
    let schedule = Schedule::new(cfg.rate, conns.len(), cfg.seed);
    let duration = cfg.duration;
    let pacer = std::thread::Builder::new()
        .name("h2pace-pacer".into())
        .spawn(move || pace(schedule, start, duration, tx))
        .map_err(|e| format!("pacer thread: {e}"))?;
    while let Some(job) = rx.recv().await {
        let Some(send) = conns.get(job.conn).cloned() else {
            continue;
        };
        let (shape, rec, alive) = (shape.clone(), rec.clone(), alive_tx.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::from_std(job.due + REQUEST_TIMEOUT);
            let outcome =
                tokio::time::timeout_at(deadline, exchange(send, &shape, job.due, &rec)).await;
            let why = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(why)) => Some(why),
                Err(_) => Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
            };
            if let (Some(why), Ok(mut r)) = (why, rec.lock()) {
                r.error(why);
            }
            drop(alive);
        });
    }
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    let _ = pacer.join();
    let rec = Arc::try_unwrap(rec)
        .map_err(|_| "requests still running".to_string())?
        .into_inner()
        .map_err(|_| "recorder poisoned".to_string())?;
    for why in &rec.shown {
        eprintln!("h2pace: error: {why}");
    }
    Ok(Report::from(rec, cfg.rate, cfg.duration))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("h2pace: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("h2pace: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(report) => {
            println!("{}", report.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("h2pace: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn schedule_is_poisson_at_the_rate_and_spread_over_the_connections() {
        let (rate, conns, n) = (20_000.0, 16, 200_000);
        let mut s = Schedule::new(rate, conns, 42);
        let mut per_conn = vec![0usize; conns];
        let (mut prev, mut sum, mut sum_sq) = (Duration::ZERO, 0.0, 0.0);
        for _ in 0..n {
            let (c, at) = s.next_arrival();
            assert!(at >= prev, "arrivals go forward");
            let gap = (at - prev).as_secs_f64();
            sum += gap;
            sum_sq += gap * gap;
            prev = at;
            per_conn[c] += 1;
        }
        let mean = sum / n as f64;
        let sd = (sum_sq / n as f64 - mean * mean).sqrt();
        // Exponential gaps: mean 1/rate, standard deviation equal to the mean.
        assert!((mean * rate - 1.0).abs() < 0.01, "mean gap {mean}");
        assert!(
            (sd / mean - 1.0).abs() < 0.02,
            "coefficient of variation {}",
            sd / mean
        );
        // The last arrival lands near n / rate: the schedule does not drift.
        assert!((prev.as_secs_f64() * rate / n as f64 - 1.0).abs() < 0.01);
        let expected = n as f64 / conns as f64;
        for (c, k) in per_conn.iter().enumerate() {
            assert!(
                (*k as f64 / expected - 1.0).abs() < 0.05,
                "connection {c}: {k}"
            );
        }
    }

    #[test]
    fn schedule_is_the_same_for_a_seed_and_differs_across_seeds() {
        let take = |seed| {
            let mut s = Schedule::new(1000.0, 4, seed);
            (0..100).map(|_| s.next_arrival()).collect::<Vec<_>>()
        };
        assert_eq!(take(7), take(7));
        assert_ne!(take(7), take(8));
    }

    #[test]
    fn pacer_sends_at_the_due_times_and_stops_at_the_duration() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let duration = Duration::from_millis(300);
        pace(Schedule::new(1000.0, 2, 1), start, duration, tx);
        let mut n = 0;
        while let Ok(job) = rx.try_recv() {
            assert!(job.due < start + duration);
            assert!(job.conn < 2);
            n += 1;
        }
        // ~300 arrivals (Poisson: sd ~17); the pacer waited for the last one's time.
        assert!((200..400).contains(&n), "{n} arrivals");
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), Some(500));
        assert_eq!(percentile(&v, 90.0), Some(900));
        assert_eq!(percentile(&v, 99.0), Some(990));
        assert_eq!(percentile(&v, 99.9), Some(999));
        assert_eq!(percentile(&v, 100.0), Some(1000));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.9), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // 10 samples: p99 is the largest (rank ceil(9.9) = 10), p50 the 5th.
        let ten: Vec<u64> = (10..=100).step_by(10).collect();
        assert_eq!(percentile(&ten, 99.0), Some(100));
        assert_eq!(percentile(&ten, 50.0), Some(50));
    }

    #[test]
    fn latency_counts_from_the_scheduled_time_not_the_send() {
        let due = Instant::now();
        let sent = due + Duration::from_micros(700); // sent late
        let done = sent + Duration::from_micros(100);
        let mut rec = Recorder::default();
        rec.ok(due, sent, done);
        rec.error("status 502".into());
        let r = Report::from(rec, 10.0, Duration::from_secs(1));
        assert_eq!(r.pcts, Some([800, 800, 800, 800, 800]));
        assert_eq!(r.send_p99, Some(700));
        assert_eq!((r.requests, r.errors), (1, 1));
        assert_eq!(
            r.line(),
            "H2PACE asked=10 achieved=1.0 requests=1 errors=1 p50=800 p90=800 p99=800 p99.9=800 max=800 send_p99=700"
        );
        let empty = Report::from(Recorder::default(), 10.0, Duration::from_secs(1));
        assert!(empty.line().contains("p99=- "), "{}", empty.line());
    }

    #[test]
    fn grpc_frame_is_grpc_bench_s_ping() {
        // grpc-bench.sh: printf '\x00\x00\x00\x00\x07\x0a\x05hello'
        assert_eq!(
            &grpc_ping_frame(None)[..],
            b"\x00\x00\x00\x00\x07\x0a\x05hello"
        );
        // 200 bytes of text: a two-byte varint length (0xc8 0x01).
        let f = grpc_ping_frame(Some(200));
        assert_eq!(&f[..8], b"\x00\x00\x00\x00\xcb\x0a\xc8\x01");
        assert_eq!(f.len(), 5 + 3 + 200);
    }

    #[test]
    fn urls_and_arguments_parse_or_say_what_is_wrong() {
        let t = parse_url("https://localhost:8443/a/b?c=1").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "localhost", 8443, "/a/b?c=1")
        );
        let t = parse_url("http://[::1]:80").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 80, "/"));
        assert_eq!(parse_url("http://127.0.0.1/").unwrap().port, 80);
        for bad in [
            "ftp://x/",
            "http://:80/",
            "http://h:notaport/",
            "localhost:80",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let c = parse_args(&args(
            "--url http://127.0.0.1:9/ --rate 100 --conns 4 --duration 2.5 --grpc --seed 3",
        ))
        .unwrap();
        assert_eq!(
            (c.rate, c.conns, c.duration, c.grpc, c.seed),
            (100.0, 4, Duration::from_millis(2500), true, 3)
        );
        for (bad, says) in [
            ("--rate 1 --conns 1 --duration 1", "--url"),
            (
                "--url http://h:1/ --rate 0 --conns 1 --duration 1",
                "--rate",
            ),
            (
                "--url http://h:1/ --rate 1 --conns 0 --duration 1",
                "--conns",
            ),
            ("--url http://h:1/ --rate 1 --conns 1", "--duration"),
            ("--url https://h:1/ --rate 1 --conns 1 --duration 1", "--ca"),
            (
                "--url http://h:1/ --rate 1 --conns 1 --duration 1 --frob 2",
                "--frob",
            ),
            ("--url http://h:1/ --rate", "--rate"),
        ] {
            let e = parse_args(&args(bad)).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn cfg(url: String, grpc: bool) -> Config {
        Config {
            target: parse_url(&url).unwrap(),
            rate: 400.0,
            conns: 2,
            duration: Duration::from_millis(500),
            body: None,
            grpc,
            ca: None,
            seed: 5,
        }
    }

    #[tokio::test]
    async fn grpc_calls_to_the_bookstore_count_as_answered() {
        let backend = busbar_testkit::GrpcBackend::start(1).await;
        let url = format!("http://{}/bookstore.v1.Bookstore/Ping", backend.addr);
        let r = run(cfg(url, true)).await.unwrap();
        assert_eq!(r.errors, 0);
        // ~200 calls scheduled (Poisson, sd ~14).
        assert!((120..280).contains(&r.requests), "{r:?}");
        assert_eq!(backend.calls().len(), r.requests);
        assert!(r.pcts.is_some());
    }

    #[tokio::test]
    async fn a_call_without_grpc_status_0_is_an_error() {
        let backend = busbar_testkit::GrpcBackend::start(1).await;
        // No such method: tonic answers 200 with grpc-status 12 (UNIMPLEMENTED).
        let url = format!("http://{}/bookstore.v1.Bookstore/Nope", backend.addr);
        let r = run(cfg(url, true)).await.unwrap();
        assert_eq!(r.requests, 0);
        assert!(r.errors > 100, "{r:?}");
        assert!(r.pcts.is_none());
    }
}
