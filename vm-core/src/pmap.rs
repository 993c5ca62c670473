//! The machine-dependent layer: the [`Pmap`] trait (FreeBSD `pmap(9)`).
//!
//! One `Pmap` value serves a whole machine: it owns whatever is shared
//! between address spaces (the pv lists that find every mapping of a
//! physical page), and it makes one [`Pmap::Space`] per address space (a
//! set of page tables). The trait is generic, not object-safe, on purpose:
//! the fault path calls it for every page and must not pay a virtual call.
//!
//! Invalidation of translation caches is the implementation's business and
//! must never be skipped: after a call that removes or downgrades a mapping
//! returns, no CPU that the implementation serves may still use the old
//! entry.

use crate::addr::{PAGE_SIZE, Pfn, VirtAddr};
use crate::frames::Frames;
pub use crate::mem_attr::MemAttr;
use crate::page::PageFlags;
use crate::page_queues::{AllocClass, Pages};
use crate::phys::PhysMem;
use crate::prot::Prot;
use alloc::sync::Arc;
use core::ops::Range;

/// What the pmap needs to know about a page it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageInfo {
    /// The frame.
    pub pfn: Pfn,
    /// Whether mappings of the page are tracked (pv entries). Device
    /// (fictitious) pages are unmanaged.
    pub managed: bool,
    /// The memory type to map it with.
    pub attr: MemAttr,
}

/// Where [`Pmap::remove`] and [`Pmap::protect`] report each mapping that
/// went away or lost write permission.
pub type DisplacedSink<'a> = dyn FnMut(Displaced) + 'a;

/// What [`Pmap::enter`] maps: a page, its protection, the access being
/// satisfied, and whether the mapping is wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The page to map.
    pub page: PageInfo,
    /// The protection to map it with.
    pub prot: Prot,
    /// The access the mapping is made for: a write pre-sets the modified
    /// bit, any access the referenced bit (FreeBSD passes the fault type).
    pub access: Prot,
    /// Whether the mapping is wired (`PG_W`).
    pub wired: bool,
}

impl Mapping {
    /// `page` with `prot`, for a read, not wired.
    #[must_use]
    pub const fn new(page: PageInfo, prot: Prot) -> Mapping {
        Mapping {
            page,
            prot,
            access: Prot::READ,
            wired: false,
        }
    }

    /// The same, made for an access of kind `access`.
    #[must_use]
    pub const fn access(self, access: Prot) -> Mapping {
        Mapping { access, ..self }
    }

    /// The same, wired or not.
    #[must_use]
    pub const fn wired(self, wired: bool) -> Mapping {
        Mapping { wired, ..self }
    }
}

/// A mapping that went away or lost write permission, with the hardware's
/// referenced (A) and modified (D) bits it had, for the core to carry into
/// the page (FreeBSD does this inside `pmap_remove` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Displaced {
    /// The frame that was mapped.
    pub pfn: Pfn,
    /// The mapping had been used.
    pub referenced: bool,
    /// The mapping had been written through.
    pub modified: bool,
}

/// Referenced/modified summary over every mapping of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RefMod {
    /// Some mapping had been used.
    pub referenced: bool,
    /// Some mapping had been written through.
    pub modified: bool,
}

/// Errors of a pmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PmapError {
    /// No frame for a page-table page.
    #[error("no memory for page tables")]
    NoMemory,
    /// The virtual address cannot be mapped by this pmap (non-canonical, or
    /// beyond the paging mode's reach).
    #[error("address {0:#x} cannot be mapped")]
    BadAddress(VirtAddr),
    /// The frame is not one this pmap can map.
    #[error("frame {0} cannot be mapped")]
    BadFrame(Pfn),
    /// A mapping the fault handler entered at this address was not there
    /// when the access retried, again and again.
    #[error("mapping at {0:#x} did not stay after repeated faults")]
    NotKept(VirtAddr),
    /// The address space was destroyed
    /// ([`Pmap::destroy_space`]); its tables are gone.
    #[error("the address space was destroyed")]
    SpaceDestroyed,
}

/// Frames of the machine's physical memory, handed to a pmap by
/// [`Pmap::attach`] so it can keep page tables in them.
#[derive(Clone)]
pub struct PhysFrames {
    pub(crate) mem: Arc<Frames>,
}

impl core::fmt::Debug for PhysFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PhysFrames")
            .field("phys", &self.mem.phys)
            .finish()
    }
}

impl PhysFrames {
    /// The physical memory itself.
    #[must_use]
    pub fn phys(&self) -> &PhysMem {
        &self.mem.phys
    }

