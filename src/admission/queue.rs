//! A service's concurrency cap with per-user fair queues in front of it.
//!
//! Owns: [`ServiceQueue`] (slots in use, the users waiting and their order) and the
//! RAII [`Permit`] a request holds while it is in flight.
//! Must not: know routes, identities or HTTP; the caller passes a user key and a policy.
//!
//! Below the cap a request takes a slot with one atomic compare-and-swap. At the cap it
//! waits in its user's own FIFO. Slots are handed out by start-time fair queuing (the
//! virtual-time scheme Kubernetes' API Priority and Fairness uses, with unit cost): each
//! waiter is tagged `start = max(V, its user's last finish)`, the waiter with the
//! smallest tag goes next and `V` becomes its tag. A user who floods gets tags far in the
//! future, so a newcomer (tag `V`) is served next and the flood waits behind itself.
//!
//! Lost wake-ups are avoided by ordering: a waiter increments `waiting` before it looks
//! for a free slot, and a releasing request frees its slot before it looks at `waiting`
//! (both `SeqCst`), so at least one of the two always dispatches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::QueuePolicy;

/// Key of the queue shared by users who arrive while `max_users` are already waiting;
/// real keys always start with a source prefix (`jwt:`, `ip:` …), so it can't collide.
const OVERFLOW_KEY: &str = "\0overflow";

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the user's queue is full")]
    Full,
    #[error("no slot freed within the route's max_wait")]
    Timeout,
}

struct Waiter {
    seq: u64,
    start: u64,
    tx: oneshot::Sender<()>,
}

#[derive(Default)]
struct UserQueue {
    waiters: VecDeque<Waiter>,
    /// Virtual finish tag of this user's last queued request.
    last_finish: u64,
}

#[derive(Default)]
struct Fair {
    users: HashMap<Arc<str>, UserQueue>,
    /// One entry per user with waiters: (start tag, seq) of its head → user.
    heads: BTreeMap<(u64, u64), Arc<str>>,
    /// Virtual time: the start tag of the last waiter served.
    vtime: u64,
    seq: u64,
}

impl Fair {
    fn index_head(&mut self, key: &Arc<str>) {
        if let Some(w) = self.users.get(key).and_then(|q| q.waiters.front()) {
            self.heads.insert((w.start, w.seq), key.clone());
        }
    }
}

/// Concurrency cap and fair queues of one service; survives reloads.
pub struct ServiceQueue {
    max_in_flight: AtomicUsize,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    max_users: usize,
    fair: Mutex<Fair>,
}

impl std::fmt::Debug for ServiceQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceQueue")
            .field("max_in_flight", &self.max_in_flight.load(SeqCst))
            .field("in_flight", &self.in_flight.load(SeqCst))
            .field("waiting", &self.waiting.load(SeqCst))
            .finish()
    }
}

/// A slot in the service; released when dropped.
#[derive(Debug)]
pub struct Permit {
    queue: Arc<ServiceQueue>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queue.in_flight.fetch_sub(1, SeqCst);
        if self.queue.waiting.load(SeqCst) > 0 {
            self.queue.dispatch();
        }
    }
}

/// A waiter's claim; if the wait is abandoned (timeout, client gone) it leaves the queue,
/// or gives back the slot it was granted in the meantime.
struct WaitGuard<'q> {
    queue: &'q Arc<ServiceQueue>,
    key: Arc<str>,
    seq: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl WaitGuard<'_> {
    /// Leaves the queue; `true` if a slot was granted before we could leave.
    fn leave(&mut self) -> bool {
        self.done = true;
        let mut fair = self.queue.lock();
        // Grants happen under this lock, so what try_recv sees here is final.
        if self.rx.try_recv().is_ok() {
            return true;
        }
        let Some(q) = fair.users.get_mut(&self.key) else {
            return false;
        };
        let Some(pos) = q.waiters.iter().position(|w| w.seq == self.seq) else {
            return false;
        };
        let was_head = pos == 0;
        if let Some(w) = q.waiters.remove(pos) {
            self.queue.waiting.fetch_sub(1, SeqCst);
            if was_head {
                fair.heads.remove(&(w.start, w.seq));
            }
        }
        if fair
            .users
            .get(&self.key)
            .is_some_and(|q| q.waiters.is_empty())
        {
            fair.users.remove(&self.key);
        } else if was_head {
            let key = self.key.clone();
            fair.index_head(&key);
        }
        false
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.done && self.leave() {
            drop(Permit {
                queue: self.queue.clone(),
            });
        }
    }
}

