//! What an operator of an installed busbar uses (issue 26): `busbar --version`, the config
//! file found the same way by every command, `busbar reload` and `busbar status` against a
//! running node, `/livez` and `/readyz`, the state folder's default and its lock, and the
//! graceful upgrade on SIGUSR2 with systemd's notify protocol.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, client, free_port, get_json, one_route, Backend, Busbar};

const SIGUSR2: i32 = 12;

fn busbar(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("BUSBAR_CONFIG")
        .env_remove("BUSBAR_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run busbar")
}

/// Waits for `/readyz` to answer 200: the harness waits for the listeners, the node's
/// own probe of them may take a moment longer (a loaded machine).
async fn ready(bus: &Busbar) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client().get(bus.admin_url("/readyz")).send().await.unwrap();
        if r.status() == 200 {
            return;
        }
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["status"], "starting", "{v}");
        assert!(Instant::now() < deadline, "not ready within 20 s: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let o = busbar(&["--version"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // "busbar 0.1.0 (commit 0123456789ab, built 2026-01-31)"
    let rest = line
        .strip_prefix(&format!("busbar {} (commit ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("no version and commit in {line:?}"));
    let (commit, rest) = rest.split_once(", built ").expect("a build date");
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "commit {commit:?} in {line:?}"
    );
    let date = rest.strip_suffix(')').expect("closing parenthesis");
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()) && parts[0].len() == 4,
        "build date {date:?} in {line:?}"
    );
    // Built from this checkout: the commit is its HEAD.
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        if head.status.success() {
            assert_eq!(commit, String::from_utf8_lossy(&head.stdout).trim());
        }
    }
}

