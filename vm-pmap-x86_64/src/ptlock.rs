//! The lock of one leaf page table (Linux's split PTE locks).
//!
//! A leaf table's frame has one word of metadata in vm-core
//! ([`PhysFrames::table_word`](vm_core::pmap::PhysFrames::table_word)): its
//! low bits count the table's valid entries, bit 63 is this lock. Faults on
//! different leaf tables of one space so take different locks, on different
//! cache lines (the words live in the frames' `VmPage`s).
//!
//! Holders never block inside (they change entries, the table's count and
//! pv lists, and run the TLB hook), so waiting is a short spin that yields
//! with `std`.

use core::sync::atomic::{AtomicU64, Ordering};

/// Bit 63 of a table word: the table is locked.
pub(crate) const LOCKED: u64 = 1 << 63;

/// The count of valid entries in a table word.
pub(crate) fn count_of(word: u64) -> u64 {
    word & !LOCKED
}

/// A table's word: the pmap's are atomics in vm-core's page array; the
/// loom model check supplies its own.
pub(crate) trait TableWord {
    /// The word now.
    fn peek(&self) -> u64;
    /// Sets [`LOCKED`] if the word still holds `seen` (unlocked).
    fn try_lock(&self, seen: u64) -> bool;
    /// Clears [`LOCKED`], publishing the holder's changes.
    fn unlock(&self);
}

/// [`TableWord`] for an atomic type with the core atomics' methods (the
/// core one here, loom's in the model check): one body for both.
macro_rules! table_word_for {
    ($atomic:ty) => {
        impl TableWord for $atomic {
            fn peek(&self) -> u64 {
                self.load(Ordering::Relaxed)
            }
            fn try_lock(&self, seen: u64) -> bool {
                self.compare_exchange_weak(
                    seen,
                    seen | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            }
            fn unlock(&self) {
                self.fetch_and(!LOCKED, Ordering::Release);
            }
        }
    };
}

table_word_for!(AtomicU64);

/// A held table lock; dropping it unlocks.
#[must_use = "the table is unlocked when the guard goes"]
pub(crate) struct TableLock<'a, W: TableWord = AtomicU64>(&'a W);

impl<'a, W: TableWord> TableLock<'a, W> {
    /// Locks the table whose word is `word`, waiting for another holder.
    pub(crate) fn lock(word: &'a W) -> Self {
        let mut spins = 0u32;
        loop {
            let w = word.peek();
            if w & LOCKED == 0 && word.try_lock(w) {
                return TableLock(word);
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                #[cfg(all(feature = "std", not(loom)))]
                std::thread::yield_now();
            }
            #[cfg(loom)]
            loom::thread::yield_now();
            core::hint::spin_loop();
        }
    }
}

impl TableLock<'_, AtomicU64> {
    /// Changes the locked table's count of valid entries.
    pub(crate) fn count_add(&self, delta: i64) {
        let old = self.0.fetch_add(delta as u64, Ordering::Relaxed);
        debug_assert!(
            count_of(old).checked_add_signed(delta).is_some(),
            "table count"
        );
    }

    /// The locked table's count of valid entries.
    pub(crate) fn count(&self) -> u64 {
        count_of(self.0.load(Ordering::Relaxed))
    }
}

impl<W: TableWord> Drop for TableLock<'_, W> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

/// The lock checked under loom (`RUSTFLAGS="--cfg loom" cargo test -p
/// vmfault-pmap-x86_64 --lib --release loom`): holders exclude each other,
/// and a count change made by the holder (the table's entries) survives
/// the unlock of the same word.
#[cfg(all(loom, test))]
mod loom_checks {
    use super::*;
    use crate::entry::EntryCell;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64 as LoomU64;

    table_word_for!(LoomU64);

    #[test]
    fn loom_table_lock_excludes_and_keeps_counts() {
        loom::model(|| {
            // The word (count 3) and an entry the holders change with a
            // plain load and store: a second holder inside would lose one.
            let word = Arc::new(LoomU64::new(3));
            let entry = Arc::new(LoomU64::new(0));
            let other = {
                let (word, entry) = (word.clone(), entry.clone());
                loom::thread::spawn(move || {
                    let _l = TableLock::lock(&*word);
                    let e = entry.load(Ordering::Relaxed);
                    entry.store(e + 1, Ordering::Relaxed);
                    word.fetch_add(1, Ordering::Relaxed);
                })
            };
            {
                let _l = TableLock::lock(&*word);
                let e = entry.load(Ordering::Relaxed);
                entry.store(e + 1, Ordering::Relaxed);
                word.fetch_add(1, Ordering::Relaxed);
            }
            other.join().unwrap();
            assert_eq!(entry.load(Ordering::Relaxed), 2, "two holders at once");
            let w = word.load(Ordering::Relaxed);
            assert_eq!(w, 5, "count {} lock {}", count_of(w), w & LOCKED != 0);
        });
    }

    /// Two faults make the same missing table at once: each takes a fresh
    /// frame and installs it by compare-and-swap. Exactly one is linked, the
    /// parent counts it once, and the loser frees its own (never seen) frame
    /// and continues in the winner's.
    #[test]
    fn loom_racing_table_installs_link_one_table() {
        const FLAGS: u64 = 0x67;
        loom::model(|| {
            let parent = Arc::new(LoomU64::new(0));
            let parent_count = Arc::new(LoomU64::new(0));
            // `leaf_slot_create`'s step, through the same `EntryCell`.
            let install = |parent: &LoomU64, count: &LoomU64, mine: u64| -> (u64, bool) {
                let seen = parent.load(Ordering::Acquire);
                if seen != 0 {
                    return (seen & !FLAGS, false); // theirs: no frame taken
                }
                match EntryCell::compare_exchange(parent, seen, mine | FLAGS) {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        (mine, false)
                    }
                    Err(theirs) => (theirs & !FLAGS, true), // ours freed
                }
            };
            let other = {
                let (p, c) = (parent.clone(), parent_count.clone());
                loom::thread::spawn(move || install(&p, &c, 0x2000))
            };
            let (used_a, freed_a) = install(&parent, &parent_count, 0x1000);
            let (used_b, freed_b) = other.join().unwrap();
            let linked = parent.load(Ordering::Acquire) & !FLAGS;
            assert_eq!(used_a, linked);
            assert_eq!(used_b, linked);
            assert_eq!(parent_count.load(Ordering::Relaxed), 1);
            assert!(linked == 0x1000 || linked == 0x2000);
            assert!(!freed_a || linked != 0x1000, "the linked table was freed");
            assert!(!freed_b || linked != 0x2000, "the linked table was freed");
        });
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_lock_excludes_and_keeps_the_count() {
        let word = Arc::new(AtomicU64::new(5));
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (word, inside) = (word.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let _g = TableLock::lock(&*word);
                        assert_eq!(inside.fetch_add(1, Ordering::Relaxed), 0, "two holders");
                        word.fetch_add(1, Ordering::Relaxed);
                        inside.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let w = word.load(Ordering::Relaxed);
        assert_eq!(w & LOCKED, 0, "left locked");
        assert_eq!(count_of(w), 5 + 4 * 2000);
    }
}
