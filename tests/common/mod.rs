//! Test harness: the real busbar binary and real HTTP backends on run-time ports.
//!
//! Everything a test starts binds to 127.0.0.1 on a port the OS picked and is stopped
//! when its guard drops, also when the test fails.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod daemon;
pub mod dns;
pub mod etcd;
pub mod forwarder;
pub mod h2raw;
pub mod http1;
pub mod redis;
pub mod tls;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use backend::Backend;

/// A port that was free a moment ago, taken from below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` is handed out again as the local port of the
/// next outgoing connection (the tests make thousands): between this call and busbar's
/// bind, such a connection could take it. Below `ip_local_port_range` the kernel never
/// picks a port by itself, so a port found free there stays free unless someone asks for
/// it by number; a process-wide cursor keeps this process's tests from asking twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 10_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if low > BASE + 2_000 {
        let span = low - BASE;
        // Concurrent test processes start at different places in the range.
        let seed = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (BASE + (seed + n) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_busbar")
}

/// A running busbar process.
pub struct Busbar {
    child: Option<Child>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The registration API listener (`{registry}` in a test's own `[registry]` section).
    pub registry: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub token: String,
    /// Extra environment for the busbar process (kept across restarts).
    env: Vec<(String, String)>,
}

impl Busbar {
    /// Starts busbar on `body` (services and routes; `{dir}` is replaced by the test's
    /// temp dir), with listeners, admin and access log filled in by the harness.
    pub async fn start(body: &str) -> Busbar {
        Self::start_with_header(body, "").await
    }

    /// Like [`Busbar::start`], with extra `[listen]` keys (e.g. a `tls = [...]` line).
    pub async fn start_with_header(body: &str, listen_extra: &str) -> Busbar {
        Self::launch(body, listen_extra, &[]).await
    }

    /// Like [`Busbar::start`], with extra environment variables for the busbar process
    /// (e.g. a JWT secret named by `secret_env`).
    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> Busbar {
        Self::launch(body, "", env).await
    }

    async fn launch(body: &str, listen_extra: &str, env: &[(&str, &str)]) -> Busbar {
        let dir = tempfile::tempdir().expect("temp dir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("busbar.toml");
        let registry: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut b = Busbar {
            child: None,
            http,
            admin,
            registry,
            config,
            token: format!("test-token-{}", free_port()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        // A port can still be taken by number by another process between `free_port`
        // and busbar's bind: then busbar refuses to start, and a new set of ports is tried.
        for _ in 0..3 {
            b.write_config(body, listen_extra);
            b.spawn();
            match b.ready().await {
                Ok(()) => return b,
                Err(stderr) if stderr.contains("is already used") => {
                    b.http = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    b.admin = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                    b.registry = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                }
                Err(stderr) => panic!("{stderr}"),
            }
        }
        panic!("busbar found no free ports in three tries:\n{}", b.stderr());
    }

    pub fn header(&self, listen_extra: &str) -> String {
        format!(
            "[server]\nruntime_dir = \"{dir}\"\ngrace_period = \"10s\"\n\n[listen]\nhttp = [\"{http}\"]\nadmin = \"{admin}\"\n{listen_extra}\n\n[log]\nlevel = \"info\"\naccess = \"{dir}/access.log\"\n\n",
            dir = self.dir.path().display(),
            http = self.http,
            admin = self.admin,
        )
    }

    /// Rewrites the config file (the process keeps running until told to reload).
    /// A body without its own `[registry]` gets one on a run-time port.
    pub fn write_config(&self, body: &str, listen_extra: &str) {
        let mut body = body
            .replace("{dir}", &self.dir.path().display().to_string())
            .replace("{registry}", &self.registry.to_string());
        if !body.contains("[registry]") {
            body = format!("[registry]\nlisten = \"{}\"\n\n{body}", self.registry);
        }
        std::fs::write(&self.config, format!("{}{body}", self.header(listen_extra)))
            .expect("write config");
    }

    fn spawn(&mut self) {
        let out = std::fs::File::create(self.dir.path().join("stdout.log")).unwrap();
        let err = std::fs::File::create(self.dir.path().join("stderr.log")).unwrap();
        let child = Command::new(bin())
            .args(["run", "-c"])
            .arg(&self.config)
            .env("BUSBAR_ADMIN_TOKEN", &self.token)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start busbar");
        self.child = Some(child);
    }

    pub async fn wait_ready(&mut self) {
        if let Err(e) = self.ready().await {
            panic!("{e}");
        }
    }

    /// Waits until every listener answers; an early exit is an error with busbar's stderr.
    async fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let client = client();
        // The registration API is its own listener and may come up after the others: a
        // test that registers at once must not race it. busbar's start line says whether
        // it listens (only when some service takes registrations).
        let registration = format!("Some({})", self.registry);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "busbar exited early with {status}:\n{}",
                        self.stderr()
                    ));
                }
            }
            let ready = client
                .get(format!("http://{}/healthz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready
                && std::net::TcpStream::connect(self.http).is_ok()
                && (!self.stderr().contains(&registration)
                    || std::net::TcpStream::connect(self.registry).is_ok())
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "busbar not ready:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: libc::kill on our own child's pid.
        let rc = unsafe_kill(self.pid(), sig);
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return status.code();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// A GET on the admin API with the admin token: its reads of topology and config
    /// history (`/v1/services`, `/v1/registry`, …) need it unless `[admin] open_reads`.
    pub fn admin_get(&self, path: &str) -> reqwest::RequestBuilder {
        client().get(self.admin_url(path)).bearer_auth(&self.token)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample in `/metrics`, e.g. `busbar_requests_total{class="2xx",method="GET",reason="",route="a",service="s"}` (labels in name order).
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// The value of one sample once it equals `want`, or its last value after 5 s: the
    /// finish phase counts a request just after its answer has gone out, so a client can
    /// read the answer before the count moves.
    pub async fn metric_settled(&self, sample: &str, want: f64) -> f64 {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(sample).await;
            if v == want || Instant::now() > until {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn reload(&self) -> reqwest::Response {
        client()
            .post(self.admin_url("/v1/reload"))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("reload call")
    }
}

/// Parses one sample's value out of Prometheus text; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Busbar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // The crate forbids unsafe code; the test harness shells out instead.
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    match status {
        Ok(s) if s.success() => 0,
        _ => -1,
    }
}

/// A client that never reuses a pooled connection across tests and has a sane timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends `req` and parses the answer as JSON (panics, naming the URL, on any failure).
pub async fn get_json(req: reqwest::RequestBuilder) -> serde_json::Value {
    let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let url = r.url().clone();
    r.json()
        .await
        .unwrap_or_else(|e| panic!("JSON from {url}: {e}"))
}

pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap()
}

/// Runs `busbar check` on a file.
pub fn check(path: &Path) -> std::process::Output {
    Command::new(bin())
        .arg("check")
        .arg(path)
        .output()
        .expect("busbar check")
}

pub const SIGHUP: i32 = 1;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

impl Busbar {
    /// Kills the process with SIGKILL (no drain, no snapshot flush) and starts it again
    /// on the same config, ports and directory.
    pub async fn kill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn();
        self.wait_ready().await;
    }

    pub fn registry_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry)
    }
}

