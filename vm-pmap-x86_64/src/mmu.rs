//! A software MMU: walks the tables as an x86_64 CPU does, sets A and D
//! bits, and reports the #PF error code the CPU would push.

use crate::entry::{AVAIL_HIGH, PG_FRAME, PfErrorCode, PteFlags};
use crate::paging::{Level, PagingMode, index};
use crate::tables::entry_at;
use core::sync::atomic::Ordering;
use vm_core::PhysMem;
use vm_core::{PhysAddr, VirtAddr};

/// Kind and privilege of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// A write (else a read or fetch).
    pub write: bool,
    /// An instruction fetch.
    pub exec: bool,
    /// From user mode (CPL 3).
    pub user: bool,
}

impl Access {
    /// A user-mode read.
    pub const USER_READ: Access = Access {
        write: false,
        exec: false,
        user: true,
    };
    /// A user-mode write.
    pub const USER_WRITE: Access = Access {
        write: true,
        exec: false,
        user: true,
    };
    /// A user-mode instruction fetch.
    pub const USER_EXEC: Access = Access {
        write: false,
        exec: true,
        user: true,
    };

    fn code(self) -> PfErrorCode {
        let mut c = PfErrorCode::empty();
        c.set(PfErrorCode::WRITE, self.write);
        c.set(PfErrorCode::USER, self.user);
        c.set(PfErrorCode::INSTRUCTION, self.exec);
        c
    }
}

/// CPU settings the walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuMode {
    /// 4- or 5-level paging.
    pub paging: PagingMode,
    /// EFER.NXE: the NX bit is honoured (else it is reserved).
    pub nxe: bool,
    /// CR0.WP: supervisor writes respect read-only pages.
    pub wp: bool,
    /// Physical address width (CPUID 0x80000008 EAX bits 7:0); entry bits from
    /// here to bit 51 are reserved.
    pub maxphyaddr: u32,
}

impl Default for CpuMode {
    fn default() -> Self {
        CpuMode {
            paging: PagingMode::FourLevel,
            nxe: true,
            wp: true,
            maxphyaddr: 46,
        }
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// #PF with this error code.
    PageFault(PfErrorCode),
    /// #GP: the address is not canonical.
    NonCanonical,
    /// An entry points outside physical memory (a machine check on real
    /// hardware).
    BadPhysical(PhysAddr),
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The physical address.
    pub pa: PhysAddr,
    /// The leaf entry's value after the walk set its bits.
    pub leaf: u64,
    /// Level of the leaf: [`Level::PT`] for a 4 KiB page, [`Level::PD`]
    /// for 2 MiB, [`Level::PDPT`] for 1 GiB.
    pub level: Level,
}

fn reserved_bits(mode: &CpuMode, level: Level, e: u64) -> u64 {
    let phys_reserved = PG_FRAME & !((1u64 << mode.maxphyaddr) - 1);
    let mut r = phys_reserved;
    if !mode.nxe {
        r |= PteFlags::NO_EXECUTE.bits();
    }
    let ps = e & PteFlags::HUGE.bits() != 0;
    match level {
        Level::PML4 | Level::PML5 => r |= PteFlags::HUGE.bits(),
        // A large leaf's frame must be aligned to its size; bit 12 is PAT.
        Level::PD | Level::PDPT if ps => r |= (level.span() - 1) & !0x1fff,
        _ => {}
    }
    r & !AVAIL_HIGH
}

/// Translates `va` for `access` in the tables at `root` (CR3), as the CPU
/// would. On success sets A in every entry used and D in the leaf of a
/// write.
///
/// # Errors
///
/// [`Fault`]: the #PF error code (P, W, U, RSVD, I), a non-canonical
/// address, or an entry pointing outside `phys`.
pub fn translate(
    phys: &PhysMem,
    mode: &CpuMode,
    root: PhysAddr,
    va: VirtAddr,
    access: Access,
) -> Result<Translation, Fault> {
    if !mode.paging.is_canonical(va.0) {
        return Err(Fault::NonCanonical);
    }
    loop {
        if let Some(t) = walk(phys, mode, root, va, access)? {
            return Ok(t);
        }
        // An entry changed between its load and the A/D update: walk
        // again, as the CPU does when its locked update finds the entry
        // changed.
    }
}

/// One walk; `None` if an entry changed before its A/D bits could be set.
fn walk(
    phys: &PhysMem,
    mode: &CpuMode,
    root: PhysAddr,
    va: VirtAddr,
    access: Access,
) -> Result<Option<Translation>, Fault> {
    let mut table = PhysAddr(root.0 & PG_FRAME);
    let (mut writable, mut user, mut exec) = (true, true, true);
    let mut used = [None; 5];
    for level in mode.paging.root().down_to(Level::PT) {
        let slot = entry_at(phys, table, index(va, level)).ok_or(Fault::BadPhysical(table))?;
        let e = slot.load(Ordering::Acquire);
        if e & PteFlags::PRESENT.bits() == 0 {
            return Err(Fault::PageFault(access.code()));
        }
        if e & reserved_bits(mode, level, e) != 0 {
            return Err(Fault::PageFault(
                access.code() | PfErrorCode::PRESENT | PfErrorCode::RESERVED,
            ));
        }
        used[level.number()] = Some((slot, e));
        writable &= e & PteFlags::WRITABLE.bits() != 0;
        user &= e & PteFlags::USER.bits() != 0;
        exec &= !(mode.nxe && e & PteFlags::NO_EXECUTE.bits() != 0);
        let leaf = level == Level::PT || (level <= Level::PDPT && e & PteFlags::HUGE.bits() != 0);
        if !leaf {
            table = PhysAddr(e & PG_FRAME);
            continue;
        }
        let denied = (access.user && !user)
            || (access.write && !writable && (access.user || mode.wp))
            || (access.exec && !exec);
        if denied {
            return Err(Fault::PageFault(access.code() | PfErrorCode::PRESENT));
        }
        // As the CPU: a locked update only where a bit is still clear (a
        // walk of entries already accessed writes nothing), and only into
        // the entry as it was read, so a bit never lands in an entry the
        // pmap cleared meanwhile (a stray A in an empty slot would make a
        // non-zero "empty" table).
        let a = PteFlags::ACCESSED.bits();
        for (s, seen) in used.iter().flatten() {
            if seen & a == 0 && !set_bits(s, *seen, a) {
                return Ok(None);
            }
        }
        let d = PteFlags::DIRTY.bits();
        if access.write && e & d == 0 && !set_bits(slot, e | a, d) {
            return Ok(None);
        }
        let offset_mask = level.span() - 1;
        let frame = e & PG_FRAME & !offset_mask;
        return Ok(Some(Translation {
            pa: PhysAddr(frame | (va.0 & offset_mask)),
            leaf: slot.load(Ordering::Acquire),
            level,
        }));
    }
    unreachable!("the page table is always a leaf")
}

/// Sets `bits` in `slot` if it still holds `seen`.
fn set_bits(slot: &core::sync::atomic::AtomicU64, seen: u64, bits: u64) -> bool {
    slot.compare_exchange(seen, seen | bits, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}
