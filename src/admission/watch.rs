//! Admission's waits raced against the client going away, so a request whose client
//! left gives up its place in the queue at once instead of holding it until `max_wait`.
//!
//! Owns: [`enter_watched`], given a future the driver supplies that finishes when its
//! client leaves (pingora's session: `drivers::gone`; busbar's own HTTP/1 engine watches
//! its socket), and what it returns then ([`Refused::ClientGone`], counted as
//! `decision="abandoned"`).
//! Must not: hold a driver's type, or write to the client.
//!
//! Dropping the queue wait is what frees the place: `queue::WaitGuard` leaves the queue on
//! drop, or hands back a slot granted in the same instant.

use std::future::Future;

use pingora_error::{Error, ErrorType};

use super::{Admitted, Rejection, RoutePolicy};

/// Why a request was not let through.
#[derive(Debug)]
pub enum Refused {
    /// Refused by policy: write this to the client.
    Rejected(Rejection),
    /// The client left while the request waited: nothing to write. The error is a
    /// downstream one (`ConnectionClosed` for a close or reset).
    ClientGone(Box<Error>),
}

impl Refused {
    /// The rejection to write, or the error that ends the request (`?` in the proxy).
    pub fn into_rejection(self) -> pingora_error::Result<Rejection> {
        match self {
            Refused::Rejected(r) => Ok(r),
            Refused::ClientGone(e) => Err(e),
        }
    }
}

/// What [`RoutePolicy::check`] let through, let in: at once when nothing needs waiting
/// for ([`RoutePolicy::enter_now`]), else after [`wait_watched`] (boxed: its state is
/// large, and only a request that waits needs it), given a `gone` that finishes when its client leaves.
pub async fn enter_watched(
    policy: &RoutePolicy,
    mut admitted: Admitted,
    gone: impl Future<Output = Box<Error>>,
) -> Result<Admitted, Refused> {
    if policy.enter_now(&mut admitted) {
        return Ok(admitted);
    }
    Box::pin(wait_watched(policy, admitted, gone)).await
}

/// The waits of a request `check` let through (cluster limit, service queue), given up
/// as soon as `gone` says the client left.
async fn wait_watched(
    policy: &RoutePolicy,
    admitted: Admitted,
    gone: impl Future<Output = Box<Error>>,
) -> Result<Admitted, Refused> {
    match until_gone(policy.wait(admitted), gone).await {
        Ok(r) => r.map_err(Refused::Rejected),
        Err(e) => {
            if matches!(e.etype(), ErrorType::ConnectionClosed) {
                policy.metrics.abandoned_closed.inc();
            } else {
                policy.metrics.abandoned_protocol.inc();
            }
            Err(Refused::ClientGone(e))
        }
    }
}

/// `work`, unless `gone` finishes first; then `work` is dropped (leaving any queue).
/// `work` is polled first, so a request that need not wait never polls `gone`.
async fn until_gone<T>(
    work: impl Future<Output = T>,
    gone: impl Future<Output = Box<Error>>,
) -> Result<T, Box<Error>> {
    tokio::select! {
        biased;
        r = work => Ok(r),
        e = gone => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::admission::queue::ServiceQueue;
    use crate::config::QueuePolicy;

    fn policy() -> QueuePolicy {
        QueuePolicy {
            max_depth: 4,
            max_wait: Duration::from_secs(60),
        }
    }

    async fn gone_when(rx: oneshot::Receiver<()>) -> Box<Error> {
        let _ = rx.await;
        Error::explain(ErrorType::ConnectionClosed, "test: client closed")
    }

    /// A queued request whose client leaves gives up its place at once, and the next
    /// user gets the freed slot long before max_wait.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_frees_its_place() {
        let q = Arc::new(ServiceQueue::new(1, 100));
        let (hold, _) = q.acquire("ip:busy", &policy()).await.unwrap();
        let (close, closed) = oneshot::channel();
        let q1 = q.clone();
        let leaver = tokio::spawn(async move {
            until_gone(q1.acquire("ip:leaver", &policy()), gone_when(closed)).await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.waiting(), 1);
        close.send(()).unwrap();
        let left = leaver.await.unwrap();
        assert!(matches!(left, Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed)));
        assert_eq!((q.waiting(), q.users()), (0, 0), "its place is gone");

        let q2 = q.clone();
        let next = tokio::spawn(async move { q2.acquire("ip:next", &policy()).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(hold);
        let (_permit, waited) = next.await.unwrap().unwrap();
        assert_eq!(
            waited,
            Duration::from_millis(10),
            "served when the slot freed"
        );
    }

    /// A request that need not wait is admitted without the watch being polled.
    #[tokio::test(start_paused = true)]
    async fn an_immediate_admission_never_polls_the_watch() {
        let q = Arc::new(ServiceQueue::new(1, 100));
        let gone = std::future::poll_fn(|_| -> std::task::Poll<Box<Error>> {
            panic!("the watch was polled")
        });
        let r = until_gone(q.acquire("ip:a", &policy()), gone).await;
        assert!(matches!(r, Ok(Ok((_, w))) if w.is_zero()));
    }
}
