//! The locks and wait queues of builds without `std`: [`lock_api`] locks
//! over a 32-bit word each, which spin briefly and then park the thread
//! through the embedder's [`Parker`] (a futex-style block and wake on the
//! word). Without a parker they spin.
//!
//! A kernel or hypervisor embedding vm-core without `std` installs its
//! scheduler once with [`set_parker`]; the locks stay vm-core's (the data
//! they guard is laid out by vm-core), the waiting becomes the embedder's.
//! The uncontended paths are one atomic operation and call nothing.

use core::sync::atomic::{AtomicU32, Ordering};

/// How an embedder blocks and wakes threads that wait for one of
/// vm-core's locks or wait queues, with the semantics of a futex.
///
/// Used only by builds without the `std` feature (with `std`, the standard
/// library's locks and condition variables block).
///
/// # Examples
///
/// ```
/// use core::sync::atomic::AtomicU32;
/// use vm_core::sync::{Parker, set_parker};
///
/// /// A parker for a machine with no scheduler: waiting spins.
/// struct Spin;
/// impl Parker for Spin {
///     fn park(&self, _word: &AtomicU32, _expected: u32) {
///         core::hint::spin_loop();
///     }
///     fn park_timeout(&self, word: &AtomicU32, expected: u32, _ms: u64) {
///         self.park(word, expected);
///     }
///     fn unpark_all(&self, _word: &AtomicU32) {}
/// }
/// static SPIN: Spin = Spin;
/// assert!(set_parker(&SPIN));
/// assert!(!set_parker(&SPIN), "set once");
/// ```
pub trait Parker: Sync {
    /// Blocks the calling thread while `word` holds `expected`: returns at
    /// once if it does not (the check and the sleep are atomic with respect
    /// to [`unpark_all`](Self::unpark_all) on the same word), and may
    /// return spuriously. The callers loop.
    fn park(&self, word: &AtomicU32, expected: u32);

    /// Like [`park`](Self::park), returning after about `ms` milliseconds
    /// at the latest (waits for free memory use it: they must give up).
    fn park_timeout(&self, word: &AtomicU32, expected: u32, ms: u64);

    /// Wakes every thread parked on `word`.
    fn unpark_all(&self, word: &AtomicU32);
}

/// The default: no scheduler, so waiting spins.
struct Spinning;

impl Parker for Spinning {
    fn park(&self, _word: &AtomicU32, _expected: u32) {
        core::hint::spin_loop();
    }

    fn park_timeout(&self, _word: &AtomicU32, _expected: u32, _ms: u64) {
        core::hint::spin_loop();
    }

    fn unpark_all(&self, _word: &AtomicU32) {}
}

static PARKER: spin::Once<&'static dyn Parker> = spin::Once::new();

/// Installs the embedder's [`Parker`] for every machine of the program;
/// false (and nothing changes) if one was installed before. Install it
/// before the first `Vm` is made: a thread already spinning in a lock
/// keeps spinning until it gets it.
pub fn set_parker(parker: &'static dyn Parker) -> bool {
    let mut installed = false;
    PARKER.call_once(|| {
        installed = true;
        parker
    });
    installed
}

fn parker() -> &'static dyn Parker {
    PARKER.get().copied().unwrap_or(&Spinning)
}

/// Rounds of spinning before a waiter parks.
const SPINS: u32 = 64;

/// A mutex word: 0 free, 1 held, 2 held and someone may be parked
/// (Drepper's "futexes are tricky" mutex).
pub struct RawMutex {
    state: AtomicU32,
}

const FREE: u32 = 0;
const HELD: u32 = 1;
const CONTENDED: u32 = 2;

impl RawMutex {
    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0;
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s == FREE
                && self
                    .state
                    .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            if s == HELD && spins < SPINS {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            // Announce a waiter; if the lock was free meanwhile it is ours
            // (marked contended: at worst one needless wake-up).
            if self.state.swap(CONTENDED, Ordering::Acquire) == FREE {
                return;
            }
            parker().park(&self.state, CONTENDED);
        }
    }
}

// SAFETY: `lock` and `try_lock` return only after moving the word from
// FREE to HELD or CONTENDED with Acquire, which only one thread can do
// until `unlock` stores FREE with Release: mutual exclusion, and each
// holder sees the previous holder's writes.
unsafe impl lock_api::RawMutex for RawMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawMutex = RawMutex {
        state: AtomicU32::new(FREE),
    };
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        if self
            .state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
    }

    fn try_lock(&self) -> bool {
        self.state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        if self.state.swap(FREE, Ordering::Release) == CONTENDED {
            parker().unpark_all(&self.state);
        }
    }
}

/// A reader/writer word: the count of readers in the low bits, a writer
/// bit, and a bit saying someone may be parked. Readers are let in while
/// no writer holds the lock (a writer can wait behind a stream of
/// readers; the fault path's readers are short).
pub struct RawRwLock {
    state: AtomicU32,
}

