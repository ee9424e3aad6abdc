//! Queue tests on tokio's paused clock: fairness, depth, wait limit, cancellation, caps.

use super::*;
use std::sync::Mutex as StdMutex;

fn policy(depth: usize, wait_ms: u64) -> QueuePolicy {
    QueuePolicy {
        max_depth: depth,
        max_wait: Duration::from_millis(wait_ms),
    }
}

#[tokio::test(start_paused = true)]
async fn below_the_cap_requests_pass_at_once() {
    let q = Arc::new(ServiceQueue::new(2, 10));
    let (a, wa) = q.acquire("ip:a", &policy(1, 10)).await.unwrap();
    let (_b, wb) = q.acquire("ip:a", &policy(1, 10)).await.unwrap();
    assert_eq!((wa, wb), (Duration::ZERO, Duration::ZERO));
    assert_eq!(q.in_flight(), 2);
    drop(a);
    assert_eq!(q.in_flight(), 1);
}

/// Two users backlogged, one with ten times the requests: slots alternate between them
/// while both have waiters, and the flood is served only after the polite user is done.
#[tokio::test(start_paused = true)]
async fn backlogged_users_share_slots_equally() {
    let q = Arc::new(ServiceQueue::new(1, 100));
    let order = Arc::new(StdMutex::new(Vec::new()));
    let (hold, _) = q.acquire("ip:x", &policy(100, 60_000)).await.unwrap();
    let mut tasks = Vec::new();
    for (user, n) in [("jwt:flood", 50), ("jwt:polite", 5)] {
        for _ in 0..n {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let (permit, _) = q.acquire(user, &policy(100, 60_000)).await.unwrap();
                order.lock().unwrap().push(user);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }));
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(q.waiting(), 55);
    drop(hold);
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap();
    // Among the first 10 served, the polite user got its 5: half the capacity.
    let polite_early = order[..10].iter().filter(|u| **u == "jwt:polite").count();
    assert_eq!(polite_early, 5, "{order:?}");
    assert_eq!(order.len(), 55);
}

