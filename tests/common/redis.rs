//! A throwaway Redis (Debian's redis-server) on a run-time port, stopped when dropped.

use std::time::Duration;

use super::daemon::{wait_until, Daemon};
use super::free_port;

pub struct Redis {
    daemon: Daemon,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = vec!["--port".into(), port.to_string().into()];
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .map(Into::into),
        );
        args.push(dir.path().as_os_str().to_owned());
        let daemon = Daemon::new(
            "redis-server",
            args,
            dir.path().join("redis.log"),
            "Debian's redis-server package",
        );
        let mut r = Redis { daemon, port, dir };
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        self.daemon.start();
        let within = Duration::from_secs(10);
        wait_until(
            "redis-server start",
            within,
            Duration::from_millis(50),
            || self.ping(),
        )
        .await;
    }

    /// `PING` over a raw socket: true on `+PONG`.
    pub async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
        )
    }

    /// Kills Redis (SIGKILL, by its pid); its data is gone (no persistence).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts a fresh Redis on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}
