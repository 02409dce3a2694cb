//! Remembered download rights: a user allowed to download a media object
//! stays allowed for a short time without asking fanout again, so that a
//! download of many chunks costs one membership question.
//!
//! Only positive answers are kept (a refusal is asked again next time, so
//! a user who just joined is not kept out), and only for
//! `access_cache_ttl`: a member who left keeps access that long at most.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// The rights remembered by one media process.
#[derive(Debug)]
pub struct AccessCache {
    ttl_ms: i64,
    capacity: usize,
    /// (user, media) → until when (ms since the epoch, exclusive).
    entries: Mutex<HashMap<(String, String), i64>>,
}

impl AccessCache {
    /// Remembers rights for `ttl_ms` (0 remembers nothing), at most
    /// `capacity` at once.
    pub fn new(ttl_ms: i64, capacity: usize) -> Self {
        Self {
            ttl_ms,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `user` was found allowed to download `media` within the ttl
    /// before `now_ms`.
    pub fn allowed(&self, user: &str, media: &str, now_ms: i64) -> bool {
        if self.ttl_ms <= 0 {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&(user.to_owned(), media.to_owned()))
            .is_some_and(|until| now_ms < *until)
    }

    /// Remembers that `user` may download `media`, as of `now_ms`.
    pub fn grant(&self, user: &str, media: &str, now_ms: i64) {
        if self.ttl_ms <= 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity {
            entries.retain(|_, until| now_ms < *until);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(
            (user.to_owned(), media.to_owned()),
            now_ms.saturating_add(self.ttl_ms),
        );
    }

    /// Forgets every right to `media` (it was deleted).
    pub fn forget_media(&self, media: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|(_, m), _| m != media);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_last_the_ttl() {
        let cache = AccessCache::new(100, 10);
        assert!(!cache.allowed("alice", "m", 0));
        cache.grant("alice", "m", 1_000);
        assert!(cache.allowed("alice", "m", 1_099));
        assert!(!cache.allowed("alice", "m", 1_100));
        assert!(!cache.allowed("bob", "m", 1_000));
        assert!(!cache.allowed("alice", "n", 1_000));
        cache.forget_media("m");
        assert!(!cache.allowed("alice", "m", 1_000));
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = AccessCache::new(100, 2);
        cache.grant("a", "m", 0);
        cache.grant("b", "m", 0);
        // Full of live rights: all are dropped to make room.
        cache.grant("c", "m", 50);
        assert!(cache.allowed("c", "m", 60));
        assert!(!cache.allowed("a", "m", 60));
        cache.grant("d", "m", 60);
        // Full again; "c" expired at 150 and makes the room.
        cache.grant("e", "m", 155);
        assert!(cache.allowed("d", "m", 155));
        assert!(cache.allowed("e", "m", 155));
    }

    #[test]
    fn a_zero_ttl_remembers_nothing() {
        let cache = AccessCache::new(0, 10);
        cache.grant("alice", "m", 0);
        assert!(!cache.allowed("alice", "m", 0));
    }
}
