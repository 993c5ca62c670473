//! `Vm`: one machine — physical memory, the page array and its queues,
//! objects, counters and the pmap.

use crate::addr::{PAGE_SIZE, Pfn, va_range};
use crate::counters::Counters;
use crate::frames::Frames;
use crate::io_executor::IoExecutor;
use crate::object::{Machine, ObjectRegistry, VmObject};
use crate::page::{PageId, VmPage};
use crate::page_queues::{Pages, Thresholds};
use crate::pager::Pager;
use crate::phys::PhysMem;
use crate::pmap::{PhysFrames, Pmap};
use alloc::sync::Arc;

/// Which resident neighbours a fault maps read-only besides its own page.
///
/// Only pages already resident and wholly valid are mapped, never with
/// write access (a write to one faults as usual), only where nothing is
/// mapped, and not after a wiring fault. A page
/// not resident is never read in for this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultAround {
    /// Only the faulting page.
    Off,
    /// The seed's prefault (`vm_fault_prefault`, L934-1006): up to `n`
    /// pages on each side, visited outward (-1, +1, -2, +2, …), each mapped
    /// alone; the walk stops at the first page not resident.
    Outward(u32),
    /// Linux's fault-around (`fault_around_bytes`): the naturally aligned
    /// window of `n` pages that holds the fault (`n` rounded up to a power
    /// of two, at most [`FaultAround::MAX_WINDOW`]), clipped to the
    /// mapping. Every resident page of the window is mapped, holes
    /// skipped, with one page-table walk and one lock hold for the run
    /// ([`Pmap::enter_quick_run`]). As in Linux, only faults that read or
    /// execute map a window: after a write fault the next write to a
    /// neighbour would fault anyway.
    Window(u32),
}

impl FaultAround {
    /// The largest [`Window`](FaultAround::Window), in pages (256 KiB).
    pub const MAX_WINDOW: u32 = 64;
}

impl Default for FaultAround {
    /// A 16-page (64 KiB) window, Linux's default.
    fn default() -> Self {
        FaultAround::Window(16)
    }
}

/// Tunables of a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Bytes of physical memory to create (std builds; rounded down to
    /// pages).
    pub memory_bytes: u64,
    /// Free-page thresholds; `None` scales FreeBSD's defaults to memory.
    pub thresholds: Option<Thresholds>,
    /// How long a fault sleeps for free memory before retrying, in
    /// milliseconds.
    pub memory_wait_ms: u64,
    /// How many times a fault waits for memory before it gives up with
    /// [`FaultError::ResourceShortage`](crate::FaultError::ResourceShortage).
    pub memory_retries: u32,
    /// How far a stack grows at once, in bytes (FreeBSD `sgrowsiz`).
    pub stack_growth: u64,
    /// Which resident neighbours a fault maps besides its own page, so the
    /// next accesses need no fault (see [`FaultAround`]).
    pub fault_around: FaultAround,
    /// The largest read-ahead window, in pages after the faulting one
    /// (FreeBSD `VM_FAULT_READ_AHEAD_MAX`, at most 255): sequential faults
    /// on a mapping double its window up to this, from the seed's 15;
    /// `MADV_SEQUENTIAL` mappings use it from the first fault. The default,
    /// 255, is modern FreeBSD's (`maxphys` of 1 MiB): a scan reads 1 MiB a
    /// pager call, as many system calls per MiB as `pread` of 1 MiB, and on
    /// a cold file measured 0.83× that floor against 0.76× at 63. Windows
    /// of up to 63 pages are built on the stack; a larger one keeps its
    /// page list on the heap (a few allocations per pager call of up to
    /// 1 MiB, none per page); 63 keeps every cluster on the stack.
    pub read_ahead_max: u32,
    /// Whether sequential read-ahead reads the next window in the
    /// background (Linux's asynchronous read-ahead; default off): a
    /// read-ahead window marks its first page read ahead, and the fault
    /// that reaches it starts the next window's read on the machine's
    /// [`IoExecutor`] and goes on. It pays where the
    /// pager is slow and the reader works on each page (a pager taking
    /// 100 µs a call, a reader summing every byte: 16 % faster); on a page
    /// cache that answers at memory speed the reader catches up with each
    /// window and waits for its wake-up (20 % slower on two cores; the
    /// README's `file_*` benches). Off, or with no executor, every read is
    /// made by the fault that needs it.
    pub async_read_ahead: bool,
    /// Lowest user address.
    pub user_min: u64,
    /// One past the highest user address (x86_64: the lower canonical
    /// half).
    pub user_max: u64,
    /// Records for device (fictitious) pages resident at once.
    pub fictitious_pages: u32,
    /// Superpages for anonymous memory: see [`SuperpagePolicy`].
    pub superpages: SuperpagePolicy,
}

