//! Coarse deadlines for the front door and the own HTTP/1 path: `within(limit, future)`
//! without an allocation or a timer registration per wait.
//!
//! Owns: each runtime thread's table of armed deadlines and the task that sweeps it every
//! [`TICK`]. A wait that ends before its deadline (nearly all of them) costs a clock read
//! and a slot in a `Vec`. pingora's `timeout` costs several times that and four
//! allocations a request for the same two waits (a B-tree lookup on a shared wheel, an
//! `Arc`, a boxed future, a `Notify`; profiles in `load-tests/RESULTS.md`); tokio's timer
//! wakes a parked runtime through its eventfd (see `edge::read_first`).
//! Must not: be exact. A deadline fires up to one [`TICK`] after it passes, as pingora's
//! and nginx's coarse timers do; it is armed from the turn's reading of the clock
//! (`clock::now`), which may be the poll's own work (microseconds) old.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::clock;

/// How often a thread's table is looked at while it holds a deadline.
pub const TICK: Duration = Duration::from_millis(10);

/// Slots a table keeps allocated once every one of them is free again (40 KiB of slots):
/// a spike of connections past this leaves nothing behind when it is over.
const KEEP_SLOTS: usize = 1024;

/// The limit passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` until it finishes or `limit` passes, whichever is first. The future is
/// polled before a deadline is armed, so one that is ready at once arms none.
pub fn within<F: Future>(limit: Duration, fut: F) -> Within<F> {
    Within {
        fut,
        limit,
        by: None,
        armed: Armed(None),
    }
}

/// [`within`], and also no later than `by`: the deadline is whichever comes first,
/// worked out only if the future has to wait (a wait that ends at once costs no clock
/// read and no arithmetic on `Instant`s).
pub fn within_by<F: Future>(limit: Duration, by: Instant, fut: F) -> Within<F> {
    Within {
        fut,
        limit,
        by: Some(by),
        armed: Armed(None),
    }
}

pin_project_lite::pin_project! {
    /// [`within`]'s future: the wrapped future held once, in place. (An `async fn`
    /// taking the future by value keeps room for it twice, the argument and its pinned
    /// local, and a wrapper around that three times: every idle HTTP/2 connection's
    /// future carried its handshake's so, ~2 KiB.)
    pub struct Within<F> {
        #[pin]
        fut: F,
        limit: Duration,
        by: Option<Instant>,
        armed: Armed,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        this.armed.poll(*this.limit, *this.by, cx)
    }
}

#[derive(PartialEq, Eq)]
enum State {
    Free,
    Armed,
    Expired,
}

struct Slot {
    at: Instant,
    waker: Option<Waker>,
    state: State,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    armed: usize,
    /// No armed deadline is earlier than this (it may be later than the earliest one
    /// left after a removal: then a sweep finds nothing, and corrects it).
    earliest: Option<Instant>,
}

