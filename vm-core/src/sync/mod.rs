//! The locking primitives of the crate, in one place.
//!
//! With the `std` feature these are the standard library's blocking locks
//! and condition variables. Without it they are [`lock_api`] locks over
//! vm-core's own lock words ([`RawMutex`], [`RawRwLock`]) that spin
//! briefly and then park through the embedder's scheduler, installed once
//! with [`set_parker`] (see [`Parker`]); with no parker they spin. Nothing
//! else in the crate names a lock type directly.
//!
//! Lock poisoning is ignored: the data the locks guard is kept consistent by
//! the code that holds them, and a panic elsewhere must not wedge the
//! machine.

/// The atomics the waiting and page protocols are built on: the core
/// ones, or loom's when the crate is model-checked (`--cfg loom`, see the
/// `loom_protocols` tests).
pub(crate) mod atomic {
    #[cfg(not(loom))]
    pub(crate) use core::sync::atomic::AtomicU32;
    pub(crate) use core::sync::atomic::Ordering;
    #[cfg(all(not(loom), feature = "std", not(vm_parked_locks)))]
    pub(crate) use core::sync::atomic::fence;
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicU32, fence};
}

#[cfg(all(feature = "std", not(vm_parked_locks)))]
mod imp {
    use super::atomic::{AtomicU32, Ordering, fence};
    #[cfg(loom)]
    use loom::sync::{Condvar as BucketCondvar, Mutex as BucketMutex};
    use std::sync::{self, PoisonError};
    #[cfg(not(loom))]
    use std::sync::{Condvar as BucketCondvar, Mutex as BucketMutex};

