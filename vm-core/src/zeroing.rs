//! Idle-time page zeroing (FreeBSD's old `vm_page_zero_idle`, removed there
//! in 2016 but still the way to take zeroing off the fault path when a
//! core has time to spare): free frames not known to be zero are zeroed
//! and go back to the free lists marked so, and a zero-fill fault that
//! gets one skips the zeroing (`v_ozfod`). A whole-superpage fault whose
//! 512 frames are all zeroed maps 2 MiB without writing a byte.
//!
//! By hand, [`Vm::zero_free_pages`]; with `std`, as a thread
//! ([`Vm::spawn_page_zeroer`]) that zeroes while free memory is above the
//! pageout target and sleeps when nothing is left to zero. Either way
//! frames are taken a small batch at a time and given back before the
//! next, so a fault running beside it never finds memory short because of
//! it: from the free lists first, then from superpage runs that hold free
//! frames (their frames are off the lists; a run remembers when a frame
//! not known to be zero came back to it).

use crate::page::{PageFlags, PageId};
use crate::pmap::Pmap;
use crate::vm::Vm;
#[cfg(feature = "std")]
use alloc::sync::Arc;

/// Frames taken off the free lists at a time, at most.
const BATCH: usize = 32;

impl<P: Pmap> Vm<P> {
    /// Zeroes free pages not known to be zero, up to `max`, a batch of at
    /// most 32 at a time; returns how many it zeroed. Stops early when
    /// every free page is known to be zero, and leaves the reserve of
    /// free pages alone. Zero-fill faults that get such a page skip the
    /// zeroing (`v_ozfod`).
    pub fn zero_free_pages(&self, max: u64) -> u64 {
        let mut done = 0;
        loop {
            let (zeroed, more) = self.zero_batch(max - done);
            done += zeroed;
            if !more || done >= max {
                return done;
            }
        }
    }

    /// One batch of [`zero_free_pages`](Self::zero_free_pages): up to
    /// `max` (and [`BATCH`]) plain free pages taken, zeroed and freed
    /// marked zero. Returns how many, and whether plain pages may be left.
    fn zero_batch(&self, max: u64) -> (u64, bool) {
        let pages = &self.machine.pages;
        let mut taken = [PageId(0); BATCH];
        let want = BATCH.min(usize::try_from(max).unwrap_or(BATCH));
        // Not below the reserve: page-table allocations rely on it.
        let n = pages.take_plain(0, &mut taken[..want]);
        let more = n == want;
        let mut zeroed = 0;
        for &id in &taken[..n] {
            let page = pages.get(id);
            if !page.flags().contains(PageFlags::ZERO) {
                self.machine.phys.zero(pages.pfn(id));
                page.set_flags(PageFlags::ZERO);
                zeroed += 1;
            }
            pages.free(id);
        }
        (zeroed, more)
    }
}

/// A page-zeroing thread ([`Vm::spawn_page_zeroer`]); stopped and joined
/// on drop.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct PageZeroer {
    _thread: crate::daemon::Daemon,
}

#[cfg(feature = "std")]
impl<P: Pmap> Vm<P> {
    /// Starts a thread that zeroes free pages in the background (see the
    /// [module docs](self)): a batch at a time while more free memory
    /// than the pageout target is left and some of it is not known to be
    /// zero; otherwise it sleeps for `period` before it looks again. It
    /// takes a core's time: give it one the faults do not need.
    ///
    /// # Panics
    ///
    /// If the thread cannot be started (as `std::thread::spawn`).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use vm_core::{Prot, Vm};
    /// let vm = Vm::new(vm_testkit::RefPmap::default(), vm_testkit::test_config(256))?;
    /// let s = vm.new_space()?;
    /// s.map_anon(0x10_0000, 64 * 4096, Prot::RW)?;
    /// for i in 0..64 {
    ///     s.write_u8(0x10_0000 + i * 4096, 1)?;
    /// }
    /// drop(s); // 64 frames that held data are free again
    /// let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    /// let until = Instant::now() + Duration::from_secs(10);
    /// while vm.free_zeroed_pages() < vm.free_pages() && Instant::now() < until {
    ///     std::thread::sleep(Duration::from_millis(1));
    /// }
    /// drop(zeroer);
    /// assert_eq!(vm.free_zeroed_pages(), vm.free_pages());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn_page_zeroer(self: &Arc<Self>, period: std::time::Duration) -> PageZeroer {
        let vm = self.clone();
        PageZeroer {
            _thread: crate::daemon::Daemon::spawn("vm-page-zeroer", move || {
                let pages = &vm.machine.pages;
                let spare = pages.free_count() > pages.thresholds.target + BATCH as u64;
                let plain = pages.free_count() > pages.free_zeroed_count();
                if !(spare && plain && vm.zero_batch(BATCH as u64).0 > 0) {
                    std::thread::sleep(period);
                }
            }),
        }
    }
}
