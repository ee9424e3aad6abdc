//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary) on a plaintext listener
//! with `proxy_protocol = true`: a load balancer in `listen.trusted_proxies` opens each
//! connection with a header naming the client, and busbar takes that client as the
//! connection's peer, so every phase (ACLs, identities, limits, sticky hashing,
//! forwarding headers, the access log) sees it. Parsing is the `ppp` crate's.
//!
//! A trusted peer must send a whole, valid header within the head deadline, else the
//! connection is closed: a load balancer configured for it always sends one. Anyone else
//! may connect and speak HTTP as on any listener (clients inside the network can
//! reach the node directly), but one that opens with a PROXY header is closed: it is
//! trying to name a client it is not. Either must send its first bytes within the head
//! deadline. A v2 `LOCAL` command (a load balancer's own health
//! check) and a v1 `UNKNOWN` keep the socket's peer.
//!
//! Owns: reading and judging that header, before any HTTP byte is read.
//! Must not: serve the connection (`listeners` hands it on) or read past the header:
//! bytes that came with it are handed back to be read as the request.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (spec §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix (spec §2.1).
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest header read: v1's is at most 107 bytes; v2's address block is at most 216
/// bytes (Unix sockets) plus TLVs, and HAProxy's own recommended receive buffer is 536
/// bytes (spec §2.2). A longer "header" is refused.
const MAX_HEADER: usize = 4096;

/// Why a connection was closed before its first request.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A peer not in `trusted_proxies` sent a PROXY header.
    Untrusted,
    /// A trusted peer sent no header or a malformed one.
    Malformed,
    /// Nothing to tell by within the head deadline.
    Timeout,
}

impl Refusal {
    /// Its `busbar_edge_refusals_total` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Untrusted => "proxy_protocol_untrusted",
            Refusal::Malformed => "proxy_protocol_malformed",
            Refusal::Timeout => "proxy_protocol_timeout",
        }
    }
}

/// What the connection turned out to be: its client, and the bytes read past the
/// header (the start of the first request, to be read again).
#[derive(Debug)]
pub struct Accepted {
    pub client: SocketAddr,
    pub rest: Vec<u8>,
}

/// Reads and judges the header of a connection from `peer`: believed when `peer` is one
/// of `trusted`; the header (or a stranger's first bytes) must come within `timeout`.
pub async fn accept<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: SocketAddr,
    trusted: &[IpNet],
    timeout: Duration,
) -> Result<Accepted, Refusal> {
    let trusted = crate::client_addr::trusted(peer.ip(), trusted);
    let read = async {
        if trusted {
            read_header(s, peer).await
        } else {
            refuse_header(s, peer).await
        }
    };
    // A stranger that says nothing for as long is closed too: what it may have sent
    // (the start of "PROXY ") is gone with the future, and it is holding a connection.
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(Refusal::Timeout))
}

/// A trusted peer's header: read until `ppp` has a whole one, or says it never will.
async fn read_header<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: SocketAddr,
) -> Result<Accepted, Refusal> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if buf.len() >= MAX_HEADER || read_some(s, &mut buf).await == 0 {
            return Err(Refusal::Malformed);
        }
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            continue;
        }
        let (len, client) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_client(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_client(&h)),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => return Err(Refusal::Malformed),
        };
        let rest = buf.get(len..).unwrap_or_default().to_vec();
        return Ok(Accepted {
            client: client.unwrap_or(peer),
            rest,
        });
    }
}

/// Anyone else: read until the first bytes can't be a PROXY header's; close if they are.
async fn refuse_header<S: AsyncRead + Unpin>(
    s: &mut S,
    peer: SocketAddr,
) -> Result<Accepted, Refusal> {
    let mut buf = Vec::with_capacity(64);
    loop {
        let n = read_some(s, &mut buf).await;
        match looks_like_header(&buf) {
            Some(true) => return Err(Refusal::Untrusted),
            Some(false) => break,
            // The client closed before saying anything a header could start with:
            // what is left is the front door's to see.
            None if n == 0 => break,
            None => continue,
        }
    }
    Ok(Accepted {
        client: peer,
        rest: buf,
    })
}

/// Reads what is there into `buf`; 0 at the end (or on an error, which ends it too).
async fn read_some<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 512];
    match s.read(&mut chunk).await {
        Ok(n) => {
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            n
        }
        Err(_) => 0,
    }
}