impl ServiceQueue {
    pub fn new(max_in_flight: usize, max_users: usize) -> Self {
        ServiceQueue {
            max_in_flight: AtomicUsize::new(max_in_flight.max(1)),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            max_users: max_users.max(1),
            fair: Mutex::new(Fair::default()),
        }
    }

    /// Applies a reloaded cap; waiters take any slots a larger cap frees.
    pub fn set_max_in_flight(&self, max: usize) {
        self.max_in_flight.store(max.max(1), SeqCst);
        self.dispatch();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    /// Users with requests waiting (at most `max_users` plus the overflow queue).
    pub fn users(&self) -> usize {
        self.lock().users.len()
    }

    fn lock(&self) -> MutexGuard<'_, Fair> {
        // Nothing panics while holding it; recover rather than spread a poison.
        self.fair.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_take(&self) -> bool {
        let max = self.max_in_flight.load(SeqCst);
        self.in_flight
            .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Gets a slot for `user`: at once below the cap, else after a fair wait.
    /// Returns how long it waited (zero on the fast path) with the permit.
    pub async fn acquire(
        self: &Arc<Self>,
        user: &str,
        policy: &QueuePolicy,
    ) -> Result<(Permit, Duration), QueueError> {
        if self.waiting.load(SeqCst) == 0 && self.try_take() {
            return Ok((self.permit(), Duration::ZERO));
        }
        let started = tokio::time::Instant::now();
        let (key, seq, rx) = {
            let mut fair = self.lock();
            if fair.heads.is_empty() && self.try_take() {
                return Ok((self.permit(), Duration::ZERO));
            }
            let key: Arc<str> = match fair.users.get_key_value(user) {
                Some((k, _)) => k.clone(),
                None if fair.users.len() < self.max_users => Arc::from(user),
                None => Arc::from(OVERFLOW_KEY),
            };
            let vtime = fair.vtime;
            fair.seq += 1;
            let seq = fair.seq;
            let q = fair.users.entry(key.clone()).or_default();
            if q.waiters.len() >= policy.max_depth {
                if q.waiters.is_empty() {
                    fair.users.remove(&key);
                }
                return Err(QueueError::Full);
            }
            let start = vtime.max(q.last_finish);
            q.last_finish = start + 1;
            let (tx, rx) = oneshot::channel();
            let was_empty = q.waiters.is_empty();
            q.waiters.push_back(Waiter { seq, start, tx });
            if was_empty {
                fair.heads.insert((start, seq), key.clone());
            }
            self.waiting.fetch_add(1, SeqCst);
            (key, seq, rx)
        };
        // A slot may have been freed between our fast-path check and `waiting += 1`.
        self.dispatch();
        let mut guard = WaitGuard {
            queue: self,
            key,
            seq,
            rx,
            done: false,
        };
        let granted = match tokio::time::timeout(policy.max_wait, &mut guard.rx).await {
            Ok(Ok(())) => {
                guard.done = true;
                true
            }
            // A closed channel means the waiter was dropped from the queue without a slot.
            Ok(Err(_)) => guard.leave(),
            Err(_) => guard.leave(),
        };
        if granted {
            Ok((self.permit(), started.elapsed()))
        } else {
            Err(QueueError::Timeout)
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            queue: self.clone(),
        }
    }

    /// Hands free slots to waiters, smallest start tag first.
    fn dispatch(&self) {
        let mut fair = self.lock();
        while !fair.heads.is_empty() && self.try_take() {
            let Some(((start, _), key)) = fair.heads.pop_first() else {
                self.in_flight.fetch_sub(1, SeqCst);
                break;
            };
            fair.vtime = fair.vtime.max(start);
            let Some(q) = fair.users.get_mut(&key) else {
                self.in_flight.fetch_sub(1, SeqCst);
                continue;
            };
            let waiter = q.waiters.pop_front();
            if q.waiters.is_empty() {
                fair.users.remove(&key);
            } else {
                fair.index_head(&key);
            }
            let Some(w) = waiter else {
                self.in_flight.fetch_sub(1, SeqCst);
                continue;
            };
            self.waiting.fetch_sub(1, SeqCst);
            if w.tx.send(()).is_err() {
                // The receiver is gone without leaving the queue: give the slot back.
                self.in_flight.fetch_sub(1, SeqCst);
            }
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
