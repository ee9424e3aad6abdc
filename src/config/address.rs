//! The address policy: which `ip:port` busbar may be told to send requests to.
//!
//! A registration names the addresses every caller of a service is then sent to, so the
//! registration API is a server-side request forgery surface: whoever holds a token could
//! point a service at the cloud metadata address, at "nothing" (which reaches this host),
//! or at busbar's own listeners (its admin API, or itself in a loop). The same rules hold
//! for the static `endpoints` of the TOML, checked by `busbar check` and every reload.
//!
//! Refused, in either family and also in IPv4-mapped IPv6 form (`::ffff:169.254.169.254`):
//! unspecified addresses (`0.0.0.0/8`, `::`), port 0, multicast, the IPv4 broadcast
//! address, link-local addresses (`169.254.0.0/16`, `fe80::/10`, where cloud metadata
//! services answer), AWS's IPv6 metadata address `fd00:ec2::254`, and every address:port
//! where this node listens.
//!
//! "Where this node listens": a listener's exact address; and, for a listener bound to
//! `0.0.0.0` or `::`, that port on any address local to this host — loopback
//! (`127.0.0.0/8`, `::1`), or an address a UDP socket can be bound to here (the kernel's own
//! answer to "is this one of mine"). A host that lets sockets bind addresses it does not
//! have (`net.ipv4.ip_nonlocal_bind`) answers yes to everything; there only loopback
//! counts, and busbar's loop detection (`Via`) is what stops a registration at the
//! host's own public address. The probe costs one syscall, and only when the port is a
//! wildcard listener's: it runs when an address is registered or a config is loaded,
//! never on the request path.
//!
//! Owns: the refused kinds and the own-listener rule. Must not: know where an address
//! came from (callers name the field or the config line).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use super::model::Listen;

/// Why an address may not be sent requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("an unspecified address (0.0.0.0/8, ::) reaches this host, not an instance")]
    Unspecified,
    #[error("port 0 is not a port to connect to")]
    PortZero,
    #[error("a multicast address is not an instance")]
    Multicast,
    #[error("the broadcast address is not an instance")]
    Broadcast,
    #[error(
        "a link-local address (169.254.0.0/16, fe80::/10) is where cloud metadata services answer"
    )]
    LinkLocal,
    #[error("it is a cloud metadata address")]
    Metadata,
    #[error("busbar itself listens on this address and port")]
    OwnListener,
}

impl Refused {
    /// A short name for metric labels and JSON (`own_listener`, `link_local`, ...).
    pub fn code(self) -> &'static str {
        match self {
            Refused::Unspecified => "unspecified",
            Refused::PortZero => "port_zero",
            Refused::Multicast => "multicast",
            Refused::Broadcast => "broadcast",
            Refused::LinkLocal => "link_local",
            Refused::Metadata => "metadata",
            Refused::OwnListener => "own_listener",
        }
    }
}

/// AWS's instance metadata service over IPv6 (Nitro); unique-local, so not caught as
/// link-local.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// The kinds of address no instance can have, whoever names it. Pure.
pub fn check_kind(addr: SocketAddr) -> Result<(), Refused> {
    if addr.port() == 0 {
        return Err(Refused::PortZero);
    }
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            if ip.octets()[0] == 0 {
                Err(Refused::Unspecified)
            } else if ip.is_broadcast() {
                Err(Refused::Broadcast)
            } else if ip.is_multicast() {
                Err(Refused::Multicast)
            } else if ip.is_link_local() {
                Err(Refused::LinkLocal)
            } else {
                Ok(())
            }
        }
        IpAddr::V6(ip) => {
            if ip.is_unspecified() {
                Err(Refused::Unspecified)
            } else if ip.is_multicast() {
                Err(Refused::Multicast)
            } else if ip.is_unicast_link_local() {
                Err(Refused::LinkLocal)
            } else if ip == AWS_METADATA_V6 {
                Err(Refused::Metadata)
            } else {
                Ok(())
            }
        }
    }
}

/// Every address this node listens on: service (plaintext and TLS), admin and, when it
/// is opened, registration listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnListeners(Vec<SocketAddr>);

impl OwnListeners {
    /// The listeners a config opens; `registration` is the registration API's, when some
    /// service takes registrations (otherwise that port is not opened, and not ours).
    pub fn new(listen: &Listen, registration: Option<SocketAddr>) -> OwnListeners {
        let mut all = listen.http.clone();
        all.extend(listen.tls.iter().map(|t| t.addr));
        all.push(listen.admin);
        all.extend(listen.metrics);
        all.extend(registration);
        OwnListeners(all)
    }

    /// Just these addresses.
    pub fn of(addrs: &[SocketAddr]) -> OwnListeners {
        OwnListeners(addrs.to_vec())
    }