/// How anonymous memory gets superpages (Linux's transparent huge page
/// `enabled` setting; FreeBSD's `vm_reserv` for the reservations).
///
/// With reservations, the first zero-fill fault in an aligned 2 MiB of an
/// anonymous object, where one mapping covers all of it, claims a wholly
/// free, aligned run of 512 frames, and each page of those 2 MiB then gets
/// the frame at its own offset in the run while it is free. A pmap that
/// promotes (the x86_64 one) maps the run with one 2 MiB entry once every
/// page is in. The run's frames stay free for anyone until taken, so a
/// reservation never holds memory back from a shortage.
///
/// Per range, [`VmSpace::advise_superpages`](crate::VmSpace::advise_superpages)
/// asks for whole superpages or for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SuperpagePolicy {
    /// No reservations: frames in allocation order, 4 KiB pages (`never`).
    Never,
    /// Reservations, the 2 MiB mapped whole once every page of it has
    /// faulted; ranges advised [`Huge`](crate::map::SuperpageAdvice::Huge)
    /// get the whole 2 MiB, zeroed and mapped, at their first write fault
    /// (`madvise`). The default.
    #[default]
    Reserve,
    /// The whole 2 MiB at the first write fault wherever it fits, unless
    /// advised [`NoHuge`](crate::map::SuperpageAdvice::NoHuge) (`always`):
    /// fewer faults, more memory for sparse use.
    Always,
}

impl VmConfig {
    /// Defaults with `bytes` of memory.
    #[must_use]
    pub fn with_memory(bytes: u64) -> VmConfig {
        VmConfig {
            memory_bytes: bytes,
            ..VmConfig::default()
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_bytes: 64 << 20,
            thresholds: None,
            memory_wait_ms: 20,
            memory_retries: 3,
            stack_growth: 128 << 10,
            fault_around: FaultAround::default(),
            read_ahead_max: 255,
            async_read_ahead: false,
            user_min: PAGE_SIZE,
            user_max: 0x0000_8000_0000_0000,
            fictitious_pages: 4096,
            superpages: SuperpagePolicy::Reserve,
        }
    }
}

/// Errors creating a machine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmInitError {
    /// The host refused the physical memory mapping.
    #[cfg(feature = "std")]
    #[error("cannot create physical memory: {0}")]
    Memory(#[from] std::io::Error),
    /// Physical memory is larger than the page array can index (2^32
    /// frames).
    #[error("{0} frames is more than a page array can index")]
    TooLarge(u64),
    /// The configuration is inconsistent.
    #[error("bad configuration: {0}")]
    Config(&'static str),
}

/// A live space as the machine knows it (weakly): its map and its pmap
/// space, for the consistency check and for removing the mappings of a
/// terminated object that no pv list tracks.
pub(crate) struct SpaceRef<P: Pmap> {
    pub(crate) map: alloc::sync::Weak<crate::map::VmMap>,
    pub(crate) pmap: alloc::sync::Weak<P::Space>,
}

/// One machine. See the [crate docs](crate).
pub struct Vm<P: Pmap> {
    pub(crate) pmap: P,
    pub(crate) machine: Arc<Machine>,
    pub(crate) config: VmConfig,
    /// Where anonymous memory is paged out to.
    pub(crate) swap: crate::sync::Mutex<Option<Arc<dyn crate::pager::SwapProvider>>>,
    /// The pageout scan's clock hand.
    pub(crate) hand: core::sync::atomic::AtomicU32,
    /// Every live address space (weakly).
    pub(crate) spaces: crate::sync::Mutex<alloc::vec::Vec<SpaceRef<P>>>,
    /// Where background paging I/O runs; `None` until first needed (then
    /// the default) or set.
    io: crate::sync::Mutex<Option<Option<Arc<dyn IoExecutor>>>>,
}

impl<P: Pmap> core::fmt::Debug for Vm<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vm")
            .field("phys", &self.machine.phys)
            .field("free", &self.free_pages())
            .finish_non_exhaustive()
    }
}