/// A user who arrives while a flood is queued is served right after the flood's head,
/// not behind the whole flood.
#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_wait_behind_a_flood() {
    let q = Arc::new(ServiceQueue::new(1, 100));
    let order = Arc::new(StdMutex::new(Vec::new()));
    let (hold, _) = q.acquire("ip:x", &policy(100, 60_000)).await.unwrap();
    let mut tasks = Vec::new();
    for user in std::iter::repeat_n("ip:flood", 20).chain(["ip:polite"]) {
        let (q, order) = (q.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let (permit, _) = q.acquire(user, &policy(100, 60_000)).await.unwrap();
            order.lock().unwrap().push(user);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(permit);
        }));
        tokio::task::yield_now().await;
    }
    drop(hold);
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap();
    let pos = order.iter().position(|u| *u == "ip:polite");
    assert!(pos.is_some_and(|p| p <= 1), "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn a_full_user_queue_is_refused_without_touching_others() {
    let q = Arc::new(ServiceQueue::new(1, 100));
    let (_hold, _) = q.acquire("ip:x", &policy(2, 1000)).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let q = q.clone();
        waiting.push(tokio::spawn(async move {
            q.acquire("ip:a", &policy(2, 1000)).await.map(|_| ())
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(
        q.acquire("ip:a", &policy(2, 1000)).await.err(),
        Some(QueueError::Full)
    );
    let q2 = q.clone();
    let other = tokio::spawn(async move { q2.acquire("ip:b", &policy(2, 1000)).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(q.waiting(), 3);
    drop(other);
    drop(waiting);
}

#[tokio::test(start_paused = true)]
async fn waiting_past_max_wait_times_out_and_leaves_the_queue() {
    let q = Arc::new(ServiceQueue::new(1, 100));
    let (hold, _) = q.acquire("ip:x", &policy(4, 100)).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let r = q.acquire("ip:a", &policy(4, 100)).await;
    assert_eq!(r.err(), Some(QueueError::Timeout));
    assert_eq!(t0.elapsed(), Duration::from_millis(100));
    assert_eq!((q.waiting(), q.users()), (0, 0));
    drop(hold);
    assert_eq!(q.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place_and_loses_no_slot() {
    let q = Arc::new(ServiceQueue::new(1, 100));
    let (hold, _) = q.acquire("ip:x", &policy(1, 60_000)).await.unwrap();
    let q2 = q.clone();
    let gone =
        tokio::spawn(async move { q2.acquire("ip:a", &policy(1, 60_000)).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(q.waiting(), 1);
    gone.abort();
    let _ = gone.await;
    assert_eq!((q.waiting(), q.users()), (0, 0));
    // The same user can queue again (its depth of 1 is free), and the slot still works.
    let q3 = q.clone();
    let next =
        tokio::spawn(async move { q3.acquire("ip:a", &policy(1, 60_000)).await.map(|_| ()) });
    tokio::task::yield_now().await;
    drop(hold);
    next.await.unwrap().unwrap();
    assert_eq!(q.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn tracked_users_are_capped_by_an_overflow_queue() {
    let q = Arc::new(ServiceQueue::new(1, 3));
    let (_hold, _) = q.acquire("ip:x", &policy(1, 60_000)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.acquire(&format!("ip:{i}"), &policy(1, 60_000))
                .await
                .map(|_| ())
        }));
    }
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    // 3 users tracked plus the shared overflow queue (depth 1): the rest are refused.
    assert_eq!(q.users(), 4);
    assert_eq!(q.waiting(), 4);
    let refused = futures_count(tasks).await;
    assert_eq!(refused, 46);
}

async fn futures_count(tasks: Vec<tokio::task::JoinHandle<Result<(), QueueError>>>) -> usize {
    let mut refused = 0;
    for t in tasks {
        if t.is_finished() {
            if let Ok(Err(QueueError::Full)) = t.await {
                refused += 1;
            }
        } else {
            t.abort();
        }
    }
    refused
}

#[tokio::test(start_paused = true)]
async fn raising_the_cap_on_reload_serves_waiters() {
    let q = Arc::new(ServiceQueue::new(1, 10));
    let (_hold, _) = q.acquire("ip:x", &policy(4, 60_000)).await.unwrap();
    let q2 = q.clone();
    let w = tokio::spawn(async move { q2.acquire("ip:a", &policy(4, 60_000)).await.map(|_| ()) });
    tokio::task::yield_now().await;
    q.set_max_in_flight(2);
    w.await.unwrap().unwrap();
}

/// The case fair queuing alone loses: cap 2, a flood keeping its queue full, a polite
/// user sending one request at a time, and every request taking exactly 200 ms, so the
/// polite user's slot and a flood slot free at the same instant. Without holding the
/// freed slot for the polite user (who is between two requests at that instant), both
/// slots go to the flood and every polite request waits a whole request time.
#[tokio::test(start_paused = true)]
async fn a_polite_user_between_requests_keeps_its_share() {
    const WORK: Duration = Duration::from_millis(200);
    let q = Arc::new(ServiceQueue::new(2, 100));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..8 {
        let (q, stop) = (q.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let mut served = 0u32;
            while !stop.load(SeqCst) {
                match q.acquire("ip:flood", &policy(4, 60_000)).await {
                    Ok((permit, _)) => {
                        tokio::time::sleep(WORK).await;
                        drop(permit);
                        served += 1;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            served
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        (q.in_flight(), q.waiting()),
        (2, 4),
        "the flood fills the service"
    );
    let mut waits = Vec::new();
    for _ in 0..20 {
        let (permit, waited) = q.acquire("ip:polite", &policy(4, 60_000)).await.unwrap();
        waits.push(waited);
        tokio::time::sleep(WORK).await;
        drop(permit);
        // The client reads the response and sends its next request.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, SeqCst);
    let flood_served: u32 = {
        let mut n = 0;
        for f in flood {
            n += f.await.unwrap();
        }
        n
    };
    // The first request may wait up to one request time for a slot to free; after that
    // the polite user's slot is held across its 1 ms turnaround.
    assert!(waits[0] <= WORK, "{waits:?}");
    assert!(
        waits[1..].iter().all(|w| *w <= Duration::from_millis(1)),
        "{waits:?}"
    );
    // The flood kept the other slot busy the whole time: about 20 × 201 ms / 200 ms.
    assert!(flood_served >= 19, "flood served {flood_served}");
    // Once everyone is gone, the held slots and lingering users are gone too.
    tokio::time::sleep(WORK * 2).await;
    q.sweep();
    assert_eq!((q.in_flight(), q.waiting(), q.users()), (0, 0, 0));
}

/// A hold is bounded: when the user it was kept for does not come back, the slot goes
/// to the next waiter after at most [`MAX_HOLD`].
#[tokio::test(start_paused = true)]
async fn a_hold_for_a_user_who_does_not_return_expires() {
    const WORK: Duration = Duration::from_millis(200);
    let q = Arc::new(ServiceQueue::new(2, 100));
    // Two fast-path (uncounted) requests fill the service; then the polite user and three
    // flood requests queue, so the next slots are handed out (and counted) by the queue.
    let (a, _) = q.acquire("ip:x", &policy(4, 60_000)).await.unwrap();
    let (b, _) = q.acquire("ip:y", &policy(4, 60_000)).await.unwrap();
    let mut tasks = Vec::new();
    for user in ["ip:polite", "ip:flood", "ip:flood", "ip:flood"] {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let (p, waited) = q.acquire(user, &policy(4, 60_000)).await.unwrap();
            tokio::time::sleep(WORK).await;
            drop(p);
            waited
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(q.waiting(), 4);
    let t0 = tokio::time::Instant::now();
    drop(a);
    drop(b);
    // Polite and one flood request run from t0 to t0 + 200 ms; the polite user then
    // leaves for good. Its slot is held (the flood is at its share of 1 of 2 slots)…
    tokio::time::sleep_until(t0 + WORK + Duration::from_millis(5)).await;
    assert_eq!(
        (q.in_flight(), q.waiting()),
        (2, 1),
        "one slot held, one flood waiter"
    );
    // …until the hold ends, a quarter of the 200 ms request time capped at MAX_HOLD.
    tokio::time::sleep_until(t0 + WORK + MAX_HOLD + Duration::from_millis(1)).await;
    assert_eq!(
        q.waiting(),
        0,
        "the hold expired and the flood got the slot"
    );
    let waits: Vec<Duration> = futures_join(tasks).await;
    assert_eq!(waits[3], WORK + MAX_HOLD, "{waits:?}");
    tokio::time::sleep(WORK).await;
    q.sweep();
    assert_eq!((q.in_flight(), q.users()), (0, 0));
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<Duration>>) -> Vec<Duration> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
