//! Holding pages for I/O: fault a range in and pin its frames (what
//! FreeBSD later called `vm_fault_quick_hold_pages`, Linux's GUP).
//!
//! A held page is never freed (its last release frees it if it was freed
//! meanwhile), never moved to another object by the copy-on-write
//! optimisation, and never unmapped behind a sequential scan. Holding a page
//! that the space shares copy-on-write with another space first gives the
//! space its own copy, even for a read hold, so that what the holder sees
//! and what the space later writes cannot diverge (the class of bugs
//! behind CVE-2020-29374); a fork of a range with held pages gives the
//! child copies at once for the same reason.

use crate::addr::{PAGE_SIZE, Pfn, page_trunc};
use crate::error::FaultError;
use crate::fault::FaultFlags;
use crate::map::EntryFlags;
use crate::page::PageId;
use crate::pmap::{Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::vec::Vec;

/// Frames of a space held by [`VmSpace::hold`]; released on drop.
pub struct HeldPages<'a, P: Pmap> {
    space: &'a VmSpace<P>,
    start: u64,
    pages: Vec<PageId>,
}

impl<P: Pmap> core::fmt::Debug for HeldPages<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeldPages")
            .field("start", &self.start)
            .field("pages", &self.pages)
            .finish()
    }
}

impl<P: Pmap> HeldPages<'_, P> {
    /// Address of the first held page.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The held frames, one per page from [`start`](Self::start).
    #[must_use]
    pub fn frames(&self) -> Vec<Pfn> {
        let pages = &self.space.vm.machine.pages;
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

    /// Reads held memory at byte `offset` from [`start`](Self::start), as a
    /// device doing DMA would: the frames, whatever the mappings do now.
    ///
    /// # Panics
    ///
    /// If the range leaves the held pages.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.each(offset, buf.len(), |pfn, off, at, n| {
            self.space.vm.phys().read(pfn, off, &mut buf[at..at + n])
        });
    }

    /// Writes held memory at byte `offset` from [`start`](Self::start).
    ///
    /// # Panics
    ///
    /// If the range leaves the held pages.
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.each(offset, data.len(), |pfn, off, at, n| {
            self.space.vm.phys().write(pfn, off, &data[at..at + n])
        });
    }

    fn each(&self, offset: usize, len: usize, mut f: impl FnMut(Pfn, usize, usize, usize)) {
        let page = PAGE_SIZE as usize;
        assert!(
            offset + len <= self.pages.len() * page,
            "range outside the held pages"
        );
        let pages = &self.space.vm.machine.pages;
        let mut done = 0;
        while done < len {
            let (i, off) = ((offset + done) / page, (offset + done) % page);
            let n = (page - off).min(len - done);
            f(pages.pfn(self.pages[i]), off, done, n);
            done += n;
        }
    }
}

impl<P: Pmap> Drop for HeldPages<'_, P> {
    fn drop(&mut self) {
        let pages = &self.space.vm.machine.pages;
        for &id in &self.pages {
            pages.unhold(id);
        }
    }
}

impl<P: Pmap> VmSpace<P> {
    /// Faults in and holds every page of `va..va+len` for `access`.
    ///
    /// # Errors
    ///
    /// The [`FaultError`] of the first page that cannot be faulted for
    /// `access`; nothing stays held then.
    pub fn hold(&self, va: u64, len: u64, access: Prot) -> Result<HeldPages<'_, P>, FaultError> {
        let start = page_trunc(va);
        let end = va
            .checked_add(len)
            .and_then(crate::addr::page_round_up)
            .ok_or(FaultError::InvalidAddress { addr: va })?;
        let mut held = HeldPages {
            space: self,
            start,
            pages: Vec::new(),
        };
        let mut at = start;
        while at < end {
            held.pages.push(self.hold_one(at, access)?);
            at += PAGE_SIZE;
        }
        Ok(held)
    }

    /// Faults `va` in (writing if the mapping is a writable private one,
    /// to own the page) and holds the frame the pmap then maps.
    fn hold_one(&self, va: u64, access: Prot) -> Result<PageId, FaultError> {
        let pages = &self.vm.machine.pages;
        for _ in 0..64 {
            let unshare = {
                let g = self.map.read();
                g.find(va).is_some_and(|e| {
                    e.eflags.contains(EntryFlags::COW) && e.protection.contains(Prot::WRITE)
                })
            };
            let want = if unshare {
                access | Prot::WRITE
            } else {
                access
            };
            let flags = if want.contains(Prot::WRITE) {
                FaultFlags::DIRTY
            } else {
                FaultFlags::NORMAL
            };
            self.fault(va, want, flags)?;
            let _map = self.map.read();
            let Some(pfn) = self.vm.pmap.translate(&self.pmap, va, want) else {
                continue;
            };
            let Some(id) = pages.id_of(pfn) else {
                return Err(FaultError::Pmap {
                    addr: va,
                    error: PmapError::BadFrame(pfn),
                });
            };
            pages.hold(id);
            if self.vm.pmap.extract(&self.pmap, va) == Some(pfn) {
                return Ok(id);
            }
            pages.unhold(id);
        }
        Err(FaultError::Pmap {
            addr: va,
            error: PmapError::NotKept(va),
        })
    }
}
