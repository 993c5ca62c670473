//! Holding pages for I/O: fault a range in and pin its frames (what
//! FreeBSD later called `vm_fault_quick_hold_pages`, Linux's GUP/pin).
//!
//! A hold knows what it was taken for. A hold for read cannot write. A
//! hold for write marks its pages dirty when it is taken, after every write
//! through it, and when it is released — a device may have written the
//! frames directly (Linux's `unpin_user_pages_dirty_lock`) — so neither
//! `msync` nor the pageout daemon can drop what was written through it.
//!
//! A held page is never freed (its last release frees it if it was freed
//! meanwhile), never taken by the pageout daemon, never moved to another
//! object by the copy-on-write optimisation or collapse, and never unmapped
//! behind a sequential scan. Holding a page that the space shares
//! copy-on-write with another space first gives the space its own copy,
//! even for a read hold, so that what the holder sees and what the space
//! later writes cannot diverge (the class of bugs behind CVE-2020-29374);
//! a fork of a range with held pages gives the child copies of them at once
//! for the same reason (see [`fork`](crate::space::fork)).

use crate::addr::{PAGE_SIZE, Pfn, VirtAddr, page_trunc};
use crate::error::FaultError;
use crate::fault::{FaultCtx, FaultFlags};
use crate::page::PageId;
use crate::pmap::{Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::vec::Vec;

/// Why an access through [`HeldPages`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HoldError {
    /// The pages were held for reading only.
    #[error("the pages are held for {held:?}, not for writing")]
    NotWritable {
        /// What the hold was taken for.
        held: Prot,
    },
    /// The byte range leaves the held pages.
    #[error("bytes {offset}..{offset}+{len} leave the {held} held bytes")]
    OutOfRange {
        /// First byte asked for.
        offset: usize,
        /// Bytes asked for.
        len: usize,
        /// Bytes held.
        held: usize,
    },
}

/// Frames of a space held by [`VmSpace::hold`]; released on drop.
///
/// A hold is independent of the space once taken (it keeps the machine, not
/// the space): it may outlive the mapping and the space, as an I/O in flight
/// outlives the process that started it; the frames stay out of reuse until
/// it is dropped.
pub struct HeldPages<P: Pmap> {
    vm: alloc::sync::Arc<crate::vm::Vm<P>>,
    start: u64,
    access: Prot,
    pages: Vec<PageId>,
}

impl<P: Pmap> core::fmt::Debug for HeldPages<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeldPages")
            .field("start", &self.start)
            .field("access", &self.access)
            .field("pages", &self.pages)
            .finish()
    }
}

impl<P: Pmap> HeldPages<P> {
    /// Address of the first held page.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The held frames, one per page from [`start`](Self::start).
    #[must_use]
    pub fn frames(&self) -> Vec<Pfn> {
        let pages = &self.vm.machine.pages;
        self.pages.iter().map(|&id| pages.pfn(id)).collect()
    }

    /// Number of held pages.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether nothing is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// What the pages are held for.
    #[must_use]
    pub fn access(&self) -> Prot {
        self.access
    }

    /// Reads held memory at byte `offset` from [`start`](Self::start), as a
    /// device doing DMA would: the frames, whatever the mappings do now.
    ///
    /// # Errors
    ///
    /// [`HoldError::OutOfRange`] if the range leaves the held pages.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), HoldError> {
        self.each(offset, buf.len(), |_, pfn, off, at, n| {
            self.vm.phys().read(pfn, off, &mut buf[at..at + n]);
        })
    }

    /// Writes held memory at byte `offset` from [`start`](Self::start), and
    /// marks the pages written dirty.
    ///
    /// # Errors
    ///
    /// [`HoldError::NotWritable`] if the pages were held for reading,
    /// [`HoldError::OutOfRange`] if the range leaves the held pages;
    /// nothing is written then.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), HoldError> {
        if !self.access.contains(Prot::WRITE) {
            return Err(HoldError::NotWritable { held: self.access });
        }
        let pages = &self.vm.machine.pages;
        self.each(offset, data.len(), |id, pfn, off, at, n| {
            self.vm.phys().write(pfn, off, &data[at..at + n]);
            pages.get(id).dirty_all();
        })
    }

    fn each(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(PageId, Pfn, usize, usize, usize),
    ) -> Result<(), HoldError> {
        let page = PAGE_SIZE as usize;
        let held = self.pages.len() * page;
        if offset.checked_add(len).is_none_or(|end| end > held) {
            return Err(HoldError::OutOfRange { offset, len, held });
        }
        let pages = &self.vm.machine.pages;
        let mut done = 0;
        while done < len {
            let (i, off) = ((offset + done) / page, (offset + done) % page);
            let n = (page - off).min(len - done);
            let id = self.pages[i];
            f(id, pages.pfn(id), off, done, n);
            done += n;
        }
        Ok(())
    }
}