/// `Some(true)`: `buf` starts a PROXY header (v1 or v2); `Some(false)`: it can't;
/// `None`: too few bytes to tell.
fn looks_like_header(buf: &[u8]) -> Option<bool> {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf.get(..n) == sig.get(..n)
    };
    let (v1, v2) = (starts(V1_PREFIX), starts(V2_SIGNATURE));
    if !v1 && !v2 {
        return Some(false);
    }
    if (v1 && buf.len() >= V1_PREFIX.len()) || (v2 && buf.len() >= V2_SIGNATURE.len()) {
        return Some(true);
    }
    None
}

fn v1_client(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match &h.addresses {
        v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// What `accept` makes of `bytes` sent from 127.0.0.1, trusted or not.
    async fn judge(bytes: &[u8], trusted: bool) -> Result<Accepted, Refusal> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        c.write_all(bytes).await.unwrap();
        c.shutdown().await.unwrap();
        let (mut s, peer) = l.accept().await.unwrap();
        let list: Vec<IpNet> = if trusted {
            vec!["127.0.0.0/8".parse().unwrap()]
        } else {
            vec!["10.0.0.0/8".parse().unwrap()]
        };
        accept(&mut s, peer, &list, Duration::from_secs(5)).await
    }

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[tokio::test]
    async fn a_trusted_v1_or_v2_header_names_the_client() {
        let a = judge(
            b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 80\r\nGET / HTTP/1.1\r\n",
            true,
        )
        .await
        .unwrap();
        assert_eq!(a.client.to_string(), "198.51.100.7:5000");
        assert_eq!(a.rest, b"GET / HTTP/1.1\r\n");
        let mut addrs = vec![198, 51, 100, 8, 10, 0, 0, 1];
        addrs.extend_from_slice(&5001u16.to_be_bytes());
        addrs.extend_from_slice(&80u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &addrs);
        bytes.extend_from_slice(b"GET");
        let a = judge(&bytes, true).await.unwrap();
        assert_eq!(a.client.to_string(), "198.51.100.8:5001");
        assert_eq!(a.rest, b"GET");
        // A health check of the load balancer's own: the socket's peer.
        let a = judge(&v2(0, 0x00, &[]), true).await.unwrap();
        assert_eq!(a.client.ip().to_string(), "127.0.0.1");
    }

    #[tokio::test]
    async fn a_trusted_peer_without_a_good_header_is_refused() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"PROXY TCP4 198.51.100.7 10.0.0.1 5000\r\n",
            b"PROXY TCP4 not-an-ip 10.0.0.1 5000 80\r\n",
            b"PROXY TCP4 198.51.100.7",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6",
            b"",
        ] {
            assert_eq!(
                judge(bytes, true).await.unwrap_err(),
                Refusal::Malformed,
                "{bytes:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_stranger_with_a_header_is_refused_and_without_one_served() {
        let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(judge(v1, false).await.unwrap_err(), Refusal::Untrusted);
        let bytes = v2(1, 0x11, &[198, 51, 100, 8, 10, 0, 0, 1, 0, 1, 0, 80]);
        assert_eq!(judge(&bytes, false).await.unwrap_err(), Refusal::Untrusted);
        let a = judge(b"GET / HTTP/1.1\r\n\r\n", false).await.unwrap();
        assert_eq!(a.client.ip().to_string(), "127.0.0.1");
        assert_eq!(a.rest, b"GET / HTTP/1.1\r\n\r\n");
        // "PRO" then a close: not a header, left for the front door.
        assert!(judge(b"PRO", false).await.is_ok());
    }

    #[test]
    fn a_prefix_is_told_apart_as_soon_as_it_can_be() {
        assert_eq!(looks_like_header(b""), None);
        assert_eq!(looks_like_header(b"PROX"), None);
        assert_eq!(looks_like_header(b"PROXY "), Some(true));
        assert_eq!(looks_like_header(b"POST"), Some(false));
        assert_eq!(looks_like_header(b"\r\n\r\n"), None);
        assert_eq!(looks_like_header(&V2_SIGNATURE[..]), Some(true));
        assert_eq!(looks_like_header(b"\r\n\r\nGET"), Some(false));
    }
}
