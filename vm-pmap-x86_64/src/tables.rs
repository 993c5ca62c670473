//! Raw access to page-table entries in physical memory.
//!
//! Entries are read and written as `AtomicU64`: the CPU (or the software
//! MMU) sets A and D bits concurrently with the pmap's updates, exactly as
//! on hardware, so every access is atomic.

use crate::paging::TableIndex;
use core::sync::atomic::AtomicU64;
use vm_core::{PAGE_SIZE, Pfn, PhysAddr, PhysMem};

/// The entry `idx` of the table at physical address `table`, or `None` if
/// the table is not in `phys`.
#[must_use]
pub fn entry_at(phys: &PhysMem, table: PhysAddr, idx: TableIndex) -> Option<&AtomicU64> {
    let base = phys.frame_ptr(Pfn::containing(table))?;
    let off = table.page_offset() as usize + idx.get() * 8;
    if off + 8 > PAGE_SIZE as usize {
        return None;
    }
    // SAFETY: the frame is inside physical memory, which lives as long as
    // `phys`; `off` keeps the 8 bytes inside the frame and 8-byte aligned
    // (frames are page aligned, the page offset is 0 for every table
    // this crate makes and the walker masks it). Every access to table
    // memory goes through atomics, so there is no data race.
    Some(unsafe { &*(base.as_ptr().add(off) as *const AtomicU64) })
}

/// The 512 entries of the table at physical address `table`, or `None` if
/// the frame is not in `phys`.
#[must_use]
pub fn table_at(phys: &PhysMem, table: PhysAddr) -> Option<&[AtomicU64]> {
    let base = phys.frame_ptr(Pfn::containing(table))?;
    // SAFETY: the frame is inside physical memory, which lives as long as
    // `phys`, page aligned and 4 KiB long: 512 aligned 8-byte entries.
    // Every access to table memory goes through atomics, so there is no
    // data race.
    Some(unsafe {
        core::slice::from_raw_parts(base.as_ptr() as *const AtomicU64, PAGE_SIZE as usize / 8)
    })
}
