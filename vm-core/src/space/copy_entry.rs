//! Copying a wired entry page by page: into a forked child (seed
//! `vm_fault_copy_entry`, L1088-1200), and in place when a user-wired
//! copy-on-write entry gains write access (modern FreeBSD's use of the same
//! function from `vm_map_protect`).

use crate::addr::{PAGE_SIZE, VirtAddr, va_range};
use crate::error::MapError;
use crate::map::WireRecord;
use crate::map::{EntryFlags, MapEntry};
use crate::object::VmObject;
use crate::page::{PageFlags, PageId, VM_PAGE_BITS_ALL};
use crate::page_queues::AllocClass;
use crate::pmap::Mapping;
use crate::pmap::{MemAttr, PageInfo, Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::sync::Arc;

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
        vm.pmap
            .remove(&child.pmap, va_range(src.start, src.end), &mut |_| {});
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
    let Some(first) = src.object.clone() else {
        return Ok(());
    };
    for va in (src.start..src.end).step_by(PAGE_SIZE as usize) {
        let src_id = match shown_page(&first, src.pindex(va)) {
            Shown::Own(id) | Shown::Below(id) => Some(id),
            // Past the end of a truncated file: nothing to copy, as the
            // parent's access there faults.
            Shown::Beyond => continue,
            // Lost to a truncation and not faulted back because nothing
            // may access the entry (`PROT_NONE`): nothing to copy either.
            Shown::Missing if src.protection.is_empty() => continue,
            Shown::Missing => None,
        }
        .ok_or(MapError::MissingPage { addr: va })?;
        let dst_id = copy_page(parent, src_id, dst_object, (va - src.start) / PAGE_SIZE)?;
        if !src.protection.intersects(Prot::READ | Prot::EXECUTE) {
            // Nothing may touch it: leave it unmapped (a present entry
            // would be readable on a machine like x86).
            pages.activate(dst_id);
            continue;
        }
        let info = PageInfo {
            pfn: pages.pfn(dst_id),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        let displaced = vm
            .retry_for_memory(
                || {
                    vm.pmap.enter(
                        &child.pmap,
                        VirtAddr(va),
                        Mapping::new(info, src.protection).access(Prot::NONE),
                    )
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
/// page it showed (modern FreeBSD's `vm_fault_copy_entry(map, map, entry,
/// entry)` from `vm_map_protect`): without it the first write would copy a
/// page the wiring does not hold. Unlike FreeBSD, pages already in the
/// entry's own object stay where they are — they are the entry's own, and a
/// hold on one must go on seeing the mapping — and only the pages it shows
/// from below are copied up into that object. The entry's wiring moves from
/// each old page to its copy. A page past the end of its object (a
/// truncated file) has nothing to copy and is left.
///
/// # Errors
///
/// [`MapError::ResourceShortage`] if no memory can be had; the pages copied
/// up to then stay (each is the entry's private copy of what it showed).
pub(crate) fn upgrade_wired_entry<P: Pmap>(
    space: &VmSpace<P>,
    e: &mut MapEntry,
) -> Result<(), MapError> {
    let vm = &space.vm;
    let pages = &vm.machine.pages;
    if e.eflags.contains(EntryFlags::NEEDS_COPY) {
        e.shadow(&vm.machine);
    } else if e.object.is_none() {
        e.allocate_object(&vm.machine);
    }
    let Some(first) = e.object.clone() else {
        return Ok(());
    };
    let entry_pages = e.pages();
    let record = e.wiring.get_or_insert_with(|| WireRecord::new(entry_pages));
    let base = e.offset / PAGE_SIZE;
    for index in 0..entry_pages {
        let va = e.start + index * PAGE_SIZE;
        let src = match shown_page(&first, base + index) {
            Shown::Own(_) | Shown::Beyond => continue,
            // Lost to a truncation and not faulted back (the entry allowed
            // no access before this change): the entry's first write
            // there copies what the object holds then, as for any page it
            // has not copied.
            Shown::Missing => continue,
            Shown::Below(id) => id,
        };
        let dst = copy_page(space, src, &first, base + index)?;
        let info = PageInfo {
            pfn: pages.pfn(dst),
            managed: true,
            attr: MemAttr::WriteBack,
        };
        // The old page is mapped here or was (it is wired), so the tables
        // exist and the replacement needs no memory.
        match vm.pmap.enter(
            &space.pmap,
            VirtAddr(va),
            Mapping::new(info, e.protection)
                .access(Prot::NONE)
                .wired(true),
        ) {
            Ok(displaced) => displaced.into_iter().for_each(|d| vm.note_displaced(d)),
            Err(err) => debug_assert!(false, "replacing the wired page at {va:#x}: {err}"),
        }
        record.note(pages, index, dst);
    }
    Ok(())
}

/// Faults back, as their owner would, the pages wired entries of
/// `start..end` show but no longer have resident: a file truncated under a
/// wired mapping and grown again (truncation frees the wired pages; the
/// wire record keeps them until unwired). Copying such an entry (fork, or
/// a wired copy-on-write entry gaining write) needs every page, and must
/// not read them under the map's write lock. Best effort, before that lock
/// is taken, with an access the entry allows (none for `PROT_NONE`, whose
/// copy leaves such a page out): a page of an accessible entry still
/// missing then (a truncation racing the fork) is fork's
/// [`MapError::MissingPage`]; a wired entry gaining write leaves it to its
/// first write fault.
///
/// `copied` picks the wired entries the caller will copy.
pub(crate) fn refault_missing_wired<P: Pmap>(
    space: &VmSpace<P>,
    start: u64,
    end: u64,
    copied: impl Fn(&MapEntry) -> bool,
) {
    let missing: alloc::vec::Vec<(u64, Prot)> = {
        let g = space.map.read();
        g.entries
            .range(..end)
            .map(|(_, e)| e)
            .filter(|e| e.end > start && e.wired_count != 0 && copied(e))
            .flat_map(|e| {
                let first = e.object.clone();
                // A fault needs an access the entry allows now; a
                // `PROT_NONE` entry's missing pages are left to the copy.
                let access = [Prot::READ, Prot::WRITE, Prot::EXECUTE]
                    .into_iter()
                    .find(|&a| e.protection.contains(a));
                (e.start.max(start)..e.end.min(end))
                    .step_by(PAGE_SIZE as usize)
                    .filter(move |&va| {
                        first
                            .as_ref()
                            .is_some_and(|o| matches!(shown_page(o, e.pindex(va)), Shown::Missing))
                    })
                    .filter_map(move |va| Some((va, access?)))
            })
            .collect()
    };
    for (va, access) in missing {
        // A fault on a wired entry moves the wiring to the page it maps.
        let _ = space.fault(va, access, crate::fault::FaultFlags::NORMAL);
    }
}

/// Where the page an entry shows at `pindex` of its first object is.
enum Shown {
    /// In the first object itself.
    Own(PageId),
    /// Resident and valid further down the chain.
    Below(PageId),
    /// Past the end of the object where the chain ends: none.
    Beyond,
    /// Within it but not resident (not possible for a wired entry).
    Missing,
}

fn shown_page(first: &Arc<VmObject>, pindex: u64) -> Shown {
    let mut object = first.clone();
    let mut pindex = pindex;
    loop {
        let next = {
            let st = object.lock();
            if let Some(&id) = st.pages.get(&pindex) {
                let valid = object.machine.pages.get(id).valid() == VM_PAGE_BITS_ALL;
                return match (Arc::ptr_eq(&object, first), valid) {
                    (true, true) => Shown::Own(id),
                    (false, true) => Shown::Below(id),
                    (_, false) => Shown::Missing,
                };
            }
            match st.backing.as_ref() {
                Some(b) => {
                    pindex += b.offset;
                    b.object.clone()
                }
                None if pindex >= st.size => return Shown::Beyond,
                None => return Shown::Missing,
            }
        };
        object = next;
    }
}
