//! Page-table entries bit for bit (FreeBSD `sys/amd64/include/pmap.h`).

bitflags::bitflags! {
    /// Bits of a page-table entry at any level. Hardware bits at the
    /// architecture's positions; software bits where FreeBSD's amd64 pmap
    /// keeps them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// Present (`PG_V`).
        const V = 0x001;
        /// Writable (`PG_RW`).
        const RW = 0x002;
        /// User accessible (`PG_U`).
        const U = 0x004;
        /// Write-through (`PG_NC_PWT`).
        const PWT = 0x008;
        /// Cache disable (`PG_NC_PCD`).
        const PCD = 0x010;
        /// Accessed (`PG_A`), set by the CPU.
        const A = 0x020;
        /// Dirty (`PG_M`), set by the CPU on writes to a leaf.
        const M = 0x040;
        /// Large page in a PDE/PDPTE (`PG_PS`); the same bit is the PAT bit
        /// of a 4 KiB PTE (`PG_PTE_PAT`).
        const PS = 0x080;
        /// Global (`PG_G`).
        const G = 0x100;
        /// Software bit 1 (`PG_AVAIL1`).
        const AVAIL1 = 0x200;
        /// Software bit 2: managed, i.e. tracked by pv lists (`PG_MANAGED`).
        const MANAGED = 0x400;
        /// Software bit 3: wired (`PG_W`). Modern FreeBSD's position; the
        /// seed's era used 0x200, which aliases EPT's M bit.
        const W = 0x800;
        /// PAT bit of a 2 MiB / 1 GiB entry (`PG_PDE_PAT`).
        const PDE_PAT = 0x1000;
        /// No execute (`PG_NX`), honoured with EFER.NXE.
        const NX = 1 << 63;
    }
}

impl PteFlags {
    /// PAT bit of a 4 KiB PTE (`PG_PTE_PAT`), the same bit as [`PteFlags::PS`].
    pub const PTE_PAT: PteFlags = PteFlags::PS;
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
    assert!(PteFlags::V.bits() == 1 << 0);
    assert!(PteFlags::RW.bits() == 1 << 1);
    assert!(PteFlags::U.bits() == 1 << 2);
    assert!(PteFlags::A.bits() == 1 << 5);
    assert!(PteFlags::M.bits() == 1 << 6);
    assert!(PteFlags::PS.bits() == 1 << 7);
    assert!(PteFlags::PDE_PAT.bits() == 1 << 12);
    assert!(PteFlags::NX.bits() == 1 << 63);
    assert!(PG_FRAME & PteFlags::all().bits() & !PteFlags::PDE_PAT.bits() == 0);
    assert!(PG_FRAME == ((1u64 << 52) - 1) & !0xfff);
};

bitflags::bitflags! {
    /// The page-fault error code the CPU pushes for #PF.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PfErrorCode: u64 {
        /// The fault was a protection violation (a present entry), not a
        /// missing one.
        const P = 0x1;
        /// The access was a write.
        const W = 0x2;
        /// The access came from user mode (CPL 3).
        const U = 0x4;
        /// A reserved bit was set in an entry.
        const RSVD = 0x8;
        /// The access was an instruction fetch.
        const I = 0x10;
        /// Protection-key violation.
        const PK = 0x20;
    }
}

/// One 64-bit entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Entry(pub u64);

impl Entry {
    /// Present?
    #[must_use]
    pub fn present(self) -> bool {
        self.0 & PteFlags::V.bits() != 0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sits_where_the_architecture_puts_it() {
        let expect: [(PteFlags, u64); 14] = [
            (PteFlags::V, 0x1),
            (PteFlags::RW, 0x2),
            (PteFlags::U, 0x4),
            (PteFlags::PWT, 0x8),
            (PteFlags::PCD, 0x10),
            (PteFlags::A, 0x20),
            (PteFlags::M, 0x40),
            (PteFlags::PS, 0x80),
            (PteFlags::G, 0x100),
            (PteFlags::AVAIL1, 0x200),
            (PteFlags::MANAGED, 0x400),
            (PteFlags::W, 0x800),
            (PteFlags::PDE_PAT, 0x1000),
            (PteFlags::NX, 0x8000_0000_0000_0000),
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
        assert_eq!(PfErrorCode::P.bits(), 1);
        assert_eq!(PfErrorCode::W.bits(), 2);
        assert_eq!(PfErrorCode::U.bits(), 4);
        assert_eq!(PfErrorCode::RSVD.bits(), 8);
        assert_eq!(PfErrorCode::I.bits(), 0x10);
        assert_eq!(PfErrorCode::PK.bits(), 0x20);
    }

    #[test]
    fn entries_split_into_frame_and_flags() {
        let e = Entry::new(0x1234_5000, PteFlags::V | PteFlags::RW | PteFlags::NX);
        assert_eq!(e.0, 0x8000_0000_1234_5003);
        assert_eq!(e.addr(), 0x1234_5000);
        assert_eq!(e.flags(), PteFlags::V | PteFlags::RW | PteFlags::NX);
        assert!(e.present());
    }
}
