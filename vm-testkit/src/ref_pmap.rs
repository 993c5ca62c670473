//! A reference pmap: a plain map from address to (frame, protection, bits)
//! per space, and reverse lists per frame. Obviously right rather than
//! fast: one lock serialises it. It lets `vm-core` run end to end without
//! a hardware pmap, and is the model hardware pmaps are checked against.

use core::ops::Range;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use vm_core::VirtAddr;
use vm_core::pmap::{Displaced, DisplacedSink, Mapping, PageInfo, Pmap, PmapError, RefMod};
use vm_core::{Pfn, Prot};

/// One mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefPte {
    /// The frame.
    pub pfn: Pfn,
    /// Its protection.
    pub prot: Prot,
    /// Wired.
    pub wired: bool,
    /// Referenced (the hardware's A bit).
    pub referenced: bool,
    /// Modified (the hardware's D bit).
    pub modified: bool,
    /// Tracked in the reverse lists.
    pub managed: bool,
}

#[derive(Default)]
struct State {
    spaces: HashMap<u64, BTreeMap<u64, RefPte>>,
    /// frame → (space, va) of each managed mapping.
    pv: HashMap<Pfn, Vec<(u64, u64)>>,
    next_space: u64,
    calls: RefPmapCalls,
}

/// Counts of the operations a [`RefPmap`] has served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefPmapCalls {
    /// `enter` calls.
    pub enter: u64,
    /// `enter_quick` calls that mapped something.
    pub enter_quick: u64,
    /// `remove_all` calls.
    pub remove_all: u64,
    /// `protect` calls.
    pub protect: u64,
}

/// The reference pmap: a plain map from address to (frame, protection,
/// bits) per space and reverse lists per frame, under one lock; obviously
/// right rather than fast.
#[derive(Default)]
pub struct RefPmap {
    st: Mutex<State>,
}

/// A [`RefPmap`] address space: just its number.
#[derive(Debug)]
pub struct RefSpace {
    id: u64,
}

impl RefSpace {
    /// The space's number in its pmap.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl RefPmap {
    /// An empty reference pmap.
    #[must_use]
    pub fn new() -> RefPmap {
        RefPmap::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The mapping at `va` of `space`.
    #[must_use]
    pub fn pte(&self, space: &RefSpace, va: u64) -> Option<RefPte> {
        self.lock().spaces.get(&space.id)?.get(&va).copied()
    }

    /// Every mapping of `space`, in address order.
    #[must_use]
    pub fn mappings(&self, space: &RefSpace) -> Vec<(u64, RefPte)> {
        self.lock()
            .spaces
            .get(&space.id)
            .map(|t| t.iter().map(|(&va, &p)| (va, p)).collect())
            .unwrap_or_default()
    }

    /// Every (space number, va) mapping `pfn`.
    #[must_use]
    pub fn mappers(&self, pfn: Pfn) -> Vec<(u64, u64)> {
        self.lock().pv.get(&pfn).cloned().unwrap_or_default()
    }

    /// Operation counts so far.
    #[must_use]
    pub fn calls(&self) -> RefPmapCalls {
        self.lock().calls
    }
}

impl State {
    fn unlink(&mut self, pfn: Pfn, space: u64, va: u64) {
        if let Some(list) = self.pv.get_mut(&pfn) {
            list.retain(|&m| m != (space, va));
            if list.is_empty() {
                self.pv.remove(&pfn);
            }
        }
    }

    fn take(&mut self, space: u64, va: u64) -> Option<RefPte> {
        let pte = self.spaces.get_mut(&space)?.remove(&va)?;
        if pte.managed {
            self.unlink(pte.pfn, space, va);
        }
        Some(pte)
    }

    fn for_each_mapping(&mut self, pfn: Pfn, mut f: impl FnMut(&mut BTreeMap<u64, RefPte>, u64)) {
        for (space, va) in self.pv.get(&pfn).cloned().unwrap_or_default() {
            if let Some(t) = self.spaces.get_mut(&space) {
                f(t, va);
            }
        }
    }
}

fn displaced(p: &RefPte) -> Displaced {
    Displaced {
        pfn: p.pfn,
        referenced: p.referenced,
        modified: p.modified,
    }
}

impl Pmap for RefPmap {
    type Space = RefSpace;

    fn create_space(&self) -> Result<RefSpace, PmapError> {
        let mut st = self.lock();
        st.next_space += 1;
        let id = st.next_space;
        st.spaces.insert(id, BTreeMap::new());
        Ok(RefSpace { id })
    }

    fn destroy_space(&self, space: &RefSpace) {
        let mut st = self.lock();
        let vas: Vec<u64> = st
            .spaces
            .get(&space.id)
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default();
        for va in vas {
            st.take(space.id, va);
        }
        st.spaces.remove(&space.id);
    }

