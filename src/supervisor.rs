//! Every service busbar hands pingora, watched: a service whose task panics (a listener
//! that could not start, a background task that hit a bug) ends the process with an error
//! and a non-zero exit, instead of leaving the rest serving while `/healthz` says ok and
//! one port refuses connections. Whatever restarts busbar (systemd, an orchestrator) then
//! sees a failed process.
//!
//! Panics in request tasks are not watched: each connection runs on its own tokio task,
//! tokio catches its panic there, and one bad request must not stop the node.
//! Owns: the [`Supervised`] wrapper and that exit.
//! Must not: restart anything itself, or wrap request tasks.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ListenFds, RuntimeOpts, ShutdownWatch};
use pingora_core::services::{ServiceReadyNotifier, ServiceWithDependents};

/// The exit status of a process one of whose services died.
pub const EXIT_SERVICE_DIED: i32 = 1;

/// A service whose panic ends the process.
pub struct Supervised {
    inner: Box<dyn ServiceWithDependents>,
}

/// Wraps `service` so that its panic ends the process.
pub fn supervised(service: impl ServiceWithDependents + 'static) -> Supervised {
    Supervised {
        inner: Box::new(service),
    }
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Polls a future, turning its panic into an `Err` (what `futures`' `catch_unwind` does).
struct CatchUnwind<F: ?Sized>(Pin<Box<F>>);

impl<F: Future + ?Sized> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Awaits `task`, a part of a service spawned on its own tokio task (an accept loop);
/// a panic there is the service's: it is raised again here, for [`Supervised`] to see.
pub async fn join_part(task: tokio::task::JoinHandle<()>) {
    if let Err(e) = task.await {
        if let Ok(panic) = e.try_into_panic() {
            std::panic::resume_unwind(panic);
        }
    }
}

#[async_trait]
impl ServiceWithDependents for Supervised {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        let name = self.inner.name().to_string();
        let run = self
            .inner
            .start_service(fds, shutdown, listeners_per_fd, ready_notifier);
        if let Err(panic) = CatchUnwind(run).await {
            // The panic hook already printed where it happened.
            tracing::error!(
                service = %name,
                "service stopped by a panic: {}; busbar exits",
                panic_message(&*panic)
            );
            std::process::exit(EXIT_SERVICE_DIED);
        }
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        let r = CatchUnwind(Box::pin(async { panic!("listener gone") })).await;
        let panic = r.expect_err("caught");
        assert_eq!(panic_message(&*panic), "listener gone");
        let r = CatchUnwind(Box::pin(async { 7 })).await;
        assert_eq!(r.ok(), Some(7));
    }

    #[tokio::test]
    async fn a_spawned_part_panics_again_in_its_service() {
        let part = tokio::spawn(async { panic!("accept loop: {}", 1) });
        let r = CatchUnwind(Box::pin(join_part(part))).await;
        assert_eq!(
            panic_message(&*r.expect_err("raised again")),
            "accept loop: 1"
        );
    }
}
