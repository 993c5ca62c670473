//! Addresses, page sizes and frame numbers.

/// log2 of the page size (FreeBSD `PAGE_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;
/// Bytes in a page (FreeBSD `PAGE_SIZE`).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Pages a superpage maps: 512, a 2 MiB page of 4 KiB ones (what
/// [`Pmap::enter_superpage`](crate::Pmap::enter_superpage) maps at once).
pub const SUPERPAGE_PAGES: u64 = 512;
/// Mask of the offset within a page (FreeBSD `PAGE_MASK`).
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// Defines an address newtype: arithmetic with byte counts, alignment, and
/// formatting in hex; never arithmetic with the other kind of address.
macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The address `addr`.
            #[must_use]
            pub const fn new(addr: u64) -> $name {
                $name(addr)
            }

            /// The address as a number.
            #[must_use]
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// Whether the address is page aligned.
            #[must_use]
            pub const fn is_page_aligned(self) -> bool {
                self.0 & PAGE_MASK == 0
            }

            /// The start of the page holding the address (`trunc_page`).
            #[must_use]
            pub const fn page_trunc(self) -> $name {
                $name(self.0 & !PAGE_MASK)
            }

            /// The offset of the address inside its page.
            #[must_use]
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_MASK
            }

            /// The address `bytes` further, or `None` past the end of the
            /// address space.
            #[must_use]
            pub const fn checked_add(self, bytes: u64) -> Option<$name> {
                match self.0.checked_add(bytes) {
                    Some(a) => Some($name(a)),
                    None => None,
                }
            }
        }

        impl From<u64> for $name {
            fn from(addr: u64) -> $name {
                $name(addr)
            }
        }

        impl core::ops::Add<u64> for $name {
            type Output = $name;
            /// # Panics
            ///
            /// On overflow in debug builds, as integer addition.
            fn add(self, bytes: u64) -> $name {
                $name(self.0 + bytes)
            }
        }

        impl core::ops::Sub<u64> for $name {
            type Output = $name;
            fn sub(self, bytes: u64) -> $name {
                $name(self.0 - bytes)
            }
        }

        /// The distance in bytes between two addresses of the same kind.
        impl core::ops::Sub<$name> for $name {
            type Output = u64;
            fn sub(self, other: $name) -> u64 {
                self.0 - other.0
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl core::fmt::LowerHex for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(
    /// A virtual address in an address space. A `u64` converts into it
    /// (`VirtAddr::from`, or `.into()`), so the entry points that take
    /// `impl Into<VirtAddr>` also take plain numbers; it never converts to
    /// or from a [`PhysAddr`].
    VirtAddr,
    "VirtAddr"
);

address!(
    /// A physical address in the machine's memory (or a device's).
    PhysAddr,
    "PhysAddr"
);

/// The virtual range `start..end`, as the pmap takes it.
#[must_use]
pub(crate) const fn va_range(start: u64, end: u64) -> core::ops::Range<VirtAddr> {
    VirtAddr(start)..VirtAddr(end)
}

/// A physical frame number: a physical address shifted right by
/// [`PAGE_SHIFT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The physical address of the frame's first byte.
    #[must_use]
    pub const fn phys_addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }

    /// The frame that holds physical address `pa`.
    #[must_use]
    pub const fn containing(pa: PhysAddr) -> Pfn {
        Pfn(pa.0 >> PAGE_SHIFT)
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
