//! Config history: the last applied configurations (file text and release overrides),
//! so `POST /v1/config/rollback` can go back one step.
//!
//! Owns: the bounded list of entries, kept in memory only. A rollback applies an older
//! text through the same validation as a reload; the user's file is never rewritten,
//! so a later reload reads the file again.
//! Must not: apply anything itself (that is `admin::config_rollback`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::Digest;

use super::Overrides;

/// Configurations kept: enough to step back through a morning's changes, small enough
/// that the texts held in memory stay modest.
pub const HISTORY_LEN: usize = 10;
/// Hex digits of the SHA-256 shown as a configuration's digest.
const DIGEST_LEN: usize = 12;

/// One applied configuration.
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: SystemTime,
    /// What applied it: start, reload, rollback, release, cluster.
    pub source: &'static str,
    /// SHA-256 prefix of the file text.
    pub digest: String,
    pub text: Arc<str>,
    pub releases: Arc<Overrides>,
}

#[derive(Debug, Default)]
pub struct History {
    entries: Mutex<VecDeque<Entry>>,
}

fn digest(text: &str) -> String {
    let d = sha2::Sha256::digest(text.as_bytes());
    let mut s: String = d.iter().map(|b| format!("{b:02x}")).collect();
    s.truncate(DIGEST_LEN);
    s
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, e: Entry) {
        let mut q = self.lock();
        if q.len() == HISTORY_LEN {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// A config text was applied (the overrides as they are now).
    pub fn record_text(&self, source: &'static str, text: &str, releases: Overrides) {
        self.push(Entry {
            at: SystemTime::now(),
            source,
            digest: digest(text),
            text: Arc::from(text),
            releases: Arc::new(releases),
        });
    }

    /// The overrides changed; the text is the newest entry's.
    pub fn record_releases(&self, source: &'static str, releases: Overrides) {
        let mut q = self.lock();
        let Some(last) = q.back() else {
            return;
        };
        let e = Entry {
            at: SystemTime::now(),
            source,
            digest: last.digest.clone(),
            text: last.text.clone(),
            releases: Arc::new(releases),
        };
        if q.len() == HISTORY_LEN {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().iter().cloned().collect()
    }

    /// The entry before the newest, to roll back to.
    pub fn previous(&self) -> Option<Entry> {
        let q = self.lock();
        q.len().checked_sub(2).and_then(|i| q.get(i)).cloned()
    }

    /// Drops the newest entry once a rollback to the one before it applied, so another
    /// rollback goes one step further back.
    pub fn drop_newest(&self) {
        self.lock().pop_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_entries_and_steps_back() {
        let h = History::default();
        assert!(h.previous().is_none());
        for i in 0..HISTORY_LEN + 3 {
            h.record_text("reload", &format!("text {i}"), Overrides::new());
        }
        let all = h.entries();
        assert_eq!(all.len(), HISTORY_LEN);
        assert_eq!(&*all[0].text, "text 3");
        assert_eq!(all[0].digest.len(), DIGEST_LEN);
        assert_ne!(all[0].digest, all[1].digest);
        h.record_releases("release", Overrides::new());
        let prev = h.previous().unwrap();
        assert_eq!(&*prev.text, &*format!("text {}", HISTORY_LEN + 2));
        h.drop_newest();
        assert_eq!(
            &*h.previous().unwrap().text,
            &*format!("text {}", HISTORY_LEN + 1)
        );
    }
}
