//! Cache attributes: memory type → PAT/PCD/PWT bits (FreeBSD
//! `pmap_cache_bits`), for the PAT as FreeBSD programs it: slots 0..7 =
//! WB, WT, UC-, UC, WB, WP, WC, UC.

use crate::entry::PteFlags;
use vm_core::MemAttr;

/// The PAT slot FreeBSD uses for a memory type (FreeBSD programs the PAT
/// as WB, WT, UC-, UC, WB, WP, WC, UC, which is the numbering of
/// [`MemAttr::index`]).
#[must_use]
pub fn pat_index(attr: MemAttr) -> u8 {
    attr.index()
}

/// Entry bits selecting `attr`: index bit 0 → PWT, bit 1 → PCD, bit 2 →
/// PAT (0x80 in a 4 KiB PTE, 0x1000 in a large entry).
#[must_use]
pub fn cache_bits(attr: MemAttr, large: bool) -> PteFlags {
    let i = pat_index(attr);
    let mut f = PteFlags::empty();
    if i & 1 != 0 {
        f |= PteFlags::WRITE_THROUGH;
    }
    if i & 2 != 0 {
        f |= PteFlags::NO_CACHE;
    }
    if i & 4 != 0 {
        f |= if large {
            PteFlags::PDE_PAT
        } else {
            PteFlags::PTE_PAT
        };
    }
    f
}

/// The cache bits an entry may carry.
pub(crate) const CACHE_MASK: PteFlags = PteFlags::WRITE_THROUGH
    .union(PteFlags::NO_CACHE)
    .union(PteFlags::PTE_PAT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_follow_freebsd_pat_layout() {
        assert_eq!(cache_bits(MemAttr::WriteBack, false), PteFlags::empty());
        assert_eq!(
            cache_bits(MemAttr::WriteThrough, false),
            PteFlags::WRITE_THROUGH
        );
        assert_eq!(
            cache_bits(MemAttr::UncachedMinus, false),
            PteFlags::NO_CACHE
        );
        assert_eq!(
            cache_bits(MemAttr::Uncacheable, false),
            PteFlags::WRITE_THROUGH | PteFlags::NO_CACHE
        );
        assert_eq!(
            cache_bits(MemAttr::WriteProtected, false),
            PteFlags::PTE_PAT | PteFlags::WRITE_THROUGH
        );
        assert_eq!(
            cache_bits(MemAttr::WriteCombining, false),
            PteFlags::PTE_PAT | PteFlags::NO_CACHE
        );
        assert_eq!(
            cache_bits(MemAttr::WriteCombining, true),
            PteFlags::PDE_PAT | PteFlags::NO_CACHE
        );
        assert_eq!(cache_bits(MemAttr::WriteCombining, false).bits(), 0x90);
    }
}
