//! Paging modes: levels, shifts, indexes and canonical addresses.

use vm_core::VirtAddr;

/// 4-level (48-bit) or 5-level (LA57, 57-bit) paging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PagingMode {
    /// PML4 root: 48-bit virtual addresses.
    #[default]
    FourLevel,
    /// PML5 root: 57-bit virtual addresses (CR4.LA57).
    FiveLevel,
}

/// Entries per table (`NPTEPG`).
pub const ENTRIES: usize = 512;

/// A level of the page-table tree, counted from the leaf: [`PT`](Self::PT)
/// (4 KiB entries), [`PD`](Self::PD) (2 MiB), [`PDPT`](Self::PDPT)
/// (1 GiB), [`PML4`](Self::PML4), [`PML5`](Self::PML5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u8);

impl Level {
    /// The page table: its entries map 4 KiB pages.
    pub const PT: Level = Level(0);
    /// The page directory: 2 MiB per entry (`PDRSHIFT` 21).
    pub const PD: Level = Level(1);
    /// The page-directory-pointer table: 1 GiB per entry (`PDPSHIFT` 30).
    pub const PDPT: Level = Level(2);
    /// The 4-level root: 512 GiB per entry (`PML4SHIFT` 39).
    pub const PML4: Level = Level(3);
    /// The 5-level (LA57) root: 256 TiB per entry (`PML5SHIFT` 48).
    pub const PML5: Level = Level(4);

    /// The level's number, leaf first (0 for [`PT`](Self::PT)), to index
    /// per-level arrays.
    #[must_use]
    pub const fn number(self) -> usize {
        self.0 as usize
    }

    /// Shift of the address bits this level indexes: 12, 21, 30, 39, 48.
    #[must_use]
    pub const fn shift(self) -> u32 {
        12 + 9 * self.0 as u32
    }

    /// Bytes mapped by one entry of this level.
    #[must_use]
    pub const fn span(self) -> u64 {
        1 << self.shift()
    }

    /// The level below, `None` under the page table.
    #[must_use]
    pub const fn below(self) -> Option<Level> {
        match self.0 {
            0 => None,
            n => Some(Level(n - 1)),
        }
    }

    /// This level and those below it down to `last`, top first.
    pub fn down_to(self, last: Level) -> impl Iterator<Item = Level> {
        (last.0..=self.0).rev().map(Level)
    }
}

/// The index of an entry in a table: `0..512`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableIndex(u16);

impl TableIndex {
    /// Index `i`, or `None` past the table.
    #[must_use]
    pub const fn new(i: usize) -> Option<TableIndex> {
        if i < ENTRIES {
            Some(TableIndex(i as u16))
        } else {
            None
        }
    }

    /// The index as a number.
    #[must_use]
    pub const fn get(self) -> usize {
        self.0 as usize
    }

    /// Every index of a table, in order.
    pub fn all() -> impl Iterator<Item = TableIndex> {
        (0..ENTRIES as u16).map(TableIndex)
    }
}

impl PagingMode {
    /// Number of table levels.
    #[must_use]
    pub fn levels(self) -> usize {
        self.root().number() + 1
    }

    /// The level of the root table (CR3's).
    #[must_use]
    pub fn root(self) -> Level {
        match self {
            PagingMode::FourLevel => Level::PML4,
            PagingMode::FiveLevel => Level::PML5,
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

/// Index of `va` in a table of `level`.
#[must_use]
pub const fn index(va: VirtAddr, level: Level) -> TableIndex {
    TableIndex(((va.0 >> level.shift()) & (ENTRIES as u64 - 1)) as u16)
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
    fn indexes_spans_and_levels() {
        let va = 0x0000_7f12_3456_7000u64;
        assert_eq!(
            index(VirtAddr(va), Level::PT).get(),
            (va >> 12) as usize & 511
        );
        assert_eq!(
            index(VirtAddr(va), Level::PML4).get(),
            (va >> 39) as usize & 511
        );
        assert_eq!(Level::PD.span(), 2 << 20);
        assert_eq!(Level::PDPT.span(), 1 << 30);
        assert_eq!(Level::PML5.shift(), 48);
        assert_eq!(PagingMode::FiveLevel.levels(), 5);
        let down: Vec<_> = Level::PML4.down_to(Level::PD).collect();
        assert_eq!(down, [Level::PML4, Level::PDPT, Level::PD]);
        assert_eq!(Level::PT.below(), None);
        assert_eq!(TableIndex::new(512), None);
        assert_eq!(TableIndex::all().count(), 512);
    }
}
