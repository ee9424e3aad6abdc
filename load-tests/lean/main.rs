//! The ceiling of a hand-written tokio HTTP/1.1 proxy on this machine: what an own HTTP/1
//! engine under busbar could reach at best, with no policy at all. `load-tests/bench.sh`
//! runs it beside nginx, bare pingora and busbar (scenario a) when built.
//!
//! One current-thread tokio runtime per thread; per connection, a loop that reads a request
//! head (httparse), takes an idle upstream connection from the thread's pool (or opens
//! one), writes the head, reads the response head and its `Content-Length` body, and
//! writes them back. Requests with a body, chunked responses and anything unusual are
//! answered 501: it proxies exactly what the bench sends, and nothing else.
//!
//! Usage: lean-proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]

use std::cell::RefCell;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 4096;

thread_local! {
    static POOL: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

fn head_len(buf: &[u8]) -> Option<(usize, Option<usize>)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok());
            Some((n, len))
        }
        _ => None,
    }
}

/// One request's trip upstream: returns false when the client connection must close.
async fn forward(up: &mut TcpStream, head: &[u8], out: &mut Vec<u8>) -> std::io::Result<bool> {
    up.write_all(head).await?;
    out.clear();
    loop {
        if out.capacity() - out.len() < 512 {
            out.reserve(BUF);
        }
        if up.read_buf(out).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some((n, len)) = head_len(out) {
            let Some(len) = len else { return Ok(false) };
            while out.len() < n + len {
                out.reserve(n + len - out.len());
                if up.read_buf(out).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            return Ok(true);
        }
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(BUF);
    let mut out = Vec::with_capacity(BUF);
    loop {
        let end = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let has_body = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        || h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
                });
                if has_body {
                    client
                        .write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await?;
                    return Ok(());
                }
                break n;
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(BUF);
            }
            if client.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let mut up = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(up) => up,
            None => {
                let up = TcpStream::connect(upstream).await?;
                up.set_nodelay(true)?;
                up
            }
        };
        let keep = forward(&mut up, &buf[..end], &mut out).await?;
        client.write_all(&out).await?;
        if !keep {
            return Ok(());
        }
        POOL.with(|p| p.borrow_mut().push(up));
        buf.drain(..end);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: lean-proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN_ADDR");
    let upstream: SocketAddr = args[2].parse().expect("UPSTREAM_ADDR");
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let std_listener = std::net::TcpListener::bind(listen).expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let l = std_listener.try_clone().expect("listener");
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let listener = TcpListener::from_std(l).expect("listener");
                    loop {
                        let Ok((c, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = c.set_nodelay(true);
                        tokio::task::spawn_local(serve(c, upstream));
                    }
                });
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}
