//! Prefault: after a fault, map resident neighbours read-only so the next
//! accesses need no fault (seed `vm_fault_prefault`, L934-1006).

use super::FaultState;
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::map::MapEntry;
use crate::object::VmObject;
use crate::page::{PageFlags, VM_PAGE_BITS_ALL};
use crate::pmap::{MemAttr, PageInfo, Pmap};
use alloc::sync::Arc;
use core::sync::atomic::Ordering;

impl<P: Pmap> FaultState<'_, P> {
    /// Maps up to `prefault_pages` resident pages on each side of the
    /// fault, in the seed's outward order (-1, +1, -2, +2, …), inside the
    /// entry, where the pmap can map without replacing or allocating. Stops
    /// at the first page that is not resident (seed L990-993).
    pub(super) fn prefault(&self, entry: &MapEntry) {
        let Some(object) = entry.object.as_ref() else {
            return;
        };
        let window = u64::from(self.space.vm.config.prefault_pages);
        for i in 0..2 * window {
            let dist = (i / 2 + 1) * PAGE_SIZE;
            let addr = if i % 2 == 0 {
                self.va.checked_sub(dist)
            } else {
                self.va.checked_add(dist)
            };
            let Some(addr) = addr.filter(|a| (entry.start..entry.end).contains(a)) else {
                continue;
            };
            if !self
                .space
                .vm
                .pmap
                .is_prefaultable(&self.space.pmap, VirtAddr(addr))
            {
                continue;
            }
            if !self.prefault_one(object, entry, addr) {
                break;
            }
        }
    }

    /// Maps the page `addr` shows, if resident and usable; false if no
    /// page is resident (the seed then gives up on the rest).
    fn prefault_one(&self, object: &Arc<VmObject>, entry: &MapEntry, addr: u64) -> bool {
        let pages = &self.machine.pages;
        let mut obj = object.clone();
        let mut pindex = entry.pindex(addr);
        loop {
            // The object lock is held across enter_quick, so the page
            // cannot be freed or moved while it is being mapped.
            let st = obj.lock();
            if let Some(&id) = st.pages.get(&pindex) {
                let page = pages.get(id);
                let usable = page.valid() == VM_PAGE_BITS_ALL
                    && !page.is_busy()
                    && !page.flags().contains(PageFlags::FICTITIOUS);
                if usable {
                    let info = PageInfo {
                        pfn: pages.pfn(id),
                        managed: !page.flags().contains(PageFlags::UNMANAGED),
                        attr: MemAttr::WriteBack,
                    };
                    if self.space.vm.pmap.enter_quick(
                        &self.space.pmap,
                        VirtAddr(addr),
                        info,
                        entry.protection,
                    ) {
                        self.machine
                            .counters
                            .local()
                            .v_prefaults
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                return true;
            }
            // Only anonymous chains are followed (seed L977-986).
            // An anonymous object without a pager has nothing more to say
            // about the page than its backing object.
            let next = match &st.backing {
                Some(b) if st.kind.is_anonymous() && st.pager.is_none() => {
                    (b.object.clone(), pindex + b.offset)
                }
                _ => return false,
            };
            drop(st);
            (obj, pindex) = next;
        }
    }
}