    /// A mutual-exclusion lock.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(sync::Mutex<T>);
    /// Guard of a [`Mutex`].
    pub type MutexGuard<'a, T> = sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub const fn new(v: T) -> Self {
            Mutex(sync::Mutex::new(v))
        }
        /// Locks, blocking.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
        /// The data, through exclusive access to the lock itself.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// A reader/writer lock.
    #[derive(Debug, Default)]
    pub struct RwLock<T>(sync::RwLock<T>);
    /// Shared guard of a [`RwLock`].
    pub type ReadGuard<'a, T> = sync::RwLockReadGuard<'a, T>;
    /// Exclusive guard of a [`RwLock`].
    pub type WriteGuard<'a, T> = sync::RwLockWriteGuard<'a, T>;

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub const fn new(v: T) -> Self {
            RwLock(sync::RwLock::new(v))
        }
        /// Locks shared, blocking.
        pub fn read(&self) -> ReadGuard<'_, T> {
            self.0.read().unwrap_or_else(PoisonError::into_inner)
        }
        /// Locks shared if that needs no waiting.
        pub fn try_read(&self) -> Option<ReadGuard<'_, T>> {
            match self.0.try_read() {
                Ok(g) => Some(g),
                Err(sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(sync::TryLockError::WouldBlock) => None,
            }
        }
        /// Locks exclusive, blocking.
        pub fn write(&self) -> WriteGuard<'_, T> {
            self.0.write().unwrap_or_else(PoisonError::into_inner)
        }
        /// Locks exclusive if that needs no waiting.
        pub fn try_write(&self) -> Option<WriteGuard<'_, T>> {
            match self.0.try_write() {
                Ok(g) => Some(g),
                Err(sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    /// One bucket of the wait table: a mutex, a condition variable and a
    /// count of the threads inside `wait_*`, so that a notify with nobody
    /// waiting (nearly every one: each fault ends with one) costs a load,
    /// not a lock and a `futex` system call.
    #[derive(Debug, Default)]
    pub(super) struct Bucket {
        lock: BucketMutex<()>,
        cv: BucketCondvar,
        waiters: AtomicU32,
    }

    /// Counts a waiter in for as long as it lives.
    struct Waiting<'a>(&'a AtomicU32);

    impl<'a> Waiting<'a> {
        fn new(count: &'a AtomicU32) -> Self {
            count.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `notify`: either the notifier sees
            // this count, or this thread's check of its condition (next)
            // sees the change made before the notify.
            fence(Ordering::SeqCst);
            Waiting(count)
        }
    }

    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Bucket {
        pub(super) fn wait_while(&self, mut blocked: impl FnMut() -> bool) {
            let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            let _w = Waiting::new(&self.waiters);
            while blocked() {
                g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
        }
        #[cfg(not(loom))]
        pub(super) fn wait_timeout(&self, mut blocked: impl FnMut() -> bool, ms: u64) {
            let g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            let _w = Waiting::new(&self.waiters);
            let _ = self
                .cv
                .wait_timeout_while(g, std::time::Duration::from_millis(ms), |_| blocked());
        }
        /// Under loom there is no clock: one look, then give way.
        #[cfg(loom)]
        pub(super) fn wait_timeout(&self, mut blocked: impl FnMut() -> bool, _ms: u64) {
            if blocked() {
                loom::thread::yield_now();
            }
        }
        pub(super) fn notify(&self) {
            // The caller changed the condition before calling; see
            // `Waiting::new` for the other half.
            fence(Ordering::SeqCst);
            if self.waiters.load(Ordering::SeqCst) == 0 {
                return;
            }
            // Taking the lock orders this wake-up after a waiter's check.
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
            self.cv.notify_all();
        }
    }
}

// `--cfg vm_parked_locks` selects these with std too, so the whole test
// suite can run on the no_std locks (CI does).
#[cfg(any(not(feature = "std"), vm_parked_locks))]
mod imp {
    pub(super) use super::parked::Bucket;
    pub use super::parked::{Mutex, MutexGuard, ReadGuard, RwLock, WriteGuard};
}

pub use imp::{Mutex, MutexGuard, ReadGuard, RwLock, WriteGuard};
#[cfg_attr(all(feature = "std", not(vm_parked_locks)), allow(dead_code))]
mod parked;
pub use parked::{Parker, RawMutex, RawRwLock, set_parker};

use crossbeam_utils::CachePadded;

/// A reader/writer lock for data every fault reads and few operations
/// change (an address space's map): each reader takes the read side of its
/// own thread's shard, so concurrent faults do not bounce one lock word
/// between CPUs; a writer takes every shard. With `std` it is
/// crossbeam's [`ShardedLock`](crossbeam_utils::sync::ShardedLock) (eight
/// cache-padded shards, one per running thread index); without `std` it is
/// the plain [`RwLock`] (correct, one shared word).
#[derive(Debug, Default)]
pub struct ShardedRwLock<T>(sharded::Inner<T>);

/// Shared guard of a [`ShardedRwLock`].
pub type ShardedReadGuard<'a, T> = sharded::ReadGuard<'a, T>;
/// Exclusive guard of a [`ShardedRwLock`].
pub type ShardedWriteGuard<'a, T> = sharded::WriteGuard<'a, T>;

#[cfg(all(feature = "std", not(vm_parked_locks)))]
mod sharded {
    pub(super) type Inner<T> = crossbeam_utils::sync::ShardedLock<T>;
    pub type ReadGuard<'a, T> = crossbeam_utils::sync::ShardedLockReadGuard<'a, T>;
    pub type WriteGuard<'a, T> = crossbeam_utils::sync::ShardedLockWriteGuard<'a, T>;
}

#[cfg(any(not(feature = "std"), vm_parked_locks))]
mod sharded {
    pub(super) type Inner<T> = super::RwLock<T>;
    pub type ReadGuard<'a, T> = super::ReadGuard<'a, T>;
    pub type WriteGuard<'a, T> = super::WriteGuard<'a, T>;
}

impl<T> ShardedRwLock<T> {
    /// A new unlocked lock.
    pub fn new(v: T) -> Self {
        ShardedRwLock(sharded::Inner::new(v))
    }

    /// Locks shared (this thread's shard), blocking while a writer holds it.
    pub fn read(&self) -> ShardedReadGuard<'_, T> {
        #[cfg(all(feature = "std", not(vm_parked_locks)))]
        return self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        #[cfg(any(not(feature = "std"), vm_parked_locks))]
        return self.0.read();
    }

    /// Locks shared if that needs no waiting.
    pub fn try_read(&self) -> Option<ShardedReadGuard<'_, T>> {
        #[cfg(all(feature = "std", not(vm_parked_locks)))]
        return match self.0.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        #[cfg(any(not(feature = "std"), vm_parked_locks))]
        return self.0.try_read();
    }

    /// Locks exclusive: every shard, in order.
    pub fn write(&self) -> ShardedWriteGuard<'_, T> {
        #[cfg(all(feature = "std", not(vm_parked_locks)))]
        return self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        #[cfg(any(not(feature = "std"), vm_parked_locks))]
        return self.0.write();
    }

    /// Locks exclusive if that needs no waiting (for work that may be
    /// skipped, such as a superpage promotion).
    pub fn try_write(&self) -> Option<ShardedWriteGuard<'_, T>> {
        #[cfg(all(feature = "std", not(vm_parked_locks)))]
        return match self.0.try_write() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        #[cfg(any(not(feature = "std"), vm_parked_locks))]
        return self.0.try_write();
    }
}

