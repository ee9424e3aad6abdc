//! Which part of Redis a key's decision needs, and whether that part answers.
//!
//! Owns: [`Topology`] (Redis Cluster's slot → master map, from `CLUSTER SLOTS`; one shard
//! for a single Redis), [`ShardHealth`] (up or down, with hysteresis) and [`key_slot`].
//! Must not: talk to Redis or log. `cluster::redis` feeds request and probe outcomes in,
//! and logs each transition these report, once.
//!
//! A shard is a master with its slot ranges; it keeps its identity (its lowest slot)
//! across a failover, so its health carries over to the promoted replica. A shard goes
//! down on a Redis error, on [`TIMEOUTS_TO_DOWN`] request timeouts in a row or as many
//! failed probes, and stays down until probes have answered without a break for its
//! hold-down ([`HOLD_DOWN_MIN`], doubling up to [`HOLD_DOWN_MAX`] when it falls again
//! within [`FLAP_WINDOW`] of coming back). One timeout alone never switches a shard.
//! Keys on other shards are not affected.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;
/// Request timeouts in a row (or failed probes in a row) that take a shard down: one
/// slow answer on a loaded host is not an outage.
pub const TIMEOUTS_TO_DOWN: u32 = 3;
/// Shortest time probes must answer without a break before a down shard is used again:
/// long enough that a shard in trouble is not retried by every request ten times a second.
pub const HOLD_DOWN_MIN: u64 = 1_000;
/// Longest hold-down, reached by a shard that keeps falling soon after coming back.
pub const HOLD_DOWN_MAX: u64 = 30_000;
/// A shard that falls again within this many ms of coming back doubles its hold-down.
pub const FLAP_WINDOW: u64 = 10_000;
/// After a shard comes back, how long (ms) a node admits no more than its own share of a
/// key on it: other nodes may still be deciding from their share for a moment, and
/// together they must not admit more than the limit.
pub const SETTLE: u64 = 1_000;

/// CRC16-XMODEM (polynomial 0x1021), as Redis Cluster hashes keys.
const CRC16: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The hash slot of `key`: CRC16 of its hash tag (the first non-empty `{…}`) or of the
/// whole key, modulo 16384 — what Redis Cluster computes.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = key.get(open + 1..)?;
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc = 0u16;
    for &b in tagged.unwrap_or(key) {
        crc = (crc << 8) ^ CRC16[usize::from((crc >> 8) as u8 ^ b)];
    }
    crc % SLOTS as u16
}

/// The first `busbar:probe:N` whose slot is in `ranges` (a single slot takes ~16k tries,
/// a third of the slots ~3; done once per change of the slot map).
fn probe_key(ranges: &[(u16, u16)]) -> String {
    (0u32..1 << 22)
        .map(|n| format!("busbar:probe:{n}"))
        .find(|k| {
            let slot = key_slot(k.as_bytes());
            ranges.iter().any(|(s, e)| (*s..=*e).contains(&slot))
        })
        .unwrap_or_else(|| "busbar:probe:0".to_string())
}

/// What a request to Redis came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    TimedOut,
    Failed,
}

/// A shard's switch, for the caller to log once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Down,
    /// Back after `down_ms`, during which `fallbacks` decisions used the local share.
    Up {
        down_ms: u64,
        fallbacks: u64,
    },
}

const NEVER: u64 = u64::MAX;

/// Whether one shard can decide its keys; shared by every request (atomics only).
/// Times are ms on the caller's clock.
#[derive(Debug)]
pub struct ShardHealth {
    up: AtomicBool,
    timeouts: AtomicU32,
    probe_failures: AtomicU32,
    /// Since when probes have answered without a break while down (`NEVER`: not now).
    ok_since: AtomicU64,
    /// When the shard last went down or came back.
    changed_at: AtomicU64,
    hold_ms: AtomicU64,
    settle_until: AtomicU64,
    /// Decisions made from the local share since the shard went down.
    fallbacks: AtomicU64,
}

impl Default for ShardHealth {
    fn default() -> Self {
        ShardHealth {
            up: AtomicBool::new(true),
            timeouts: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            ok_since: AtomicU64::new(NEVER),
            changed_at: AtomicU64::new(0),
            hold_ms: AtomicU64::new(HOLD_DOWN_MIN),
            settle_until: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }
}

impl ShardHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Came back less than [`SETTLE`] ago.
    pub fn settling(&self, now: u64) -> bool {
        now < self.settle_until.load(Relaxed)
    }

