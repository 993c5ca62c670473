//! `VmObject`: a set of pages indexed by page number, with an optional
//! pager and an optional backing object (FreeBSD `vm_object.c`).
//!
//! Shadow chains: a copy-on-write mapping gets a *shadow* object in front
//! of the shared one; pages written privately live in the shadow, the rest
//! are found further down the chain through `backing`.
//!
//! Lifetime is the `Arc`: an object lives while a map entry, a shadow, a
//! fault in progress or a user handle holds it, and frees its pages when the
//! last goes (its pages are mapped nowhere by then, since mappings exist
//! only through entries). [`ref_count`](VmObject::ref_count) is FreeBSD's
//! count of references from map entries and shadows, which the
//! copy-on-write optimisation and collapse consult.
//!
//! Lock order: a shadow's lock before its backing object's.

pub(crate) mod busy;
mod machine;

pub(crate) use machine::{Machine, ObjectRegistry};

use crate::page::{PageId, VmPage};
use crate::pager::{Pager, PagerKind};
use crate::sync::{Mutex, MutexGuard};
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, Ordering};
use hashbrown::HashMap;

/// A machine-unique object number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId(pub u64);

impl core::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

bitflags::bitflags! {
    /// Object flags (FreeBSD `OBJ_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ObjectFlags: u32 {
        /// Mapped by a single entry of a single map (`OBJ_ONEMAPPING`).
        const ONEMAPPING = 0x2000;
        /// Being destroyed (`OBJ_DEAD`).
        const DEAD = 0x8;
        /// Has been mapped writable (`OBJ_WRITEABLE`).
        const WRITEABLE = 0x80;
        /// May have dirty pages (`OBJ_MIGHTBEDIRTY`).
        const MIGHTBEDIRTY = 0x100;
        /// Someone outside the VM can find the object (a handle, FreeBSD
        /// `handle != NULL`): a user's [`Arc`], a file, a device. Its pages
        /// are never moved to another object by the copy-on-write
        /// optimisation or by collapse.
        const NAMED = 0x1_0000;
    }
}

/// The backing object of a shadow, with the page offset into it.
#[derive(Clone)]
pub(crate) struct Backing {
    pub(crate) object: Arc<VmObject>,
    /// `backing_object_offset` in pages.
    pub(crate) offset: u64,
}

/// State behind the object's lock.
pub(crate) struct ObjectState {
    pub(crate) pages: HashMap<u64, PageId>,
    pub(crate) size: u64,
    pub(crate) backing: Option<Backing>,
    pub(crate) shadow_count: u32,
    pub(crate) flags: ObjectFlags,
    /// The pager's kind, or [`PagerKind::ANONYMOUS`] for an object with
    /// no pager (FreeBSD `OBJT_DEFAULT`: anonymous memory not yet given
    /// swap).
    pub(crate) kind: PagerKind,
    pub(crate) pager: Option<Arc<dyn Pager>>,
    /// Superpage reservations: for the first page index of an aligned
    /// 2 MiB of the object, the run of frames claimed for it
    /// ([`NO_RUN`](crate::page_queues::NO_RUN) if none was whole); see
    /// `fault::reserve`.
    pub(crate) reservations: HashMap<u64, u32>,
}

/// A VM object. See the [module docs](self).
pub struct VmObject {
    id: ObjectId,
    pub(crate) machine: Arc<Machine>,
    ref_count: AtomicU32,
    /// Whether the VM ever gave a user a handle to the object (see
    /// [`unexposed`](Self::unexposed)).
    handed_out: core::sync::atomic::AtomicBool,
    pip: crate::sync::Gate,
    state: Mutex<ObjectState>,
}

impl core::fmt::Debug for VmObject {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = self.lock();
        f.debug_struct("VmObject")
            .field("id", &self.id)
            .field("kind", &st.kind)
            .field("pager", &st.pager.is_some())
            .field("size", &st.size)
            .field("resident", &st.pages.len())
            .field("ref_count", &self.ref_count())
            .field("shadow_count", &st.shadow_count)
            .field(
                "backing",
                &st.backing.as_ref().map(|b| (b.object.id, b.offset)),
            )
            .finish()
    }
}

