//! Copying a wired entry into a forked child: seed `vm_fault_copy_entry`
//! (L1088-1200); and in place, when a user-wired copy-on-write entry
//! gains write access (modern FreeBSD's use of the same function).

use crate::addr::PAGE_SIZE;
use crate::error::MapError;
use crate::map::{EntryFlags, MapEntry};
use crate::object::VmObject;
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::AllocClass;
use crate::pmap::{MemAttr, PageInfo, Pmap};
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// Gives the child a private copy of every page of the wired entry `src`
/// of `parent`, entered in the child's pmap, and returns the child's entry.
///
/// The seed maps the copies with the entry's *maximum* protection; this
/// maps them with its current protection, so a read-only wired region does
/// not become writable in the child.
///
/// # Errors
///
/// [`MapError::MissingPage`] if a page of the wired entry is not resident
/// (the seed panics), [`MapError::ResourceShortage`] if no memory can be
/// had. The child's pmap is left without the entry's pages then.
pub(crate) fn copy_entry<P: Pmap>(
    parent: &VmSpace<P>,
    child: &VmSpace<P>,
    src: &MapEntry,
) -> Result<MapEntry, MapError> {
    let vm = &parent.vm;
    let machine = &vm.machine;
    let dst_object = VmObject::create(machine, src.pages(), None, None);
    dst_object.add_ref();
    let mut dst = MapEntry::new(src.start, src.end, src.protection, src.max_protection);
    dst.eflags = src.eflags
        - (EntryFlags::COW
            | EntryFlags::NEEDS_COPY
            | EntryFlags::USER_WIRED
            | EntryFlags::IN_TRANSITION);
    dst.inheritance = src.inheritance;
    dst.behavior = src.behavior;
    dst.object = Some(dst_object.clone());
    let result = copy_pages(parent, child, src, &dst_object);
    if result.is_err() {
        vm.pmap.remove(&child.pmap, src.start, src.end, &mut |_| {});
        dst_object.drop_ref();
    }
    result.map(|()| dst)
}

