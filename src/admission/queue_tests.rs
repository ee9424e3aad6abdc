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
