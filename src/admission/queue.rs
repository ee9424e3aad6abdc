//! A service's concurrency cap with per-user fair queues in front of it.
//!
//! Owns: [`ServiceQueue`] (slots in use, the users waiting and their order, who holds
//! how many slots) and the RAII [`Permit`] a request holds while it is in flight.
//! Must not: know routes, identities or HTTP; the caller passes a user key and a policy.
//!
//! Below the cap a request takes a slot with one atomic compare-and-swap. At the cap it
//! waits in its user's own FIFO. Slots are handed out by start-time fair queuing (the
//! virtual-time scheme Kubernetes' API Priority and Fairness uses, with unit cost): each
//! waiter is tagged `start = max(V, its user's last finish)`, the waiter with the
//! smallest tag goes next and `V` becomes its tag. A user who floods gets tags far in the
//! future, so a newcomer (tag `V`) is served next and the flood waits behind itself.
//!
//! Fair queuing alone is work-conserving: a user who sends one request at a time is not
//! waiting at the moment its own slot frees, so that slot goes to the flood, and when
//! completions are synchronised the polite user then waits a whole request time. So
//! under contention the queue also counts the slots each user holds, and a user stays
//! *active* for a moment after its request ends (a fraction of the typical request
//! time, at most [`MAX_HOLD`]). A freed slot goes to a user below its fair share
//! (`cap ÷ active users`) first: the earliest such waiter, else — when the first waiter
//! is at or above its share — it is held for a below-share user who just finished, until
//! that user's moment runs out. Slots taken on the fast path are not counted (that would
//! cost a lock per request); within one request time of contention starting, every slot
//! in use has been handed out by the queue and is counted.
//!
//! Lost wake-ups are avoided by ordering: a waiter increments `waiting` before it looks
//! for a free slot, and a releasing request frees its slot before it looks at `waiting`
//! (both `SeqCst`), so at least one of the two always dispatches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::QueuePolicy;

/// Key of the queue shared by users who arrive while `max_users` are already waiting;
/// real keys always start with a source prefix (`jwt:`, `ip:` …), so it can't collide.
const OVERFLOW_KEY: &str = "\0overflow";
/// Longest a freed slot is held for a below-share user between two of its requests. A
/// client's turnaround (read the response, send the next request) on a LAN is far less.
pub const MAX_HOLD: Duration = Duration::from_millis(20);
/// A hold lasts at most this fraction of the typical request time, so a user who does
/// not come back costs the service at most a quarter of one request per hold.
const HOLD_FRACTION: u32 = 4;
/// Recently finished users one dispatch considers for a hold; bounds its cost.
const HOLD_CANDIDATES: usize = 16;

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

/// One user's state in a service: its waiters and what it holds. Kept while it waits,
/// holds a counted slot, has a slot held for it, or has just finished a request.
#[derive(Default)]
struct UserQueue {
    waiters: VecDeque<Waiter>,
    /// Virtual finish tag of this user's last queued request.
    last_finish: u64,
    /// Counted slots in flight (granted by the queue, not on the fast path).
    holding: usize,
    /// The user counts as active until then, after a counted request ended.
    linger_until: Option<Instant>,
    /// A freed slot is held for this user until then.
    held_until: Option<Instant>,
}

impl UserQueue {
    fn idle(&self, now: Instant) -> bool {
        self.waiters.is_empty()
            && self.holding == 0
            && self.held_until.is_none()
            && self.linger_until.is_none_or(|t| t <= now)
    }
}

/// What a freed slot is for.
enum Pick {
    /// The head waiter of this user.
    Waiter(Arc<str>),
    /// Held for this user until then.
    Hold(Arc<str>, Instant),
}

#[derive(Default)]
struct Fair {
    users: HashMap<Arc<str>, UserQueue>,
    /// One entry per user with waiters: (start tag, seq) of its head → user.
    heads: BTreeMap<(u64, u64), Arc<str>>,
    /// Virtual time: the start tag of the last waiter served.
    vtime: u64,
    seq: u64,
    /// Users whose counted request ended recently: (end of their active moment, user),
    /// roughly oldest first.
    lingering: VecDeque<(Instant, Arc<str>)>,
    /// Slots held for users (they count in `in_flight`), with their deadlines.
    holds: Vec<(Instant, Arc<str>)>,
    /// Typical time a counted request keeps its slot (moving average).
    request_time: Duration,
}

impl Fair {
    fn index_head(&mut self, key: &Arc<str>) {
        if let Some(w) = self.users.get(key).and_then(|q| q.waiters.front()) {
            self.heads.insert((w.start, w.seq), key.clone());
        }
    }