    /// Whether a connection to `addr` would reach one of these listeners.
    pub fn reached_by(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let mut local = None;
        self.0.iter().any(|l| {
            if l.port() != addr.port() {
                return false;
            }
            let own = l.ip().to_canonical();
            if own.is_unspecified() {
                *local.get_or_insert_with(|| is_local(ip))
            } else {
                own == ip
            }
        })
    }
}

/// [`check_kind`], then whether `addr` is one of `own` listeners.
pub fn check(addr: SocketAddr, own: &OwnListeners) -> Result<(), Refused> {
    check_kind(addr)?;
    if own.reached_by(addr) {
        return Err(Refused::OwnListener);
    }
    Ok(())
}

/// Whether `ip` is one of this host's own addresses (see the module header).
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    if UdpSocket::bind((ip, 0)).is_err() {
        return false;
    }
    // Documentation addresses (RFC 5737, RFC 3849) are nobody's: if one binds, the host
    // binds anything and the answer above meant nothing.
    let nobodys: IpAddr = match ip {
        IpAddr::V4(_) => Ipv4Addr::new(192, 0, 2, 1).into(),
        IpAddr::V6(_) => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
    };
    UdpSocket::bind((nobodys, 0)).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Result<(), Refused> {
        check_kind(s.parse().unwrap())
    }

    #[test]
    fn refused_kinds_in_both_families_and_mapped_form() {
        for (a, want) in [
            ("0.0.0.0:80", Refused::Unspecified),
            ("0.1.2.3:80", Refused::Unspecified),
            ("[::]:80", Refused::Unspecified),
            ("[::ffff:0.0.0.0]:80", Refused::Unspecified),
            ("10.0.0.1:0", Refused::PortZero),
            ("224.0.0.1:80", Refused::Multicast),
            ("239.255.255.250:1900", Refused::Multicast),
            ("[ff02::1]:80", Refused::Multicast),
            ("255.255.255.255:80", Refused::Broadcast),
            ("[::ffff:255.255.255.255]:80", Refused::Broadcast),
            ("169.254.169.254:80", Refused::LinkLocal),
            ("[::ffff:169.254.169.254]:80", Refused::LinkLocal),
            ("[fe80::1]:80", Refused::LinkLocal),
            ("[febf::1]:80", Refused::LinkLocal),
            ("[fd00:ec2::254]:80", Refused::Metadata),
        ] {
            assert_eq!(kind(a), Err(want), "{a}");
        }
        for a in [
            "127.0.0.1:8080",
            "10.20.0.5:8080",
            "[::1]:8080",
            "[fec0::1]:80",
            "[fd00:ec2::253]:80",
            "192.168.1.255:80",
        ] {
            assert_eq!(kind(a), Ok(()), "{a}");
        }
    }

    fn listen(http: &[&str], admin: &str) -> Listen {
        Listen {
            http: http.iter().map(|a| a.parse().unwrap()).collect(),
            tls: Vec::new(),
            admin: admin.parse().unwrap(),
            metrics: None,
            proxy_protocol: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }

    #[test]
    fn exact_listeners_are_own_other_ports_and_addresses_are_not() {
        let own = OwnListeners::new(
            &listen(&["127.0.0.1:8080"], "127.0.0.1:9901"),
            Some("127.0.0.1:9902".parse().unwrap()),
        );
        for a in [
            "127.0.0.1:8080",
            "127.0.0.1:9901",
            "127.0.0.1:9902",
            "[::ffff:127.0.0.1]:8080",
        ] {
            assert!(own.reached_by(a.parse().unwrap()), "{a}");
        }
        for a in ["127.0.0.2:8080", "127.0.0.1:8081", "10.0.0.1:9901"] {
            assert!(!own.reached_by(a.parse().unwrap()), "{a}");
        }
        let unopened = OwnListeners::new(&listen(&["127.0.0.1:8080"], "127.0.0.1:9901"), None);
        assert!(!unopened.reached_by("127.0.0.1:9902".parse().unwrap()));
    }

    #[test]
    fn a_wildcard_listener_owns_its_port_on_every_local_address() {
        for wildcard in ["0.0.0.0:8080", "[::]:8080"] {
            let own = OwnListeners::new(&listen(&[wildcard], "127.0.0.1:9901"), None);
            for a in ["127.0.0.1:8080", "127.9.9.9:8080", "[::1]:8080"] {
                assert!(own.reached_by(a.parse().unwrap()), "{wildcard} {a}");
            }
            // TEST-NET-3 (RFC 5737) is no host's address.
            assert!(!own.reached_by("203.0.113.7:8080".parse().unwrap()));
            assert!(!own.reached_by("127.0.0.1:8081".parse().unwrap()));
        }
    }
}
