//! busbar's hop in `Via` (RFC 9110 §7.6.3), and the forwarding loops it reveals.
//!
//! Every request busbar sends upstream carries `Via: <client's protocol> busbar-<id>`
//! after what it came with; `<id>` is made at random when the process starts, so it is
//! stable for the process and differs between nodes. A request that arrives carrying
//! this node's id has been here before (an instance that is busbar itself, or a chain
//! of nodes that leads back), and one that has passed more busbar nodes than
//! `[limits] max_hops` is in a loop this node cannot see whole: both are answered
//! `508 Loop Detected` and go nowhere. The admin and registration listeners refuse any
//! request that passed a busbar node at all: the data plane never reaches them.
//!
//! Owns: the node's id, the `Via` values it appends, and reading a received `Via`.
//! Must not: answer requests (the phases and the control APIs do) or allocate on the
//! request path.

use std::sync::OnceLock;

use http::header::VIA;
use http::{HeaderMap, HeaderValue, Version};

/// What every busbar's `received-by` starts with: hops of other busbar nodes count
/// towards `max_hops`, and the control APIs refuse any request that carries one.
pub const PSEUDONYM_PREFIX: &str = "busbar-";

/// The name busbar writes: title case and static, as its other headers (pingora's
/// case-preserving map takes a static name without copying it).
pub const VIA_NAME: &str = "Via";

/// This node's hop.
#[derive(Debug)]
pub struct Hop {
    /// `busbar-<hex>`: this node's `received-by` pseudonym.
    id: String,
    /// `<protocol> <id>` for clients on HTTP/1.0, 1.1, 2 and 3 (see [`proto_index`]).
    values: [HeaderValue; 4],
    /// The same as whole `Via:` lines, for busbar's own HTTP/1.1 path.
    lines: [Vec<u8>; 4],
}

/// The protocol names a `Via` entry gives for each client version (RFC 9110 §7.6.3:
/// the `HTTP/` prefix is left out).
const PROTOCOLS: [&str; 4] = ["1.0", "1.1", "2", "3"];

fn proto_index(v: Version) -> usize {
    match v {
        Version::HTTP_2 => 2,
        Version::HTTP_3 => 3,
        Version::HTTP_11 => 1,
        // HTTP/1.0 and 0.9.
        _ => 0,
    }
}

/// What a request's `Via` says about the busbar nodes it passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passed {
    /// This node is among them.
    pub here: bool,
    /// How many `busbar-` hops it lists (this node's included).
    pub busbar_hops: u32,
}

impl Hop {
    /// A hop with this pseudonym (`busbar-…`).
    pub fn new(id: String) -> Hop {
        let values = PROTOCOLS.map(|p| {
            HeaderValue::from_str(&format!("{p} {id}"))
                .unwrap_or_else(|_| HeaderValue::from_static("1.1 busbar"))
        });
        let lines = PROTOCOLS.map(|p| format!("{VIA_NAME}: {p} {id}\r\n").into_bytes());
        Hop { id, values, lines }
    }

    /// This node's `received-by` pseudonym.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The value to append for a request the client sent with `version`.
    pub fn value(&self, version: Version) -> &HeaderValue {
        &self.values[proto_index(version)]
    }

    /// [`Hop::value`] as a whole header line (CRLF included).
    pub fn line(&self, version: Version) -> &[u8] {
        &self.lines[proto_index(version)]
    }

    /// Reads the `Via` entries a request came with. No `Via`: one map lookup.
    ///
    /// Each comma-separated entry is `received-protocol received-by [comment]`; only the
    /// second word is looked at. Commas inside comments are not special-cased: a comment
    /// split in two yields entries whose second word is not a busbar pseudonym unless the
    /// sender wrote one, and a sender can only make its own request look looped that way.
    pub fn passed(&self, headers: &HeaderMap) -> Passed {
        let mut seen = Passed::default();
        for value in headers.get_all(VIA) {
            for entry in value.as_bytes().split(|&b| b == b',') {
                let by = received_by(entry);
                if by.starts_with(PSEUDONYM_PREFIX.as_bytes()) {
                    seen.busbar_hops = seen.busbar_hops.saturating_add(1);
                    seen.here |= by == self.id.as_bytes();
                }
            }
        }
        seen
    }

