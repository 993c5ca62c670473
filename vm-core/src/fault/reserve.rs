//! Superpage reservations on the fault path (FreeBSD `vm_reserv`, in a
//! lighter form).
//!
//! The first zero-fill fault in an aligned 2 MiB of addresses that one map
//! entry covers whole, in an anonymous object, claims a wholly free,
//! aligned run of 512 frames for those 2 MiB (`Pages::claim_run`); the
//! object remembers it by the page index that starts the 2 MiB
//! (`ObjectState::reservations`). Every zero-fill of a page there then asks
//! for the frame at the page's own offset in the run, by its id
//! (`Pages::alloc_at`), and takes any frame if that one is gone. When all
//! 512 are in, the pages sit in physical order at superpage-aligned
//! addresses, and a pmap that promotes maps them with one entry.
//!
//! Unlike FreeBSD's, a reservation keeps nothing off the free lists: a
//! frame of the run is free for any allocation until its page comes, so
//! there is nothing to break under a shortage, and a run taken in part
//! just means those 2 MiB stay 4 KiB pages. The offset comes from the
//! address, not the page index, so an object mapped at an address whose
//! 2 MiB alignment differs from its offset's still lines up.

use super::FaultState;
use crate::object::ObjectState;
use crate::page::PageId;
use crate::page_queues::{AllocClass, NO_RUN, RUN_PAGES};
use crate::pmap::Pmap;
use crate::{PAGE_SHIFT, PAGE_SIZE};

impl<P: Pmap> FaultState<'_, P> {
    /// The frame of this page's reservation in the first object `st`
    /// (locked), claiming a run on the first fault of its 2 MiB; `None`
    /// when reservations are off, the 2 MiB are not all inside the entry,
    /// no run was whole, or the page's frame is taken.
    pub(super) fn reserved_frame(&self, st: &mut ObjectState) -> Option<PageId> {
        if !self.target.vm.config.superpage_reservations {
            return None;
        }
        let offset = (self.va >> PAGE_SHIFT) & (RUN_PAGES - 1);
        let start = self.pindex.checked_sub(offset)?;
        let run = match st.reservations.get(&start) {
            Some(&run) => run,
            None => {
                let va0 = self.va - offset * PAGE_SIZE;
                let end = self
                    .map
                    .as_ref()
                    .and_then(|g| g.entries.get(&self.entry_start))
                    .map(|e| e.end)?;
                if va0 < self.entry_start || va0 + RUN_PAGES * PAGE_SIZE > end {
                    return None;
                }
                let run = self.machine.pages.claim_run().unwrap_or(NO_RUN);
                st.reservations.insert(start, run);
                run
            }
        };
        let first = self.machine.pages.run_first(run)?;
        let id = PageId(first.0 + offset as u32);
        self.machine.pages.alloc_at(id, AllocClass::Normal)
    }
}
