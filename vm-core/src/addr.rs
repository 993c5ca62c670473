//! Addresses, page sizes and frame numbers.

/// log2 of the page size (FreeBSD `PAGE_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;
/// Bytes in a page (FreeBSD `PAGE_SIZE`).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset within a page (FreeBSD `PAGE_MASK`).
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// A physical frame number: a physical address shifted right by
/// [`PAGE_SHIFT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The physical address of the frame's first byte.
    #[must_use]
    pub const fn phys_addr(self) -> u64 {
        self.0 << PAGE_SHIFT
    }

    /// The frame that holds physical address `pa`.
    #[must_use]
    pub const fn containing(pa: u64) -> Pfn {
        Pfn(pa >> PAGE_SHIFT)
    }
}

impl core::fmt::Display for Pfn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

/// Rounds `addr` down to a page boundary (FreeBSD `trunc_page`).
#[must_use]
pub const fn page_trunc(addr: u64) -> u64 {
    addr & !PAGE_MASK
}

/// Rounds `addr` up to a page boundary (FreeBSD `round_page`), or `None` if
/// that overflows.
#[must_use]
pub const fn page_round_up(addr: u64) -> Option<u64> {
    match addr.checked_add(PAGE_MASK) {
        Some(a) => Some(a & !PAGE_MASK),
        None => None,
    }
}

/// Whether `addr` is page aligned.
#[must_use]
pub const fn is_page_aligned(addr: u64) -> bool {
    addr & PAGE_MASK == 0
}

/// Number of pages in `len` bytes (`len` must be page aligned).
#[must_use]
pub const fn pages(len: u64) -> u64 {
    len >> PAGE_SHIFT
}