    fn pages(&self) -> &Pages {
        &self.mem.pages
    }

    /// Allocates a zeroed frame for a page table; it may dig into the
    /// free-page reserve (`VM_ALLOC_SYSTEM`). The frame is wired and owned
    /// by no object until [`free`](Self::free).
    #[must_use]
    pub fn alloc_zeroed(&self) -> Option<Pfn> {
        let id = self.pages().alloc(0, AllocClass::System, true)?;
        let page = self.pages().get(id);
        if !page.flags().contains(PageFlags::ZERO) {
            self.phys().zero(self.pages().pfn(id));
        }
        page.clear_flags(PageFlags::ZERO);
        page.spare_word()
            .store(0, core::sync::atomic::Ordering::Relaxed);
        self.pages().wire(id);
        page.set_flags(PageFlags::TABLE);
        Some(self.pages().pfn(id))
    }

    /// The page of `pfn` if it is a table frame from
    /// [`alloc_zeroed`](Self::alloc_zeroed) not yet freed.
    fn table(&self, pfn: Pfn) -> Option<(crate::page::PageId, &crate::page::VmPage)> {
        let id = self.pages().id_of(pfn)?;
        let page = self.pages().get(id);
        page.flags()
            .contains(PageFlags::TABLE)
            .then_some((id, page))
    }

    /// A word of metadata for frame `pfn`, which the pmap allocated with
    /// [`alloc_zeroed`](Self::alloc_zeroed): zero when allocated, the
    /// pmap's to use until [`free`](Self::free) (FreeBSD keeps a
    /// page-table page's count of valid entries in its `vm_page` the same
    /// way). `None` for a frame that is not such a table: outside memory,
    /// free, or a page of an object, whose word the core uses.
    #[must_use]
    pub fn table_word(&self, pfn: Pfn) -> Option<&core::sync::atomic::AtomicU64> {
        self.table(pfn).map(|(_, page)| page.spare_word())
    }

    /// Returns a frame from [`alloc_zeroed`](Self::alloc_zeroed).
    ///
    /// # Safety
    ///
    /// The pmap is done with the frame: no table entry refers to it any
    /// more, no walker (a thread of the pmap's, or a CPU through a TLB
    /// entry or paging-structure cache not yet flushed) can still reach it,
    /// and the pmap neither reads nor writes it after this call. The frame
    /// goes back to the free pool at once and may next hold a user's data;
    /// a table write to it then would corrupt that data behind every check.
    ///
    /// # Errors
    ///
    /// [`PmapError::BadFrame`] if `pfn` is not a table frame the pmap holds
    /// (outside memory, a page of an object, or freed already): a bug of
    /// the pmap, refused without touching the page.
    pub unsafe fn free(&self, pfn: Pfn) -> Result<(), PmapError> {
        self.release(pfn, false)
    }

    /// [`free`](Self::free) for a frame whose bytes are all zero (a table
    /// whose entries were all cleared): it joins the pool of known-zero
    /// frames, so the next table allocation or zero-fill fault that takes
    /// it skips zeroing it (page-table pages from the pre-zeroed pool).
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free), and every byte of the frame is zero: a
    /// later user of the frame trusts that without looking.
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free).
    pub unsafe fn free_zeroed(&self, pfn: Pfn) -> Result<(), PmapError> {
        self.release(pfn, true)
    }

    fn release(&self, pfn: Pfn, zeroed: bool) -> Result<(), PmapError> {
        let (id, page) = self.table(pfn).ok_or(PmapError::BadFrame(pfn))?;
        // Only one caller can clear the flag: a racing double free loses.
        if !page.take_flag(PageFlags::TABLE) {
            return Err(PmapError::BadFrame(pfn));
        }
        if zeroed {
            debug_assert!(self.phys().is_zero(pfn), "a frame freed as zero is not");
            page.set_flags(PageFlags::ZERO);
        }
        self.pages().unwire(id, false);
        self.pages().free(id);
        Ok(())
    }
}

