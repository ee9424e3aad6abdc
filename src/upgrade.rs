//! The signals the server obeys, with one added to pingora's: SIGUSR2 starts the graceful
//! binary upgrade from inside the running process.
//!
//! pingora's own upgrade needs someone to start `busbar run --upgrade` beside the running
//! process and then send that one SIGQUIT. Under systemd the new process must start inside
//! the unit (or systemd kills it with the unit) and become its main process: so the running
//! process starts its successor itself (same binary path, same config file, `--upgrade`),
//! waits until the successor listens on the upgrade socket, and then hands its listening
//! sockets over as on SIGQUIT. The successor tells systemd it is the main process when it
//! is ready (`ready`). A config the successor could not load, or a successor that exits
//! early, cancels the upgrade: the running process keeps serving.
//!
//! SIGQUIT (upgrade, successor started by someone else), SIGTERM (drain and exit) and
//! SIGINT (exit now) keep pingora's meaning.
//! Owns: [`Signals`]. Must not: drain or hand sockets over itself (pingora does).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a successor may take to load its config and open the upgrade socket.
const SUCCESSOR_START_LIMIT: Duration = Duration::from_secs(30);
/// How often the upgrade socket is looked for.
const SUCCESSOR_POLL: Duration = Duration::from_millis(20);

/// The server's signal watch (`Server::run`'s `shutdown_signal`).
pub struct Signals {
    /// This binary's path as it was at start: after a package upgrade replaced the file,
    /// the path names the new binary.
    pub exe: PathBuf,
    /// The configuration file this process was started with.
    pub config: PathBuf,
    /// pingora's upgrade socket (`busbar-<port>.upgrade.sock` in the runtime folder).
    pub upgrade_sock: PathBuf,
}

/// A signal stream, or one that never fires when the handler cannot be installed.
fn watch(kind: SignalKind, name: &str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot listen for {name}: {e}");
            None
        }
    }
}

async fn recv(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl Signals {
    /// Starts `busbar run --upgrade` on the same config and waits until it listens on the
    /// upgrade socket. `false` (and the reason logged) when the upgrade must not go on.
    async fn start_successor(&self) -> bool {
        if let Err(e) = crate::config::load(&self.config) {
            tracing::error!(
                "SIGUSR2: upgrade cancelled, the configuration does not load; still serving:\n{e}"
            );
            return false;
        }
        // A socket file left by an earlier upgrade would look like the successor's.
        let _ = std::fs::remove_file(&self.upgrade_sock);
        let mut child = match Command::new(&self.exe)
            .arg("run")
            .arg("--upgrade")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(exe = %self.exe.display(), "SIGUSR2: cannot start the new process, still serving: {e}");
                return false;
            }
        };
        tracing::info!(pid = child.id(), exe = %self.exe.display(), "SIGUSR2: new process started, waiting for it to take the listeners");
        let deadline = Instant::now() + SUCCESSOR_START_LIMIT;
        loop {
            if self.upgrade_sock.exists() {
                return true;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::error!("SIGUSR2: the new process exited ({status}) before taking over; still serving");
                    return false;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("SIGUSR2: cannot check the new process: {e}"),
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    "SIGUSR2: the new process did not open {} within {:?}; stopping it, still serving",
                    self.upgrade_sock.display(),
                    SUCCESSOR_START_LIMIT
                );
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(SUCCESSOR_POLL).await;
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = watch(SignalKind::quit(), "SIGQUIT");
        let mut term = watch(SignalKind::terminate(), "SIGTERM");
        let mut int = watch(SignalKind::interrupt(), "SIGINT");
        let mut usr2 = watch(SignalKind::user_defined2(), "SIGUSR2");
        loop {
            tokio::select! {
                _ = recv(&mut quit) => return ShutdownSignal::GracefulUpgrade,
                _ = recv(&mut term) => return ShutdownSignal::GracefulTerminate,
                _ = recv(&mut int) => return ShutdownSignal::FastShutdown,
                _ = recv(&mut usr2) => {
                    if self.start_successor().await {
                        return ShutdownSignal::GracefulUpgrade;
                    }
                }
            }
        }
    }
}
