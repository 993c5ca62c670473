//! Where background paging I/O runs: asynchronous read-ahead hands its
//! pager reads to an [`IoExecutor`]. Under `std` the default is
//! [`IoThreads`], a small pool started when first needed; an embedder
//! with its own workers (a kernel's taskqueue, an async runtime) plugs
//! them in with [`Vm::set_io_executor`](crate::Vm::set_io_executor).
//! Without an executor, read-ahead is synchronous.

use alloc::boxed::Box;

/// One background job: a pager read and the settling of its pages.
pub type IoJob = Box<dyn FnOnce() + Send + 'static>;

/// Runs paging I/O jobs off the faulting thread.
///
/// A job should run soon (the pages it reads stay busy until it has, and a
/// fault on one waits for it); it may run on any thread, including the
/// caller's, but [`execute`](Self::execute) must not wait for jobs
/// submitted before (the caller holds a fault's locks). A job dropped
/// without running releases its pages (they are read again by the faults
/// that need them), so an executor may discard jobs it cannot run.
pub trait IoExecutor: Send + Sync {
    /// Runs `job`, now or later.
    fn execute(&self, job: IoJob);
}

#[cfg(feature = "std")]
pub use threads::IoThreads;

#[cfg(feature = "std")]
mod threads {
    use super::{IoExecutor, IoJob};
    use std::sync::{Mutex, PoisonError, mpsc};

    /// A fixed pool of threads fed through a channel. Dropping the pool
    /// lets its threads finish the queued jobs and exit.
    pub struct IoThreads {
        tx: mpsc::Sender<IoJob>,
    }

    impl core::fmt::Debug for IoThreads {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("IoThreads").finish_non_exhaustive()
        }
    }

    impl IoThreads {
        /// A pool of `threads` threads (at least one).
        ///
        /// # Errors
        ///
        /// The host refused to start a thread.
        pub fn new(threads: usize) -> std::io::Result<IoThreads> {
            let (tx, rx) = mpsc::channel::<IoJob>();
            let rx = std::sync::Arc::new(Mutex::new(rx));
            for i in 0..threads.max(1) {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("vm-io-{i}"))
                    .spawn(move || {
                        loop {
                            // The lock is held only to take one job.
                            let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                            match job {
                                // A pager that panics takes its own job
                                // down (its pages are released as the job
                                // unwinds), not the thread: the jobs
                                // queued behind it still run.
                                Ok(job) => {
                                    let _ =
                                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                                }
                                Err(mpsc::RecvError) => return,
                            }
                        }
                    })?;
            }
            Ok(IoThreads { tx })
        }
    }

    impl IoExecutor for IoThreads {
        fn execute(&self, job: IoJob) {
            if let Err(mpsc::SendError(job)) = self.tx.send(job) {
                // Every thread is gone (each panicked in a pager): run it
                // here rather than strand its busy pages.
                job();
            }
        }
    }
}
