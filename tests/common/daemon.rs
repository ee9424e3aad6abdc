//! A server a test runs beside busbar (etcd, redis-server): started from one command line,
//! killed by its pid when the test stops it or drops it, and started again on the same
//! command line (same ports, same data directory).

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    program: &'static str,
    args: Vec<OsString>,
    /// stdout and stderr of every run, appended.
    log: PathBuf,
    /// Said when the program can't be started (which package provides it).
    missing: &'static str,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon not started yet.
    pub fn new<A: Into<OsString>>(
        program: &'static str,
        args: impl IntoIterator<Item = A>,
        log: PathBuf,
        missing: &'static str,
    ) -> Daemon {
        Daemon {
            program,
            args: args.into_iter().map(Into::into).collect(),
            log,
            missing,
            child: None,
        }
    }

    /// Starts the process (a no-op while it runs); readiness is the caller's to check.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} ({})", self.program, self.missing));
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL, by its pid) and reaps it; its files stay.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The running process's pid (to send it a signal).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// What the process wrote so far, for a failing assertion's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `ready` every `every` until it says yes; panics naming `what` after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, every: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !ready().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(every).await;
    }
}
