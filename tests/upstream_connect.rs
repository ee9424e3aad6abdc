//! How busbar gets an upstream connection when none is idle (issue 21, the HTTP/2 tail):
//! its own connect raced against a connection another request gives back meanwhile.
//!
//! Measured in `load-tests/bench.sh`'s `lat` scenario: when HTTP/2 streams bunch up, each
//! finds no idle connection and connects; the backend's listen queue (nginx's 511) fills,
//! Linux drops the SYNs past it, and a dropped SYN is sent again only after 1 s — the
//! default connect timeout — so those requests failed with 504 or took a second. Here a
//! backend that accepts one connection and then none (its queue full) stands for that.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Busbar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Serves HTTP/1.1 keep-alive on one connection: `GET /slow` answered after 400 ms, any
/// other path at once. Records each request's path.
async fn serve_one(mut s: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let Ok(n) = s.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    }
}

/// A second request that finds no idle connection, while the backend's listen queue
/// drops its SYN, is served on the connection the first request gives back — in about
/// the first request's time, not after the kernel's 1 s SYN retransmission (or a 504).
#[tokio::test]
async fn a_request_whose_connect_is_dropped_takes_the_connection_given_back() {
    // Backlog 1: Linux queues two unaccepted connections, and drops SYNs past them.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let backend: SocketAddr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(Mutex::new(0usize));
    let server = {
        let (seen, accepted) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            // The one connection busbar opens first; after it, nothing more is accepted.
            let (s, _) = listener.accept().await.unwrap();
            *accepted.lock().unwrap() += 1;
            let one = tokio::spawn(serve_one(s, seen));
            let _listener = listener;
            let _ = one.await;
        })
    };
    let bus = Busbar::start(&common::one_route(
        backend,
        "",
        // Longer than the test, so that before the race a dropped SYN shows as the
        // kernel's retransmission (or this timeout), never as a quick answer.
        "connect_timeout = \"3s\"",
    ))
    .await;
    let client = common::h2c_client();

    // The first request opens the one connection the backend accepts; it is pooled.
    let r = client.get(bus.url("/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Fill the backend's accept queue: two connections the backend never accepts.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        fillers.push(TcpStream::connect(backend).await.unwrap());
    }
    // Past them a connect gets nowhere (its SYN is dropped).
    let stuck = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(backend)).await;
    assert!(stuck.is_err(), "the backend's listen queue is full");

    // A slow request takes the pooled connection; a second one, a moment later, finds
    // none idle and must connect.
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), bus.url("/slow"));
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let second = client.get(bus.url("/second")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    assert_eq!(
        second.status(),
        200,
        "{:?}",
        second.text().await.unwrap_or_default()
    );
    assert_eq!(second.text().await.unwrap(), "ok\n");
    // The slow answer comes ~300 ms after the second request started; the kernel's
    // retransmitted SYN would come after 1 s (and be dropped again). Generous for a
    // loaded machine, and still under the retransmission.
    assert!(
        took < Duration::from_millis(900),
        "the second request took {took:?}: it waited for its own connect"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["/first", "/slow", "/second"],
        "all three on the backend's one connection"
    );
    assert_eq!(*accepted.lock().unwrap(), 1);
    drop(fillers);
    server.abort();
}
