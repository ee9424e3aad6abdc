//! `busbar check` says what is wrong with a file, passes a right one without the
//! production host's DNS or secrets (warning about them), and every shipped config
//! stands alone in `conf/`.

mod common;

use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{client, Busbar};

fn check(args: &[&str], path: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(common::bin())
        .arg("check")
        .args(args)
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("busbar check")
}

/// `busbar run` on a file it must refuse: its exit status and stderr (killed after 15 s).
fn run_refused(path: &Path) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(common::bin())
        .args(["run", "-c"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("busbar run");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(err).unwrap())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const UNSET_TOKEN: &str = "BUSBAR_CHECK_TEST_UNSET_TOKEN";
const UNSET_SECRET: &str = "BUSBAR_CHECK_TEST_UNSET_SECRET";

fn needs_host(port: u16) -> String {
    format!(
        r#"[listen]
http = ["127.0.0.1:{port}"]
admin = "127.0.0.1:0"

[registry]
listen = "127.0.0.1:0"
[[registry.token]]
token_env = "{UNSET_TOKEN}"
services = ["orders"]

[auth]
[[auth.jwt]]
name = "corp"
algorithm = "HS256"
secret_env = "{UNSET_SECRET}"

[[service]]
name = "orders"
endpoints = [{{ addr = "127.0.0.1:9101" }}, {{ addr = "orders.invalid:9102" }}]

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[route.admission]
identity = ["jwt:corp"]
"#
    )
}

#[test]
fn check_warns_of_what_only_the_host_provides_and_run_refuses_the_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("busbar.toml");
    let src = needs_host(common::free_port());
    std::fs::write(&file, &src).unwrap();
    let at = |needle: &str| {
        let (l, c) = common::line_col(&src, needle);
        format!("{}:{l}:{c}: ", file.display())
    };
    let dns = format!(
        "{}service \"orders\": host \"orders.invalid\" does not resolve (",
        at("\"orders.invalid:9102\"")
    );
    let token = format!(
        "{}[[registry.token]]: environment variable {UNSET_TOKEN} is not set",
        at(&format!("\"{UNSET_TOKEN}\""))
    );
    let secret = at(&format!("\"{UNSET_SECRET}\""));

    // `check`: the file is right; what this host lacks is a warning, with its place.
    let out = check(&[], &file, &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(": ok (1 services, 1 routes; 3 warnings"),
        "{stdout}"
    );
    for want in [&dns, &token, &secret] {
        assert!(
            stderr.contains(&format!("warning: {want}")),
            "{stderr:?} lacks {want:?}"
        );
    }
    assert!(stderr.contains(UNSET_SECRET), "{stderr}");
    assert!(!stderr.contains("not an address of the form"), "{stderr}");

    // `check --strict` holds the file to what `run` needs.
    let out = check(&["--strict"], &file, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("refused (--strict): 3 warnings"),
        "{}",
        text(&out.stderr)
    );

    // The secrets set: only the name is left to warn about.
    let env = [
        (UNSET_TOKEN, "a-registration-token"),
        (UNSET_SECRET, "a-secret-of-at-least-16-bytes"),
    ];
    let out = check(&[], &file, &env);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("; 1 warning"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stderr).contains("is not set"),
        "{}",
        text(&out.stderr)
    );

    // `run` refuses the same file: the unset secrets are errors. The name is not: `run`
    // resolves endpoint names in the background and keeps trying (issue 27).
    let (status, stderr) = run_refused(&file);
    assert!(matches!(status, Some(c) if c != 0), "{status:?}: {stderr}");
    for want in [&token, &secret] {
        assert!(stderr.contains(want.as_str()), "{stderr:?} lacks {want:?}");
    }
    assert!(!stderr.contains(dns.as_str()), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn a_malformed_address_is_an_error_not_a_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("busbar.toml");
    let src = needs_host(common::free_port()).replace("orders.invalid:9102", "orders.invalid");
    std::fs::write(&file, &src).unwrap();
    let out = check(&[], &file, &[]);
    assert!(!out.status.success());
    let (l, c) = common::line_col(&src, "\"orders.invalid\"");
    let want = format!(
        "{}:{l}:{c}: service \"orders\": \"orders.invalid\" is not an address of the form host:port",
        file.display()
    );
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_an_unset_secret() {
    let route = r#"
[[service]]
name = "orders"
endpoints = [{ addr = "127.0.0.1:9101" }]
[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
"#;
    let bus = Busbar::start(route).await;
    let with_token = format!(
        "[registry]\nlisten = \"{{registry}}\"\n[[registry.token]]\ntoken_env = \"{UNSET_TOKEN}\"\nservices = [\"orders\"]\n{route}"
    );
    bus.write_config(&with_token, "");
    let r = bus.reload().await;
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(
        body.contains(&format!("environment variable {UNSET_TOKEN} is not set")),
        "{body}"
    );
    // Still serving the old config.
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_ne!(r.status(), 404);
}

/// Every `.toml` under `dir`, recursively.
fn tomls(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            tomls(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// `path` relative to `base`, with `.` and `..` resolved by name alone.
fn lexical_join(base: &Path, path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Every string in a TOML value.
fn strings(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

#[test]
fn shipped_configs_stand_alone_in_conf() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = root.join("conf");
    let mut files = Vec::new();
    tomls(&conf, &mut files);
    assert!(files.len() >= 2, "{files:?}");

    // No relative path climbs out of conf/.
    for f in &files {
        let v: toml::Value = toml::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let mut all = Vec::new();
        strings(&v, &mut all);
        for s in all.iter().filter(|s| s.contains("..")) {
            let to = lexical_join(f.parent().unwrap(), s);
            assert!(
                to.starts_with(&conf),
                "{} refers to {s}, outside conf/",
                f.display()
            );
        }
    }

    // A copy of conf/ alone, away from the source tree, passes `check`.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("conf");
    copy_tree(&conf, &copy);
    let mut copied = Vec::new();
    tomls(&copy, &mut copied);
    assert_eq!(copied.len(), files.len());
    for f in &copied {
        let out = check(&["--strict"], f, &[]);
        assert!(
            out.status.success() && text(&out.stdout).contains(": ok ("),
            "{}: {}",
            f.display(),
            text(&out.stderr)
        );
    }

    // The example's proto is the one the translation tests use (past its header).
    let body = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap();
        t[t.find("syntax =").unwrap()..].to_string()
    };
    assert_eq!(
        body(&conf.join("protos/bookstore.proto")),
        body(&root.join("tests/protos/bookstore.proto"))
    );
}

/// A DNS server that never answers (in a network and mount namespace of its own, where
/// /etc/resolv.conf names a UDP socket nobody reads): `check` gives up on the first name
/// after 3 s, asks nothing more, and passes with warnings. Skipped where namespaces or
/// python3 are not available.
#[test]
fn check_does_not_wait_on_a_silent_dns() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("busbar.toml");
    let src = format!(
        r#"[listen]
http = ["127.0.0.1:{port}"]

[[service]]
name = "orders"
endpoints = [{{ addr = "orders.internal:9102" }}, {{ addr = "pay.internal:9102" }}]

[[route]]
name = "orders"
service = "orders"
"#,
        port = common::free_port()
    );
    std::fs::write(&file, &src).unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:5\n",
    )
    .unwrap();
    let script = format!(
        "ip link set lo up && mount --bind {resolv} /etc/resolv.conf || exit 77
python3 -c 'import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((\"127.0.0.1\",53)); time.sleep(60)' &
sleep 0.5
kill -0 $! || exit 77
{bin} check {file}
code=$?
kill $!
exit $code",
        resolv = resolv.display(),
        bin = common::bin(),
        file = file.display()
    );
    let started = Instant::now();
    let out = match Command::new("unshare")
        .args(["-m", "-n", "sh", "-c", &script])
        .output()
    {
        Ok(o) if o.status.code() != Some(77) && !text(&o.stderr).contains("unshare:") => o,
        other => {
            eprintln!("skipped: no namespaces or python3 here ({other:?})");
            return;
        }
    };
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("host \"orders.internal\" does not resolve (DNS did not answer within 3s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "host \"pay.internal\" does not resolve (not looked up: DNS did not answer for an earlier name)"
        ),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}
