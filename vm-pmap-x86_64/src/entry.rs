//! Page-table entries bit for bit (FreeBSD `sys/amd64/include/pmap.h`).

bitflags::bitflags! {
    /// Bits of a page-table entry at any level. Hardware bits at the
    /// architecture's positions; software bits where FreeBSD's amd64 pmap
    /// keeps them. Names say what a bit means; FreeBSD's `PG_*` name is in
    /// each one's docs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// Present (`PG_V`).
        const PRESENT = 0x001;
        /// Writable (`PG_RW`).
        const WRITABLE = 0x002;
        /// User accessible (`PG_U`).
        const USER = 0x004;
        /// Write-through (`PG_NC_PWT`).
        const WRITE_THROUGH = 0x008;
        /// Cache disable (`PG_NC_PCD`).
        const NO_CACHE = 0x010;
        /// Accessed (`PG_A`), set by the CPU.
        const ACCESSED = 0x020;
        /// Dirty (`PG_M`), set by the CPU on writes to a leaf.
        const DIRTY = 0x040;
        /// Large page in a PDE/PDPTE (`PG_PS`); the same bit is the PAT bit
        /// of a 4 KiB PTE (`PG_PTE_PAT`).
        const HUGE = 0x080;
        /// Global (`PG_G`).
        const GLOBAL = 0x100;
        /// Software bit 1 (`PG_AVAIL1`).
        const AVAIL1 = 0x200;
        /// Software bit 2: managed, i.e. tracked by pv lists (`PG_MANAGED`).
        const MANAGED = 0x400;
        /// Software bit 3: wired (`PG_W`). Modern FreeBSD's position; the
        /// seed's era used 0x200, which aliases EPT's M bit.
        const WIRED = 0x800;
        /// PAT bit of a 2 MiB / 1 GiB entry (`PG_PDE_PAT`).
        const PDE_PAT = 0x1000;
        /// No execute (`PG_NX`), honoured with EFER.NXE.
        const NO_EXECUTE = 1 << 63;
    }
}

impl PteFlags {
    /// PAT bit of a 4 KiB PTE (`PG_PTE_PAT`), the same bit as [`PteFlags::HUGE`].
    pub const PTE_PAT: PteFlags = PteFlags::HUGE;
}

/// Physical frame bits of an entry (`PG_FRAME`).
pub const PG_FRAME: u64 = 0x000f_ffff_ffff_f000;
/// Frame bits of a 2 MiB entry (`PG_PS_FRAME`).
pub const PG_PS_FRAME: u64 = 0x000f_ffff_ffe0_0000;
/// Frame bits of a 1 GiB entry (`PG_PS_PDP_FRAME`).
pub const PG_PS_PDP_FRAME: u64 = 0x000f_ffff_c000_0000;
/// Bits 52-62: available to software, except that the CPU reserves none of
/// them; bits between the frame and 52 beyond MAXPHYADDR are reserved.
pub const AVAIL_HIGH: u64 = 0x7ff0_0000_0000_0000;

const _: () = {
    assert!(PteFlags::PRESENT.bits() == 1 << 0);
    assert!(PteFlags::WRITABLE.bits() == 1 << 1);
    assert!(PteFlags::USER.bits() == 1 << 2);
    assert!(PteFlags::ACCESSED.bits() == 1 << 5);
    assert!(PteFlags::DIRTY.bits() == 1 << 6);
    assert!(PteFlags::HUGE.bits() == 1 << 7);
    assert!(PteFlags::PDE_PAT.bits() == 1 << 12);
    assert!(PteFlags::NO_EXECUTE.bits() == 1 << 63);
    assert!(PG_FRAME & PteFlags::all().bits() & !PteFlags::PDE_PAT.bits() == 0);
    assert!(PG_FRAME == ((1u64 << 52) - 1) & !0xfff);
};

