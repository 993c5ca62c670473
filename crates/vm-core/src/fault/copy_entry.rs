//! Copying a wired entry page by page: into a forked child (seed
//! `vm_fault_copy_entry`, L1088-1200), and in place when a user-wired
//! copy-on-write entry gains write access (modern FreeBSD's use of the same
//! function from `vm_map_protect`).

use crate::addr::PAGE_SIZE;
use crate::error::MapError;
use crate::map::{EntryFlags, MapEntry};
use crate::object::VmObject;
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::AllocClass;
use crate::pmap::{MemAttr, PageInfo, Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;
use crate::wire::WireRecord;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// Gives the child a private copy of every page of the wired entry `src`
/// of `parent`, entered in the child's pmap, and returns the child's entry
/// (not wired: wiring is not inherited).
///
/// The seed maps the copies with the entry's *maximum* protection; this
/// maps them with its current protection, so a read-only wired region does
/// not become writable in the child. Memory for the copies and for the
/// child's page tables is reclaimed as a fault reclaims it (seed L1148-1156
/// waits until memory is freed).
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
    let dst_object = VmObject::create(&vm.machine, src.pages(), None, None);
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
        // `dst` drops with its object, and the copies with it.
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
    for va in (src.start..src.end).step_by(PAGE_SIZE as usize) {
        let src_id = source_page(src, va).ok_or(MapError::MissingPage { addr: va })?;
        let dst_id = copy_page(parent, src_id, dst_object, (va - src.start) / PAGE_SIZE)?;
        let info = PageInfo {
            pfn: pages.pfn(dst_id),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        let displaced = vm
            .retry_for_memory(
                || {
                    vm.pmap
                        .enter(&child.pmap, va, info, src.protection, Prot::NONE, false)
                },
                |e| *e == PmapError::NoMemory,
            )
            .map_err(MapError::Pmap)?;
        if let Some(d) = displaced {
            vm.note_displaced(d);
        }
        pages.activate(dst_id);
    }
    Ok(())
}

/// A copy of page `src` (dirty, valid), inserted at `pindex` of `object`
/// and on no queue yet. Memory is reclaimed for it if need be.
pub(crate) fn copy_page<P: Pmap>(
    space: &VmSpace<P>,
    src: PageId,
    object: &Arc<VmObject>,
    pindex: u64,
) -> Result<PageId, MapError> {
    let vm = &space.vm;
    let pages = &vm.machine.pages;
    let dst = vm
        .retry_for_memory(
            || {
                pages
                    .alloc(object.id().0 ^ pindex, AllocClass::Normal, false)
                    .ok_or(())
            },
            |()| true,
        )
        .map_err(|()| MapError::ResourceShortage)?;
    vm.machine.phys.copy(pages.pfn(src), pages.pfn(dst));
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
/// The entry's wiring moves from each old page to its copy.
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
        let copied = source_page(e, va)
            .ok_or(MapError::MissingPage { addr: va })
            .and_then(|src| copy_page(space, src, &object, pindex as u64));
        match copied {
            Ok(copy) => copies.push(copy),
            Err(err) => {
                object.drop_ref();
                return Err(err);
            }
        }
    }
    let record = e
        .wiring
        .get_or_insert_with(|| WireRecord::new(e.end.saturating_sub(e.start) / PAGE_SIZE));
    for ((index, va), dst) in (e.start..e.end)
        .step_by(PAGE_SIZE as usize)
        .enumerate()
        .zip(copies)
    {
        let info = PageInfo {
            pfn: pages.pfn(dst),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        // The old page is mapped here or was (it is wired), so its tables
        // exist and the replacement needs no memory.
        match vm
            .pmap
            .enter(&space.pmap, va, info, e.protection, Prot::NONE, true)
        {
            Ok(displaced) => displaced.into_iter().for_each(|d| vm.note_displaced(d)),
            Err(err) => debug_assert!(false, "replacing the wired page at {va:#x}: {err}"),
        }
        record.note(pages, index as u64, dst);
    }
    if let Some(old) = e.object.replace(object) {
        old.drop_ref();
    }
    e.offset = 0;
    e.eflags.remove(EntryFlags::COW | EntryFlags::NEEDS_COPY);
    Ok(())
}

/// The resident, valid page that `va` shows through entry `e` (seed
/// L1163-1177 for a read-only entry; a wired entry's pages are all
/// resident, wherever in its chain they are).
fn source_page(e: &MapEntry, va: u64) -> Option<PageId> {
    let mut object = e.object.clone()?;
    let mut pindex = e.pindex(va);
    loop {
        let next = {
            let st = object.lock();
            if let Some(&id) = st.pages.get(&pindex) {
                let valid = object.machine.pages.get(id).valid() == VM_PAGE_BITS_ALL;
                return valid.then_some(id);
            }
            let b = st.backing.as_ref()?;
            pindex += b.offset;
            b.object.clone()
        };
        object = next;
    }
}