/// The machine-dependent page tables (FreeBSD `pmap(9)`), generic over the
/// machine. See the [module docs](self).
///
/// Addresses are page aligned; ranges are half-open `start..end`.
#[cfg_attr(feature = "mock", mockall::automock(type Space = ();))]
pub trait Pmap: Send + Sync + 'static {
    /// One address space's page tables.
    type Space: Send + Sync;

    /// Called once by [`Vm::new`](crate::Vm::new) before any other method,
    /// with the machine's frames. Pmaps that keep tables in physical memory
    /// store `frames`; others ignore it.
    fn attach(&mut self, frames: PhysFrames) {
        let _ = frames;
    }

    /// Makes the tables of a new, empty address space (`pmap_pinit`).
    ///
    /// # Errors
    ///
    /// [`PmapError::NoMemory`] if no frame is left for the root table.
    fn create_space(&self) -> Result<Self::Space, PmapError>;

    /// Releases an address space's tables (`pmap_release`). Every mapping
    /// has been removed before.
    fn destroy_space(&self, space: &Self::Space);

    /// Maps `m.page` at `va` with `m.prot` (`pmap_enter`). `m.access` is
    /// the access being satisfied (a write pre-sets the modified bit),
    /// `m.wired` marks the mapping wired. An existing mapping of the same
    /// frame is updated; one of another frame is replaced and returned.
    ///
    /// # Errors
    ///
    /// [`PmapError::NoMemory`] when a page-table page cannot be allocated;
    /// nothing changed then. [`PmapError::BadAddress`] for an address the
    /// pmap cannot map.
    ///
    /// # Examples
    ///
    /// ```
    /// use vm_core::pmap::{Mapping, PageInfo, Pmap};
    /// use vm_core::{MemAttr, Pfn, Prot, VirtAddr};
    /// # let vm = vm_core::Vm::new(vm_testkit::RefPmap::default(), vm_testkit::test_config(16)).unwrap();
    /// # let pmap = vm.pmap();
    /// let space = pmap.create_space()?;
    /// let page = PageInfo { pfn: Pfn(7), managed: true, attr: MemAttr::WriteBack };
    /// let va = VirtAddr(0x40_0000);
    /// pmap.enter(&space, va, Mapping::new(page, Prot::RW).access(Prot::WRITE))?;
    /// assert_eq!(pmap.translate(&space, va, Prot::WRITE), Some(Pfn(7)));
    /// # Ok::<(), vm_core::PmapError>(())
    /// ```
    fn enter(
        &self,
        space: &Self::Space,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<Option<Displaced>, PmapError>;

    /// Maps a whole superpage with one entry (FreeBSD `pmap_enter` with
    /// `psind` 1, `pmap_enter_pde`): the [`SUPERPAGE_PAGES`](crate::SUPERPAGE_PAGES) frames from
    /// `m.page.pfn`, which the caller has in physical order from a
    /// superpage-aligned frame with one attribute, at the superpage-aligned
    /// `va`, each as `m` says (protection, access, wiring). Only where
    /// nothing is mapped in those addresses yet.
    ///
    /// Returns whether it did. `false` changes nothing: the pmap makes no
    /// superpages (the default), or not here or now (something mapped
    /// there, an unaligned address or frame, a lock it would wait for, no
    /// memory for a table); the caller then enters the pages one by one,
    /// and a pmap that promotes may still make the superpage.
    ///
    /// # Errors
    ///
    /// [`PmapError::BadAddress`] for an address the space cannot map,
    /// [`PmapError::SpaceDestroyed`] after [`destroy_space`](Self::destroy_space).
    fn enter_superpage(
        &self,
        space: &Self::Space,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<bool, PmapError> {
        let _ = (space, va, m);
        Ok(false)
    }

    /// Maps `page` at `va` read-only or with `prot` less write, only if
    /// nothing is mapped there, never sleeping (`pmap_enter_quick`).
    /// Returns whether a mapping was made.
    fn enter_quick(&self, space: &Self::Space, va: VirtAddr, page: PageInfo, prot: Prot) -> bool;

    /// Maps a run of pages as [`enter_quick`](Self::enter_quick) maps one:
    /// `pages[i]`, if `Some`, at `start + i` pages, read-only or with
    /// `prot` less write, only where nothing is mapped, never sleeping
    /// (FreeBSD `pmap_enter_object`, for fault-around). Stops early,
    /// without error, where the pmap cannot map (no memory for a table, an
    /// address it cannot map). Returns how many mappings were made.
    ///
    /// The default calls `enter_quick` for each page; a pmap that can
    /// enter a run with one table walk and one lock hold overrides it.
    fn enter_quick_run(
        &self,
        space: &Self::Space,
        start: VirtAddr,
        pages: &[Option<PageInfo>],
        prot: Prot,
    ) -> usize {
        let mut mapped = 0;
        for (i, page) in (0u64..).zip(pages) {
            let Some(va) = i.checked_mul(PAGE_SIZE).and_then(|o| start.checked_add(o)) else {
                break;
            };
            if let Some(page) = page {
                mapped += usize::from(self.enter_quick(space, va, *page, prot));
            }
        }
        mapped
    }

    /// Removes every mapping in `range` (`pmap_remove`), reporting each
    /// removed mapping of a managed page to `sink`.
    fn remove<'s>(&self, space: &Self::Space, range: Range<VirtAddr>, sink: &mut DisplacedSink<'s>);

    /// Lowers the protection of every mapping in `range` to `prot`
    /// (`pmap_protect`); [`Prot::NONE`] removes them. Mappings that lose
    /// write permission report their bits to `sink`.
    fn protect<'s>(
        &self,
        space: &Self::Space,
        range: Range<VirtAddr>,
        prot: Prot,
        sink: &mut DisplacedSink<'s>,
    );

    /// The frame mapped at `va`, if any (`pmap_extract`).
    fn extract(&self, space: &Self::Space, va: VirtAddr) -> Option<Pfn>;

    /// Whether a prefault could map `va` without allocating a table and
    /// without replacing anything (`pmap_is_prefaultable`).
    fn is_prefaultable(&self, space: &Self::Space, va: VirtAddr) -> bool;

    /// Sets or clears the wired attribute of the mapping at `va`
    /// (`pmap_change_wiring`). No effect if nothing is mapped.
    fn change_wiring(&self, space: &Self::Space, va: VirtAddr, wired: bool);

    /// A user-mode access of kind `access` at `va` as the hardware would
    /// perform it: the frame if the mapping allows the access (setting its
    /// referenced bit, and its modified bit for a write), `None` if the
    /// access would fault.
    fn translate(&self, space: &Self::Space, va: VirtAddr, access: Prot) -> Option<Pfn>;

    /// Removes every mapping of `pfn` in every space (`pmap_remove_all`).
    fn remove_all(&self, pfn: Pfn) -> RefMod;

    /// Lowers every mapping of `pfn` to `prot` (`pmap_page_protect`);
    /// without read it removes them.
    fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod;

    /// Whether any mapping of `pfn` has been written (`pmap_is_modified`).
    fn is_modified(&self, pfn: Pfn) -> bool;

    /// Clears the modified bit of every mapping of `pfn`
    /// (`pmap_clear_modify`).
    fn clear_modify(&self, pfn: Pfn);

    /// Counts and clears referenced bits of up to five mappings of `pfn`
    /// (`pmap_ts_referenced`).
    fn ts_referenced(&self, pfn: Pfn) -> u32;

    /// How many mappings of `pfn` exist (for consistency checks; 0 for an
    /// unmanaged page).
    fn mapping_count(&self, pfn: Pfn) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_queues::Thresholds;

    #[test]
    fn a_table_word_is_lent_only_for_frames_allocated_as_tables() {
        let machine = Arc::new(Frames {
            phys: PhysMem::anonymous(8 * crate::PAGE_SIZE).unwrap(),
            pages: Pages::new(
                0,
                8,
                true,
                Thresholds {
                    reserved: 0,
                    severe: 0,
                    target: 0,
                },
                0,
            ),
        });
        let frames = PhysFrames { mem: machine };
        let table = frames.alloc_zeroed().unwrap();
        let word = frames.table_word(table).expect("a table's word");
        word.store(3, core::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            frames
                .table_word(table)
                .unwrap()
                .load(core::sync::atomic::Ordering::Relaxed),
            3
        );
        // SAFETY: nothing refers to the frame; the test is its only user.
        unsafe { frames.free(table) }.expect("a table frees");
        assert!(
            frames.table_word(table).is_none(),
            "a free frame lends nothing"
        );
        assert_eq!(
            // SAFETY: as above (and the call is refused anyway).
            unsafe { frames.free(table) },
            Err(PmapError::BadFrame(table)),
            "a double free is refused"
        );
        assert!(frames.table_word(Pfn(1000)).is_none(), "outside memory");
        // Reallocated, the word starts at zero again.
        let again = frames.alloc_zeroed().unwrap();
        assert_eq!(
            frames
                .table_word(again)
                .unwrap()
                .load(core::sync::atomic::Ordering::Relaxed),
            0
        );
        // A frame the core allocated for itself is not the pmap's to free.
        let other = frames.pages().alloc(0, AllocClass::Normal, false).unwrap();
        let pfn = frames.pages().pfn(other);
        // SAFETY: refused without touching the frame, which is checked.
        assert_eq!(unsafe { frames.free(pfn) }, Err(PmapError::BadFrame(pfn)));
        assert!(frames.table_word(pfn).is_none());
    }
}