bitflags::bitflags! {
    /// The page-fault error code the CPU pushes for #PF (Intel SDM names:
    /// P, W/R, U/S, RSVD, I/D, PK).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PfErrorCode: u64 {
        /// The fault was a protection violation (a present entry), not a
        /// missing one.
        const PRESENT = 0x1;
        /// The access was a write.
        const WRITE = 0x2;
        /// The access came from user mode (CPL 3).
        const USER = 0x4;
        /// A reserved bit was set in an entry.
        const RESERVED = 0x8;
        /// The access was an instruction fetch.
        const INSTRUCTION = 0x10;
        /// Protection-key violation.
        const PROTECTION_KEY = 0x20;
    }
}

/// One 64-bit entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Entry(pub u64);

impl Entry {
    /// Present?
    #[must_use]
    pub fn present(self) -> bool {
        self.0 & PteFlags::PRESENT.bits() != 0
    }

    /// The flag bits (frame bits masked off).
    #[must_use]
    pub fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0 & !PG_FRAME)
    }

    /// The physical address the entry points at (4 KiB granularity).
    #[must_use]
    pub fn addr(self) -> u64 {
        self.0 & PG_FRAME
    }

    /// Builds an entry from a physical address and flags.
    #[must_use]
    pub fn new(pa: u64, flags: PteFlags) -> Entry {
        Entry((pa & PG_FRAME) | flags.bits())
    }
}

/// Bits that only the CPU changes on its own: a difference there alone
/// needs no update (FreeBSD `pmap_enter`).
pub(crate) const HW_BITS: u64 = PteFlags::ACCESSED.bits() | PteFlags::DIRTY.bits();

/// A page-table entry in memory, which a CPU may change under the pmap's
/// lock (setting A and M). The pmap's own cells are atomics in physical
/// memory; the loom model check supplies its own.
pub(crate) trait EntryCell {
    /// Replaces `old` by `new` if the entry still holds `old`; the value
    /// found otherwise.
    fn compare_exchange(&self, old: u64, new: u64) -> Result<u64, u64>;
}

impl EntryCell for core::sync::atomic::AtomicU64 {
    fn compare_exchange(&self, old: u64, new: u64) -> Result<u64, u64> {
        core::sync::atomic::AtomicU64::compare_exchange(
            self,
            old,
            new,
            core::sync::atomic::Ordering::AcqRel,
            core::sync::atomic::Ordering::Acquire,
        )
    }
}

/// `pmap_enter` on an entry that already maps the frame of `new`: a change
/// of protection or wiring. What the CPU set (A, M) is kept unless write
/// permission goes, when the caller must carry M to the page from the
/// returned old value. Done by compare-and-swap from `old` (the entry as
/// last read), so an A or M a CPU sets meanwhile is never lost. Returns
/// `(old entry, new entry)`, or `None` if only A/M differ (nothing to do).
pub(crate) fn update_same_frame<C: EntryCell>(
    slot: &C,
    mut old: u64,
    new: u64,
) -> Option<(u64, u64)> {
    loop {
        let keep = if new & PteFlags::WRITABLE.bits() != 0 {
            old & HW_BITS
        } else {
            old & PteFlags::ACCESSED.bits()
        };
        let updated = new | keep;
        if (updated ^ old) & !HW_BITS == 0 {
            return None;
        }
        match slot.compare_exchange(old, updated) {
            Ok(prev) => return Some((prev, updated)),
            // Only a CPU changes the entry without the lock, and only A
            // and M: recompute from what it left.
            Err(now) => old = now,
        }
    }
}

