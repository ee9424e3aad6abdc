//! W3C trace context: keep the caller's trace id and sampling decision, or start a trace
//! and decide (by `[tracing] sample_ratio`), and give busbar's hop and each upstream try
//! their own span ids.
//!
//! Owns: parsing and formatting `traceparent`, and the sampling decision.
//! Must not: allocate more than the header value; record or export spans (`otel`).

use crate::config::TracingConfig;

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`
const LEN: usize = 55;

/// The `sampled` trace flag (W3C Trace Context §3.2.2.5).
pub const SAMPLED: u8 = 0x01;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// busbar's own (server) span.
    pub span_id: [u8; 8],
    /// The caller's span, the parent of busbar's; zeros when busbar started the trace.
    pub parent_id: [u8; 8],
    /// The span the upstream is told is its parent: the current try's client span when
    /// spans are exported, busbar's own span otherwise.
    pub try_id: [u8; 8],
    pub flags: u8,
    /// Sampled, and `[tracing]` has an endpoint: this request's spans are recorded.
    pub export: bool,
    /// The try in progress, while its client span is open (`otel`).
    pub open: Option<OpenTry>,
}

/// The latest try (its client span is `otel`'s) of a sampled request, and whether its client span is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTry {
    pub(crate) start: std::time::Instant,
    pub(crate) addr: std::net::SocketAddr,
    /// The instance's index in the request's instance set (its release version).
    pub(crate) idx: u32,
    pub(crate) ended: bool,
}

impl TraceContext {
    /// Continues the caller's trace if its `traceparent` is valid, keeping its sampling
    /// decision (parent-based); otherwise starts a new trace, sampled by `config`'s ratio.
    /// Either way the span id is new: it names busbar's hop.
    pub fn from_header(value: Option<&[u8]>, config: &TracingConfig) -> TraceContext {
        let mut ctx = match value.and_then(parse) {
            Some(ctx) => ctx,
            None => {
                let trace_id = random();
                TraceContext {
                    trace_id,
                    flags: if sampled(&trace_id, config.sample_below) {
                        SAMPLED
                    } else {
                        0
                    },
                    ..Default::default()
                }
            }
        };
        ctx.span_id = random();
        ctx.export = ctx.flags & SAMPLED != 0 && config.exports();
        // The first try's client span id is known before the try starts: busbar's own
        // HTTP/1 path writes the upstream head once, ahead of its tries.
        ctx.try_id = if ctx.export { random() } else { ctx.span_id };
        ctx
    }

    /// A new client span id for a try after the first (see [`Self::from_header`]).
    pub fn next_try(&mut self) {
        self.try_id = random();
    }

    /// The `traceparent` busbar sends upstream: this trace, the try's span, the decision.
    pub fn header_value(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..3].copy_from_slice(b"00-");
        hex(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex(&self.try_id, &mut out[36..52]);
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

/// A new random trace id in hex: the request id of an answer busbar gives before any
/// trace started (a front-door refusal).
pub fn new_trace_id_hex() -> [u8; 32] {
    let mut out = [0u8; 32];
    hex(&random::<16>(), &mut out);
    out
}

/// OpenTelemetry's `TraceIdRatioBased`: the low 8 bytes of a random trace id, read as a
/// number, are below the ratio's share of `u64`. Every node decides alike for one id.
fn sampled(trace_id: &[u8; 16], below: u64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    below == u64::MAX || u64::from_be_bytes(low) < below
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

/// Each byte's two lowercase hex digits, one load a byte (ids are written for every
/// request: the traceparent and the request id).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

fn hex(bytes: &[u8], out: &mut [u8]) {
    for (&b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair.copy_from_slice(&HEX_PAIRS[b as usize]);
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
    ctx.parent_id = parent;
    Some(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_valid_trace_id_with_a_new_span() {
        let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_header(Some(incoming), &TracingConfig::default());
        let out = ctx.header_value();
        assert_eq!(&out[..36], &incoming[..36]);
        assert_ne!(&out[36..52], &incoming[36..52]);
        assert_eq!(&out[52..], b"-01");
        assert_eq!(
            ctx.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
    }

    #[test]
    fn parent_based_then_ratio() {
        let ratio = |r: f64| TracingConfig {
            sample_ratio: r,
            sample_below: crate::config::sample_below(r),
            ..Default::default()
        };
        // A caller's decision is kept whatever the ratio.
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceContext::from_header(Some(unsampled), &ratio(1.0)).flags,
            0
        );
        let sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceContext::from_header(Some(sampled), &ratio(0.0)).flags,
            SAMPLED
        );
        // New traces: by the ratio; off (no `[tracing]`) starts them unsampled.
        for _ in 0..100 {
            assert_eq!(TraceContext::from_header(None, &ratio(1.0)).flags, SAMPLED);
            assert_eq!(TraceContext::from_header(None, &ratio(0.0)).flags, 0);
            assert_eq!(
                TraceContext::from_header(None, &TracingConfig::default()).flags,
                0
            );
        }
        let half = (0..4000)
            .filter(|_| TraceContext::from_header(None, &ratio(0.5)).flags == SAMPLED)
            .count();
        assert!((1600..2400).contains(&half), "{half} of 4000");
        // Nothing exported: the upstream's parent is busbar's own span, as before.
        let c = TraceContext::from_header(None, &ratio(1.0));
        assert!(!c.export);
        assert_eq!(c.try_id, c.span_id);
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
            let ctx = TraceContext::from_header(Some(bad), &TracingConfig::default());
            assert!(parse(&ctx.header_value()).is_some());
        }
    }
}