impl VmObject {
    /// Creates an object of `size` pages on `machine`.
    pub(crate) fn create(
        machine: &Arc<Machine>,
        size: u64,
        pager: Option<Arc<dyn Pager>>,
        backing: Option<Backing>,
    ) -> Arc<VmObject> {
        let kind = pager.as_ref().map_or(PagerKind::ANONYMOUS, |p| p.kind());
        let id = machine.objects.next.fetch_add(1, Ordering::Relaxed);
        let obj = Arc::new(VmObject {
            id: ObjectId(id),
            machine: machine.clone(),
            ref_count: AtomicU32::new(0),
            handed_out: core::sync::atomic::AtomicBool::new(false),
            pip: crate::sync::Gate::default(),
            state: Mutex::new(ObjectState {
                pages: HashMap::new(),
                reservations: HashMap::new(),
                size,
                backing,
                shadow_count: 0,
                flags: ObjectFlags::ONEMAPPING,
                kind,
                pager,
            }),
        });
        machine
            .objects
            .shard(id)
            .lock()
            .insert(id, Arc::downgrade(&obj));
        obj
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ObjectState> {
        self.state.lock()
    }

    /// The object's id.
    #[must_use]
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// What the object holds: its pager's [`Pager::kind`], or
    /// [`PagerKind::ANONYMOUS`] for anonymous memory with no pager yet.
    #[must_use]
    pub fn kind(&self) -> PagerKind {
        self.lock().kind
    }

    /// Whether the object has a pager (anonymous memory gets one, swap,
    /// when its pages are first paged out).
    #[must_use]
    pub fn has_pager(&self) -> bool {
        self.lock().pager.is_some()
    }

    /// Size in pages.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.lock().size
    }

    /// References from map entries and shadow objects (FreeBSD
    /// `ref_count`).
    #[must_use]
    pub fn ref_count(&self) -> u32 {
        self.ref_count.load(Ordering::Acquire)
    }

    /// Objects that shadow this one (FreeBSD `shadow_count`).
    #[must_use]
    pub fn shadow_count(&self) -> u32 {
        self.lock().shadow_count
    }

    /// Number of resident pages.
    #[must_use]
    pub fn resident_count(&self) -> usize {
        self.lock().pages.len()
    }

    /// The indexes of the resident pages in `start..end`, in order. Costs
    /// what is resident or what the range spans, whichever is less.
    #[must_use]
    pub fn resident_between(&self, start: u64, end: u64) -> alloc::vec::Vec<u64> {
        let st = self.lock();
        let span = end.saturating_sub(start);
        let mut found: alloc::vec::Vec<u64> = if span <= st.pages.len() as u64 {
            (start..end).filter(|p| st.pages.contains_key(p)).collect()
        } else {
            st.pages
                .keys()
                .copied()
                .filter(|p| (start..end).contains(p))
                .collect()
        };
        found.sort_unstable();
        found
    }

    /// The resident page at `pindex`, if any.
    #[must_use]
    pub fn resident_page(&self, pindex: u64) -> Option<PageId> {
        self.lock().pages.get(&pindex).copied()
    }

    /// The backing object and the page offset into it.
    ///
    /// While the handle lives, collapse leaves the backing object whole
    /// (it neither merges it into its shadow nor lets a shadow bypass it),
    /// so what the handle shows stays what the chain held.
    #[must_use]
    pub fn backing(&self) -> Option<(Arc<VmObject>, u64)> {
        let (object, offset) = self.backing_link()?;
        Some((object.hand_out(), offset))
    }

    /// [`backing`](Self::backing) for the VM's own walks.
    pub(crate) fn backing_link(&self) -> Option<(Arc<VmObject>, u64)> {
        self.lock()
            .backing
            .as_ref()
            .map(|b| (b.object.clone(), b.offset))
    }

    /// A handle for a user: the object is marked as handed out (see
    /// [`unexposed`](Self::unexposed)) under its lock, so a caller that
    /// asks `unexposed` under the lock and acts before unlocking sees the
    /// handle either wholly before or wholly after.
    pub(crate) fn hand_out(self: Arc<Self>) -> Arc<Self> {
        {
            let _st = self.lock();
            self.handed_out
                .store(true, core::sync::atomic::Ordering::Release);
        }
        self
    }

