//! Owned guards for busy pages and paging-in-progress references, as a
//! fault, a write-back or the pageout scan holds them. Dropping one
//! releases it, so every exit path — error, retry or success — releases
//! exactly what it holds (the seed's `release_page` /
//! `unlock_and_deallocate`, seed L133-177).

use crate::object::Machine;
use crate::object::VmObject;
use crate::page::PageId;
use alloc::sync::Arc;

/// A paging-in-progress reference: keeps the object alive and its pages
/// from being collapsed or truncated away (`vm_object_pip_add` /
/// `vm_object_pip_wakeup`).
pub(crate) struct Pip(Arc<VmObject>);

impl Pip {
    pub(crate) fn new(object: Arc<VmObject>) -> Pip {
        object.pip_add();
        Pip(object)
    }

    pub(crate) fn object(&self) -> &Arc<VmObject> {
        &self.0
    }
}

impl Drop for Pip {
    fn drop(&mut self) {
        self.0.pip_wakeup();
    }
}

/// What happens to a busy page if the fault lets go of it without
/// finishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disposal {
    /// A page this fault allocated: take it out of its object and free it
    /// (`vm_page_free` in the seed's error paths).
    Free,
    /// A resident page this fault found: unbusy it and put it on the
    /// inactive queue (`release_page`, seed L133-141).
    Release,
    /// Already handed back: nothing left to do.
    Done,
}

/// A page this fault holds busy.
pub(crate) struct BusyPage<'m> {
    machine: &'m Machine,
    object: Arc<VmObject>,
    pub(crate) id: PageId,
    disposal: Disposal,
}

impl<'m> BusyPage<'m> {
    /// Takes over a page already busied by this thread.
    pub(crate) fn new(
        machine: &'m Machine,
        object: Arc<VmObject>,
        id: PageId,
        disposal: Disposal,
    ) -> Self {
        BusyPage {
            machine,
            object,
            id,
            disposal,
        }
    }

    pub(crate) fn page(&self) -> &'m crate::page::VmPage {
        self.machine.pages.get(self.id)
    }

    pub(crate) fn pfn(&self) -> crate::addr::Pfn {
        self.machine.pages.pfn(self.id)
    }

    pub(crate) fn object(&self) -> &Arc<VmObject> {
        &self.object
    }

    /// The page now belongs to `object` (after a rename).
    pub(crate) fn set_object(&mut self, object: Arc<VmObject>) {
        self.object = object;
    }

    /// The page stays where it is whatever happens: an error after this
    /// point only releases it.
    pub(crate) fn keep(&mut self) {
        self.disposal = Disposal::Release;
    }

    /// The page goes after all: an error after this point frees it.
    pub(crate) fn discard(&mut self) {
        self.disposal = Disposal::Free;
    }

    /// Lets go of the page without releasing it: it stays busy, for a
    /// guard made elsewhere (a background read) to take over.
    pub(crate) fn hand_over(mut self) -> PageId {
        self.disposal = Disposal::Done;
        self.id
    }

    /// Unbusies the page and wakes its waiters (`vm_page_wakeup`), leaving
    /// queue placement to the caller.
    pub(crate) fn unbusy(mut self) {
        self.machine.pages.wake(self.id);
        self.disposal = Disposal::Done;
    }
}

impl Drop for BusyPage<'_> {
    fn drop(&mut self) {
        let pages = &self.machine.pages;
        match self.disposal {
            Disposal::Done => {}
            Disposal::Release => {
                // Queue it while still busy: once unbusied, another thread
                // may free it, and a free page must not be put on a queue.
                pages.deactivate(self.id);
                self.machine.pages.wake(self.id);
            }
            Disposal::Free => {
                let page = pages.get(self.id);
                {
                    let mut st = self.object.lock();
                    let pindex = page.pindex();
                    if st.pages.get(&pindex) == Some(&self.id) {
                        st.pages.remove(&pindex);
                    }
                }
                self.machine.pages.wake(self.id);
                pages.free(self.id);
            }
        }
    }
}