    fn enter(
        &self,
        space: &RefSpace,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<Option<Displaced>, PmapError> {
        let (va, page, prot, access, wired) = (va.as_u64(), m.page, m.prot, m.access, m.wired);
        let mut st = self.lock();
        st.calls.enter += 1;
        let old = st.spaces.get(&space.id).and_then(|t| t.get(&va)).copied();
        let mut out = None;
        let mut pte = RefPte {
            pfn: page.pfn,
            prot,
            wired,
            referenced: true,
            modified: access.contains(Prot::WRITE),
            managed: page.managed,
        };
        match old {
            Some(o) if o.pfn == page.pfn => {
                pte.referenced |= o.referenced;
                pte.modified |= o.modified;
            }
            Some(o) => {
                st.take(space.id, va);
                if o.managed {
                    out = Some(displaced(&o));
                }
            }
            None => {}
        }
        if page.managed && old.is_none_or(|o| o.pfn != page.pfn) {
            st.pv.entry(page.pfn).or_default().push((space.id, va));
        }
        st.spaces
            .get_mut(&space.id)
            .ok_or(PmapError::BadAddress(VirtAddr(va)))?
            .insert(va, pte);
        Ok(out)
    }

    fn enter_quick(&self, space: &RefSpace, va: VirtAddr, page: PageInfo, prot: Prot) -> bool {
        let va = va.as_u64();
        let mut st = self.lock();
        let Some(t) = st.spaces.get_mut(&space.id) else {
            return false;
        };
        if t.contains_key(&va) {
            return false;
        }
        t.insert(
            va,
            RefPte {
                pfn: page.pfn,
                prot: prot - Prot::WRITE,
                wired: false,
                referenced: false,
                modified: false,
                managed: page.managed,
            },
        );
        if page.managed {
            st.pv.entry(page.pfn).or_default().push((space.id, va));
        }
        st.calls.enter_quick += 1;
        true
    }

    fn remove(&self, space: &RefSpace, range: Range<VirtAddr>, sink: &mut DisplacedSink<'_>) {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        let mut st = self.lock();
        let vas: Vec<u64> = match st.spaces.get(&space.id) {
            Some(t) => t.range(start..end).map(|(&va, _)| va).collect(),
            None => return,
        };
        for va in vas {
            if let Some(p) = st.take(space.id, va) {
                if p.managed {
                    sink(displaced(&p));
                }
            }
        }
    }

    fn protect(
        &self,
        space: &RefSpace,
        range: Range<VirtAddr>,
        prot: Prot,
        sink: &mut DisplacedSink<'_>,
    ) {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        if !prot.contains(Prot::READ) {
            return self.remove(space, range, sink);
        }
        let mut st = self.lock();
        st.calls.protect += 1;
        let Some(t) = st.spaces.get_mut(&space.id) else {
            return;
        };
        for (_, p) in t.range_mut(start..end) {
            let lost_write = p.prot.contains(Prot::WRITE) && !prot.contains(Prot::WRITE);
            p.prot &= prot;
            if lost_write && p.managed {
                sink(displaced(p));
                p.modified = false;
            }
        }
    }

    fn extract(&self, space: &RefSpace, va: VirtAddr) -> Option<Pfn> {
        let va = va.as_u64();
        self.pte(space, va).map(|p| p.pfn)
    }

    fn is_prefaultable(&self, space: &RefSpace, va: VirtAddr) -> bool {
        let va = va.as_u64();
        self.pte(space, va).is_none()
    }

    fn change_wiring(&self, space: &RefSpace, va: VirtAddr, wired: bool) {
        let va = va.as_u64();
        if let Some(p) = self
            .lock()
            .spaces
            .get_mut(&space.id)
            .and_then(|t| t.get_mut(&va))
        {
            p.wired = wired;
        }
    }

    fn translate(&self, space: &RefSpace, va: VirtAddr, access: Prot) -> Option<Pfn> {
        let va = va.as_u64();
        let mut st = self.lock();
        let p = st.spaces.get_mut(&space.id)?.get_mut(&va)?;
        if !p.prot.contains(access) {
            return None;
        }
        p.referenced = true;
        p.modified |= access.contains(Prot::WRITE);
        Some(p.pfn)
    }

    fn remove_all(&self, pfn: Pfn) -> RefMod {
        let mut st = self.lock();
        st.calls.remove_all += 1;
        let mut rm = RefMod::default();
        for (space, va) in st.pv.get(&pfn).cloned().unwrap_or_default() {
            if let Some(p) = st.take(space, va) {
                rm.referenced |= p.referenced;
                rm.modified |= p.modified;
            }
        }
        rm
    }

    fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod {
        if !prot.contains(Prot::READ) {
            return self.remove_all(pfn);
        }
        let mut rm = RefMod::default();
        if !prot.contains(Prot::WRITE) {
            self.lock().for_each_mapping(pfn, |t, va| {
                if let Some(p) = t.get_mut(&va) {
                    rm.referenced |= p.referenced;
                    rm.modified |= p.modified;
                    p.prot.remove(Prot::WRITE);
                    p.modified = false;
                }
            });
        }
        rm
    }

    fn is_modified(&self, pfn: Pfn) -> bool {
        let mut any = false;
        self.lock()
            .for_each_mapping(pfn, |t, va| any |= t.get(&va).is_some_and(|p| p.modified));
        any
    }

    fn clear_modify(&self, pfn: Pfn) {
        self.lock().for_each_mapping(pfn, |t, va| {
            if let Some(p) = t.get_mut(&va) {
                p.modified = false;
            }
        });
    }

    fn ts_referenced(&self, pfn: Pfn) -> u32 {
        let mut n = 0;
        self.lock().for_each_mapping(pfn, |t, va| {
            if let Some(p) = t.get_mut(&va) {
                if n < 5 && p.referenced {
                    p.referenced = false;
                    n += 1;
                }
            }
        });
        n
    }

    fn mapping_count(&self, pfn: Pfn) -> usize {
        self.lock().pv.get(&pfn).map_or(0, Vec::len)
    }
}
