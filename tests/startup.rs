//! Start-up: a listener that cannot start (a certificate that can't be loaded, an address
//! in use) stops busbar with a clear error and a non-zero exit before it says it started,
//! `busbar check` refuses such certificates at their file:line:col, and a service that
//! dies after start-up (here: the registration listener after a graceful upgrade) ends
//! the process instead of leaving the rest serving.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{client, free_port, get_json, sha256_hex, Backend, Busbar};
use serde_json::json;

const SIGQUIT: i32 = 3;
const ORDERS_TOKEN: &str = "orders-secret-token";

/// A self-signed certificate and its key, written as `name.crt` and `name.key` in `dir`.
fn cert_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A whole configuration: `listen` is the `[listen]` table's body, `extra` goes at the end.
fn config(dir: &Path, listen: &str, extra: &str) -> String {
    format!(
        r#"[server]
runtime_dir = "{dir}"
grace_period = "2s"

[listen]
{listen}

[log]
access = "off"

[[service]]
name = "s"
endpoints = [{{ addr = "127.0.0.1:9" }}]
[[route]]
name = "r"
service = "s"
{extra}"#,
        dir = dir.display()
    )
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `busbar run` on `text`, killed (by its pid) if it has not exited within `within`.
/// Returns its exit code (`None`: still running, killed), stderr, and how long it ran.
fn run_for(dir: &Path, text: &str, within: Duration) -> (Option<i32>, String, Duration) {
    let path = dir.join("busbar.toml");
    std::fs::write(&path, text).unwrap();
    let err = dir.join("run.stderr");
    let started = Instant::now();
    let mut child = Command::new(common::bin())
        .args(["run", "-c"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start busbar");
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    (
        code,
        std::fs::read_to_string(&err).unwrap_or_default(),
        took,
    )
}

fn check(path: &Path) -> Output {
    common::check(path)
}

#[test]
fn check_refuses_a_missing_unreadable_or_mismatched_certificate_at_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let (a_crt, a_key) = cert_pair(dir.path(), "a");
    let (_, b_key) = cert_pair(dir.path(), "b");
    let missing = dir.path().join("missing.crt");
    let a_directory = dir.path().join("certs.d");
    std::fs::create_dir(&a_directory).unwrap();
    let tls = |cert: &Path, key: &Path| {
        format!(
            "http = [\"127.0.0.1:18080\"]\ntls = [{{ addr = \"127.0.0.1:18443\", cert = \"{}\", key = \"{}\" }}]",
            cert.display(),
            key.display()
        )
    };
    let file = dir.path().join("busbar.toml");

    // (certificate, key, which value the error points at, what it says)
    let cases: [(&Path, &Path, &Path, &str); 3] = [
        (&missing, &a_key, &missing, "cannot read"),
        (&a_directory, &a_key, &a_directory, "cannot read"),
        (&a_crt, &b_key, &b_key, "does not belong to certificate"),
    ];
    for (cert, key, at, says) in cases {
        let text = config(dir.path(), &tls(cert, key), "");
        std::fs::write(&file, &text).unwrap();
        let out = check(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cert:?} + {key:?} passed check");
        let (line, col) = common::line_col(&text, &format!("\"{}\"", at.display()));
        let expected = format!("{}:{line}:{col}: [listen]: ", file.display());
        assert!(
            stderr.contains(&expected) && stderr.contains(says),
            "{cert:?} + {key:?}: {stderr:?} lacks {expected:?} … {says:?}"
        );
    }

    std::fs::write(&file, config(dir.path(), &tls(&a_crt, &a_key), "")).unwrap();
    let out = check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_certificate_stops_busbar_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (a_crt, _) = cert_pair(dir.path(), "a");
    let (_, b_key) = cert_pair(dir.path(), "b");
    let missing = dir.path().join("missing.crt");
    for (cert, key) in [(&missing, &b_key), (&a_crt, &b_key)] {
        let listen = format!(
            "http = [\"{}\"]\nadmin = \"{}\"\ntls = [{{ addr = \"{}\", cert = \"{}\", key = \"{}\" }}]",
            addr(),
            addr(),
            addr(),
            cert.display(),
            key.display()
        );
        let (code, stderr, took) = run_for(
            dir.path(),
            &config(dir.path(), &listen, ""),
            Duration::from_secs(15),
        );
        assert!(
            code.is_some_and(|c| c != 0),
            "{cert:?} + {key:?}: exit {code:?} after {took:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("busbar started"),
            "said it started:\n{stderr}"
        );
        let named = if cert == &missing { cert } else { key };
        assert!(
            stderr.contains("busbar.toml:") && stderr.contains(&*named.display().to_string()),
            "the error names the file and the certificate or key:\n{stderr}"
        );
    }
}

#[test]
fn an_address_in_use_stops_busbar_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = cert_pair(dir.path(), "a");
    let registration = "\n[[service]]\nname = \"orders\"\nregistration = true\n";
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    let (http, admin) = (addr(), addr());
    let tls_line = |a: SocketAddr| {
        format!(
            "tls = [{{ addr = \"{a}\", cert = \"{}\", key = \"{}\" }}]",
            crt.display(),
            key.display()
        )
    };
    // (what is busy, [listen] body, the rest)
    let cases = [
        (
            "http",
            format!("http = [\"{busy}\"]\nadmin = \"{admin}\""),
            String::new(),
        ),
        (
            "tls",
            format!(
                "http = [\"{http}\"]\nadmin = \"{admin}\"\n{}",
                tls_line(busy)
            ),
            String::new(),
        ),
        (
            "admin",
            format!("http = [\"{http}\"]\nadmin = \"{busy}\""),
            String::new(),
        ),
        (
            "registration",
            format!("http = [\"{http}\"]\nadmin = \"{admin}\""),
            format!("{registration}\n[registry]\nlisten = \"{busy}\"\n"),
        ),
    ];
    for (what, listen, extra) in cases {
        let (code, stderr, took) = run_for(
            dir.path(),
            &config(dir.path(), &listen, &extra),
            Duration::from_secs(15),
        );
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: exit {code:?} after {took:?}:\n{stderr}"
        );
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        assert!(
            !stderr.contains("busbar started"),
            "{what}: said it started:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("cannot listen on {busy}")),
            "{what}: the error names {busy}:\n{stderr}"
        );
    }

    // Busy with busbar's own service listener.
    drop(held);
    let listen = format!("http = [\"{busy}\"]\nadmin = \"{admin}\"");
    let extra = format!("{registration}\n[registry]\nlisten = \"{busy}\"\n");
    let (code, stderr, took) = run_for(
        dir.path(),
        &config(dir.path(), &listen, &extra),
        Duration::from_secs(15),
    );
    assert!(
        code.is_some_and(|c| c != 0),
        "registry.listen on the service port: exit {code:?} after {took:?}:\n{stderr}"
    );
    assert!(!stderr.contains("busbar started"), "{stderr}");
    assert!(stderr.contains(&busy.to_string()), "{stderr}");
}