/// A page busied by a size change, unbusied (its waiters woken) when
/// dropped, whatever the exit.
struct Busied<'a> {
    pages: &'a Pages,
    id: PageId,
}

impl Drop for Busied<'_> {
    fn drop(&mut self) {
        self.pages.wake(self.id);
    }
}

impl<P: Pmap> Vm<P> {
    /// A machine with `config.memory_bytes` of fresh, zeroed host memory.
    ///
    /// # Errors
    ///
    /// [`VmInitError`] if the memory cannot be mapped or the configuration
    /// is inconsistent.
    #[cfg(feature = "std")]
    pub fn new(pmap: P, config: VmConfig) -> Result<Arc<Vm<P>>, VmInitError> {
        let phys = PhysMem::anonymous(config.memory_bytes)?;
        Self::with_phys(pmap, phys, true, config)
    }

    /// A machine on memory the caller provides; `zeroed` says whether every
    /// frame is known to hold zeros (they count as pre-zeroed pages).
    ///
    /// # Errors
    ///
    /// [`VmInitError`] if the memory is too large or the configuration is
    /// inconsistent.
    pub fn with_phys(
        mut pmap: P,
        phys: PhysMem,
        zeroed: bool,
        config: VmConfig,
    ) -> Result<Arc<Vm<P>>, VmInitError> {
        let frames =
            u32::try_from(phys.frames()).map_err(|_| VmInitError::TooLarge(phys.frames()))?;
        if config.user_min >= config.user_max
            || config.user_min % PAGE_SIZE != 0
            || config.user_max % PAGE_SIZE != 0
        {
            return Err(VmInitError::Config(
                "user_min..user_max must be a non-empty page-aligned range",
            ));
        }
        if config.read_ahead_max > 255 {
            return Err(VmInitError::Config("read_ahead_max must be at most 255"));
        }
        let thresholds = config
            .thresholds
            .unwrap_or_else(|| Thresholds::for_frames(u64::from(frames)));
        let pages = Pages::new(
            phys.base_pfn(),
            frames,
            zeroed,
            thresholds,
            config.fictitious_pages,
        );
        let frames = Arc::new(Frames { phys, pages });
        pmap.attach(PhysFrames {
            mem: frames.clone(),
        });
        let machine = Arc::new(Machine {
            frames,
            counters: Counters::default(),
            objects: ObjectRegistry::default(),
            background: crate::sync::Gate::default(),
        });
        Ok(Arc::new(Vm {
            pmap,
            machine,
            config,
            swap: crate::sync::Mutex::new(None),
            hand: core::sync::atomic::AtomicU32::new(0),
            spaces: crate::sync::Mutex::new(alloc::vec::Vec::new()),
            io: crate::sync::Mutex::new(None),
        }))
    }

    /// Sets where background paging I/O (asynchronous read-ahead) runs;
    /// `None` makes every read synchronous. Under `std` the default is an
    /// [`IoThreads`](crate::io_executor::IoThreads) pool of two threads,
    /// started at the first background read; without `std` there is none.
    pub fn set_io_executor(&self, executor: Option<Arc<dyn IoExecutor>>) {
        *self.io.lock() = Some(executor);
    }

    /// Waits until every background read (asynchronous read-ahead) that
    /// was started has finished and its pages are settled: resident and
    /// idle, or freed. Useful before a consistency check or a measurement.
    pub fn wait_for_background_io(&self) {
        self.machine.background_wait();
    }