/// A config of one service `s` at `addr` and one route `all` to it: `sections` (e.g. a
/// `[limits]` table) before them, `service_extra` (e.g. `protocol = "h2c"`) in the service.
pub fn one_route(addr: SocketAddr, sections: &str, service_extra: &str) -> String {
    format!(
        r#"
{sections}

[[service]]
name = "s"
{service_extra}
endpoints = [{{ addr = "{addr}" }}]
[[route]]
name = "all"
service = "s"
"#
    )
}

/// SHA-256 of a token, hex, for `token_sha256` in a test config.
pub fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Connects the way a client does that resolved one name to several addresses (curl, Go,
/// Envoy with DNS A records): tries `addrs` in order from `start`, moving on to the next
/// when a connect is refused, fails or takes over 2 s. Returns the addresses that failed
/// (index, why) and the index and stream of the one that took the connection, if any did.
pub async fn connect_first(
    addrs: &[SocketAddr],
    start: usize,
) -> (
    Vec<(usize, std::io::Error)>,
    Option<(usize, tokio::net::TcpStream)>,
) {
    let mut failed = Vec::new();
    for k in 0..addrs.len() {
        let i = (start + k) % addrs.len();
        let connect = tokio::net::TcpStream::connect(addrs[i]);
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(s)) => return (failed, Some((i, s))),
            Ok(Err(e)) => failed.push((i, e)),
            Err(_) => failed.push((i, std::io::ErrorKind::TimedOut.into())),
        }
    }
    (failed, None)
}

/// Reads from `s` into `buf` until `buf` holds a whole HTTP head; the offset just past its
/// blank line, or `None` when the peer closes (or fails) first. For raw test upstreams.
pub async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// The `Content-Length` of an HTTP/1.1 head (0 when it has none).
pub fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reads one HTTP/1.1 answer framed by its `Content-Length` (none: no body) from `s`,
/// each read within `within`: the answer's bytes, head and body. `got` holds what was
/// read before and keeps what was read past the answer (the next pipelined one).
pub async fn read_answer<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    got: &mut Vec<u8>,
    within: Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let len = content_length(&got[..end]);
            if got.len() >= end + 4 + len {
                return got.drain(..end + 4 + len).collect();
            }
        }
        let n = tokio::time::timeout(within, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer in time; got {:?}", String::from_utf8_lossy(got)))
            .expect("read");
        assert!(
            n > 0,
            "closed mid-answer after {} bytes: {}",
            got.len(),
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// 1-based line and column (in characters, as busbar's config errors count them) of the
/// byte offset `at` in `text`.
pub fn line_col_at(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    (line, col)
}

/// 1-based line and column (in characters) where `needle` first occurs in `text`.
pub fn line_col(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"));
    line_col_at(text, at)
}

/// A field of `/proc/<pid>/status` in its unit (kB for sizes), if the kernel has it.
pub fn status_field(pid: i32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The resident memory of process `pid` (`VmRSS`), in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS").expect("VmRSS in /proc/<pid>/status")
}

/// Polls `done` every 20 ms until it holds or `within` has passed; returns whether it held.
pub async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Services `orders` and `payments` that take registrations, each with a route on its
/// path prefix: what the registration tests register into (append a `[registry]`).
pub const ORDERS_AND_PAYMENTS: &str = r#"
[[service]]
name = "orders"
registration = true
[[service]]
name = "payments"
registration = true

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[[route]]
name = "payments"
path_prefix = "/payments"
service = "payments"
"#;
