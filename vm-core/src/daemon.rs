//! Background threads of the machine (the pageout daemon, the page
//! zeroer): a loop run on its own thread until its owner stops it, which
//! dropping the owner does (and waits for the thread to end).

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

/// A thread that runs its step again and again until dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts thread `name` calling `step` until the daemon is dropped;
    /// `step` sleeps when it has nothing to do.
    ///
    /// # Panics
    ///
    /// If the thread cannot be started (as `std::thread::spawn`).
    pub(crate) fn spawn(name: &str, mut step: impl FnMut() + Send + 'static) -> Daemon {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    step();
                }
            })
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Daemon {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