    /// The executor for background reads, starting the default if none
    /// was set.
    pub(crate) fn io_executor(&self) -> Option<Arc<dyn IoExecutor>> {
        let mut io = self.io.lock();
        io.get_or_insert_with(default_executor).clone()
    }

    /// The pmap.
    pub fn pmap(&self) -> &P {
        &self.pmap
    }

    /// Physical memory.
    pub fn phys(&self) -> &PhysMem {
        &self.machine.phys
    }

    /// The event counters.
    pub fn counters(&self) -> &Counters {
        &self.machine.counters
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Frames in the page array.
    #[must_use]
    pub fn total_pages(&self) -> u64 {
        u64::from(self.machine.pages.len())
    }

    /// Free pages now.
    #[must_use]
    pub fn free_pages(&self) -> u64 {
        self.machine.pages.free_count()
    }

    /// Free pages known to hold zeros.
    #[must_use]
    pub fn free_zeroed_pages(&self) -> u64 {
        self.machine.pages.free_zeroed_count()
    }

    /// Pages on the active, inactive queues and wired: `(active, inactive,
    /// wired)`.
    #[must_use]
    pub fn queue_counts(&self) -> (u64, u64, u64) {
        use crate::page::PageQueue;
        let p = &self.machine.pages;
        (
            p.queue_count(PageQueue::Active),
            p.queue_count(PageQueue::Inactive),
            p.wired_count(),
        )
    }

    /// The page record of `id`.
    ///
    /// # Panics
    ///
    /// If `id` is not a page of this machine.
    #[must_use]
    pub fn page(&self, id: PageId) -> &VmPage {
        self.machine.pages.get(id)
    }

    /// The frame of page `id`.
    #[must_use]
    pub fn page_pfn(&self, id: PageId) -> Pfn {
        self.machine.pages.pfn(id)
    }

    /// The page of frame `pfn`, if it is RAM of this machine.
    #[must_use]
    pub fn page_of(&self, pfn: Pfn) -> Option<PageId> {
        self.machine.pages.id_of(pfn)
    }

    /// Every live object of the machine (a snapshot, in no order).
    #[must_use]
    pub fn live_objects(&self) -> alloc::vec::Vec<Arc<VmObject>> {
        let all = self.machine.objects.all();
        all.into_iter().map(VmObject::hand_out).collect()
    }

    /// A new anonymous (zero-fill) object of `size` pages.
    #[must_use]
    pub fn new_anon_object(&self, size: u64) -> Arc<VmObject> {
        Self::named(VmObject::create(&self.machine, size, None, None))
    }

    /// A new object of `size` pages whose contents come from `pager`.
    #[must_use]
    pub fn new_object(&self, size: u64, pager: Arc<dyn Pager>) -> Arc<VmObject> {
        Self::named(VmObject::create(&self.machine, size, Some(pager), None))
    }

    /// An object the caller holds a handle to can be mapped again later:
    /// it is never "mapped by one entry only", and its pages stay its own.
    fn named(object: Arc<VmObject>) -> Arc<VmObject> {
        object.mark_named();
        object.hand_out()
    }

    /// Destroys `object` now (a revoked device, a reclaimed vnode): removes
    /// every mapping of its pages from every pmap, frees them, and marks the
    /// object dead so that later faults on it fail with
    /// [`FaultError::DeadObject`](crate::FaultError::DeadObject). Waits for
    /// paging in progress and for busy pages (a write-back in flight)
    /// first.
    pub fn terminate_object(&self, object: &VmObject) {
        object.lock().flags.insert(crate::object::ObjectFlags::DEAD);
        object.pip_wait();
        // Mappings no pv list tracks (a device's unmanaged pages) are
        // removed through the entries that map the object.
        self.unmap_object_everywhere(object);
        // Pages a write-back or the pageout daemon holds busy are waited
        // for, as any page removal waits.
        self.page_remove(object, 0, u64::MAX);
        let mut st = object.lock();
        if let Some(p) = st.pager.take() {
            p.dealloc();
        }
    }

    /// Removes from every space the mappings of the entries that map
    /// `object` itself.
    fn unmap_object_everywhere(&self, object: &VmObject) {
        for (map, pmap) in self.live_spaces() {
            let g = map.read();
            for e in g.entries.values() {
                if e.object
                    .as_ref()
                    .is_some_and(|o| core::ptr::eq(&**o, object))
                {
                    self.pmap.remove(&pmap, va_range(e.start, e.end), &mut |d| {
                        self.note_displaced(d)
                    });
                }
            }
        }
    }

    /// Changes the size of `object` to `pages` (a file truncated or
    /// extended, FreeBSD `vnode_pager_setsize`). Pages at or past the new
    /// end are unmapped from every pmap and freed, waiting for any that are
    /// busy; later faults there are out of bounds.
    pub fn resize_object(&self, object: &VmObject, pages: u64) {
        // The size first (FreeBSD `vnode_pager_setsize`): a fault checks it
        // under the object's lock before it allocates, so from here on no
        // page past the end is added, and those already there (busy in a
        // read, or resident) are removed below.
        object.lock().size = pages;
        self.page_remove(object, pages, u64::MAX);
    }

    /// Sets the size of `object` to `bytes` (a file truncated or extended
    /// to that length): pages wholly past the end are removed as by
    /// [`resize_object`](Self::resize_object), and the bytes past the end in
    /// the page that now holds it are zeroed (FreeBSD
    /// `vnode_pager_setsize`). A file that grows from a length inside a
    /// page goes through [`extend_object_bytes`](Self::extend_object_bytes)
    /// instead, which also zeroes what was written past the old end.
    pub fn set_object_size_bytes(&self, object: &VmObject, bytes: u64) {
        let pages = bytes.div_ceil(PAGE_SIZE);
        self.resize_object(object, pages);
        let tail = bytes % PAGE_SIZE;
        if tail != 0 {
            if let Some(busy) = self.busy_resident(object, pages - 1) {
                self.zero_from(busy.id, tail);
            }
        }
    }

    /// Grows `object` from `old` to `new` bytes (a file extended): `grow`
    /// lengthens the file (what the object's pager reads from), and the
    /// bytes from `old` to the end of its page read as zeros afterwards,
    /// not as whatever a mapping wrote past the old end (POSIX
    /// `ftruncate`; FreeBSD zeroes only when a file shrinks). The old last
    /// page, if resident, stays busy and write-protected from before the
    /// zeroing until the size has changed, so a write through a mapping
    /// lands either before the zeroing (past the end then: zeroed) or
    /// after the growth (file data: kept). Bytes a pin
    /// ([`HeldPages`](crate::HeldPages)) writes past the old end while this
    /// runs are not ordered with it. With `new <= old`, as
    /// [`set_object_size_bytes`](Self::set_object_size_bytes) after `grow`.
    ///
    /// # Errors
    ///
    /// `grow`'s error; the object's size is unchanged then (the bytes past
    /// the old end are zeroed all the same: they were past the end).
    pub fn extend_object_bytes<E>(
        &self,
        object: &VmObject,
        old: u64,
        new: u64,
        grow: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if new <= old {
            grow()?;
            self.set_object_size_bytes(object, new);
            return Ok(());
        }
        let tail = old % PAGE_SIZE;
        let busy = (tail != 0)
            .then(|| self.busy_resident(object, old / PAGE_SIZE))
            .flatten();
        if let Some(Busied { id, .. }) = busy {
            // A writer faults from here on, and waits for the page.
            let pages = &self.machine.pages;
            if self
                .pmap
                .page_protect(pages.pfn(id), crate::Prot::READ | crate::Prot::EXECUTE)
                .modified
            {
                pages.get(id).dirty_all();
            }
            self.zero_from(id, tail);
        }
        // The page stays busy until the size has changed (or `grow` has
        // failed or panicked: `busy` drops either way).
        let grown = grow();
        if grown.is_ok() {
            self.resize_object(object, new.div_ceil(PAGE_SIZE));
        }
        drop(busy);
        grown
    }

    /// Busies `object`'s resident page at `pindex`, waiting while another
    /// holds it busy, until the guard drops; `None` if it is not resident.
    fn busy_resident(&self, object: &VmObject, pindex: u64) -> Option<Busied<'_>> {
        loop {
            // Busied under the object's lock, which page removal holds.
            let (id, busied) = {
                let st = object.lock();
                let id = *st.pages.get(&pindex)?;
                (id, self.machine.pages.get(id).try_busy())
            };
            if busied {
                return Some(Busied {
                    pages: &self.machine.pages,
                    id,
                });
            }
            self.machine.pages.wait_for_page(id, object.id().0, pindex);
        }
    }

