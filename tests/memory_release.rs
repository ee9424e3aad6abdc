//! After a spike of client connections closes, busbar makes the allocator give back all
//! it holds freed (issue 20: RSS back within 20% of idle 10 s after the spike). What a
//! user sees is the count of those releases in `/metrics`; the RSS figures are
//! `load-tests/bench.sh`'s (`SCENARIOS=tlsmem`), not timed tests.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Busbar};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const RELEASES: &str = "busbar_memory_released_after_spike_total";
const OPEN: &str = "busbar_downstream_connections";

/// A keep-alive connection that has had one GET answered, left open and idle.
async fn answered(bus: &Busbar) -> TcpStream {
    let mut s = TcpStream::connect(bus.http).await.expect("connect");
    s.write_all(b"GET /spike HTTP/1.1\r\nHost: spike\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    common::read_head(&mut s, &mut buf)
        .await
        .expect("an answer");
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    s
}

/// Polls a metric until `ok` holds for it, or `within` passes; its last value.
async fn metric_until(
    bus: &Busbar,
    sample: &str,
    within: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let until = Instant::now() + within;
    loop {
        let v = bus.metric(sample).await;
        if ok(v) || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_spike_of_connections_releases_memory_once() {
    const CONNS: usize = 200;
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&common::one_route(backend.addr, "", "")).await;
    let mut held = Vec::new();
    for _ in 0..CONNS {
        held.push(answered(&bus).await);
    }
    let open = metric_until(&bus, OPEN, Duration::from_secs(20), |v| v >= CONNS as f64).await;
    assert!(
        open >= CONNS as f64,
        "busbar counts {open} open connections, not {CONNS}"
    );
    // Held open across a few housekeeping ticks (one a second): a node that keeps its
    // connections is left alone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        bus.metric(RELEASES).await,
        0.0,
        "released with the connections still open"
    );

    drop(held);
    let open = metric_until(&bus, OPEN, Duration::from_secs(20), |v| v == 0.0).await;
    assert_eq!(open, 0.0, "the connections did not close");
    // The tick after the count stopped falling releases; a loaded machine may be slow.
    let released = metric_until(&bus, RELEASES, Duration::from_secs(30), |v| v >= 1.0).await;
    assert_eq!(released, 1.0, "no release after {CONNS} connections closed");
    // Once per spike: the quiet node is not released again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        bus.metric(RELEASES).await,
        1.0,
        "released again with nothing more closed"
    );
}