    /// Whether nobody outside the VM holds the object: its strong count is
    /// its entries' and shadows' references ([`ref_count`](Self::ref_count))
    /// plus `clones`, the `Arc`s the caller itself holds. A user's handle
    /// ([`VmSpace::object_at`](crate::VmSpace::object_at),
    /// [`backing`](Self::backing), [`Vm::live_objects`](crate::Vm::live_objects))
    /// shows the object's pages, so while one lives they stay in it: no
    /// collapse, bypass or copy-on-write rename takes them out, and an
    /// unmap does not free them. (A page held across a fork still moves
    /// with the parent: the hold's guarantee comes first.) A transient
    /// holder elsewhere in the VM (a scan) makes the answer false too,
    /// which only puts an optimisation off (or, for an object once handed
    /// out, leaves an unmapped range's pages to the object's death).
    ///
    /// An object the VM never handed to a user (the common case: private
    /// memory nobody asked about) is unexposed whoever else holds it for a
    /// moment; only for one that was handed out do the counts decide.
    pub(crate) fn unexposed(self: &Arc<Self>, clones: usize) -> bool {
        !self.handed_out.load(core::sync::atomic::Ordering::Acquire)
            || Arc::strong_count(self) <= self.ref_count() as usize + clones
    }

    /// Marks the object as found from outside the VM (a handle was given
    /// out): [`ObjectFlags::NAMED`], and no longer one mapping's own.
    pub(crate) fn mark_named(&self) {
        let mut st = self.lock();
        st.flags.remove(ObjectFlags::ONEMAPPING);
        st.flags.insert(ObjectFlags::NAMED);
    }

    /// Length of the shadow chain from this object down (1 = no backing).
    #[must_use]
    pub fn chain_depth(&self) -> usize {
        let mut depth = 1;
        let mut cur = self.backing_link();
        while let Some((o, _)) = cur {
            depth += 1;
            cur = o.backing_link();
        }
        depth
    }

    /// Object flags.
    #[must_use]
    pub fn flags(&self) -> ObjectFlags {
        self.lock().flags
    }

    /// Whether the object is dead.
    #[must_use]
    pub fn is_dead(&self) -> bool {
        self.flags().contains(ObjectFlags::DEAD)
    }

    /// Pager operations in progress (FreeBSD `paging_in_progress`).
    #[must_use]
    pub fn paging_in_progress(&self) -> u32 {
        self.pip.count()
    }

    /// Whether `other` is an object of the same machine.
    pub(crate) fn same_machine(&self, machine: &Arc<Machine>) -> bool {
        Arc::ptr_eq(&self.machine, machine)
    }

    pub(crate) fn add_ref(&self) {
        self.ref_count.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn drop_ref(&self) {
        let old = self.ref_count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "object {} reference count underflow", self.id);
    }

    pub(crate) fn pip_add(&self) {
        self.pip.enter();
    }

    pub(crate) fn pip_wakeup(&self) {
        self.pip.leave(self.machine.pages.waits(), self.wait_key());
    }

    /// Waits until no paging operation is in progress
    /// (`vm_object_pip_wait`).
    pub(crate) fn pip_wait(&self) {
        self.pip
            .wait_idle(self.machine.pages.waits(), self.wait_key());
    }

    fn wait_key(&self) -> u64 {
        self.id.0 | (1 << 63)
    }

    /// Inserts page `id` at `pindex` (`vm_page_insert`). The caller holds
    /// the lock (`st`) and the slot is empty.
    pub(crate) fn insert_page(&self, st: &mut ObjectState, id: PageId, page: &VmPage, pindex: u64) {
        let old = st.pages.insert(pindex, id);
        debug_assert!(
            old.is_none(),
            "object {} page {pindex} already resident",
            self.id
        );
        page.set_identity(self.id.0, pindex);
    }
}

/// Frees every page of an object's state (see [`VmObject::free_all_pages`]).
fn free_pages(machine: &Machine, object: ObjectId, st: &mut ObjectState) {
    let pages = &machine.pages;
    for (_, id) in st.pages.drain() {
        debug_assert!(
            !pages.get(id).is_busy(),
            "freeing busy page of object {object}"
        );
        // A page still wired for an entry is freed by its last unwiring.
        pages.free(id);
    }
}

impl Drop for VmObject {
    fn drop(&mut self) {
        self.machine
            .objects
            .shard(self.id.0)
            .lock()
            .remove(&self.id.0);
        // Free our pages and release the backing chain iteratively: a deep
        // chain must not recurse.
        let mut next = {
            let st = self.state.get_mut();
            free_pages(&self.machine, self.id, st);
            if let Some(p) = st.pager.take() {
                p.dealloc();
            }
            st.backing.take()
        };
        while let Some(b) = next {
            {
                let mut st = b.object.lock();
                st.shadow_count = st.shadow_count.saturating_sub(1);
            }
            b.object.drop_ref();
            next = match Arc::into_inner(b.object) {
                Some(mut obj) => obj.state.get_mut().backing.take(),
                None => None,
            };
        }
    }
}