    /// Counts a decision made from the local share because this shard is down.
    pub fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Relaxed);
    }

    /// A request's outcome; true when it took the shard down.
    pub fn request(&self, outcome: Outcome, now: u64) -> bool {
        match outcome {
            Outcome::Answered => {
                if self.timeouts.load(Relaxed) != 0 {
                    self.timeouts.store(0, Relaxed);
                }
                false
            }
            Outcome::TimedOut => {
                self.timeouts.fetch_add(1, Relaxed) + 1 >= TIMEOUTS_TO_DOWN && self.down(now)
            }
            Outcome::Failed => self.down(now),
        }
    }

    /// A probe's outcome; the switch it caused, if any.
    pub fn probe(&self, answered: bool, now: u64) -> Option<Change> {
        if self.is_up() {
            if answered {
                self.probe_failures.store(0, Relaxed);
                return None;
            }
            let failed = self.probe_failures.fetch_add(1, Relaxed) + 1;
            return (failed >= TIMEOUTS_TO_DOWN && self.down(now)).then_some(Change::Down);
        }
        if !answered {
            self.ok_since.store(NEVER, Relaxed);
            return None;
        }
        let since = match self.ok_since.load(Relaxed) {
            NEVER => {
                self.ok_since.store(now, Relaxed);
                now
            }
            t => t,
        };
        if now.saturating_sub(since) < self.hold_ms.load(Relaxed) || self.up.swap(true, Relaxed) {
            return None;
        }
        let down_ms = now.saturating_sub(self.changed_at.swap(now, Relaxed));
        self.timeouts.store(0, Relaxed);
        self.probe_failures.store(0, Relaxed);
        self.settle_until.store(now + SETTLE, Relaxed);
        Some(Change::Up {
            down_ms,
            fallbacks: self.fallbacks.swap(0, Relaxed),
        })
    }

    /// Marks the shard down; true when it was up (the caller logs it).
    fn down(&self, now: u64) -> bool {
        if !self.up.swap(false, Relaxed) {
            return false;
        }
        let came_back = self.changed_at.swap(now, Relaxed);
        let hold = if came_back > 0 && now.saturating_sub(came_back) < FLAP_WINDOW {
            (self.hold_ms.load(Relaxed) * 2).min(HOLD_DOWN_MAX)
        } else {
            HOLD_DOWN_MIN
        };
        self.hold_ms.store(hold, Relaxed);
        self.ok_since.store(NEVER, Relaxed);
        self.settle_until.store(0, Relaxed);
        true
    }
}

/// One master and the slots it serves.
#[derive(Debug)]
pub struct Shard {
    /// `host:port` of the master (or the Redis URL without credentials), for logs.
    pub master: String,
    /// Its ranges, `0-5460,…`, for logs.
    pub slots: String,
    /// Its lowest slot: it names the shard across failovers.
    pub first_slot: u16,
    /// A key on one of its slots: a probe reads it, so the cluster client routes the
    /// probe to the master that serves those slots (a `PING` "to a slot" may be answered
    /// by any node when that master is unreachable).
    pub probe_key: String,
    pub health: Arc<ShardHealth>,
}

/// The shards of the Redis in use, and which shard holds each slot.
#[derive(Debug)]
pub struct Topology {
    shards: Box<[Shard]>,
    /// Slot → index in `shards`; empty when there is one shard (a single Redis).
    by_slot: Box<[u16]>,
    /// The `(start, end, master)` ranges this was built from, to notice a change.
    ranges: Vec<(u16, u16, String)>,
}

impl Topology {
    /// One shard holding every key: a single Redis, or a cluster not mapped yet.
    pub fn whole(master: String) -> Topology {
        Topology {
            shards: Box::new([Shard {
                master,
                slots: "all".into(),
                first_slot: 0,
                probe_key: probe_key(&[(0, (SLOTS - 1) as u16)]),
                health: Arc::default(),
            }]),
            by_slot: Box::default(),
            ranges: Vec::new(),
        }
    }

