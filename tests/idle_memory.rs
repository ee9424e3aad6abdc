//! What idle client connections cost busbar in resident memory (issues 20 and 21), read
//! from the real process's `/proc/<pid>/status` as `load-tests/bench.sh`'s memory
//! scenarios do. The figures for 10,000 connections are the bench's; these tests hold
//! what makes them: no transparent huge pages under the allocator, and an idle HTTP/2
//! connection's bound. The bounds leave room for a debug build on a loaded machine.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{rss_kib, status_field, Backend, Busbar};
use tokio::net::TcpStream;

/// An h2c connection that has had one GET answered, kept open and idle by its task.
async fn idle_h2c(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("http://localhost/idle")
        .body(())
        .unwrap();
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(req, true)
        .expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    send
}

/// mimalloc asks for huge pages on its arenas; with THP on, each 2 MiB it touches is
/// resident whole, and an idle connection's partly written buffers cost their full size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_runs_without_transparent_huge_pages() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&common::one_route(backend.addr, "", "")).await;
    match status_field(bus.pid(), "THP_enabled") {
        Some(on) => assert_eq!(on, 0, "THP_enabled in busbar's /proc/<pid>/status"),
        // Kernels before 6.x do not say; the bench's figures are then the only check.
        None => eprintln!("this kernel does not report THP_enabled; nothing to check"),
    }
}

/// 1,000 idle h2c connections, each after one answered GET: busbar's resident memory per
/// connection. Debug build here: 39.0 KiB with transparent huge pages, 27.8 without;
/// release, 2,000 connections: 40.0 and 25.7. Most of what is left is the `h2` crate's
/// own (a 16 KiB write buffer, an 8 KiB read buffer, a 4 KiB HPACK buffer, stream slabs,
/// allocated at the handshake whatever the settings); the bound leaves it room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_costs_under_32_kib() {
    const CONNS: u64 = 1000;
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&common::one_route(backend.addr, "", "")).await;
    // One connection first, so what every connection shares (the upstream pool, the
    // engine's first allocations) is in the baseline.
    let warm = idle_h2c(bus.http).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(bus.pid());
    let mut held = Vec::new();
    for _ in 0..CONNS {
        held.push(idle_h2c(bus.http).await);
    }
    // Let busbar's tasks for the answered streams end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(bus.pid());
    let per = after.saturating_sub(before) as f64 / CONNS as f64;
    eprintln!("{CONNS} idle h2c connections: busbar {before} → {after} KiB, {per:.1} KiB each");
    assert!(
        per < 32.0,
        "an idle h2c connection costs busbar {per:.1} KiB ({before} → {after} KiB for {CONNS})"
    );
    drop((warm, held));
}
