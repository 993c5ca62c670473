//! Helpers for tests on real files and threads: temporary files removed on
//! drop, and watchdogs that give slow runs (valgrind) more time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A unique path under the system temp directory; the file there, if any,
/// is removed on drop.
#[derive(Debug)]
pub struct TempPath(pub PathBuf);

impl TempPath {
    /// A fresh path, nothing created yet.
    #[must_use]
    pub fn new() -> TempPath {
        static N: AtomicU32 = AtomicU32::new(0);
        TempPath(std::env::temp_dir().join(format!(
            "vm-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    /// A fresh file holding `content`.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    #[must_use]
    pub fn with(content: &[u8]) -> TempPath {
        let t = TempPath::new();
        std::fs::write(&t.0, content).expect("write a temporary file");
        t
    }
}

impl Default for TempPath {
    fn default() -> Self {
        TempPath::new()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `n` seconds, times `VM_TEST_TIME_SCALE` when it is set (CI's valgrind
/// step sets it: everything runs tens of times slower there).
#[must_use]
pub fn scaled_secs(n: u64) -> Duration {
    let scale = std::env::var("VM_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(n * scale.max(1))
}

/// Runs `f` on a thread and fails if it does not finish within
/// [`scaled_secs`]`(secs)` (a deadlock), re-raising its panic otherwise.
///
/// # Panics
///
/// On a timeout, or with `f`'s panic.
pub fn bounded<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(scaled_secs(secs)) {
        Ok(()) => h.join().expect("finished"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("deadlock: the test body did not finish within {secs} s (scaled)")
        }
    }
}

/// An [`IoExecutor`](vm_core::IoExecutor) that keeps background reads
/// until the test runs them, so a test chooses the moment a read "lands".
#[derive(Default)]
pub struct ManualExecutor(std::sync::Mutex<Vec<vm_core::io_executor::IoJob>>);

impl core::fmt::Debug for ManualExecutor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ManualExecutor({} pending)", self.pending())
    }
}

impl vm_core::IoExecutor for ManualExecutor {
    fn execute(&self, job: vm_core::io_executor::IoJob) {
        self.jobs().push(job);
    }
}

impl ManualExecutor {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Vec<vm_core::io_executor::IoJob>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Jobs waiting.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.jobs().len()
    }

    /// Runs every waiting job (not those they queue); returns how many.
    pub fn run_all(&self) -> usize {
        let jobs = std::mem::take(&mut *self.jobs());
        let n = jobs.len();
        for j in jobs {
            j();
        }
        n
    }
}

/// A xorshift generator for seeded tests: the same seed replays the same
/// steps. `Rng(seed)` takes the seed as it is (it must not be 0, which
/// xorshift never leaves); [`Rng::new`] spreads any seed first.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator from any `seed` (spread, never 0).
    #[must_use]
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // an endless source, not an iterator
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `p` times in 100.
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}
