//! A throwaway etcd (Debian's etcd-server 3.4): one member, or a cluster of several, each
//! on run-time loopback ports with its own data dir under one temp dir. Members can be
//! killed and started again on their data; all are stopped when dropped.

use std::time::Duration;

use super::daemon::{wait_until, Daemon};
use super::free_port;

struct Member {
    client_port: u16,
    daemon: Daemon,
}

impl Member {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

pub struct Etcd {
    members: Vec<Member>,
    /// The first member's client port.
    pub client_port: u16,
    pub dir: tempfile::TempDir,
}

/// `n` distinct ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// A client for the members' own HTTP endpoints, with a short timeout.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .unwrap()
}

/// How long a (re)started cluster may take to elect a leader on a busy 2-core machine.
const START_WITHIN: Duration = Duration::from_secs(20);

impl Etcd {
    /// A single-member etcd.
    pub async fn start() -> Etcd {
        Self::cluster(1).await
    }

    /// A cluster of `n` members, started together; returns once every member has a leader.
    pub async fn cluster(n: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let (client, peer) = ports.split_at(n);
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", peer[i]);
        let initial: Vec<String> = (0..n).map(|i| format!("m{i}={}", peer_url(i))).collect();
        let token = format!("busbar-test-{}", client[0]);
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let c = format!("http://127.0.0.1:{}", client[i]);
                let p = peer_url(i);
                let args = [
                    "--name".to_string(),
                    format!("m{i}"),
                    "--data-dir".into(),
                    dir.path().join(format!("m{i}")).display().to_string(),
                    "--listen-client-urls".into(),
                    c.clone(),
                    "--advertise-client-urls".into(),
                    c,
                    "--listen-peer-urls".into(),
                    p.clone(),
                    "--initial-advertise-peer-urls".into(),
                    p,
                    "--initial-cluster".into(),
                    initial.join(","),
                    "--initial-cluster-token".into(),
                    token.clone(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                ];
                Member {
                    client_port: client[i],
                    daemon: Daemon::new(
                        "etcd",
                        args,
                        dir.path().join(format!("m{i}.log")),
                        "Debian's etcd-server package (apt-get install etcd-server)",
                    ),
                }
            })
            .collect();
        let mut e = Etcd {
            members,
            client_port: client[0],
            dir,
        };
        let all: Vec<usize> = (0..n).collect();
        e.start_members(&all).await;
        e
    }

    /// The first member's client URL.
    pub fn endpoint(&self) -> String {
        self.members[0].url()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// Kills every member (SIGKILL) and keeps their data for [`Etcd::restart`].
    pub fn stop(&mut self) {
        for m in &mut self.members {
            m.daemon.stop();
        }
    }

    /// Starts every member again on its data; returns once they have a leader.
    pub async fn restart(&mut self) {
        self.stop();
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.start_members(&all).await;
    }

    /// Kills member `i` (SIGKILL), keeping its data.
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].daemon.stop();
    }

    /// Starts members `ids` on their data; returns once every running member is healthy
    /// (it has a leader), so the caller must start enough of them for a quorum.
    pub async fn start_members(&mut self, ids: &[usize]) {
        for &i in ids {
            self.members[i].daemon.start();
        }
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].daemon.is_running())
            .collect();
        for i in running {
            let what = format!("etcd member m{i} healthy");
            wait_until(&what, START_WITHIN, Duration::from_millis(100), || {
                self.healthy(i)
            })
            .await;
        }
    }

    /// Member `i` answers `/health` with "true": it is up and has a leader.
    pub async fn healthy(&self, i: usize) -> bool {
        let client = http();
        match client
            .get(format!("{}/health", self.members[i].url()))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.text().await.is_ok_and(|t| t.contains("true")),
            _ => false,
        }
    }

    /// Which running member is the leader, as the members themselves say
    /// (`/v3/maintenance/status`); `None` while there is none.
    pub async fn leader(&self) -> Option<usize> {
        let client = http();
        for (i, m) in self.members.iter().enumerate() {
            if !m.daemon.is_running() {
                continue;
            }
            let status: serde_json::Value = match client
                .post(format!("{}/v3/maintenance/status", m.url()))
                .body("{}")
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                _ => continue,
            };
            let me = &status["header"]["member_id"];
            if !me.is_null() && status["leader"] == *me {
                return Some(i);
            }
        }
        None
    }

    /// How many watchers member `i` serves (its `etcd_debugging_mvcc_watcher_total`): which
    /// member the clients' watches are on.
    pub async fn watchers(&self, i: usize) -> u64 {
        let url = format!("{}/metrics", self.members[i].url());
        let text = match http().get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return 0,
        };
        super::metric_value(&text, "etcd_debugging_mvcc_watcher_total") as u64
    }

    /// Member `i`'s log so far, for a failing assertion's message.
    pub fn log(&self, i: usize) -> String {
        self.members[i].daemon.log()
    }
}

/// A busbar config whose registry is etcd at `endpoints` (a node starts on the first):
/// service `orders`, open to registration with `token`, with `service_extra` keys (e.g.
/// its `balance`), routed at `/orders`.
pub fn orders_on_etcd(endpoints: &[String], token: &str, service_extra: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[registry]
listen = "{{registry}}"
backend = "etcd"
[registry.etcd]
endpoints = [{endpoints}]
prefix = "/busbar-test/services/"
[[registry.token]]
token_sha256 = "{hash}"
services = ["orders"]

[[service]]
name = "orders"
registration = true
{service_extra}
[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
"#,
        endpoints = endpoints.join(", "),
        hash = super::sha256_hex(token),
    )
}
