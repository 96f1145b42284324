//! Per-owner shares of something held at once (uploads per app, SFTP handles
//! per key): a tenant that takes all of its share leaves the rest to others.
//!
//! A [`Share`] is given back when it is dropped, whichever way its holder
//! ends (finished, refused, timed out, or its connection dropped).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// How many of its share each owner holds, and the share.
#[derive(Debug)]
pub struct Shares<K: Eq + Hash> {
    cap: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Clone for Shares<K> {
    fn clone(&self) -> Self {
        Shares { cap: self.cap, held: self.held.clone() }
    }
}

impl<K: Eq + Hash + Clone> Shares<K> {
    /// At most `cap` held at once by each owner.
    pub fn new(cap: usize) -> Shares<K> {
        Shares { cap, held: Arc::default() }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// One more for `owner`, or `None` when it holds its whole share.
    pub fn take(&self, owner: K) -> Option<Share<K>> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(owner.clone()).or_default();
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(Share { owner, held: self.held.clone() })
    }
}

/// One unit of an owner's share, given back on drop.
#[derive(Debug)]
pub struct Share<K: Eq + Hash> {
    owner: K,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Drop for Share<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.owner) {
            *count -= 1;
            // Owners come and go: the map holds only those holding something.
            if *count == 0 {
                held.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_owner_gets_its_share_back_when_it_lets_go() {
        let shares = Shares::new(2);
        let a1 = shares.take("a").unwrap();
        let _a2 = shares.take("a").unwrap();
        assert!(shares.take("a").is_none(), "a holds its whole share");
        let _b = shares.take("b").expect("another owner is not held back by a");
        drop(a1);
        let _a3 = shares.take("a").expect("a dropped one");
        assert!(shares.take("a").is_none());
        let clone = shares.clone();
        let _b2 = clone.take("b").unwrap();
        assert!(shares.take("b").is_none(), "clones count together");
    }
}