/// How many ways per-thread statistics are split.
pub const SHARDS: usize = 16;

/// A small number that differs between threads running at the same time,
/// for picking a shard of split statistics: a thread-local index with
/// `std`, else the calling stack's address (threads' stacks are apart).
#[must_use]
pub fn thread_shard() -> usize {
    #[cfg(feature = "std")]
    {
        use core::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        SHARD.with(|s| *s)
    }
    #[cfg(not(feature = "std"))]
    {
        let marker = 0u8;
        (core::ptr::addr_of!(marker) as usize) >> 16
    }
}

/// A count kept in per-thread shards, each on its own cache line, for
/// counts that every fault changes but few read (queue lengths): a change
/// is one uncontended atomic add, a read sums the shards (exact at rest,
/// approximate while others change it).
#[derive(Debug, Default)]
pub struct ShardedCount {
    cells: [CachePadded<core::sync::atomic::AtomicI64>; SHARDS],
}

impl ShardedCount {
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.cells[thread_shard() % SHARDS].fetch_add(n, core::sync::atomic::Ordering::Relaxed);
    }

    /// The total (never below zero).
    #[must_use]
    pub fn get(&self) -> u64 {
        let sum: i64 = self
            .cells
            .iter()
            .map(|c| c.load(core::sync::atomic::Ordering::Relaxed))
            .sum();
        u64::try_from(sum).unwrap_or(0)
    }
}

/// What a shard of a [`BatchedCount`] holds, either way, before it folds
/// it into the total.
const FOLD: i64 = 32;

/// A count that every thread changes and the hot path compares with
/// thresholds (the free-page count: every allocation changes it, every
/// fault checks it). Each thread adds to its own shard and folds the shard
/// into the shared total once it holds 32 or more either way (Linux's
/// per-CPU `vm_stat_diff`), so a change rarely writes the shared line and
/// [`at_least`](Self::at_least) is usually one load of a line that rarely
/// changes. The total alone is off by at most [`SLACK`](Self::SLACK);
/// [`exact`](Self::exact) adds the shards. A fold moves a shard's value
/// into the total under a lock that `exact` takes too, so no read misses
/// a fold in flight or counts it twice.
#[derive(Debug)]
pub struct BatchedCount {
    total: CachePadded<Total>,
    /// On the heap: 16 cache lines would make every structure holding a
    /// count (and its constructor's stack frame) 2 KiB larger.
    shards: alloc::boxed::Box<[CachePadded<core::sync::atomic::AtomicI64>]>,
}

impl Default for BatchedCount {
    fn default() -> Self {
        BatchedCount {
            total: CachePadded::default(),
            shards: (0..SHARDS).map(|_| CachePadded::default()).collect(),
        }
    }
}

/// The folded total and the lock folds and exact reads take.
#[derive(Debug, Default)]
struct Total {
    value: core::sync::atomic::AtomicI64,
    folding: Mutex<()>,
}

impl BatchedCount {
    /// How far the shared total alone may be from the count.
    pub const SLACK: u64 = SHARDS as u64 * FOLD as u64;

    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        use core::sync::atomic::Ordering::Relaxed;
        if n == 0 {
            return;
        }
        let cell = &self.shards[thread_shard() % SHARDS];
        if (cell.fetch_add(n, Relaxed) + n).unsigned_abs() >= FOLD as u64 {
            let _folding = self.total.folding.lock();
            let d = cell.swap(0, Relaxed);
            self.total.value.fetch_add(d, Relaxed);
        }
    }

    /// The count from the shared total alone: off by up to
    /// [`SLACK`](Self::SLACK) (never below zero).
    #[must_use]
    pub fn approx(&self) -> u64 {
        u64::try_from(self.total.value.load(core::sync::atomic::Ordering::Relaxed)).unwrap_or(0)
    }

    /// The count: the total and every shard, with no fold between the
    /// reads (exact at rest; while others add, each shard as it is when
    /// read; never below zero).
    #[must_use]
    pub fn exact(&self) -> u64 {
        use core::sync::atomic::Ordering::Relaxed;
        let _folding = self.total.folding.lock();
        let shards: i64 = self.shards.iter().map(|c| c.load(Relaxed)).sum();
        u64::try_from(self.total.value.load(Relaxed) + shards).unwrap_or(0)
    }

    /// Whether the count is at least `n`: from the total alone when it is
    /// further than [`SLACK`](Self::SLACK) from `n`, else from
    /// [`exact`](Self::exact).
    #[must_use]
    pub fn at_least(&self, n: u64) -> bool {
        let approx = self.approx();
        if approx >= n.saturating_add(Self::SLACK) {
            true
        } else if approx.saturating_add(Self::SLACK) < n {
            false
        } else {
            self.exact() >= n
        }
    }
}

