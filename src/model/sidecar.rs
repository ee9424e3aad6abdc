//! Sidecar or direct: the path busbar takes to an instance registered with both a
//! sidecar and an app address.
//!
//! Owns: the per-instance path state (what the sidecar's probes and connections said,
//! when it recovered, the path in use) and the hold-down that keeps a recovering path
//! from taking traffic back before it has proven itself.
//! Must not: do I/O; probes are the health checker's, connections the proxy's.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use crate::config::PathPreference;

/// The path a request takes to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Sidecar,
    Direct,
    /// Neither path is up.
    Out,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Sidecar => "sidecar",
            Path::Direct => "direct",
            Path::Out => "out",
        }
    }

    fn from_u8(v: u8) -> Path {
        match v {
            0 => Path::Sidecar,
            1 => Path::Direct,
            _ => Path::Out,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Path::Sidecar => 0,
            Path::Direct => 1,
            Path::Out => 2,
        }
    }
}

/// What is known of an instance's sidecar. Shared across snapshot rebuilds like health.
#[derive(Debug)]
pub struct SidecarState {
    up: AtomicBool,
    /// When the sidecar last came back up (ms since start); hold-down counts from here.
    up_since_ms: AtomicU64,
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    /// The path last used, to see switches.
    last_path: AtomicU8,
}

impl Default for SidecarState {
    fn default() -> Self {
        SidecarState {
            up: AtomicBool::new(true),
            up_since_ms: AtomicU64::new(0),
            probe_successes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            last_path: AtomicU8::new(u8::MAX),
        }
    }
}

/// A path change, for the log line and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub from: Option<Path>,
    pub to: Path,
}

impl SidecarState {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// A connection to the sidecar failed: it is down from now on, until probes say otherwise.
    /// Returns true if this changed its state.
    pub fn connect_failed(&self) -> bool {
        self.probe_successes.store(0, Relaxed);
        self.up.swap(false, Relaxed)
    }

    /// One probe of the sidecar. Returns Some(up) when its state flipped.
    pub fn record_probe(
        &self,
        ok: bool,
        healthy: u32,
        unhealthy: u32,
        now_ms: u64,
    ) -> Option<bool> {
        if ok {
            self.probe_failures.store(0, Relaxed);
            let n = self.probe_successes.fetch_add(1, Relaxed) + 1;
            if !self.up.load(Relaxed) && n >= healthy {
                self.up_since_ms.store(now_ms, Relaxed);
                self.up.store(true, Relaxed);
                return Some(true);
            }
        } else {
            self.probe_successes.store(0, Relaxed);
            let n = self.probe_failures.fetch_add(1, Relaxed) + 1;
            if self.up.load(Relaxed) && n >= unhealthy {
                self.up.store(false, Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// Whether the sidecar may take traffic: up, and up for at least the hold-down since
    /// it came back (a sidecar that never failed has no hold-down).
    fn sidecar_ready(&self, hold_down: Duration, now_ms: u64) -> bool {
        if !self.up.load(Relaxed) {
            return false;
        }
        let since = self.up_since_ms.load(Relaxed);
        since == 0 || now_ms.saturating_sub(since) >= hold_down.as_millis() as u64
    }

    /// The path to use now. `direct_up` is the app's own health.
    pub fn choose(
        &self,
        prefer: PathPreference,
        hold_down: Duration,
        direct_up: bool,
        now_ms: u64,
    ) -> Path {
        let sidecar = self.sidecar_ready(hold_down, now_ms);
        match prefer {
            PathPreference::Sidecar if sidecar => Path::Sidecar,
            PathPreference::Sidecar if direct_up => Path::Direct,
            // Preferring direct: the sidecar is the fallback, and needs no hold-down to help.
            PathPreference::Direct if direct_up => Path::Direct,
            PathPreference::Direct if self.up.load(Relaxed) => Path::Sidecar,
            _ => Path::Out,
        }
    }

    /// Records the path used; returns the switch if it differs from the last one.
    pub fn note_path(&self, path: Path) -> Option<Switch> {
        let new = path.to_u8();
        let old = self.last_path.swap(new, Relaxed);
        (old != new).then(|| Switch {
            from: (old != u8::MAX).then(|| Path::from_u8(old)),
            to: path,
        })
    }

    pub fn last_path(&self) -> Option<Path> {
        let v = self.last_path.load(Relaxed);
        (v != u8::MAX).then(|| Path::from_u8(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(10);

    #[test]
    fn sidecar_first_then_direct_then_back_after_hold_down() {
        let s = SidecarState::default();
        assert_eq!(
            s.choose(PathPreference::Sidecar, HOLD, true, 1_000),
            Path::Sidecar
        );
        assert!(s.connect_failed());
        assert_eq!(
            s.choose(PathPreference::Sidecar, HOLD, true, 1_100),
            Path::Direct
        );
        // Back up at t = 2 s (one probe suffices here), but not trusted until t = 12 s.
        assert_eq!(s.record_probe(true, 1, 1, 2_000), Some(true));
        assert_eq!(
            s.choose(PathPreference::Sidecar, HOLD, true, 11_999),
            Path::Direct
        );
        assert_eq!(
            s.choose(PathPreference::Sidecar, HOLD, true, 12_000),
            Path::Sidecar
        );
    }

    #[test]
    fn both_down_is_out_and_direct_preference_falls_back_to_sidecar() {
        let s = SidecarState::default();
        s.connect_failed();
        assert_eq!(s.choose(PathPreference::Sidecar, HOLD, false, 0), Path::Out);
        let s = SidecarState::default();
        assert_eq!(
            s.choose(PathPreference::Direct, HOLD, true, 0),
            Path::Direct
        );
        assert_eq!(
            s.choose(PathPreference::Direct, HOLD, false, 0),
            Path::Sidecar
        );
    }

    #[test]
    fn switches_are_reported_once() {
        let s = SidecarState::default();
        assert_eq!(
            s.note_path(Path::Sidecar),
            Some(Switch {
                from: None,
                to: Path::Sidecar
            })
        );
        assert_eq!(s.note_path(Path::Sidecar), None);
        assert_eq!(
            s.note_path(Path::Direct),
            Some(Switch {
                from: Some(Path::Sidecar),
                to: Path::Direct
            })
        );
    }
}