impl<P: Pmap> Drop for HeldPages<P> {
    fn drop(&mut self) {
        let pages = &self.vm.machine.pages;
        let written = self.access.contains(Prot::WRITE);
        for &id in &self.pages {
            if written {
                // The frames may have been written directly (DMA).
                pages.get(id).dirty_all();
            }
            pages.unhold(id);
        }
    }
}

impl<P: Pmap> VmSpace<P> {
    /// Faults in and holds every page of `va..va+len` for `access`
    /// (`vm_fault_quick_hold_pages`): the frames stay allocated to their
    /// pages, and a write hold's pages count as written, until the
    /// [`HeldPages`] is dropped, whatever happens to the mapping meanwhile
    /// (a device doing DMA, `O_DIRECT` I/O).
    ///
    /// ```
    /// use vm_core::Prot;
    /// let (vm, space) = vm_testkit::machine(16);
    /// space.map_anon(0x10_0000, 0x2000, Prot::RW)?;
    /// let held = space.hold(0x10_0000, 0x2000, Prot::WRITE)?;
    /// assert_eq!(held.len(), 2);
    /// // A device writes the first frame directly.
    /// vm.phys().write(held.frames()[0], 0, b"dma");
    /// drop(held);
    /// let mut b = [0; 3];
    /// space.read(0x10_0000, &mut b)?;
    /// assert_eq!(&b, b"dma");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The [`FaultError`] of the first page that cannot be faulted for
    /// `access`; nothing stays held then.
    pub fn hold(
        &self,
        va: impl Into<VirtAddr>,
        len: u64,
        access: Prot,
    ) -> Result<HeldPages<P>, FaultError> {
        let va = va.into().as_u64();
        let start = page_trunc(va);
        let end = va
            .checked_add(len)
            .and_then(crate::addr::page_round_up)
            .ok_or(FaultError::InvalidAddress { addr: va })?;
        let access = if access.is_empty() {
            Prot::READ
        } else {
            access
        };
        let mut held = HeldPages {
            vm: self.vm.clone(),
            start,
            access,
            pages: Vec::new(),
        };
        let mut at = start;
        while at < end {
            held.pages.push(self.hold_one(at, access)?);
            at += PAGE_SIZE;
        }
        Ok(held)
    }

    /// Faults `va` in — with a private copy of its page if the mapping is
    /// private, so the space owns what is held — and holds the frame the
    /// mapping then gives `access` to.
    fn hold_one(&self, va: u64, access: Prot) -> Result<PageId, FaultError> {
        let pages = &self.vm.machine.pages;
        for _ in 0..64 {
            // A private mapping that may ever be written gets its own copy
            // of the page first, whatever the hold is for: a pin never
            // shares a page copy-on-write (Linux unshares pinned pages
            // since 5.19), so later writes by the space land in the pinned
            // page and fork can give the child a copy.
            let must_own = |e: &crate::map::MapEntry| {
                e.eflags.contains(crate::map::EntryFlags::COW)
                    && e.max_protection.contains(Prot::WRITE)
            };
            let unshare = self.map.read().find(va).is_some_and(must_own);
            let ctx = if access.contains(Prot::WRITE) {
                FaultCtx::public(FaultFlags::DIRTY)
            } else if unshare {
                FaultCtx::copy()
            } else {
                FaultCtx::public(FaultFlags::NORMAL)
            };
            self.fault_with(va, access, ctx)?;
            let map = self.map.read();
            // Checked again under the map lock, with the page held: a fork
            // that ran while the fault was in I/O may have made the page
            // shared again; then copy again.
            let own = map
                .find(va)
                .filter(|e| must_own(e))
                .map(crate::map::MapEntry::own_object);
            if let Some(id) = self.hold_mapped(va, access)? {
                if own.is_some_and(|own| own != Some(pages.get(id).object_raw())) {
                    pages.unhold(id);
                    continue;
                }
                if access.contains(Prot::WRITE) {
                    pages.get(id).dirty_all();
                }
                return Ok(id);
            }
        }
        Err(FaultError::Pmap {
            addr: va,
            error: PmapError::NotKept(VirtAddr(va)),
        })
    }

    /// Holds the page mapped at `va` if the mapping gives `access` to it,
    /// checked again once held: a frame that was freed and reused between
    /// the two looks is held in its new use and refused unless that use is
    /// the mapping at `va` with `access`. The caller holds the map
    /// read-locked, so the space's own map does not change meanwhile.
    /// `None` if the mapping does not give the access (fault and try
    /// again).
    pub(crate) fn hold_mapped(&self, va: u64, access: Prot) -> Result<Option<PageId>, FaultError> {
        let pages = &self.vm.machine.pages;
        let Some(pfn) = self.vm.pmap.translate(&self.pmap, VirtAddr(va), access) else {
            return Ok(None);
        };
        let Some(id) = pages.id_of(pfn) else {
            return Err(FaultError::Pmap {
                addr: va,
                error: PmapError::BadFrame(pfn),
            });
        };
        pages.hold(id);
        if self.vm.pmap.translate(&self.pmap, VirtAddr(va), access) == Some(pfn) {
            return Ok(Some(id));
        }
        pages.unhold(id);
        Ok(None)
    }
}