const BUCKETS: usize = 64;

/// A hashed table of wait queues, like the kernel's sleep queues: a thread
/// waits on a key (a page, an object) until a condition clears, and whoever
/// clears it notifies the key. Keys that hash together share a bucket and
/// get spurious wake-ups, never lost ones.
#[derive(Debug)]
pub struct WaitTable {
    buckets: [imp::Bucket; BUCKETS],
}

impl Default for WaitTable {
    fn default() -> Self {
        WaitTable {
            buckets: core::array::from_fn(|_| <imp::Bucket as Default>::default()),
        }
    }
}

impl WaitTable {
    fn bucket(&self, key: u64) -> &imp::Bucket {
        let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.buckets[h as usize % BUCKETS]
    }

    /// Blocks while `blocked()` returns true. `blocked` is evaluated under
    /// the bucket's lock, so a [`notify`](Self::notify) that follows the
    /// change cannot be missed.
    pub fn wait_while(&self, key: u64, blocked: impl FnMut() -> bool) {
        self.bucket(key).wait_while(blocked);
    }

    /// Like [`wait_while`](Self::wait_while) but gives up after about `ms`
    /// milliseconds.
    pub fn wait_timeout(&self, key: u64, blocked: impl FnMut() -> bool, ms: u64) {
        self.bucket(key).wait_timeout(blocked, ms);
    }

    /// Wakes every waiter of `key` (and of keys sharing its bucket).
    pub fn notify(&self, key: u64) {
        self.bucket(key).notify();
    }
}

/// A count of operations in progress that others can wait to drain: an
/// object's paging-in-progress (`vm_object_pip_add` / `pip_wakeup` /
/// `pip_wait`). Whoever takes the count to zero wakes the waiters of the
/// gate's key.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    count: atomic::AtomicU32,
}

impl Gate {
    /// One more operation in progress.
    pub(crate) fn enter(&self) {
        self.count.fetch_add(1, atomic::Ordering::AcqRel);
    }

    /// One fewer; the last wakes whoever waits on `key` in `waits`.
    pub(crate) fn leave(&self, waits: &WaitTable, key: u64) {
        if self.count.fetch_sub(1, atomic::Ordering::AcqRel) == 1 {
            waits.notify(key);
        }
    }

    /// Operations in progress now.
    pub(crate) fn count(&self) -> u32 {
        self.count.load(atomic::Ordering::Acquire)
    }

    /// Sleeps until no operation is in progress.
    pub(crate) fn wait_idle(&self, waits: &WaitTable, key: u64) {
        waits.wait_while(key, || self.count() != 0);
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::BatchedCount;

    /// The total lags the count by what a shard holds below the fold
    /// threshold; `at_least` near a threshold goes by the exact count, far
    /// from it by the total.
    #[test]
    fn a_batched_count_folds_and_answers_exactly_near_a_threshold() {
        let c = BatchedCount::default();
        c.add(31);
        assert_eq!((c.approx(), c.exact()), (0, 31), "held in the shard");
        assert!(
            c.at_least(31) && !c.at_least(32),
            "exact near the threshold"
        );
        c.add(1);
        assert_eq!((c.approx(), c.exact()), (32, 32), "folded at 32");
        c.add(-40);
        assert_eq!((c.approx(), c.exact()), (0, 0), "never below zero");
        c.add(10_000);
        assert!(c.at_least(9_000) && !c.at_least(10_001));
        assert_eq!(c.exact(), 9_992);
    }

    /// Threads adding and taking away at once leave the exact count at
    /// rest, whatever they left in their shards.
    #[test]
    fn a_batched_count_is_exact_at_rest_after_threads() {
        let c = BatchedCount::default();
        std::thread::scope(|s| {
            for t in 0..8 {
                let c = &c;
                s.spawn(move || {
                    for i in 0..1_000 {
                        c.add(if i % 3 == 0 { -1 } else { 2 });
                    }
                    c.add(t);
                });
            }
        });
        // Each thread: 334 times -1, 666 times +2, then its number.
        assert_eq!(c.exact(), 8 * (666 * 2 - 334) + 28);
        assert!(c.approx().abs_diff(c.exact()) <= BatchedCount::SLACK);
    }
}