    /// Is this request in a forwarding loop: has it been here, or passed more than
    /// `max_hops` busbar nodes?
    pub fn looped(&self, headers: &HeaderMap, max_hops: u32) -> bool {
        let seen = self.passed(headers);
        seen.here || seen.busbar_hops > max_hops
    }
}

/// The second word of a `Via` entry (`received-by`); empty when there is none.
fn received_by(entry: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let entry = entry.trim_ascii();
    let Some(gap) = entry.iter().position(is_space) else {
        return &[];
    };
    let rest = entry[gap..].trim_ascii_start();
    let end = rest.iter().position(is_space).unwrap_or(rest.len());
    &rest[..end]
}

static NODE: OnceLock<Hop> = OnceLock::new();

/// This process's hop, made on first use: `busbar-` and 12 random hex digits.
pub fn node() -> &'static Hop {
    NODE.get_or_init(|| {
        Hop::new(format!(
            "{PSEUDONYM_PREFIX}{:012x}",
            rand::random::<u64>() >> 16
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(vias: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in vias {
            h.append(VIA, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn values_name_the_clients_protocol() {
        let hop = Hop::new("busbar-abc".into());
        assert_eq!(hop.value(Version::HTTP_10), "1.0 busbar-abc");
        assert_eq!(hop.value(Version::HTTP_11), "1.1 busbar-abc");
        assert_eq!(hop.value(Version::HTTP_2), "2 busbar-abc");
        assert_eq!(hop.line(Version::HTTP_11), b"Via: 1.1 busbar-abc\r\n");
    }

    #[test]
    fn the_node_id_is_stable_and_busbars() {
        assert_eq!(node().id(), node().id());
        assert!(node().id().starts_with("busbar-"), "{}", node().id());
        assert_eq!(node().id().len(), "busbar-".len() + 12);
    }

    #[test]
    fn other_proxies_pass_and_busbar_hops_are_counted() {
        let hop = Hop::new("busbar-me".into());
        assert_eq!(hop.passed(&HeaderMap::new()), Passed::default());
        let other = headers(&["1.1 nginx, 1.1 squid (squid/6.1)", "HTTP/1.0 10.0.0.1:8080"]);
        assert_eq!(hop.passed(&other), Passed::default());
        assert!(!hop.looped(&other, 0));

        let two = headers(&["1.1 busbar-a,2 busbar-b (x, y)"]);
        let p = hop.passed(&two);
        assert_eq!((p.here, p.busbar_hops), (false, 2));
        assert!(!hop.looped(&two, 2));
        assert!(hop.looped(&two, 1));

        // Here before, in any entry of any line, whatever the spacing.
        for v in [
            &["1.1 busbar-me"][..],
            &["1.1 nginx", " 1.0\tbusbar-me  (comment)"],
            &["1.1 a,1.1 busbar-me"],
        ] {
            assert!(hop.looped(&headers(v), 8), "{v:?}");
        }
        // A longer or shorter pseudonym is another node.
        let near = headers(&["1.1 busbar-mex, 1.1 busbar-m"]);
        let p = hop.passed(&near);
        assert_eq!((p.here, p.busbar_hops), (false, 2));
    }

    #[test]
    fn entries_without_a_received_by_are_nothing() {
        for e in ["", "1.1", "  ", ",,,", "1.1 ", "busbar-me"] {
            assert_eq!(received_by(e.as_bytes()), b"", "{e:?}");
        }
        assert_eq!(received_by(b" 1.1   busbar-x (c)"), b"busbar-x");
    }
}