/// A registration service and its token; the registration API on `{registry}`.
fn registration_body(backend: SocketAddr, registry: &str) -> String {
    format!(
        r#"
[registry]
listen = "{registry}"
[[registry.token]]
token_sha256 = "{token}"
services = ["orders"]

[[service]]
name = "orders"
registration = true
[[service]]
name = "static"
endpoints = [{{ addr = "{backend}" }}]

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[[route]]
name = "static"
service = "static"
"#,
        token = sha256_hex(ORDERS_TOKEN),
    )
}

/// The process a graceful upgrade started; killed (by its pid) when dropped.
struct Upgraded {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Upgraded {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `busbar run --upgrade` on `bus`'s config file (as rewritten by the test), then
/// sends SIGQUIT to `bus` once the new process waits for its sockets.
async fn upgrade(bus: &mut Busbar) -> Upgraded {
    let err = bus.dir.path().join("upgraded.stderr");
    let child = Command::new(common::bin())
        .args(["run", "-u", "-c"])
        .arg(&bus.config)
        .env("BUSBAR_ADMIN_TOKEN", &bus.token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start busbar --upgrade");
    let sock = bus
        .dir
        .path()
        .join(format!("busbar-{}.upgrade.sock", bus.http.port()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never waited for the sockets:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.signal(SIGQUIT);
    Upgraded { child, stderr: err }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_api_carries_on_after_a_graceful_upgrade() {
    let backend = Backend::start("static").await;
    let app = Backend::start("orders-1").await;
    let mut bus = Busbar::start(&registration_body(backend.addr, "{registry}")).await;
    let mut new = upgrade(&mut bus).await;
    let old_exit = bus.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        old_exit,
        Some(0),
        "the old process drains and exits:\n{}",
        bus.stderr()
    );

    // The new process listens where the old one did, and takes registrations.
    let deadline = Instant::now() + Duration::from_secs(15);
    let registered = loop {
        let r = client()
            .put(bus.registry_url("/v1/services/orders/instances/o1"))
            .bearer_auth(ORDERS_TOKEN)
            .json(&json!({ "address": app.addr.to_string(), "ttl": 30 }))
            .send()
            .await;
        if let Ok(r) = r {
            break r.status();
        }
        if let Some(code) = new.wait_exit(Duration::ZERO).await {
            panic!("the new process exited with {code}:\n{}", new.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "no registration API after the upgrade:\n{}",
            new.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(registered, 200);
    // The service listener, which the new process's pingora accepts on, answers too.
    let r = client().get(bus.url("/orders/x")).send().await;
    let r = r.unwrap_or_else(|e| panic!("{e}:\n{}", new.stderr()));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "orders-1");
    let r = client().get(bus.url("/static")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "static");
    let registry = get_json(bus.admin_get("/v1/registry")).await;
    assert_eq!(registry["listen"], bus.registry.to_string(), "{registry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_start_after_an_upgrade_stops_busbar() {
    let backend = Backend::start("static").await;
    let mut bus = Busbar::start(&registration_body(backend.addr, "{registry}")).await;
    // The new process's registration address is held by someone else.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    bus.write_config(&registration_body(backend.addr, &busy.to_string()), "");
    let mut new = upgrade(&mut bus).await;
    let started = Instant::now();
    // It tries for `UPGRADE_BIND_WAIT` (15 s), in case the old process holds the address.
    let code = new.wait_exit(Duration::from_secs(40)).await;
    let stderr = new.stderr();
    assert!(
        code.is_some_and(|c| c != 0),
        "the new process did not stop (exit {code:?} after {:?}):\n{stderr}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!("cannot listen on {busy}")),
        "the error names {busy}:\n{stderr}"
    );
    assert!(stderr.contains("busbar exits"), "{stderr}");
    drop(held);
}
