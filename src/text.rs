//! Numbers and addresses as text, written by hand for the request path.
//!
//! std's `Display` for integers and IP addresses goes through the formatting machinery
//! (a `Formatter`, padding, a second buffer for addresses): ~1k instructions for an IPv4
//! socket address, where these take a few dozen. Used by the forwarding headers and the
//! access log.
//! Owns: the digits. Must not: allocate (beyond growing the caller's buffer).

use std::net::{IpAddr, SocketAddr};

/// Somewhere to append bytes.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// `n` in decimal.
pub fn decimal(out: &mut impl Sink, n: u64) {
    out.put(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` (below 1000) in three digits, zero-padded: the fraction of a milliseconds value.
pub fn three_digits(out: &mut impl Sink, n: u32) {
    let n = n % 1000;
    out.put(&[
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

/// Each octet's digits, padded to four bytes, and how many of them there are: an octet
/// is one four-byte copy, not up to three divisions.
const OCTETS: [([u8; 4], u8); 256] = {
    let mut t = [([0u8; 4], 0u8); 256];
    let mut o = 0;
    while o < 256 {
        let d = [
            b'0' + (o / 100) as u8,
            b'0' + (o / 10 % 10) as u8,
            b'0' + (o % 10) as u8,
        ];
        t[o] = match o {
            0..=9 => ([d[2], 0, 0, 0], 1),
            10..=99 => ([d[1], d[2], 0, 0], 2),
            _ => ([d[0], d[1], d[2], 0], 3),
        };
        o += 1;
    }
    t
};

/// An IP address: IPv4 (every request's usual case) by hand, IPv6 through `Display`.
pub fn ip(out: &mut impl Sink, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Into a stack buffer, then one `put`. Each octet copies four bytes; the
            // next octet's dot overwrites what is past its digits.
            let mut text = [0u8; 16];
            let mut at = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[at] = b'.';
                    at += 1;
                }
                let (digits, len) = OCTETS[usize::from(o)];
                text[at..at + 4].copy_from_slice(&digits);
                at += usize::from(len);
            }
            out.put(&text[..at]);
        }
        IpAddr::V6(v6) => out.put(v6.to_string().as_bytes()),
    }
}

/// A socket address as `Display` writes it: `1.2.3.4:80`, `[::1]:80`.
pub fn socket_addr(out: &mut impl Sink, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => ip(out, IpAddr::V4(*a.ip())),
        SocketAddr::V6(a) => {
            out.put(b"[");
            ip(out, IpAddr::V6(*a.ip()));
            out.put(b"]");
        }
    }
    out.put(b":");
    decimal(out, u64::from(addr.port()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_same_text_as_display() {
        for n in [0, 7, 10, 999, 1000, 65535, u64::MAX] {
            assert_eq!(text(|o| decimal(o, n)), n.to_string());
        }
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "255.255.255.255:1",
            "9.99.100.199:10",
            "10.20.255.9:443",
            "[::1]:80",
            "[2001:db8::7]:65535",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(text(|o| socket_addr(o, addr)), addr.to_string());
        }
        for o in 0..=255u8 {
            let addr = IpAddr::from([o, 0, 255 - o, o]);
            assert_eq!(text(|out| ip(out, addr)), addr.to_string());
        }
        assert_eq!(text(|o| three_digits(o, 7)), "007");
        assert_eq!(text(|o| three_digits(o, 123)), "123");
    }
}
