//! The real client address behind load balancers busbar trusts (`listen.trusted_proxies`).
//!
//! nginx's `real_ip_from` + `real_ip_recursive on` and Envoy's trusted hops: when the TCP
//! peer is trusted, the client is the right-most address of its `X-Forwarded-For` chain
//! (or, without one, of its `Forwarded` `for=` chain) that is not itself trusted. A
//! peer that is not trusted is the client, whatever it sends; an entry that is not an
//! address (`unknown`, an obfuscated name, garbage) ends the walk at the trusted hop to
//! its right, so nothing left of it is believed.
//!
//! Owns: that walk and the trust test, for both request paths.
//! Must not: read sockets (the PROXY protocol header is `proxy_header`'s) or write
//! headers (what goes upstream is `proxy::headers`').

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// `ip` is one of the `trusted` peers. An IPv4-mapped IPv6 address (a dual-stack
/// socket's view of an IPv4 peer) is taken as the IPv4 address it is.
pub fn trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|n| n.contains(&ip))
}

/// The client of a request that came from `peer` with `headers`: see the module header.
/// Costs one emptiness test when no proxy is trusted.
pub fn real_client(peer: IpAddr, headers: &HeaderMap, list: &[IpNet]) -> IpAddr {
    if list.is_empty() || !trusted(peer, list) {
        return peer;
    }
    let mut client = peer;
    // Header lines right to left, and each line's entries right to left.
    if headers.contains_key(&X_FORWARDED_FOR) {
        for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            for entry in value.as_bytes().rsplit(|&b| b == b',') {
                match node(entry) {
                    Some(ip) if trusted(ip, list) => client = ip,
                    Some(ip) => return ip,
                    None => return client,
                }
            }
        }
    } else {
        for value in headers.get_all(&FORWARDED).iter().rev() {
            for element in value.as_bytes().rsplit(|&b| b == b',') {
                match forwarded_for(element).and_then(node) {
                    Some(ip) if trusted(ip, list) => client = ip,
                    Some(ip) => return ip,
                    None => return client,
                }
            }
        }
    }
    client
}

/// The `for=` value of one `Forwarded` element (RFC 7239 §4), parameter names
/// case-insensitive.
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let (name, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
        name.eq_ignore_ascii_case(b"for").then(|| &value[1..])
    })
}

/// An address as forwarding headers write one: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`, perhaps quoted.
fn node(raw: &[u8]) -> Option<IpAddr> {
    let mut s = std::str::from_utf8(raw).ok()?.trim();
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        s = inner;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // IPv4 with a port; a bare IPv6 address parsed above.
    let (v4, port) = s.split_once(':')?;
    is_port(port)
        .then(|| v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
        .flatten()
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn client(peer: &str, lines: &[(&str, &str)], list: &[&str]) -> String {
        real_client(peer.parse().unwrap(), &headers(lines), &nets(list)).to_string()
    }

    const LB: &[&str] = &["10.0.0.0/8", "fd00::/8"];

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let spoof = [("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")];
        assert_eq!(client("203.0.113.9", &spoof, LB), "203.0.113.9");
        assert_eq!(client("10.0.0.1", &spoof, &[]), "10.0.0.1");
    }

    #[test]
    fn the_right_most_untrusted_address_of_a_trusted_chain_is_the_client() {
        // The client wrote 1.2.3.4 itself; the load balancer appended what it saw.
        let xff = [("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.1.1.1")];
        assert_eq!(client("10.0.0.5", &xff, LB), "198.51.100.7");
        // Two header lines are one list, in order.
        let lines = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "198.51.100.7"),
        ];
        assert_eq!(client("10.0.0.5", &lines, LB), "198.51.100.7");
        // Every hop trusted: the left-most.
        assert_eq!(
            client("10.0.0.5", &[("x-forwarded-for", "10.9.9.9, 10.1.1.1")], LB),
            "10.9.9.9"
        );
        // No header: the peer.
        assert_eq!(client("10.0.0.5", &[], LB), "10.0.0.5");
    }

    #[test]
    fn garbage_ends_the_walk_at_the_trusted_hop_right_of_it() {
        let xff = [("x-forwarded-for", "198.51.100.7, unknown, 10.1.1.1")];
        assert_eq!(client("10.0.0.5", &xff, LB), "10.1.1.1");
        let empty = [("x-forwarded-for", "198.51.100.7,")];
        assert_eq!(client("10.0.0.5", &empty, LB), "10.0.0.5");
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let fwd = [(
            "forwarded",
            "for=1.2.3.4, For=\"[2001:db8::7]:4711\";proto=https, for=10.1.1.1;by=x",
        )];
        assert_eq!(client("10.0.0.5", &fwd, LB), "2001:db8::7");
        let both = [("forwarded", "for=1.2.3.4"), ("x-forwarded-for", "5.6.7.8")];
        assert_eq!(client("10.0.0.5", &both, LB), "5.6.7.8");
        let obfuscated = [("forwarded", "for=1.2.3.4, for=_hidden")];
        assert_eq!(client("10.0.0.5", &obfuscated, LB), "10.0.0.5");
    }

    #[test]
    fn nodes_read_as_forwarding_headers_write_them() {
        for (raw, ip) in [
            ("192.0.2.1", Some("192.0.2.1")),
            (" 192.0.2.1:4711 ", Some("192.0.2.1")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("\"[2001:db8::1]:80\"", Some("2001:db8::1")),
            ("[2001:db8::1]x", None),
            ("192.0.2.1:", None),
            ("192.0.2.1:123456", None),
            ("unknown", None),
            ("", None),
        ] {
            assert_eq!(
                node(raw.as_bytes()).map(|i| i.to_string()).as_deref(),
                ip,
                "{raw}"
            );
        }
    }

    #[test]
    fn a_mapped_ipv4_peer_is_trusted_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert!(trusted(mapped, &nets(LB)));
    }
}
