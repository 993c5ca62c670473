//! Paging modes: levels, shifts, indexes and canonical addresses.

/// 4-level (48-bit) or 5-level (LA57, 57-bit) paging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PagingMode {
    /// PML4 root: 48-bit virtual addresses.
    #[default]
    FourLevel,
    /// PML5 root: 57-bit virtual addresses (CR4.LA57).
    FiveLevel,
}

/// Shift of the address bits each level indexes, leaf first: PTE 12,
/// PDE 21 (`PDRSHIFT`), PDPTE 30 (`PDPSHIFT`), PML4E 39 (`PML4SHIFT`),
/// PML5E 48 (`PML5SHIFT`).
pub const SHIFTS: [u32; 5] = [12, 21, 30, 39, 48];
/// Entries per table (`NPTEPG`).
pub const ENTRIES: usize = 512;

impl PagingMode {
    /// Number of table levels.
    #[must_use]
    pub fn levels(self) -> usize {
        match self {
            PagingMode::FourLevel => 4,
            PagingMode::FiveLevel => 5,
        }
    }

    /// Bits of virtual address.
    #[must_use]
    pub fn va_bits(self) -> u32 {
        match self {
            PagingMode::FourLevel => 48,
            PagingMode::FiveLevel => 57,
        }
    }

    /// Whether `va` is canonical: the bits above the top translated one
    /// copy it.
    #[must_use]
    pub fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.va_bits();
        ((va << shift) as i64 >> shift) as u64 == va
    }

    /// One past the highest user (lower-half) address.
    #[must_use]
    pub fn user_end(self) -> u64 {
        1 << (self.va_bits() - 1)
    }
}

/// Index of `va` in a table of `level` (0 = PT, 1 = PD, 2 = PDPT, 3 =
/// PML4, 4 = PML5).
#[must_use]
pub fn index(va: u64, level: usize) -> usize {
    ((va >> SHIFTS[level]) & (ENTRIES as u64 - 1)) as usize
}

/// Bytes mapped by one entry of `level`.
#[must_use]
pub fn span(level: usize) -> u64 {
    1 << SHIFTS[level]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        let m = PagingMode::FourLevel;
        assert!(m.is_canonical(0x0000_7fff_ffff_f000));
        assert!(m.is_canonical(0xffff_8000_0000_0000));
        assert!(!m.is_canonical(0x0000_8000_0000_0000));
        assert!(!m.is_canonical(0x0001_0000_0000_0000));
        let m5 = PagingMode::FiveLevel;
        assert!(m5.is_canonical(0x00ff_ffff_ffff_f000));
        assert!(!m5.is_canonical(0x0100_0000_0000_0000));
        assert_eq!(m.user_end(), 0x0000_8000_0000_0000);
        assert_eq!(m5.user_end(), 0x0100_0000_0000_0000);
    }

    #[test]
    fn indexes_and_spans() {
        let va = 0x0000_7f12_3456_7000u64;
        assert_eq!(index(va, 0), (va >> 12) as usize & 511);
        assert_eq!(index(va, 3), (va >> 39) as usize & 511);
        assert_eq!(span(1), 2 << 20);
        assert_eq!(span(2), 1 << 30);
    }
}