fn copy_pages<P: Pmap>(
    parent: &VmSpace<P>,
    child: &VmSpace<P>,
    src: &MapEntry,
    dst_object: &Arc<VmObject>,
) -> Result<(), MapError> {
    let vm = &parent.vm;
    let pages = &vm.machine.pages;
    let mut va = src.start;
    while va < src.end {
        let src_id = source_page(src, va, false).ok_or(MapError::MissingPage { addr: va })?;
        let dst_id = copy_page(parent, src_id, dst_object, (va - src.start) / PAGE_SIZE)?;
        let info = PageInfo {
            pfn: pages.pfn(dst_id),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        match vm
            .pmap
            .enter(&child.pmap, va, info, src.protection, Prot::NONE, false)
        {
            Ok(d) => {
                if let Some(d) = d {
                    vm.note_displaced(d);
                }
            }
            Err(e) => return Err(MapError::Pmap(e)),
        }
        pages.activate(dst_id);
        va += PAGE_SIZE;
    }
    Ok(())
}

/// A copy of page `src` (dirty, valid), inserted at `pindex` of `object`
/// and on no queue yet.
fn copy_page<P: Pmap>(
    space: &VmSpace<P>,
    src: PageId,
    object: &Arc<VmObject>,
    pindex: u64,
) -> Result<PageId, MapError> {
    let pages = &space.vm.machine.pages;
    let dst = alloc_waiting(space).ok_or(MapError::ResourceShortage)?;
    space.vm.machine.phys.copy(pages.pfn(src), pages.pfn(dst));
    let page = pages.get(dst);
    page.clear_flags(PageFlags::ZERO);
    page.set_valid(VM_PAGE_BITS_ALL);
    page.dirty_all();
    object.insert_page(&mut object.lock(), dst, page, pindex);
    Ok(dst)
}

/// A user-wired copy-on-write entry that gains write access gets its own
/// copy of every page it shows, wired and mapped writable in place of the
/// page it showed, and stops being copy-on-write (modern FreeBSD's
/// `vm_fault_copy_entry(map, map, entry, entry)` from `vm_map_protect`).
/// Without it a write there would be refused: the lookup never copies on
/// write for a user-wired entry (a copy made by a plain fault would not be
/// wired in the old page's place).
///
/// # Errors
///
/// [`MapError::MissingPage`] if a page of the wired entry is not resident,
/// [`MapError::ResourceShortage`] if no memory can be had; the entry and
/// its pages are unchanged then.
pub(crate) fn upgrade_wired_entry<P: Pmap>(
    space: &VmSpace<P>,
    e: &mut MapEntry,
) -> Result<(), MapError> {
    let vm = &space.vm;
    let pages = &vm.machine.pages;
    let object = VmObject::create(&vm.machine, e.pages(), None, None);
    object.add_ref();
    // Copy everything first, so that a failure changes nothing (dropping
    // the new object frees the copies).
    let mut copies = Vec::with_capacity(e.pages() as usize);
    for (pindex, va) in (e.start..e.end).step_by(PAGE_SIZE as usize).enumerate() {
        let copied = source_page(e, va, true)
            .ok_or(MapError::MissingPage { addr: va })
            .and_then(|src| Ok((va, src, copy_page(space, src, &object, pindex as u64)?)));
        match copied {
            Ok(copy) => copies.push(copy),
            Err(err) => {
                object.drop_ref();
                return Err(err);
            }
        }
    }
    for (va, src, dst) in copies {
        pages.wire(dst);
        let info = PageInfo {
            pfn: pages.pfn(dst),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        // The old page is mapped here (it is wired), so its tables exist
        // and the replacement needs no memory.
        match vm
            .pmap
            .enter(&space.pmap, va, info, e.protection, Prot::NONE, true)
        {
            Ok(displaced) => displaced.into_iter().for_each(|d| vm.note_displaced(d)),
            Err(err) => debug_assert!(false, "replacing the wired page at {va:#x}: {err}"),
        }
        pages.unwire(src, true);
    }
    if let Some(old) = e.object.replace(object) {
        old.drop_ref();
    }
    e.offset = 0;
    e.eflags.remove(EntryFlags::COW | EntryFlags::NEEDS_COPY);
    Ok(())
}

/// The resident, valid page that `va` shows in the wired entry `e`; a
/// read-only entry (or any, with `through`) may find it in a backing
/// object (seed L1163-1177).
fn source_page(e: &MapEntry, va: u64, through: bool) -> Option<PageId> {
    let mut object = e.object.clone()?;
    let mut pindex = e.pindex(va);
    loop {
        let next = {
            let st = object.lock();
            if let Some(&id) = st.pages.get(&pindex) {
                let valid = object.machine.pages.get(id).valid() == VM_PAGE_BITS_ALL;
                return valid.then_some(id);
            }
            if e.protection.contains(Prot::WRITE) && !through {
                return None;
            }
            let b = st.backing.as_ref()?;
            pindex += b.offset;
            b.object.clone()
        };
        object = next;
    }
}

/// Allocates a page, waiting for memory a bounded number of times.
fn alloc_waiting<P: Pmap>(space: &VmSpace<P>) -> Option<PageId> {
    let pages = &space.vm.machine.pages;
    for _ in 0..=space.vm.config.memory_retries {
        if let Some(id) = pages.alloc(0, AllocClass::Normal, false) {
            return Some(id);
        }
        pages.wait_for_memory(space.vm.config.memory_wait_ms);
    }
    None
}

/// Fork of a copy-inherited entry with held pages: the child gets a new
/// object over the parent object's backing, with copies of the parent
/// object's pages, and the parent keeps its object private and writable,
/// so a holder of the parent's pages goes on seeing what the parent
/// writes (what Linux does for pinned pages at fork).
///
/// # Errors
///
/// [`MapError::ResourceShortage`] if no memory can be had for a copy.
pub(crate) fn copy_object_for_child<P: Pmap>(
    parent: &VmSpace<P>,
    src: &MapEntry,
) -> Result<MapEntry, MapError> {
    let vm = &parent.vm;
    let pages = &vm.machine.pages;
    let Some(object) = src.object.as_ref() else {
        return Err(MapError::MissingPage { addr: src.start });
    };
    let (backing, size) = {
        let st = object.lock();
        (st.backing.clone(), st.size)
    };
    if let Some(b) = &backing {
        b.object.add_ref();
        let mut bst = b.object.lock();
        bst.shadow_count += 1;
        bst.flags.remove(crate::object::ObjectFlags::ONEMAPPING);
    }
    let copy = VmObject::create(&vm.machine, size, None, backing);
    copy.add_ref();
    let mut dst = MapEntry::new(src.start, src.end, src.protection, src.max_protection);
    dst.eflags =
        src.eflags - (EntryFlags::NEEDS_COPY | EntryFlags::USER_WIRED | EntryFlags::IN_TRANSITION);
    dst.inheritance = src.inheritance;
    dst.behavior = src.behavior;
    dst.offset = src.offset;
    dst.object = Some(copy.clone());
    let first = src.offset / PAGE_SIZE;
    for pindex in first..first + src.pages() {
        let Some(id) = stable_page(vm, object, pindex) else {
            continue;
        };
        match copy_page(parent, id, &copy, pindex) {
            Ok(new) => pages.activate(new),
            Err(e) => {
                copy.drop_ref();
                return Err(e);
            }
        }
    }
    Ok(dst)
}

/// The valid page at `pindex` of `object`, after waiting out any fault
/// that holds it busy.
fn stable_page<P: Pmap>(
    vm: &crate::vm::Vm<P>,
    object: &Arc<VmObject>,
    pindex: u64,
) -> Option<PageId> {
    loop {
        let id = *object.lock().pages.get(&pindex)?;
        let page = vm.machine.pages.get(id);
        if !page.is_busy() {
            return (page.valid() == VM_PAGE_BITS_ALL).then_some(id);
        }
        crate::fault::guard::wait_for_page(&vm.machine, id, object.id().0, pindex);
    }
}

/// Whether any page of `e`'s own object in its range is held.
pub(crate) fn has_held_pages(e: &MapEntry) -> bool {
    let Some(object) = &e.object else {
        return false;
    };
    let st = object.lock();
    let first = e.offset / PAGE_SIZE;
    let range = first..first + e.pages();
    st.pages
        .iter()
        .any(|(p, &id)| range.contains(p) && object.machine.pages.get(id).hold_count() != 0)
}