    fn forget_if_idle(&mut self, key: &Arc<str>, now: Instant) {
        if self.users.get(key).is_some_and(|q| q.idle(now)) {
            self.users.remove(key);
        }
    }

    /// Drops users whose active moment is over and ends expired holds; returns how
    /// many held slots were given back.
    fn expire(&mut self, now: Instant) -> usize {
        while let Some((until, key)) = self.lingering.front() {
            if *until > now {
                break;
            }
            let key = key.clone();
            self.lingering.pop_front();
            self.forget_if_idle(&key, now);
        }
        let mut freed = 0;
        let mut i = 0;
        while i < self.holds.len() {
            if self.holds[i].0 > now {
                i += 1;
                continue;
            }
            let (_, key) = self.holds.swap_remove(i);
            if let Some(q) = self.users.get_mut(&key) {
                q.held_until = None;
            }
            self.forget_if_idle(&key, now);
            freed += 1;
        }
        freed
    }

    /// Takes the slot held for `key`, if any.
    fn claim_hold(&mut self, key: &str) -> bool {
        let Some(q) = self.users.get_mut(key) else {
            return false;
        };
        if q.held_until.take().is_none() {
            return false;
        }
        q.holding += 1;
        self.holds.retain(|(_, k)| &**k != key);
        true
    }

