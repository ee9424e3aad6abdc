//! The console at `/console/` driven in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`) through WebDriver: the overview of a started node, a registered
//! instance on the services page, a gray release's weights, Roll back with its
//! confirmation (checked by requests through busbar), a wrong token, a refused reload's
//! file:line:col; and the console's headers and token checks without a browser.
//! Screenshots of each page go to `target/console-screenshots/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, free_port, sha256_hex, Backend, Busbar};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page may take to show something on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(45);

/// One browser at a time: several Chromiums at once on two shared cores only slow
/// each other past their deadlines.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// chromedriver on a run-time port, and the Chromium it drives, stopped by pid.
struct Browser {
    driver: Option<Child>,
    profile: tempfile::TempDir,
    client: Option<Client>,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("driver log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("driver log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMEDRIVER}: {e} (apt-get install chromium-driver)"));
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver: Some(driver),
            profile,
            client: None,
        };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", b.profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => {
                    b.client = Some(c);
                    return b;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "no WebDriver session: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn client(&self) -> Client {
        self.client.clone().expect("a session")
    }

    /// Ends the session (chromedriver closes Chromium), then chromedriver.
    async fn stop(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), c.close()).await;
        }
        self.kill();
    }

    /// chromedriver by its pid, then any Chromium still running on this test's own
    /// profile folder (found by that folder in its command line, killed by pid).
    fn kill(&mut self) {
        if let Some(mut d) = self.driver.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let mark = format!("--user-data-dir={}", self.profile.path().display());
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&mark) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `body` with a browser on the console and always ends the browser, also when the
/// body fails (its panic is raised again after).
async fn with_browser<F, Fut>(body: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _one = ONE_BROWSER.lock().await;
    let browser = Browser::start().await;
    let outcome = tokio::spawn(body(browser.client())).await;
    browser.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The text of the first element matching `css` once `ok` accepts it; panics after
/// [`PATIENCE`] with the last text seen.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        if Instant::now() > deadline {
            let banner = match c.find(Locator::Css("#banner")).await {
                Ok(b) => b.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!(
                "{css}: not as expected within {PATIENCE:?}; last text {last:?}; banner {banner:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if e.click().await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{css}: nothing to click");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Opens the console on `page` and types the token into the form once.
async fn open(c: &Client, admin: std::net::SocketAddr, token: &str, page: &str) {
    c.goto(&format!("http://{admin}/console/#{page}"))
        .await
        .expect("open the console");
    let input = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#token"))
        .await
        .expect("token field");
    input.send_keys(token).await.expect("type the token");
    click(c, "#token-save").await;
    wait_text(c, "#token-state", |t| t == "token set").await;
}

/// Replaces the token in the form, as an operator who retypes it.
async fn set_token(c: &Client, token: &str) {
    let input = c.find(Locator::Css("#token")).await.expect("token field");
    input.clear().await.expect("clear the token field");
    input.send_keys(token).await.expect("type the token");
    click(c, "#token-save").await;
}

async fn goto_page(c: &Client, page: &str) {
    click(c, &format!("#nav a[data-page=\"{page}\"]")).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let shown = c.find(Locator::Css(&format!("main #{page}"))).await.is_ok();
        if shown {
            return;
        }
        assert!(Instant::now() < deadline, "page {page} not shown");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn screenshot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

const ORDERS_TOKEN: &str = "orders-registration-token";

/// `orders` from a config endpoint (v1) and registrations; `pay` with a rate limit.
fn overview_config(v1: &Backend) -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{hash}"
services = ["orders"]

[[service]]
name = "orders"
registration = true
endpoints = [{{ addr = "{v1}", version = "v1" }}]

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
[route.admission.rate_limit]
rate = "50/s"
burst = 20

[[route]]
name = "slow"
path_prefix = "/slow"
service = "orders"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
[route.admission.rate_limit]
rate = "1/m"
burst = 1
"#,
        hash = sha256_hex(ORDERS_TOKEN),
        v1 = v1.addr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_shows_the_node_and_services_a_registered_instance() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let bus = Busbar::start(&overview_config(&v1)).await;
    for _ in 0..5 {
        let r = client().get(bus.url("/orders/1")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // One user over the slow route's limit, another within it.
    for (user, n) in [("mallory", 6), ("alice", 1)] {
        for _ in 0..n {
            client()
                .get(bus.url("/slow/1"))
                .header("x-user-id", user)
                .send()
                .await
                .unwrap();
        }
    }
    let (admin, token) = (bus.admin, bus.token.clone());
    let register = bus.registry_url("/v1/services/orders/instances/orders-canary");
    let v2_addr = v2.addr.to_string();
    with_browser(move |c| async move {
        open(&c, admin, &token, "overview").await;
        wait_text(&c, "#node-phase", |t| t == "ready").await;
        wait_text(&c, "#node-id", |t| !t.is_empty()).await;
        wait_text(&c, "#config-generation", |t| t.parse::<u64>().is_ok()).await;
        // The route's row: 5 requests so far, and a rate once two refreshes have passed.
        wait_text(&c, "#route-rates tr[data-route=\"orders\"] td.total", |t| {
            t == "5"
        })
        .await;
        wait_text(&c, "#route-rates tr[data-route=\"orders\"] td.rate", |t| {
            t.parse::<f64>().is_ok()
        })
        .await;
        screenshot(&c, "overview").await;

        goto_page(&c, "services").await;
        wait_text(&c, "section[data-service=\"orders\"] td.version", |t| {
            t == "v1"
        })
        .await;
        // Registered while the page is open: it shows within a refresh (3 s).
        let r = client()
            .put(register)
            .bearer_auth(ORDERS_TOKEN)
            .json(&json!({ "address": v2_addr, "version": "v2", "zone": "eu-west-1a", "ttl": 60 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        let registered_at = Instant::now();
        let row = "section[data-service=\"orders\"] tr[data-instance=\"orders-canary\"]";
        wait_text(&c, &format!("{row} td.addr"), |t| t == v2_addr).await;
        assert!(
            registered_at.elapsed() < Duration::from_secs(20),
            "the instance took {:?} to show",
            registered_at.elapsed()
        );
        wait_text(&c, &format!("{row} td.version"), |t| t == "v2").await;
        wait_text(&c, &format!("{row} td.zone"), |t| t == "eu-west-1a").await;
        wait_text(&c, &format!("{row} td.source"), |t| t == "registered").await;
        wait_text(&c, &format!("{row} td.ttl"), |t| t.ends_with("of 60 s")).await;
        screenshot(&c, "services").await;

        goto_page(&c, "admission").await;
        wait_text(&c, "tr[data-route=\"orders\"] td.rate-limit", |t| {
            t.starts_with("50/s per user, burst 20")
        })
        .await;
        wait_text(&c, "tr[data-route=\"slow\"] td.refusals", |t| {
            t.contains("limited (user): 5")
        })
        .await;
        wait_text(
            &c,
            "#top-refused tr[data-user=\"hdr:mallory\"] td.refusals",
            |t| t == "5",
        )
        .await;
        assert!(
            c.find(Locator::Css("#top-refused tr[data-user=\"hdr:alice\"]"))
                .await
                .is_err(),
            "a user never refused is listed"
        );
        screenshot(&c, "admission").await;

        goto_page(&c, "config").await;
        wait_text(&c, "#config-text", |t| {
            t.contains("[[registry.token]]") && t.contains("token_sha256 = \"<redacted>\"")
        })
        .await;
        let text = wait_text(&c, "#config-text", |_| true).await;
        assert!(
            !text.contains(&sha256_hex(ORDERS_TOKEN)),
            "a token hash on the page"
        );
        screenshot(&c, "config").await;
    })
    .await;
    drop(bus);
}

/// Two stable instances (v1) and a canary (v2), split by weight per user.
fn release_config(v1: &Backend, v2: &Backend) -> String {
    format!(
        r#"
[[service]]
name = "orders"
endpoints = [{{ addr = "{v1}", version = "v1" }}, {{ addr = "{v2}", version = "v2" }}]

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
[route.split]
stable = "v1"
"#,
        v1 = v1.addr,
        v2 = v2.addr,
    )
}

async fn set_split(bus: &Busbar, token: &str, split: Value) -> reqwest::StatusCode {
    client()
        .put(bus.admin_url("/v1/releases/orders"))
        .bearer_auth(token)
        .json(&split)
        .send()
        .await
        .unwrap()
        .status()
}

async fn releases(bus: &Busbar) -> Value {
    client()
        .get(bus.admin_url("/v1/releases"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Requests from 40 users; how many reached v2.
async fn canary_hits(bus: &Busbar, v2: &Backend) -> usize {
    let before = v2.hits();
    for u in 0..40 {
        let r = client()
            .get(bus.url("/orders/1"))
            .header("x-user-id", format!("user-{u}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    v2.hits() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_show_weights_and_roll_back_to_stable_on_confirmation() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let bus = Busbar::start(&release_config(&v1, &v2)).await;
    let split = json!({ "stable": "v1", "weights": { "v2": 30 },
        "rules": [{ "version": "v2", "header": { "name": "x-canary", "value": "on" } }] });
    assert_eq!(set_split(&bus, &bus.token, split).await, 200);
    assert!(
        canary_hits(&bus, &v2).await > 0,
        "the split sends some users to v2"
    );
    let (admin, token) = (bus.admin, bus.token.clone());
    let bus = std::sync::Arc::new(bus);
    let b = bus.clone();
    let v2 = std::sync::Arc::new(v2);
    let canary = v2.clone();
    with_browser(move |c| async move {
        open(&c, admin, &token, "releases").await;
        let card = "section.release[data-route=\"orders\"]";
        wait_text(&c, &format!("{card} .weights"), |t| t == "v1 70% · v2 30%").await;
        wait_text(&c, &format!("{card} .origin"), |t| t == "override in force").await;
        wait_text(&c, &format!("{card} .rules"), |t| {
            t.contains("x-canary = on → v2")
        })
        .await;
        screenshot(&c, "releases").await;

        // Roll back asks first, showing what changes; Cancel changes nothing.
        click(&c, &format!("{card} button.rollback")).await;
        wait_text(&c, "#change-before", |t| t.starts_with("v1 70% · v2 30%")).await;
        wait_text(&c, "#change-after", |t| t == "v1 100%").await;
        screenshot(&c, "releases-confirm").await;
        click(&c, "#dialog-cancel").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            releases(&b).await["releases"][0]["split"]["weights"]["v2"],
            30,
            "cancel changed the split"
        );

        click(&c, &format!("{card} button.rollback")).await;
        wait_text(&c, "#change-after", |t| t == "v1 100%").await;
        click(&c, "#dialog-confirm").await;
        wait_text(&c, &format!("{card} .weights"), |t| t == "v1 100%").await;
        wait_text(&c, "#banner", |t| t.contains("rolled back")).await;
        screenshot(&c, "releases-rolled-back").await;
        assert_eq!(
            canary_hits(&b, &canary).await,
            0,
            "v2 still served after the rollback"
        );
        let r = client()
            .get(b.url("/orders/1"))
            .header("x-canary", "on")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(canary_hits(&b, &canary).await, 0);

        // Set weights from the page: the new split is what busbar reports.
        click(&c, &format!("{card} button.set-weights")).await;
        let input = c
            .find(Locator::Css(&format!("{card} input[data-version=\"v2\"]")))
            .await
            .expect("a v2 weight field");
        input.clear().await.unwrap();
        input.send_keys("10").await.unwrap();
        click(&c, &format!("{card} button.apply-weights")).await;
        wait_text(&c, "#change-after", |t| t == "v1 90% · v2 10%").await;
        click(&c, "#dialog-confirm").await;
        wait_text(&c, &format!("{card} .weights"), |t| t == "v1 90% · v2 10%").await;
        assert_eq!(
            releases(&b).await["releases"][0]["split"]["weights"]["v2"],
            10
        );
    })
    .await;
    drop(v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_shows_an_error_and_changes_nothing() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let bus = Busbar::start(&release_config(&v1, &v2)).await;
    let split = json!({ "stable": "v1", "weights": { "v2": 30 } });
    assert_eq!(set_split(&bus, &bus.token, split).await, 200);
    let (admin, token) = (bus.admin, bus.token.clone());
    let bus = std::sync::Arc::new(bus);
    let b = bus.clone();
    with_browser(move |c| async move {
        open(&c, admin, &token, "releases").await;
        let card = "section.release[data-route=\"orders\"]";
        wait_text(&c, &format!("{card} .weights"), |t| t == "v1 70% · v2 30%").await;
        // The operator types a wrong token; the page stays, its actions are refused.
        set_token(&c, "not-the-token").await;
        click(&c, &format!("{card} button.rollback")).await;
        click(&c, "#dialog-confirm").await;
        let banner = wait_text(&c, "#banner", |t| t.contains("Rolling back")).await;
        assert!(
            banner.contains("403") && banner.contains("wrong admin token"),
            "{banner}"
        );
        screenshot(&c, "wrong-token").await;
        let now = releases(&b).await;
        assert_eq!(now["releases"][0]["split"]["weights"]["v2"], 30, "{now}");
        assert_eq!(now["releases"][0]["origin"], "override", "{now}");
        let hits = canary_hits(&b, &v2).await;
        assert!(hits > 0, "the canary no longer served");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_shows_its_file_line_and_column() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let body = release_config(&v1, &v2);
    let bus = Busbar::start(&body).await;
    // A typo on a known line: the header the harness writes, then the body.
    let broken = body.replace("path_prefix = \"/orders\"", "path_prefx = \"/orders\"");
    bus.write_config(&broken, "");
    let file = std::fs::read_to_string(&bus.config).unwrap();
    let line = file
        .lines()
        .position(|l| l.starts_with("path_prefx"))
        .expect("the typo's line")
        + 1;
    let want = format!("{}:{line}:", bus.config.display());
    let (admin, token) = (bus.admin, bus.token.clone());
    let bus = std::sync::Arc::new(bus);
    let b = bus.clone();
    with_browser(move |c| async move {
        open(&c, admin, &token, "config").await;
        wait_text(&c, "#config-text", |t| t.contains("path_prefix")).await;
        let generation = wait_text(&c, "#config", |t| t.contains("generation")).await;
        click(&c, "#reload").await;
        let errors = wait_text(&c, "#reload-errors", |t| !t.is_empty()).await;
        assert!(errors.contains(&want), "{want} not in {errors:?}");
        assert!(errors.contains("path_prefx"), "{errors}");
        screenshot(&c, "config-reload-refused").await;
        // Still the old configuration: the route answers, the page's text is unchanged.
        let r = client().get(b.url("/orders/1")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = wait_text(&c, "#config-text", |_| true).await;
        assert!(
            !text.contains("path_prefx"),
            "the refused file shows as running"
        );
        assert!(generation.contains("generation 1"), "{generation}");
    })
    .await;
}

/// The console's answers without a browser: security headers on every page and refusal,
/// the token on its data reads, GET only.
#[tokio::test]
async fn console_headers_and_token() {
    let v1 = Backend::start("v1").await;
    let bus = Busbar::start(&overview_config(&v1)).await;
    for path in [
        "/console/",
        "/console/app.js",
        "/console/console.css",
        "/console/api/overview",
        "/console/nope",
    ] {
        let r = client().get(bus.admin_url(path)).send().await.unwrap();
        let h = r.headers();
        let csp = h
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_string());
        let csp = csp.unwrap_or_else(|| panic!("{path}: no CSP"));
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h.get("x-frame-options").unwrap(), "DENY", "{path}");
        assert_eq!(
            h.get("x-content-type-options").unwrap(),
            "nosniff",
            "{path}"
        );
    }
    let page = client()
        .get(bus.admin_url("/console/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let js = client()
        .get(bus.admin_url("/console/app.js"))
        .send()
        .await
        .unwrap();
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));

    let r = client()
        .get(bus.admin_url("/console/api/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(bus.admin_url("/console/api/services"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = client()
        .get(bus.admin_url("/console/api/services"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["services"][0]["instances"][0]["version"], "v1", "{v}");
    let v: Value = client()
        .get(bus.admin_url("/console/api/config"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("token_sha256 = \"<redacted>\""), "{text}");
    assert!(!text.contains(&sha256_hex(ORDERS_TOKEN)));

    let r = client()
        .post(bus.admin_url("/console/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = client()
        .get(bus.admin_url("/console"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the redirect to /console/ is followed");
}