#[test]
fn check_takes_the_config_like_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &good,
        format!(
            "[listen]\nhttp = [\"127.0.0.1:{}\"]\n{}",
            free_port(),
            one_route("127.0.0.1:9".parse().unwrap(), "", "")
        ),
    )
    .unwrap();
    std::fs::write(&bad, "[listen]\nhttp = [\"127.0.0.1:1\"]\nbogus = 1\n").unwrap();
    let good_s = good.to_str().unwrap();
    let bad_s = bad.to_str().unwrap();

    // -c FILE, BUSBAR_CONFIG, and the old positional form.
    for o in [
        busbar(&["check", "-c", good_s], &[]),
        busbar(&["check"], &[("BUSBAR_CONFIG", good_s)]),
        busbar(&["check", good_s], &[]),
    ] {
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("good.toml: ok"),
            "{}",
            text(&o)
        );
    }
    // The flag wins over the environment.
    let o = busbar(&["check", "-c", bad_s], &[("BUSBAR_CONFIG", good_s)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.toml:3:1"),
        "{}",
        text(&o)
    );
    // A run on a config it cannot load says so and stops.
    let o = busbar(&["run"], &[("BUSBAR_CONFIG", bad_s)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.toml:3:1"),
        "{}",
        text(&o)
    );
}

#[tokio::test]
async fn reload_and_status_talk_to_the_running_node() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr, "", "")).await;
    ready(&bus).await;
    let config = bus.config.to_str().unwrap().to_string();

    // The node's topology reads need its token: status sends BUSBAR_ADMIN_TOKEN.
    let o = busbar(
        &["status", "-c", &config],
        &[("BUSBAR_ADMIN_TOKEN", &bus.token)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("busbar at {}: ready", bus.admin)),
        "{out}"
    );
    assert!(out.contains(&format!("pid {}", bus.pid())), "{out}");
    assert!(out.contains("service s: 1/1 instances healthy"), "{out}");
    assert!(
        out.contains("registry embedded: 0 registered instances"),
        "{out}"
    );
    // The admin address can be given instead of the config.
    let o = busbar(
        &["status", "--admin", &bus.admin.to_string()],
        &[("BUSBAR_ADMIN_TOKEN", &bus.token)],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("service s: 1/1 instances healthy"),
        "{}",
        text(&o)
    );
    // Without the token: the node's readiness and build, and why the rest is missing.
    let o = busbar(&["status", "-c", &config], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains(": ready"), "{out}");
    assert!(!out.contains("service s:"), "{out}");
    assert!(
        out.contains("not shown") && out.contains("401") && out.contains("BUSBAR_ADMIN_TOKEN"),
        "{out}"
    );

    // No token: refused, and told where the token comes from.
    let o = busbar(&["reload", "-c", &config], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("401") && err.contains("BUSBAR_ADMIN_TOKEN"),
        "{err}"
    );
    assert_eq!(
        bus.metric("busbar_config_reloads_total{result=\"ok\"}")
            .await,
        0.0
    );

    // With the token (config from BUSBAR_CONFIG): reloaded, and the node counts it.
    let o = busbar(
        &["reload"],
        &[
            ("BUSBAR_CONFIG", &config),
            ("BUSBAR_ADMIN_TOKEN", &bus.token),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("reloaded: configuration generation 2"),
        "{}",
        text(&o)
    );
    assert_eq!(
        bus.metric("busbar_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );

    // A file that no longer loads: the node refuses it, and so does the command.
    std::fs::write(&bus.config, "[listen]\nhttp = []\nnope = 1\n").unwrap();
    let o = busbar(
        &["reload", "--admin", &bus.admin.to_string()],
        &[("BUSBAR_ADMIN_TOKEN", &bus.token)],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reload refused (400)"),
        "{}",
        text(&o)
    );
}

#[tokio::test]
async fn status_needs_none_of_the_secrets_the_config_names() {
    let backend = Backend::start("b").await;
    let body = format!(
        "[registry]\nlisten = \"{{registry}}\"\n[[registry.token]]\ntoken_env = \"BUSBAR_TOKEN_OPS_TEST\"\nservices = [\"s\"]\n{}",
        one_route(backend.addr, "", "registration = true")
    );
    let bus = Busbar::start_with_env(&body, &[("BUSBAR_TOKEN_OPS_TEST", "x")]).await;
    ready(&bus).await;
    // The operator's shell has no BUSBAR_TOKEN_OPS_TEST: check only warns, --strict
    // refuses the file...
    let config = bus.config.to_str().unwrap().to_string();
    let o = busbar(&["check", "-c", &config], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("BUSBAR_TOKEN_OPS_TEST is not set"),
        "{}",
        text(&o)
    );
    let o = busbar(&["check", "--strict", "-c", &config], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    // ...but status and reload only need listen.admin to find the node.
    let o = busbar(&["status", "-c", &config], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = busbar(
        &["reload", "-c", &config],
        &[("BUSBAR_ADMIN_TOKEN", &bus.token)],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn status_says_when_no_node_answers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let o = busbar(&["status", "--admin", &addr], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains(&format!("cannot reach the admin API at {addr}")),
        "{}",
        text(&o)
    );
}

#[tokio::test]
async fn livez_and_readyz_answer_for_load_balancers() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr, "", "")).await;
    let r = client().get(bus.admin_url("/livez")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // 503 "starting" until every listener accepts, then 200.
    ready(&bus).await;
    let r = client().get(bus.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(v["pid"], bus.pid(), "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["generation"], 1, "{v}");
    let r = client()
        .post(bus.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

/// A busbar started on a config of our own (the harness always sets `runtime_dir`).
struct Node {
    child: Child,
    stderr: PathBuf,
}

impl Node {
    fn start(config: &Path, env: &[(&str, &str)]) -> Node {
        let stderr = config.with_extension("stderr");
        let child = Command::new(bin())
            .args(["run", "-c"])
            .arg(config)
            .env_remove("STATE_DIRECTORY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start busbar");
        Node { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn wait_ready(&mut self, admin: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("busbar exited with {s}:\n{}", self.stderr());
            }
            if let Ok(r) = client().get(format!("http://{admin}/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_config(dir: &Path, name: &str, backend: std::net::SocketAddr) -> (PathBuf, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[listen]\nhttp = [\"127.0.0.1:{}\"]\nadmin = \"{admin}\"\n[log]\naccess = \"off\"\n{}",
            free_port(),
            one_route(backend, "", "")
        ),
    )
    .unwrap();
    (path, admin)
}

#[tokio::test]
async fn the_state_folder_defaults_beside_the_config_and_a_second_node_is_refused() {
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let (a, a_admin) = node_config(dir.path(), "a", backend.addr);
    let (b, b_admin) = node_config(dir.path(), "b", backend.addr);

    let mut first = Node::start(&a, &[("BUSBAR_ADMIN_TOKEN", "node-a")]);
    first.wait_ready(&a_admin).await;
    // Not the system temp folder: .busbar/ beside the config, locked by the running node.
    let state = dir.path().join(".busbar");
    let lock = std::fs::read_to_string(state.join("busbar.lock")).expect("busbar.lock");
    assert_eq!(lock.trim(), first.child.id().to_string());
    let registry = get_json(
        client()
            .get(format!("http://{a_admin}/v1/registry"))
            .bearer_auth("node-a"),
    )
    .await;
    assert_eq!(
        registry["snapshot"],
        state.join("busbar-registry.json").display().to_string()
    );

    // Another node whose config sits in the same folder: refused, with the reason.
    let mut second = Node::start(&b, &[]);
    let code = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        code,
        Some(1),
        "second node still running or wrong exit:\n{}",
        second.stderr()
    );
    let err = second.stderr();
    assert!(
        err.contains(&format!(
            "{} is in use by another busbar (pid {})",
            state.display(),
            first.child.id()
        )),
        "{err}"
    );

    // Given its own folder (as systemd's StateDirectory= does), it starts.
    let own = dir.path().join("state-b");
    let own_s = own.to_str().unwrap().to_string();
    let mut second = Node::start(&b, &[("STATE_DIRECTORY", &own_s)]);
    second.wait_ready(&b_admin).await;
    let lock = std::fs::read_to_string(own.join("busbar.lock")).expect("busbar.lock");
    assert_eq!(lock.trim(), second.child.id().to_string());
}

/// Kills a process this test did not spawn (the upgrade's successor), by pid.
struct Successor(Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

/// The next notify message that names a MAINPID, within `within` (off the runtime's
/// threads: the socket blocks).
async fn next_main_pid(sock: &UnixDatagram, within: Duration) -> Option<(u32, String)> {
    let sock = sock.try_clone().expect("clone the notify socket");
    tokio::task::spawn_blocking(move || recv_main_pid(&sock, within))
        .await
        .expect("notify reader")
}

fn recv_main_pid(sock: &UnixDatagram, within: Duration) -> Option<(u32, String)> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(pid) = msg
                .lines()
                .find_map(|l| l.strip_prefix("MAINPID="))
                .and_then(|p| p.parse().ok())
            {
                return Some((pid, msg));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_listeners_to_a_new_process_without_failing_a_request() {
    let backend = Backend::start("b").await;
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let body = one_route(backend.addr, "", "");
    let mut bus =
        Busbar::start_with_env(&body, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]).await;
    let old = bus.pid() as u32;

    // systemd hears READY=1 with this process as the unit's main process.
    let (pid, msg) = next_main_pid(&notify, Duration::from_secs(20))
        .await
        .expect("a READY=1 notification");
    assert_eq!(pid, old, "{msg}");
    assert!(msg.contains("READY=1"), "{msg}");

    // A config that does not load cancels the upgrade; the old process keeps serving.
    std::fs::write(&bus.config, "[listen]\nbroken = true\n").unwrap();
    bus.signal(SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bus.stderr().contains("upgrade cancelled") {
        assert!(
            Instant::now() < deadline,
            "no cancellation:\n{}",
            bus.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client().get(bus.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    bus.write_config(&body, "");

    // Requests on fresh connections all along the handover.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), bus.url("/x"));
        tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(20))
                .no_proxy()
                .build()
                .unwrap();
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    bus.signal(SIGUSR2);
    let mut successor = Successor(None);
    let (new, msg) = next_main_pid(&notify, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no READY=1 from a successor:\n{}", bus.stderr()));
    successor.0 = Some(new);
    assert_ne!(new, old, "{msg}");
    assert!(msg.contains("READY=1"), "{msg}");

    // The old process drains and exits 0; the new one serves.
    let code = bus.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "old process:\n{}", bus.stderr());
    let before = ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok.load(Ordering::Relaxed) < before + 20 {
        assert!(
            Instant::now() < deadline,
            "the new process serves nothing ({} ok, {} failed):\n{}",
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            bus.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let errors = load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during the handover: {errors:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 40, "too few requests to judge");
    let v = get_json(client().get(bus.admin_url("/readyz"))).await;
    assert_eq!(v["pid"], new, "{v}");
    assert!(alive(new));
    // The successor took the state folder's lock when the old process let it go.
    let lock = bus.dir.path().join("busbar.lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != new.to_string() {
        assert!(
            Instant::now() < deadline,
            "the successor does not hold {}",
            lock.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stopped by pid like systemd would: SIGTERM, then it is gone.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(new.to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(new) {
        assert!(
            Instant::now() < deadline,
            "the successor did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    successor.0 = None;
    println!(
        "handover: {} requests answered, 0 failed; old pid {old} exited 0, new pid {new}",
        ok.load(Ordering::Relaxed)
    );
}
