//! A throwaway DNS server (Debian's dnsmasq) on a run-time port, answering from a hosts
//! file the test rewrites (SIGHUP re-reads it) and from SRV lines in its config (read at
//! start: a change restarts it). Stopped when dropped.

use std::path::PathBuf;
use std::time::Duration;

use super::daemon::Daemon;
use super::free_port;

pub struct Dnsmasq {
    daemon: Daemon,
    pub port: u16,
    pub dir: tempfile::TempDir,
    hosts: PathBuf,
    conf: PathBuf,
}

impl Dnsmasq {
    /// Serves `hosts` (lines of `ip name`) and `srv` (`--srv-host` values:
    /// `_http._tcp.name,target,port,priority,weight`), every answer with a TTL of 1 s.
    pub async fn start(hosts: &str, srv: &[&str]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let hosts_file = dir.path().join("hosts");
        let conf = dir.path().join("dnsmasq.conf");
        std::fs::write(&hosts_file, hosts).unwrap();
        write_conf(&conf, srv);
        let args: Vec<std::ffi::OsString> = vec![
            "--keep-in-foreground".into(),
            format!("--conf-file={}", conf.display()).into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            format!("--addn-hosts={}", hosts_file.display()).into(),
            format!("--port={port}").into(),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--local-ttl=1".into(),
            // Root keeps the right to read the test's temp dir after a SIGHUP.
            "--user=root".into(),
            "--log-facility=-".into(),
            // No pid file in /run shared by every test's dnsmasq.
            "--pid-file".into(),
        ];
        let daemon = Daemon::new(
            "dnsmasq",
            args,
            dir.path().join("dnsmasq.log"),
            "Debian's dnsmasq package",
        );
        let mut d = Dnsmasq {
            daemon,
            port,
            dir,
            hosts: hosts_file,
            conf,
        };
        d.spawn().await;
        d
    }

    /// `[dns] servers` for busbar.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let before = self.daemon.log().matches("started").count();
        self.daemon.start();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.daemon.log().matches("started").count() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq did not start within 20 s: {}",
                self.daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the hosts file and makes dnsmasq read it again (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        if let Some(pid) = self.daemon.pid() {
            // By the pid of the process this guard started, never by name.
            let _ = std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
        }
    }

    /// New SRV records: dnsmasq reads them only at start, so it restarts (same port).
    pub async fn set_srv(&mut self, srv: &[&str]) {
        write_conf(&self.conf, srv);
        self.daemon.stop();
        self.spawn().await;
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

fn write_conf(conf: &std::path::Path, srv: &[&str]) {
    let lines: String = srv.iter().map(|s| format!("srv-host={s}\n")).collect();
    std::fs::write(conf, lines).unwrap();
}