    /// From `CLUSTER SLOTS` ranges `(start, end, master)`; each shard keeps the health of
    /// the shard in `previous` with the same lowest slot. Slots no range covers form a
    /// shard of their own (no master: probes fail, so its keys use the local share).
    /// `None` when `ranges` is empty or a slot is out of range.
    pub fn from_ranges(
        mut ranges: Vec<(u16, u16, String)>,
        previous: &Topology,
    ) -> Option<Topology> {
        ranges.sort();
        if ranges.is_empty() || ranges.iter().any(|(s, e, _)| s > e || *e as usize >= SLOTS) {
            return None;
        }
        let mut masters: BTreeMap<&str, Vec<(u16, u16)>> = BTreeMap::new();
        for (s, e, m) in &ranges {
            masters.entry(m.as_str()).or_default().push((*s, *e));
        }
        let mut groups: Vec<(String, Vec<(u16, u16)>)> = masters
            .into_iter()
            .map(|(m, r)| (m.to_string(), r))
            .collect();
        let mut uncovered = Vec::new();
        let mut next = 0usize;
        for (s, e, _) in &ranges {
            if (*s as usize) > next {
                uncovered.push((next as u16, s - 1));
            }
            next = next.max(*e as usize + 1);
        }
        if next < SLOTS {
            uncovered.push((next as u16, (SLOTS - 1) as u16));
        }
        if !uncovered.is_empty() {
            groups.push(("(no master)".to_string(), uncovered));
        }
        groups.sort_by_key(|(_, r)| r.first().map(|(s, _)| *s));
        let mut by_slot = vec![0u16; SLOTS].into_boxed_slice();
        let mut shards = Vec::with_capacity(groups.len());
        for (i, (master, group)) in groups.into_iter().enumerate() {
            let first_slot = group.first().map_or(0, |(s, _)| *s);
            for (s, e) in &group {
                for slot in &mut by_slot[*s as usize..=*e as usize] {
                    *slot = i as u16;
                }
            }
            let health = previous
                .shards
                .iter()
                .find(|p| p.first_slot == first_slot)
                .map(|p| p.health.clone())
                .unwrap_or_default();
            let slots = group
                .iter()
                .map(|(s, e)| {
                    if s == e {
                        s.to_string()
                    } else {
                        format!("{s}-{e}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            shards.push(Shard {
                master,
                slots,
                first_slot,
                probe_key: probe_key(&group),
                health,
            });
        }
        Some(Topology {
            shards: shards.into_boxed_slice(),
            by_slot,
            ranges,
        })
    }

    /// Whether `ranges` (sorted or not) describe this topology already.
    pub fn same_ranges(&self, ranges: &[(u16, u16, String)]) -> bool {
        let mut sorted = ranges.to_vec();
        sorted.sort();
        sorted == self.ranges
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard that holds `key`.
    pub fn shard_of(&self, key: &[u8]) -> &Shard {
        let i = match self.by_slot.is_empty() {
            true => 0,
            false => self
                .by_slot
                .get(key_slot(key) as usize)
                .copied()
                .unwrap_or(0) as usize,
        };
        // Never empty: built with at least one shard.
        &self.shards[i.min(self.shards.len() - 1)]
    }

    /// Shards down right now.
    pub fn down(&self) -> usize {
        self.shards.iter().filter(|s| !s.health.is_up()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn slots_are_those_redis_computes() {
        // CLUSTER KEYSLOT answers from the Redis docs.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{bar}baz"), key_slot(b"bar"));
        for key in [
            "busbar:rl:shared:u:e3b0c44298fc1c149afbf4c8996fb924",
            "busbar:rl:shared:all",
            "a{",
            "{}",
            "x{}y",
            "{a}{b}",
            "foo{}{bar}",
            "",
        ] {
            assert_eq!(
                Slot::new(key_slot(key.as_bytes())),
                Some(Slot::for_key(key)),
                "{key}"
            );
        }
    }

    fn three() -> Vec<(u16, u16, String)> {
        vec![
            (10923, 16383, "c:3".into()),
            (0, 5460, "a:1".into()),
            (5461, 10922, "b:2".into()),
        ]
    }

    #[test]
    fn keys_map_to_their_master_and_health_survives_a_failover() {
        let start = Topology::whole("cluster".into());
        let t = Topology::from_ranges(three(), &start).unwrap();
        assert_eq!(t.shards().len(), 3);
        assert_eq!(t.shard_of(b"somekey").master, "c:3");
        assert_eq!(t.shard_of(b"{a}").slots, "10923-16383", "slot 15495");
        t.shards()[0].health.request(Outcome::Failed, 5);
        // Slots 0-5460 are now served by the promoted replica: same shard, same health.
        let mut moved = three();
        moved[1].2 = "d:4".into();
        assert!(!t.same_ranges(&moved));
        assert!(t.same_ranges(&three()));
        let after = Topology::from_ranges(moved, &t).unwrap();
        assert_eq!(after.shards()[0].master, "d:4");
        assert!(!after.shards()[0].health.is_up());
        assert!(after.shards()[1].health.is_up());
        assert_eq!(after.down(), 1);
        for shard in after.shards() {
            let slot = key_slot(shard.probe_key.as_bytes());
            assert!(
                std::ptr::eq(after.shard_of(shard.probe_key.as_bytes()), shard),
                "{slot}"
            );
        }
        let one = probe_key(&[(7_000, 7_000)]);
        assert_eq!(key_slot(one.as_bytes()), 7_000, "{one}");
    }

    #[test]
    fn uncovered_slots_form_a_shard_and_bad_ranges_are_refused() {
        let start = Topology::whole("cluster".into());
        let t = Topology::from_ranges(
            vec![(0, 99, "a:1".into()), (200, 16383, "a:1".into())],
            &start,
        )
        .unwrap();
        assert_eq!(t.shards().len(), 2);
        assert_eq!(t.shards()[0].slots, "0-99,200-16383");
        assert_eq!(t.shards()[1].master, "(no master)");
        assert_eq!(t.shards()[1].slots, "100-199");
        assert!(Topology::from_ranges(vec![], &start).is_none());
        assert!(Topology::from_ranges(vec![(0, 16384, "a:1".into())], &start).is_none());
        assert!(Topology::from_ranges(vec![(9, 3, "a:1".into())], &start).is_none());
    }

    #[test]
    fn one_timeout_does_not_switch_a_shard_three_do() {
        let h = ShardHealth::default();
        assert!(!h.request(Outcome::TimedOut, 1));
        assert!(!h.request(Outcome::TimedOut, 2));
        assert!(!h.request(Outcome::Answered, 3));
        assert!(!h.request(Outcome::TimedOut, 4));
        assert!(!h.request(Outcome::TimedOut, 5));
        assert!(h.is_up());
        assert!(h.request(Outcome::TimedOut, 6), "third in a row");
        assert!(!h.is_up());
        assert!(
            !h.request(Outcome::Failed, 7),
            "already down: no second transition"
        );
    }

    #[test]
    fn a_shard_comes_back_after_its_hold_down_of_answered_probes_and_settles() {
        let h = ShardHealth::default();
        assert!(h.request(Outcome::Failed, 1_000));
        h.fell_back();
        h.fell_back();
        assert_eq!(h.probe(true, 1_100), None, "streak starts");
        assert_eq!(h.probe(false, 1_200), None, "streak broken");
        assert_eq!(h.probe(true, 1_300), None);
        assert_eq!(h.probe(true, 2_200), None, "900 ms of answers: not yet");
        assert_eq!(
            h.probe(true, 2_300),
            Some(Change::Up {
                down_ms: 1_300,
                fallbacks: 2
            })
        );
        assert_eq!(h.probe(true, 2_400), None, "one transition");
        assert!(h.settling(2_400) && !h.settling(3_300));
    }

    #[test]
    fn a_shard_that_falls_again_soon_holds_down_longer() {
        let h = ShardHealth::default();
        let mut now = 1_000;
        let mut holds = Vec::new();
        for _ in 0..7 {
            assert!(h.request(Outcome::Failed, now));
            let down_at = now;
            while !matches!(h.probe(true, now), Some(Change::Up { .. })) {
                now += 100;
            }
            holds.push(now - down_at);
            now += 500;
        }
        assert_eq!(holds, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
        // Up for longer than the flap window: the next fall holds down the minimum again.
        now += FLAP_WINDOW;
        assert!(h.request(Outcome::Failed, now));
        let down_at = now;
        while h.probe(true, now).is_none() {
            now += 100;
        }
        assert_eq!(now - down_at, HOLD_DOWN_MIN);
    }

    #[test]
    fn failed_probes_take_an_idle_shard_down_after_three() {
        let h = ShardHealth::default();
        assert_eq!(h.probe(false, 1), None);
        assert_eq!(h.probe(false, 2), None);
        assert_eq!(h.probe(true, 3), None);
        assert_eq!(h.probe(false, 4), None);
        assert_eq!(h.probe(false, 5), None);
        assert_eq!(h.probe(false, 6), Some(Change::Down));
    }
}
