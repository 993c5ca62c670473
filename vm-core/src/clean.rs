//! Writing dirty pages back through their pager (`msync`, FreeBSD
//! `vm_object_page_clean`).

use crate::error::MapError;
use crate::object::VmObject;
use crate::object::busy::{BusyPage, Disposal};
use crate::page::{PageId, VmPage};
use crate::pager::{PageOut, Pager, PagerError};
use crate::pmap::Pmap;
use crate::prot::Prot;
use crate::vm::Vm;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;
use smallvec::SmallVec;

/// Pages written per pager call at most (as the pageout's clusters).
const RUN: usize = 32;

/// Why write-back failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CleanError {
    /// The range is not valid.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The pager could not write; the pages stay dirty.
    #[error("writing back page {pindex} of object {object}: {error}")]
    Pager {
        /// The object.
        object: crate::object::ObjectId,
        /// First page of the failed run.
        pindex: u64,
        /// The pager's error.
        error: PagerError,
    },
}

impl<P: Pmap> Vm<P> {
    /// Writes the dirty resident pages `start..end` of `object` to its
    /// pager, in runs of contiguous pages. Returns the pages written.
    ///
    /// # Errors
    ///
    /// [`CleanError::Pager`] on the first failed run; its pages stay dirty.
    pub fn clean_object(
        &self,
        object: &Arc<VmObject>,
        start: u64,
        end: u64,
    ) -> Result<u64, CleanError> {
        let Some(pager) = object.lock().pager.clone() else {
            return Ok(0);
        };
        // Paging in progress for the whole write-back, as FreeBSD's
        // `vm_pageout_flush` takes it: a termination or collapse waits.
        let _pip = crate::object::busy::Pip::new(object.clone());
        let mut written = 0;
        // Only resident pages can be dirty: walk those, not every index of
        // the range (a 64 GiB mapping with one page resident costs one).
        let resident = object.resident_between(start, end);
        let mut next = 0;
        while next < resident.len() {
            let run = self.busy_dirty_run(object, &resident, &mut next);
            if run.is_empty() {
                continue;
            }
            let first = run[0].page().pindex();
            self.write_run(&*pager, &run)
                .map_err(|error| CleanError::Pager {
                    object: object.id(),
                    pindex: first,
                    error,
                })?;
            for b in run {
                self.machine.pages.deactivate(b.id);
                b.unbusy();
                written += 1;
            }
        }
        self.machine
            .counters
            .local()
            .v_pages_cleaned
            .fetch_add(written, Ordering::Relaxed);
        Ok(written)
    }

    /// Busies and write-protects the next run of contiguous dirty pages
    /// among the resident indexes `resident[*next..]`; advances `*next`
    /// past what it looked at.
    fn busy_dirty_run(
        &self,
        object: &Arc<VmObject>,
        resident: &[u64],
        next: &mut usize,
    ) -> SmallVec<[BusyPage<'_>; RUN]> {
        let pages = &self.machine.pages;
        let mut run: SmallVec<[BusyPage<'_>; RUN]> = SmallVec::new();
        while let Some(&p) = resident.get(*next) {
            let contiguous = run.last().is_none_or(|b| b.page().pindex() + 1 == p);
            if run.len() == RUN || !contiguous {
                break;
            }
            // Busied under the object's lock, which page removal holds:
            // the page cannot be freed (and reused) in between.
            let looked: Option<(PageId, bool)> = {
                let st = object.lock();
                st.pages.get(&p).map(|&id| (id, pages.get(id).try_busy()))
            };
            let Some((id, busied)) = looked else {
                // Gone since the list was made.
                *next += 1;
                if run.is_empty() {
                    continue;
                }
                break;
            };
            let page = pages.get(id);
            if !busied {
                if !run.is_empty() {
                    break;
                }
                self.machine.pages.wait_for_page(id, object.id().0, p);
                continue;
            }
            let busy = BusyPage::new(&self.machine, object.clone(), id, Disposal::Release);
            *next += 1;
            if page.flags().contains(crate::page::PageFlags::FICTITIOUS) {
                // Device memory is never written back.
                busy.unbusy();
                if run.is_empty() {
                    continue;
                }
                break;
            }
            // Write-protect first: a write after this point faults and
            // dirties the page again.
            if self
                .pmap
                .page_protect(pages.pfn(id), Prot::READ | Prot::EXECUTE)
                .modified
            {
                page.dirty_all();
            }
            if page.dirty() == 0 {
                busy.unbusy();
                if run.is_empty() {
                    continue;
                }
                break;
            }
            run.push(busy);
        }
        run
    }

    /// Writes a run of busy, write-protected pages through `pager`.
    ///
    /// The pages are marked clean *before* the pager reads them (Linux's
    /// `clear_page_dirty_for_io`): a write that raced the write-protection
    /// (through a hold, or a byte access that had translated just before)
    /// either landed before the pager read the frame, or marks the page
    /// dirty again after the clean, so it is never lost. A failed write
    /// marks them dirty again.
    fn write_run(&self, pager: &dyn Pager, run: &[BusyPage<'_>]) -> Result<(), PagerError> {
        write_clean(
            &self.machine,
            pager,
            run.iter().map(|b| (b, b.page().pindex())),
        )
    }
}

/// Marks the busy pages clean, hands them to `pager`, and marks them dirty
/// again if it fails or panics (see [`Vm::clean_object`]'s write-back
/// order).
pub(crate) fn write_clean<'a, 'm: 'a>(
    machine: &crate::object::Machine,
    pager: &dyn Pager,
    run: impl Iterator<Item = (&'a BusyPage<'m>, u64)>,
) -> Result<(), PagerError> {
    /// Marks the pages dirty again unless disarmed: on an error and on a
    /// pager's panic alike.
    struct Redirty<'p>(SmallVec<[&'p VmPage; RUN]>);
    impl Drop for Redirty<'_> {
        fn drop(&mut self) {
            self.0.iter().for_each(|p| p.dirty_all());
        }
    }
    let mut redirty = Redirty(SmallVec::new());
    let outs: SmallVec<[PageOut<'_>; RUN]> = run
        .map(|(b, pindex)| {
            let page = b.page();
            let dirty = page.dirty();
            page.clear_dirty();
            redirty.0.push(page);
            // The page is busy and every mapping of it read-only or gone; a
            // racing write through a hold is ordered by the clean above
            // (see `write_run`) and, the window being no reference, reads
            // a torn page at worst, which the re-dirty rewrites.
            PageOut::new(pindex, machine.phys.reader_of(b.pfn()), dirty)
        })
        .collect();
    pager.put_pages(&outs)?;
    redirty.0.clear();
    Ok(())
}
