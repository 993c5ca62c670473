//! Memory (cache) types of mappings: vocabulary shared by the pmap, the
//! pagers that name device memory, and the page records of fictitious
//! pages.

/// Memory (cache) type of a mapping, as the x86 PAT names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MemAttr {
    /// Write-back: ordinary RAM.
    #[default]
    WriteBack,
    /// Write-through.
    WriteThrough,
    /// Uncacheable, overridable by MTRRs (UC-).
    UncachedMinus,
    /// Uncacheable (UC).
    Uncacheable,
    /// Write-protected.
    WriteProtected,
    /// Write-combining: frame buffers.
    WriteCombining,
}

impl MemAttr {
    /// A small number for the attribute (its PAT slot as FreeBSD programs
    /// the PAT).
    #[must_use]
    pub fn index(self) -> u8 {
        match self {
            MemAttr::WriteBack => 0,
            MemAttr::WriteThrough => 1,
            MemAttr::UncachedMinus => 2,
            MemAttr::Uncacheable => 3,
            MemAttr::WriteProtected => 5,
            MemAttr::WriteCombining => 6,
        }
    }

    /// The attribute of [`index`](Self::index); unknown numbers are
    /// uncacheable, the safe choice for device memory.
    #[must_use]
    pub fn from_index(i: u8) -> MemAttr {
        match i {
            0 => MemAttr::WriteBack,
            1 => MemAttr::WriteThrough,
            2 => MemAttr::UncachedMinus,
            5 => MemAttr::WriteProtected,
            6 => MemAttr::WriteCombining,
            _ => MemAttr::Uncacheable,
        }
    }
}