    /// Who gets a freed slot: a user below its fair share first.
    fn pick(&self, cap: usize, now: Instant) -> Option<Pick> {
        let active = self.users.len().max(1);
        let below = |key: &Arc<str>| {
            self.users
                .get(key)
                .is_some_and(|q| q.holding * active < cap)
        };
        let (_, first) = self.heads.first_key_value()?;
        if below(first) {
            return Some(Pick::Waiter(first.clone()));
        }
        // At most `cap` users can be at or above their share, so this scan is bounded.
        if let Some((_, key)) = self.heads.iter().skip(1).take(cap).find(|(_, k)| below(k)) {
            return Some(Pick::Waiter(key.clone()));
        }
        let held_for = self
            .lingering
            .iter()
            .rev()
            .take(HOLD_CANDIDATES)
            .find(|(until, key)| {
                *until > now
                    && self.users.get(key).is_some_and(|q| {
                        q.waiters.is_empty()
                            && q.held_until.is_none()
                            && q.linger_until == Some(*until)
                            && q.holding * active < cap
                    })
            });
        match held_for {
            Some((until, key)) => Some(Pick::Hold(key.clone(), *until)),
            None => Some(Pick::Waiter(first.clone())),
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
    /// The user and the grant time, when the queue handed the slot out and counts it.
    counted: Option<(Arc<str>, Instant)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.counted.take() {
            Some((user, since)) => self.queue.release_counted(&user, since),
            None => {
                self.queue.in_flight.fetch_sub(1, SeqCst);
                if self.queue.waiting.load(SeqCst) > 0 {
                    self.queue.dispatch();
                }
            }
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
        if was_head {
            let key = self.key.clone();
            fair.index_head(&key);
        }
        fair.forget_if_idle(&self.key, Instant::now());
        false
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.done && self.leave() {
            drop(self.queue.counted_permit(self.key.clone()));
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
    pub fn set_max_in_flight(self: &Arc<Self>, max: usize) {
        self.max_in_flight.store(max.max(1), SeqCst);
        self.dispatch();
    }

    /// Slots in use, including slots held for a returning user.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    /// Users tracked: waiting, holding counted slots or just finished (at most
    /// `max_users` plus the overflow queue).
    pub fn users(&self) -> usize {
        self.lock().users.len()
    }

    /// Forgets users whose active moment is over and ends expired holds.
    pub fn sweep(self: &Arc<Self>) {
        self.dispatch();
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

    /// A slot at once, when one is free and nobody waits for one; `None` otherwise
    /// (then [`acquire`](Self::acquire) queues fairly).
    pub fn acquire_now(self: &Arc<Self>) -> Option<Permit> {
        (self.waiting.load(SeqCst) == 0 && self.try_take()).then(|| self.permit())
    }

    /// Gets a slot for `user`: at once below the cap, else after a fair wait.
    /// Returns how long it waited (zero on the fast path) with the permit.
    pub async fn acquire(
        self: &Arc<Self>,
        user: &str,
        policy: &QueuePolicy,
    ) -> Result<(Permit, Duration), QueueError> {
        if let Some(permit) = self.acquire_now() {
            return Ok((permit, Duration::ZERO));
        }
        let started = Instant::now();
        let (key, seq, rx) = {
            let mut fair = self.lock();
            let key: Arc<str> = match fair.users.get_key_value(user) {
                Some((k, _)) => k.clone(),
                None if fair.users.len() < self.max_users => Arc::from(user),
                None => Arc::from(OVERFLOW_KEY),
            };
            if fair.claim_hold(&key) {
                return Ok((self.counted_permit(key), Duration::ZERO));
            }
            if fair.heads.is_empty() && self.try_take() {
                fair.users.entry(key.clone()).or_default().holding += 1;
                return Ok((self.counted_permit(key), Duration::ZERO));
            }
            let vtime = fair.vtime;
            fair.seq += 1;
            let seq = fair.seq;
            let q = fair.users.entry(key.clone()).or_default();
            if q.waiters.len() >= policy.max_depth {
                fair.forget_if_idle(&key, started);
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
            Ok((self.counted_permit(guard.key.clone()), started.elapsed()))
        } else {
            Err(QueueError::Timeout)
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            queue: self.clone(),
            counted: None,
        }
    }

    /// A permit for a slot already counted in `holding` of `user`.
    fn counted_permit(self: &Arc<Self>, user: Arc<str>) -> Permit {
        Permit {
            queue: self.clone(),
            counted: Some((user, Instant::now())),
        }
    }

    /// Gives back a counted slot; its user stays active for a moment, in case it is about
    /// to send its next request.
    fn release_counted(self: &Arc<Self>, user: &Arc<str>, since: Instant) {
        let mut fair = self.lock();
        let now = Instant::now();
        let took = now.saturating_duration_since(since);
        fair.request_time = if fair.request_time.is_zero() {
            took
        } else {
            (fair.request_time * 7 + took) / 8
        };
        let linger = (fair.request_time / HOLD_FRACTION).min(MAX_HOLD);
        if let Some(q) = fair.users.get_mut(user) {
            q.holding = q.holding.saturating_sub(1);
            if !linger.is_zero() {
                q.linger_until = Some(now + linger);
                fair.lingering.push_back((now + linger, user.clone()));
            }
        }
        fair.forget_if_idle(user, now);
        self.in_flight.fetch_sub(1, SeqCst);
        if self.waiting.load(SeqCst) > 0 || !fair.holds.is_empty() {
            self.dispatch_locked(&mut fair, now);
        }
    }

    fn dispatch(self: &Arc<Self>) {
        let mut fair = self.lock();
        self.dispatch_locked(&mut fair, Instant::now());
    }

    /// Ends expired holds, then hands free slots out: to waiters of users below their
    /// fair share first, else holds them for such a user who just finished, else to the
    /// smallest start tag.
    fn dispatch_locked(self: &Arc<Self>, fair: &mut Fair, now: Instant) {
        let freed = fair.expire(now);
        if freed > 0 {
            self.in_flight.fetch_sub(freed, SeqCst);
        }
        while !fair.heads.is_empty() && self.try_take() {
            let pick = fair.pick(self.max_in_flight.load(SeqCst), now);
            let key = match pick {
                Some(Pick::Hold(key, until)) => {
                    // Only with a timer to end the hold; without one, no hold.
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        if let Some(q) = fair.users.get_mut(&key) {
                            q.held_until = Some(until);
                            fair.holds.push((until, key));
                            let queue = Arc::downgrade(self);
                            rt.spawn(async move {
                                tokio::time::sleep_until(until).await;
                                if let Some(q) = queue.upgrade() {
                                    q.dispatch();
                                }
                            });
                            continue;
                        }
                    }
                    match fair.heads.first_key_value() {
                        Some((_, k)) => k.clone(),
                        None => {
                            self.in_flight.fetch_sub(1, SeqCst);
                            break;
                        }
                    }
                }
                Some(Pick::Waiter(key)) => key,
                None => {
                    self.in_flight.fetch_sub(1, SeqCst);
                    break;
                }
            };
            if !self.grant(fair, &key) {
                self.in_flight.fetch_sub(1, SeqCst);
            }
        }
    }

    /// Hands the slot just taken to `key`'s head waiter; `false` if there was none to take it.
    fn grant(&self, fair: &mut Fair, key: &Arc<str>) -> bool {
        let Some(w) = fair.users.get_mut(key).and_then(|q| q.waiters.pop_front()) else {
            // Not expected: drop the stale head entry so the dispatch loop moves on.
            fair.heads.retain(|_, k| k != key);
            return false;
        };
        fair.heads.remove(&(w.start, w.seq));
        fair.vtime = fair.vtime.max(w.start);
        self.waiting.fetch_sub(1, SeqCst);
        let sent = w.tx.send(()).is_ok();
        if let Some(q) = fair.users.get_mut(key) {
            if sent {
                q.holding += 1;
            }
        }
        fair.index_head(key);
        if !sent {
            // The receiver is gone without leaving the queue: give the slot back.
            fair.forget_if_idle(key, Instant::now());
        }
        sent
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
