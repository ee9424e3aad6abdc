//! The users refused most often, for the console's admission page: a short, approximate
//! top list (the Space-Saving algorithm: a new user takes the least-counted place and
//! its count, so a heavy hitter is never missed and memory never grows with users).
//!
//! Owns: [`TopRefused`], kept in the stores so a reload keeps it.
//! Must not: decide a refusal, or make a refused request wait: a contended lock skips
//! the count (the list is approximate by design).

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Places in the list: enough to see who floods, never a count per user.
pub const TOP_REFUSED_CAP: usize = 32;

/// One place in the list.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedUser {
    /// The limiter's key: the identity source's prefix (`hdr:`, `jwt:`, `key:`, `ip:`)
    /// and the user.
    pub user: String,
    /// Refusals counted for this place (at most `overcount` of them another user's).
    pub refusals: u64,
    /// Refusals inherited from the user it displaced.
    pub overcount: u64,
    /// The route and reason of the latest refusal.
    #[serde(serialize_with = "as_str")]
    pub route: Arc<str>,
    pub reason: &'static str,
}

fn as_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

/// The bounded top list of refused users.
#[derive(Debug, Default)]
pub struct TopRefused {
    places: Mutex<Vec<RefusedUser>>,
}

impl TopRefused {
    /// Counts one refusal of `user` on `route` for `reason`.
    pub fn note(&self, user: &str, route: &Arc<str>, reason: &'static str) {
        let Ok(mut places) = self.places.try_lock() else {
            return;
        };
        if let Some(p) = places.iter_mut().find(|p| p.user == user) {
            p.refusals += 1;
            p.reason = reason;
            if !Arc::ptr_eq(&p.route, route) {
                p.route = route.clone();
            }
            return;
        }
        let (refusals, overcount) = if places.len() < TOP_REFUSED_CAP {
            (1, 0)
        } else {
            let Some((i, least)) = places
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.refusals)
                .map(|(i, p)| (i, p.refusals))
            else {
                return;
            };
            places.swap_remove(i);
            (least + 1, least)
        };
        places.push(RefusedUser {
            user: user.to_string(),
            refusals,
            overcount,
            route: route.clone(),
            reason,
        });
    }

    /// The `n` most refused, most first.
    pub fn top(&self, n: usize) -> Vec<RefusedUser> {
        let mut v = match self.places.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        v.sort_by(|a, b| {
            b.refusals
                .cmp(&a.refusals)
                .then_with(|| a.user.cmp(&b.user))
        });
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heavy_hitter_stays_and_the_list_stays_bounded() {
        let t = TopRefused::default();
        let route: Arc<str> = Arc::from("orders");
        for i in 0..10_000 {
            t.note("hdr:mallory", &route, "user");
            t.note(&format!("ip:10.0.{}.{}", i / 256, i % 256), &route, "user");
        }
        let top = t.top(100);
        assert_eq!(top.len(), TOP_REFUSED_CAP);
        assert_eq!(top[0].user, "hdr:mallory");
        assert_eq!(top[0].refusals, 10_000);
        assert_eq!(top[0].overcount, 0);
        assert_eq!(t.top(3).len(), 3);
    }
}