const READERS: u32 = (1 << 30) - 1;
const WRITER: u32 = 1 << 30;
const PARKED: u32 = 1 << 31;

impl RawRwLock {
    /// Takes the lock by `step` (the next state from the current one, or
    /// `None` while it must wait), parking after a few rounds.
    fn acquire(&self, step: impl Fn(u32) -> Option<u32>) {
        let mut spins = 0;
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if let Some(next) = step(s) {
                if self
                    .state
                    .compare_exchange_weak(s, next, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            if spins < SPINS {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            let parked = s | PARKED;
            if s == parked
                || self
                    .state
                    .compare_exchange(s, parked, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                parker().park(&self.state, parked);
            }
        }
    }

    fn try_acquire(&self, step: impl Fn(u32) -> Option<u32>) -> bool {
        let s = self.state.load(Ordering::Relaxed);
        step(s).is_some_and(|next| {
            self.state
                .compare_exchange(s, next, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
    }
}

fn shared_step(s: u32) -> Option<u32> {
    // Too many readers waits too, rather than overflowing into the writer bit.
    (s & WRITER == 0 && s & READERS < READERS).then_some(s + 1)
}

fn exclusive_step(s: u32) -> Option<u32> {
    (s & (WRITER | READERS) == 0).then_some(s | WRITER)
}

// SAFETY: a writer enters only from a state with no writer and no readers
// and a reader only from one with no writer, each by a compare-exchange
// with Acquire on the whole word; the unlocks release with Release. So a
// writer excludes everyone, readers exclude writers, and each entrant sees
// the writes of those who left before.
unsafe impl lock_api::RawRwLock for RawRwLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawRwLock = RawRwLock {
        state: AtomicU32::new(0),
    };
    type GuardMarker = lock_api::GuardSend;

    fn lock_shared(&self) {
        self.acquire(shared_step);
    }

    fn try_lock_shared(&self) -> bool {
        self.try_acquire(shared_step)
    }

    unsafe fn unlock_shared(&self) {
        let s = self.state.fetch_sub(1, Ordering::Release);
        if s & READERS == 1 && s & PARKED != 0 {
            self.wake();
        }
    }

    fn lock_exclusive(&self) {
        self.acquire(exclusive_step);
    }

    fn try_lock_exclusive(&self) -> bool {
        self.try_acquire(exclusive_step)
    }

    unsafe fn unlock_exclusive(&self) {
        if self.state.swap(0, Ordering::Release) & PARKED != 0 {
            parker().unpark_all(&self.state);
        }
    }
}

impl RawRwLock {
    /// Clears the parked bit and wakes everyone: each re-checks, and
    /// whoever must wait again sets the bit again (a park with the old
    /// value returns at once).
    fn wake(&self) {
        self.state.fetch_and(!PARKED, Ordering::Relaxed);
        parker().unpark_all(&self.state);
    }
}

/// A mutual-exclusion lock.
pub type Mutex<T> = lock_api::Mutex<RawMutex, T>;
/// Guard of a [`Mutex`].
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawMutex, T>;
/// A reader/writer lock.
pub type RwLock<T> = lock_api::RwLock<RawRwLock, T>;
/// Shared guard of a [`RwLock`].
pub type ReadGuard<'a, T> = lock_api::RwLockReadGuard<'a, RawRwLock, T>;
/// Exclusive guard of a [`RwLock`].
pub type WriteGuard<'a, T> = lock_api::RwLockWriteGuard<'a, RawRwLock, T>;

/// One bucket of the wait table: a sequence word that every notify bumps
/// (waiters park on the value they saw before checking their condition,
/// so a notify after the check cannot be missed) and a count of waiters,
/// so a notify with nobody waiting calls nothing.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    seq: AtomicU32,
    waiters: AtomicU32,
}

impl Bucket {
    fn wait_with(&self, mut blocked: impl FnMut() -> bool, park: impl Fn(&AtomicU32, u32)) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        loop {
            let seen = self.seq.load(Ordering::SeqCst);
            if !blocked() {
                break;
            }
            park(&self.seq, seen);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn wait_while(&self, blocked: impl FnMut() -> bool) {
        self.wait_with(blocked, |w, v| parker().park(w, v));
    }

    /// Gives up after about `ms` milliseconds: one timed park with a
    /// parker (whose clock bounds it; an early wake-up returns early, and
    /// the callers look again), a bounded spin without one.
    pub(crate) fn wait_timeout(&self, mut blocked: impl FnMut() -> bool, ms: u64) {
        match PARKER.get() {
            Some(p) => {
                let mut parked = false;
                self.wait_with(
                    || !core::mem::replace(&mut parked, true) && blocked(),
                    |w, v| p.park_timeout(w, v, ms),
                );
            }
            None => {
                let mut rounds = ms.saturating_mul(10_000);
                while rounds > 0 && blocked() {
                    core::hint::spin_loop();
                    rounds -= 1;
                }
            }
        }
    }

    pub(crate) fn notify(&self) {
        // The caller changed the condition before; the SeqCst bump orders
        // it before a waiter's look at `seq`, and the waiter count after.
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            parker().unpark_all(&self.seq);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Condvar, Mutex as StdMutex, mpsc};
    use std::time::{Duration, Instant};

    /// A futex over one condition variable: the check of the word and
    /// the sleep happen under the mutex `unpark_all` takes. `park` sleeps
    /// with no timeout, so a lost wake-up hangs (and the watchdog fails
    /// the test).
    struct TestParker {
        lock: StdMutex<()>,
        cv: Condvar,
        parks: AtomicU64,
    }

    impl Parker for TestParker {
        fn park(&self, word: &AtomicU32, expected: u32) {
            let g = self.lock.lock().unwrap();
            if word.load(Ordering::SeqCst) == expected {
                self.parks.fetch_add(1, Ordering::Relaxed);
                drop(self.cv.wait(g).unwrap());
            }
        }
        fn park_timeout(&self, word: &AtomicU32, expected: u32, ms: u64) {
            // Wake-ups meant for other words do not end it, as with a
            // futex keyed by address.
            let deadline = Instant::now() + Duration::from_millis(ms);
            let mut g = self.lock.lock().unwrap();
            while word.load(Ordering::SeqCst) == expected {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    return;
                };
                g = self.cv.wait_timeout(g, left).unwrap().0;
            }
        }
        fn unpark_all(&self, _word: &AtomicU32) {
            let _g = self.lock.lock().unwrap();
            self.cv.notify_all();
        }
    }

    static TEST_PARKER: TestParker = TestParker {
        lock: StdMutex::new(()),
        cv: Condvar::new(),
        parks: AtomicU64::new(0),
    };

    fn install() {
        set_parker(&TEST_PARKER);
        assert!(
            core::ptr::addr_eq(parker(), &TEST_PARKER),
            "the test's parker"
        );
    }

    /// Runs `f` on a thread and fails if it has not finished in 20 s.
    fn watchdog(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a waiter was never woken");
        t.join().unwrap();
    }

    #[test]
    fn the_mutex_excludes_and_parks_its_waiters() {
        install();
        watchdog(|| {
            let m = Arc::new(Mutex::new(0u64));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        for _ in 0..20_000 {
                            let mut g = m.lock();
                            let v = *g;
                            core::hint::black_box(&mut *g);
                            *g = v + 1;
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            assert_eq!(*m.lock(), 80_000);
            assert!(m.try_lock().is_some());
            let held = m.lock();
            assert!(m.try_lock().is_none(), "held");
            drop(held);
        });
    }

    #[test]
    fn the_rwlock_lets_readers_share_and_writers_exclude() {
        install();
        watchdog(|| {
            let l = Arc::new(RwLock::new((0u64, 0u64)));
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let l = l.clone();
                    std::thread::spawn(move || {
                        for _ in 0..10_000 {
                            let mut g = l.write();
                            g.0 += 1;
                            core::hint::black_box(&mut *g);
                            g.1 += 1;
                        }
                    })
                })
                .collect();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let l = l.clone();
                    std::thread::spawn(move || {
                        for _ in 0..10_000 {
                            let g = l.read();
                            assert_eq!(g.0, g.1, "a reader saw a writer's half");
                        }
                    })
                })
                .collect();
            writers.into_iter().for_each(|t| t.join().unwrap());
            readers.into_iter().for_each(|t| t.join().unwrap());
            assert_eq!(*l.read(), (20_000, 20_000));
            let r1 = l.read();
            let r2 = l.try_read().expect("readers share");
            assert!(l.try_write().is_none(), "readers exclude a writer");
            drop((r1, r2));
            let w = l.write();
            assert!(l.try_read().is_none(), "a writer excludes readers");
            drop(w);
        });
    }

    #[test]
    fn a_wait_queue_never_loses_a_wake_up() {
        install();
        watchdog(|| {
            // Two threads hand a token back and forth through one bucket:
            // each waits for its turn, which the other gives and notifies.
            let b = Arc::new((Bucket::default(), AtomicU32::new(0)));
            let other = {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000u32 {
                        b.0.wait_while(|| b.1.load(Ordering::SeqCst) != 2 * i + 1);
                        b.1.store(2 * i + 2, Ordering::SeqCst);
                        b.0.notify();
                    }
                })
            };
            for i in 0..5_000u32 {
                b.0.wait_while(|| b.1.load(Ordering::SeqCst) != 2 * i);
                b.1.store(2 * i + 1, Ordering::SeqCst);
                b.0.notify();
            }
            other.join().unwrap();
        });
    }

    #[test]
    fn a_timed_wait_gives_up() {
        install();
        let b = Bucket::default();
        let t = Instant::now();
        b.wait_timeout(|| true, 30);
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(25), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }
}
