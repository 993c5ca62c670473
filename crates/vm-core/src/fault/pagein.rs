//! Asking the pager: seed L465-634.

use super::FaultState;
use crate::object::VmObject;
use crate::page::PageFlags;
use crate::pager::{PageSlot, PagerError};
use crate::pmap::Pmap;
use core::sync::atomic::Ordering;

impl<P: Pmap> FaultState<'_, P> {
    /// Reads the busy page `self.m` of `object` through its pager, with the
    /// map lock dropped and the object kept alive by paging-in-progress.
    /// On success the page is left busy and kept in the object.
    pub(super) fn page_in(&mut self, object: &VmObject) -> Result<(), PagerError> {
        let Some(pager) = object.lock().pager.clone() else {
            return Err(PagerError::Fail);
        };
        if pager.has_page(self.pindex).is_none() {
            return Err(PagerError::Fail);
        }
        // lastr, updated as the seed does with a cluster of one page
        // (L558); the entry may only be read-locked, hence the atomic.
        if let Some(e) = self
            .map
            .as_ref()
            .and_then(|g| g.entries.get(&self.entry_start))
        {
            e.lastr.store(self.pindex + 1, Ordering::Relaxed);
        }
        // Unlock the map for the I/O (L565).
        self.map = None;
        let m = self.m.as_mut().expect("page to read");
        let page = m.page();
        page.clear_flags(PageFlags::ZERO);
        // SAFETY: the page is busy (owned by this fault), and a page that
        // is not wholly valid is never mapped, so nothing else reads or
        // writes the frame until it is unbusied.
        let data = unsafe { self.machine.phys.frame_mut(m.pfn()) };
        let mut slots = [PageSlot::new(self.pindex, data)];
        let counters = &self.machine.counters;
        counters.v_pager_calls.fetch_add(1, Ordering::Relaxed);
        pager.get_pages(&mut slots, 0)?;
        let valid = slots[0].valid();
        counters.v_pager_pages.fetch_add(1, Ordering::Relaxed);
        counters.v_io_faults.fetch_add(1, Ordering::Relaxed);
        page.set_valid(valid);
        m.keep();
        Ok(())
    }
}