    /// Zeroes busy page `id` from byte `from` to its end (not device
    /// memory). Mappings keep the frame: users see the zeros at once.
    fn zero_from(&self, id: PageId, from: u64) {
        let pages = &self.machine.pages;
        if !pages
            .get(id)
            .flags()
            .contains(crate::page::PageFlags::FICTITIOUS)
        {
            self.machine
                .phys
                .zero_range(pages.pfn(id), from as usize, PAGE_SIZE as usize);
        }
    }

    /// Removes the resident pages `start..end` of `object` from every pmap
    /// and frees them, sleeping on busy ones (`vm_object_page_remove`).
    pub(crate) fn page_remove(&self, object: &VmObject, start: u64, end: u64) {
        self.page_remove_unless(object, start, end, || false);
    }

    /// [`page_remove`](Self::page_remove), unless `keep()` says otherwise
    /// under the object's lock (each time it is taken): a caller's test
    /// that nothing else can change while the pages go.
    pub(crate) fn page_remove_unless(
        &self,
        object: &VmObject,
        start: u64,
        end: u64,
        keep: impl Fn() -> bool,
    ) {
        let pages = &self.machine.pages;
        loop {
            let mut st = object.lock();
            if keep() {
                return;
            }
            let doomed: alloc::vec::Vec<(u64, PageId)> = st
                .pages
                .iter()
                .filter(|&(&p, _)| (start..end).contains(&p))
                .map(|(&p, &id)| (p, id))
                .collect();
            if let Some(&(pindex, id)) = doomed.iter().find(|&&(_, id)| pages.get(id).is_busy()) {
                drop(st);
                self.machine.pages.wait_for_page(id, object.id().0, pindex);
                continue;
            }
            let pager = st.pager.clone();
            for (pindex, id) in doomed {
                st.pages.remove(&pindex);
                let refmod = self.pmap.remove_all(pages.pfn(id));
                if refmod.modified {
                    pages.get(id).dirty_all();
                }
                // A page an entry's wiring holds is freed when that wiring
                // is released (the entry's refault finds the new page).
                pages.free(id);
            }
            drop(st);
            if let Some(p) = pager {
                // Their copies on backing store are gone too.
                p.discard(start, end);
            }
            return;
        }
    }
}

/// A pool of two threads under `std`; none without.
fn default_executor() -> Option<Arc<dyn IoExecutor>> {
    #[cfg(feature = "std")]
    {
        let pool = crate::io_executor::IoThreads::new(2).ok()?;
        Some(Arc::new(pool))
    }
    #[cfg(not(feature = "std"))]
    None
}

impl<P: Pmap> Vm<P> {
    /// Registers a new space's map and pmap space.
    pub(crate) fn register_space(&self, map: &Arc<crate::map::VmMap>, pmap: &Arc<P::Space>) {
        let mut spaces = self.spaces.lock();
        spaces.retain(|s| s.map.strong_count() != 0);
        spaces.push(SpaceRef {
            map: Arc::downgrade(map),
            pmap: Arc::downgrade(pmap),
        });
    }

    /// The live spaces' maps and pmap spaces.
    pub(crate) fn live_spaces(&self) -> alloc::vec::Vec<(Arc<crate::map::VmMap>, Arc<P::Space>)> {
        self.spaces
            .lock()
            .iter()
            .filter_map(|s| Some((s.map.upgrade()?, s.pmap.upgrade()?)))
            .collect()
    }
}
