//! The time of a connection task's turn: the clock read once per poll of a task that
//! runs in [`turns`], and handed to everything on the request path that needs "now"
//! (deadlines, the request's start, its upstream and total times, the pool's idle ages),
//! as nginx reads the clock once per turn of its event loop.
//!
//! Owns: this thread's reading for the turn under way. Outside a turn (a task not run in
//! [`turns`], a background task, a test) [`now`] is the clock itself.
//! Must not: be used where a reading must come after an await in the same poll would
//! have moved it: a turn's reading is as old as the poll's own work so far (microseconds;
//! tokio's cooperative budget bounds a poll's length), never older.
//!
//! A read of the clock costs a call into the vDSO and the conversion to an `Instant`
//! (~50 instructions here, more on a machine with a slow clock source); the HTTP/1 path
//! made about ten a request, most within the same poll.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::time::Instant;

thread_local! {
    /// A turn is under way on this thread.
    static IN_TURN: Cell<bool> = const { Cell::new(false) };
    /// The turn's reading, once something asked for it.
    static READ: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Now: the turn's reading when a turn is under way (read at the turn's first call),
/// else the clock.
#[inline]
pub fn now() -> Instant {
    if let Some(t) = READ.with(Cell::get) {
        return t;
    }
    let t = Instant::now();
    if IN_TURN.with(Cell::get) {
        READ.with(|r| r.set(Some(t)));
    }
    t
}

/// Runs `fut` with a turn around each of its polls: within one poll, [`now`] reads the
/// clock once. A turn inside another (nested `turns`) is part of the outer one.
///
/// `fut` is already pinned (a `Pin<Box<_>>` or `Pin<&mut _>`): the returned future holds
/// only that pointer. An `async fn` taking the future by value kept it twice in its own
/// state (the argument and the pinned local), which cost every idle HTTP/1 connection
/// ~1.1 KiB (10,000 idle: 44.4 → 55.5 MiB).
pub fn turns<F: Future + Unpin>(mut fut: F) -> impl Future<Output = F::Output> {
    poll_fn(move |cx| {
        let _turn = Turn::begin();
        Pin::new(&mut fut).poll(cx)
    })
}

struct Turn {
    /// This turn began one: it ends it.
    outer: bool,
}

impl Turn {
    fn begin() -> Turn {
        let outer = !IN_TURN.with(|t| t.replace(true));
        if outer {
            READ.with(|r| r.set(None));
        }
        Turn { outer }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.outer {
            IN_TURN.with(|t| t.set(false));
            READ.with(|r| r.set(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn outside_a_turn_now_is_the_clock() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= a + Duration::from_millis(2));
    }

    /// Within one poll the reading stays; the next poll reads the clock again, and
    /// after the turns end `now` is the clock once more.
    #[tokio::test]
    async fn a_turn_reads_the_clock_once_per_poll() {
        let (first, same, later) = turns(std::pin::pin!(async {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            let same = now();
            tokio::task::yield_now().await;
            (first, same, now())
        }))
        .await;
        assert_eq!(first, same);
        assert!(
            later >= first + Duration::from_millis(2),
            "{later:?} {first:?}"
        );
        let outside = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > outside);
    }

    #[tokio::test]
    async fn a_nested_turn_is_part_of_the_outer_one() {
        turns(std::pin::pin!(async {
            let outer = now();
            let inner = turns(std::pin::pin!(async {
                std::thread::sleep(Duration::from_millis(1));
                now()
            }))
            .await;
            assert_eq!(outer, inner);
            // The inner turn's end did not end the outer one.
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(now(), outer);
        }))
        .await;
    }
}