impl Table {
    fn arm(&mut self, at: Instant, waker: Waker) -> usize {
        let slot = Slot {
            at,
            waker: Some(waker),
            state: State::Armed,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.armed += 1;
        self.earliest = Some(self.earliest.map_or(at, |e| e.min(at)));
        i
    }

    fn disarm(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.state == State::Armed {
            self.armed -= 1;
        }
        slot.state = State::Free;
        slot.waker = None;
        self.free.push(i);
        if self.free.len() == self.slots.len() && self.slots.capacity() > KEEP_SLOTS {
            // Every slot is free, so no `Armed` holds an index: the storage a spike grew
            // goes back. Kept, the slots (40 B each) and the free list (8 B each) stayed
            // at the spike's size for good, and with them the allocator pages they sit
            // on: after 10,000 idle TLS connections closed, 0.4–3.7 MiB RSS (the slots'
            // 640 KiB block; the free list's 128 KiB block, grown as they closed, on a
            // 4 MiB page that still held the spike's freed memory).
            self.slots = Vec::new();
            self.free = Vec::new();
        }
    }

    /// Marks what is due by `now` expired and hands back their wakers.
    fn sweep(&mut self, now: Instant, due: &mut Vec<Waker>) {
        if self.earliest.is_none_or(|e| e > now) {
            return;
        }
        let mut earliest = None::<Instant>;
        for slot in self.slots.iter_mut().filter(|s| s.state == State::Armed) {
            if slot.at <= now {
                slot.state = State::Expired;
                self.armed -= 1;
                due.extend(slot.waker.take());
            } else {
                earliest = Some(earliest.map_or(slot.at, |e| e.min(slot.at)));
            }
        }
        self.earliest = earliest;
    }
}

/// One runtime thread's deadlines and the task that sweeps them.
struct Sweep {
    table: Mutex<Table>,
    /// Wakes the sweeper when its table gets a first deadline.
    armed: Notify,
    /// The sweeper task runs (it stops with its runtime; the next wait starts another).
    running: AtomicBool,
}

impl Sweep {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This thread's table, with a sweeper running on the current runtime. `None`
    /// outside a runtime (no task could be woken there anyway).
    fn here() -> Option<Arc<Sweep>> {
        thread_local! {
            static HERE: Arc<Sweep> = Arc::new(Sweep {
                table: Mutex::new(Table::default()),
                armed: Notify::new(),
                running: AtomicBool::new(false),
            });
        }
        let sweep = HERE.try_with(Arc::clone).ok()?;
        if !sweep.running.load(Ordering::Acquire) {
            let rt = tokio::runtime::Handle::try_current().ok()?;
            sweep.running.store(true, Ordering::Release);
            rt.spawn(sweeper(sweep.clone(), Running(sweep.clone())));
        }
        Some(sweep)
    }
}

/// Says the sweeper stopped when its task is dropped: mid-sleep with its runtime, or
/// before it ever ran (spawned on a runtime that was shutting down).
struct Running(Arc<Sweep>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

async fn sweeper(sweep: Arc<Sweep>, _running: Running) {
    let mut due = Vec::new();
    loop {
        if sweep.lock().armed == 0 {
            // A deadline armed after this check leaves a permit: no wake-up is lost.
            sweep.armed.notified().await;
            continue;
        }
        tokio::time::sleep(TICK).await;
        sweep.lock().sweep(Instant::now(), &mut due);
        due.drain(..).for_each(Waker::wake);
        if due.capacity() > KEEP_SLOTS {
            // A spike of deadlines that passed at once: not kept for the next one.
            due = Vec::new();
        }
    }
}

/// The deadline of one `within`, armed at its first wait; disarmed when dropped.
struct Armed(Option<(Arc<Sweep>, usize)>);

impl Armed {
    /// Pending until the deadline passes: arms it at the first call, then checks it and
    /// keeps the waker current.
    fn poll<T>(
        &mut self,
        limit: Duration,
        by: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, Elapsed>> {
        let Some((sweep, i)) = &self.0 else {
            // Outside a runtime nothing can time out; the wait is only the future's.
            // A limit past the clock's range never passes. "Now" is the turn's
            // (`clock`): the deadline is at most a poll's work early.
            let at = match (clock::now().checked_add(limit), by) {
                (Some(at), Some(by)) => Some(at.min(by)),
                (at, by) => at.or(by),
            };
            if let (Some(sweep), Some(at)) = (Sweep::here(), at) {
                let (i, first) = {
                    let mut table = sweep.lock();
                    let i = table.arm(at, cx.waker().clone());
                    (i, table.armed == 1)
                };
                if first {
                    sweep.armed.notify_one();
                }
                self.0 = Some((sweep, i));
            }
            return Poll::Pending;
        };
        let mut table = sweep.lock();
        let slot = &mut table.slots[*i];
        if slot.state == State::Expired {
            return Poll::Ready(Err(Elapsed));
        }
        match &mut slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some((sweep, i)) = self.0.take() {
            sweep.lock().disarm(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_future_arms_nothing() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await, Ok(7));
        let sweep = Sweep::here().unwrap();
        assert!(sweep.lock().slots.is_empty());
    }

    #[tokio::test]
    async fn a_wait_past_its_limit_elapses_within_a_tick_or_so() {
        let start = Instant::now();
        let r = within(Duration::from_millis(50), std::future::pending::<()>()).await;
        let took = start.elapsed();
        assert_eq!(r, Err(Elapsed));
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
        // The slot went back to the table.
        let sweep = Sweep::here().unwrap();
        let table = sweep.lock();
        assert_eq!(table.armed, 0);
        assert_eq!(table.free.len(), table.slots.len());
    }

    #[tokio::test]
    async fn a_wait_that_ends_first_keeps_its_result_and_frees_its_slot() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(5);
        });
        assert_eq!(within(Duration::from_secs(5), rx).await, Ok(Ok(5)));
        let sweep = Sweep::here().unwrap();
        assert_eq!(sweep.lock().armed, 0);
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_limit_or_its_instant_whichever_is_first() {
        let start = Instant::now();
        let by = start + Duration::from_millis(40);
        let r = within_by(Duration::from_secs(30), by, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(40), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let far = Instant::now() + Duration::from_secs(30);
        let r = within_by(Duration::from_millis(30), far, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        assert_eq!(within_by(Duration::ZERO, start, async { 3 }).await, Ok(3));
    }

    #[tokio::test]
    async fn only_the_waits_past_their_limits_elapse() {
        let short = within(Duration::from_millis(30), std::future::pending::<()>());
        let long = within(Duration::from_secs(30), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "done"
        });
        let (short, long) = tokio::join!(short, long);
        assert_eq!(short, Err(Elapsed));
        assert_eq!(long, Ok("done"));
    }

    #[test]
    fn a_table_gives_back_what_a_spike_grew_once_every_slot_is_free() {
        let mut table = Table::default();
        let at = Instant::now();
        let spike: Vec<usize> = (0..3 * KEEP_SLOTS)
            .map(|_| table.arm(at, Waker::noop().clone()))
            .collect();
        // While one slot is held, its index must stay valid: nothing is released.
        for &i in &spike[1..] {
            table.disarm(i);
        }
        assert_eq!(table.slots.len(), 3 * KEEP_SLOTS);
        assert!(table.slots[spike[0]].state == State::Armed);
        table.disarm(spike[0]);
        assert_eq!(table.armed, 0);
        assert_eq!((table.slots.capacity(), table.free.capacity()), (0, 0));
        // And the table serves on.
        let i = table.arm(at, Waker::noop().clone());
        assert_eq!((i, table.armed), (0, 1));
    }

    #[test]
    fn a_table_within_its_keep_is_not_reallocated() {
        let mut table = Table::default();
        let at = Instant::now();
        let held: Vec<usize> = (0..KEEP_SLOTS)
            .map(|_| table.arm(at, Waker::noop().clone()))
            .collect();
        let slots = table.slots.as_ptr();
        for i in held {
            table.disarm(i);
        }
        assert_eq!(table.slots.as_ptr(), slots);
        assert_eq!(table.free.len(), KEEP_SLOTS);
    }

    #[test]
    fn a_sweeper_spawned_on_a_runtime_that_is_gone_is_started_again() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let gone = rt.handle().clone();
        drop(rt);
        {
            // The spawn is dropped at once, unpolled.
            let _in = gone.enter();
            assert!(Sweep::here().is_some());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let wait = within(Duration::from_millis(20), std::future::pending::<()>());
            tokio::time::timeout(Duration::from_secs(2), wait).await
        });
        assert_eq!(r.ok(), Some(Err(Elapsed)), "no sweeper on this thread");
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_a_sweeper_again() {
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let r = rt.block_on(within(
                Duration::from_millis(20),
                std::future::pending::<()>(),
            ));
            assert_eq!(r, Err(Elapsed));
        }
    }
}
