//! Protection bits (FreeBSD `vm_prot_t`).

bitflags::bitflags! {
    /// Access rights of a mapping, or the kind of access a fault asks for.
    ///
    /// The values are FreeBSD's `VM_PROT_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Prot: u8 {
        /// `VM_PROT_READ`.
        const READ = 0x1;
        /// `VM_PROT_WRITE`.
        const WRITE = 0x2;
        /// `VM_PROT_EXECUTE`.
        const EXECUTE = 0x4;
    }
}

impl Prot {
    /// `VM_PROT_NONE`.
    pub const NONE: Prot = Prot::empty();
    /// `VM_PROT_ALL`.
    pub const ALL: Prot = Prot::all();
    /// Read and write.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);
}

impl core::fmt::Display for Prot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let c = |p: Prot, ch: char| if self.contains(p) { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(Prot::READ, 'r'),
            c(Prot::WRITE, 'w'),
            c(Prot::EXECUTE, 'x')
        )
    }
}
