//! W3C trace context: keep the caller's trace id, or start one, and give the upstream
//! hop its own span id.
//!
//! Owns: parsing and formatting `traceparent`. Must not: allocate more than the header value.

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`
const LEN: usize = 55;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Continues the caller's trace if its `traceparent` is valid; starts a new one otherwise.
    /// Either way the span id is new: it names busbar's hop.
    pub fn from_header(value: Option<&[u8]>) -> TraceContext {
        let mut ctx = value.and_then(parse).unwrap_or_else(|| TraceContext {
            trace_id: random(),
            ..Default::default()
        });
        ctx.span_id = random();
        if ctx.trace_id == [0; 16] {
            ctx.trace_id = random();
        }
        ctx
    }

    pub fn header_value(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..3].copy_from_slice(b"00-");
        hex(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex(&self.span_id, &mut out[36..52]);
        out[52] = b'-';
        hex(&[self.flags], &mut out[53..55]);
        out
    }

    pub fn trace_id_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex(&self.trace_id, &mut out);
        out
    }
}

/// Random ids from a per-thread xoshiro generator seeded from the thread's ChaCha one.
/// Trace and span ids must be unlikely to collide, not unpredictable (W3C Trace Context
/// §3.2.2.3 asks only for randomness); ChaCha's block refills cost ~300 instructions a
/// request. Filled 8 bytes a step (`random()` of an array draws each byte).
fn random<const N: usize>() -> [u8; N] {
    use rand::{rngs::SmallRng, RngCore, SeedableRng};
    use std::cell::RefCell;
    thread_local! {
        static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
    }
    let mut id = [0; N];
    IDS.with(|r| r.borrow_mut().fill_bytes(&mut id));
    id
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 0xf) as usize];
    }
}

fn unhex(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let hi = nibble(pair[0])?;
        let lo = nibble(pair[1])?;
        *o = hi << 4 | lo;
    }
    Some(())
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn parse(v: &[u8]) -> Option<TraceContext> {
    // Version 00 is exactly 55 bytes; later versions may append fields after a '-'.
    if v.len() < LEN || (v.len() > LEN && v.get(LEN) != Some(&b'-')) {
        return None;
    }
    let version = v.get(0..2)?;
    if version == b"ff"
        || v.get(2) != Some(&b'-')
        || v.get(35) != Some(&b'-')
        || v.get(52) != Some(&b'-')
    {
        return None;
    }
    if version == b"00" && v.len() != LEN {
        return None;
    }
    let mut ver = [0u8; 1];
    unhex(version, &mut ver)?;
    let mut ctx = TraceContext::default();
    unhex(v.get(3..35)?, &mut ctx.trace_id)?;
    let mut parent = [0u8; 8];
    unhex(v.get(36..52)?, &mut parent)?;
    let mut flags = [0u8; 1];
    unhex(v.get(53..55)?, &mut flags)?;
    if ctx.trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    ctx.flags = flags[0];
    Some(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_valid_trace_id_with_a_new_span() {
        let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_header(Some(incoming));
        let out = ctx.header_value();
        assert_eq!(&out[..36], &incoming[..36]);
        assert_ne!(&out[36..52], &incoming[36..52]);
        assert_eq!(&out[52..], b"-01");
    }

    #[test]
    fn replaces_garbage() {
        for bad in [
            &b"garbage"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
            let ctx = TraceContext::from_header(Some(bad));
            assert!(parse(&ctx.header_value()).is_some());
        }
    }
}