/// The entry update checked under loom against a CPU setting A and M
/// (`RUSTFLAGS="--cfg loom" cargo test -p vm-pmap-x86_64 --lib --release
/// loom`).
#[cfg(all(loom, test))]
mod loom_checks {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, Ordering};

    impl EntryCell for AtomicU64 {
        fn compare_exchange(&self, old: u64, new: u64) -> Result<u64, u64> {
            AtomicU64::compare_exchange(self, old, new, Ordering::AcqRel, Ordering::Acquire)
        }
    }

    const FRAME: u64 = 0x5000;
    const V_RW_U: u64 =
        PteFlags::PRESENT.bits() | PteFlags::WRITABLE.bits() | PteFlags::USER.bits();

    /// A CPU writes through the mapping (sets A and M) while the pmap
    /// changes the entry's wiring (`keep_write`) or takes write away: the
    /// M bit ends in the entry, or in the old value handed to the caller.
    fn race(new: u64) {
        loom::model(move || {
            let slot = Arc::new(AtomicU64::new(FRAME | V_RW_U | PteFlags::ACCESSED.bits()));
            let cpu = {
                let slot = slot.clone();
                loom::thread::spawn(move || {
                    slot.fetch_or(PteFlags::DIRTY.bits(), Ordering::AcqRel);
                })
            };
            let old = slot.load(Ordering::Acquire);
            let result = update_same_frame(&*slot, old, new);
            cpu.join().unwrap();
            let now = slot.load(Ordering::Acquire);
            let carried = result.is_some_and(|(prev, _)| prev & PteFlags::DIRTY.bits() != 0);
            assert!(
                now & PteFlags::DIRTY.bits() != 0 || carried,
                "the CPU's M bit was lost: now {now:#x}, update {result:x?}"
            );
            if let Some((_, updated)) = result {
                assert_eq!(now & !HW_BITS, updated & !HW_BITS, "the update stuck");
            }
        });
    }

    #[test]
    fn loom_a_wiring_change_keeps_the_cpu_dirty_bit() {
        race(FRAME | V_RW_U | PteFlags::WIRED.bits());
    }

    #[test]
    fn loom_taking_write_away_hands_over_the_dirty_bit() {
        race(FRAME | PteFlags::PRESENT.bits() | PteFlags::USER.bits());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sits_where_the_architecture_puts_it() {
        let expect: [(PteFlags, u64); 14] = [
            (PteFlags::PRESENT, 0x1),
            (PteFlags::WRITABLE, 0x2),
            (PteFlags::USER, 0x4),
            (PteFlags::WRITE_THROUGH, 0x8),
            (PteFlags::NO_CACHE, 0x10),
            (PteFlags::ACCESSED, 0x20),
            (PteFlags::DIRTY, 0x40),
            (PteFlags::HUGE, 0x80),
            (PteFlags::GLOBAL, 0x100),
            (PteFlags::AVAIL1, 0x200),
            (PteFlags::MANAGED, 0x400),
            (PteFlags::WIRED, 0x800),
            (PteFlags::PDE_PAT, 0x1000),
            (PteFlags::NO_EXECUTE, 0x8000_0000_0000_0000),
        ];
        for (f, v) in expect {
            assert_eq!(f.bits(), v, "{f:?}");
        }
        assert_eq!(PteFlags::PTE_PAT.bits(), 0x80);
        assert_eq!(PG_FRAME, 0x000f_ffff_ffff_f000);
        assert_eq!(PG_PS_FRAME, 0x000f_ffff_ffe0_0000);
        assert_eq!(PG_PS_PDP_FRAME, 0x000f_ffff_c000_0000);
    }

    #[test]
    fn error_code_bits() {
        assert_eq!(PfErrorCode::PRESENT.bits(), 1);
        assert_eq!(PfErrorCode::WRITE.bits(), 2);
        assert_eq!(PfErrorCode::USER.bits(), 4);
        assert_eq!(PfErrorCode::RESERVED.bits(), 8);
        assert_eq!(PfErrorCode::INSTRUCTION.bits(), 0x10);
        assert_eq!(PfErrorCode::PROTECTION_KEY.bits(), 0x20);
    }

    #[test]
    fn entries_split_into_frame_and_flags() {
        let e = Entry::new(
            0x1234_5000,
            PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE,
        );
        assert_eq!(e.0, 0x8000_0000_1234_5003);
        assert_eq!(e.addr(), 0x1234_5000);
        assert_eq!(
            e.flags(),
            PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE
        );
        assert!(e.present());
    }
}
