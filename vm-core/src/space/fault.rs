//! The fault entry point of a space: [`VmSpace::fault`] hands its machine,
//! map and pmap space to the fault layer ([`crate::fault`]) and counts the
//! result.

use super::VmSpace;
use crate::addr::VirtAddr;
use crate::error::FaultError;
use crate::fault::{FaultCtx, FaultFlags, FaultOutcome, FaultTarget};
use crate::pmap::Pmap;
use crate::prot::Prot;

impl<P: Pmap> VmSpace<P> {
    /// Resolves a fault at `va` for `access` (seed `vm_fault`).
    ///
    /// `va` need not be page aligned. `flags` says whether the fault wires
    /// the page and whether the access dirties it; a trap handler passes
    /// [`FaultFlags::DIRTY`] with write faults. `va` is a [`VirtAddr`] or
    /// a plain `u64`.
    ///
    /// ```
    /// use vm_core::{FaultFlags, FaultKind, Prot, Signal};
    /// let (_vm, space) = vm_testkit::machine(16);
    /// space.map_anon(0x10_0000, 0x1000, Prot::RW)?;
    /// // A write to untouched anonymous memory: a zero-filled page, mapped
    /// // writable.
    /// let out = space.fault(0x10_0123, Prot::WRITE, FaultFlags::DIRTY)?;
    /// assert_eq!((out.kind, out.prot), (FaultKind::ZeroFill, Prot::RW));
    /// // Nothing mapped there: the error says so, and which signal it is.
    /// let err = space.fault(0x20_0000, Prot::READ, FaultFlags::NORMAL).unwrap_err();
    /// assert!(matches!(err.signal(), Signal::Segv(_)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`FaultError`] with the facts of why the fault cannot be resolved;
    /// [`FaultError::signal`] names the signal a kernel would send. Nothing
    /// stays busy, locked or allocated after an error.
    pub fn fault(
        &self,
        va: impl Into<VirtAddr>,
        access: Prot,
        flags: FaultFlags,
    ) -> Result<FaultOutcome, FaultError> {
        self.fault_with(va.into().as_u64(), access, FaultCtx::public(flags))
    }

    /// [`fault`](Self::fault) with what the core asks besides the flags;
    /// counts the fault as major or minor for this space.
    pub(crate) fn fault_with(
        &self,
        va: u64,
        access: Prot,
        ctx: FaultCtx,
    ) -> Result<FaultOutcome, FaultError> {
        let out = self.fault_target().resolve(va, access, ctx)?;
        let count = if out.major {
            &self.majflt
        } else {
            &self.minflt
        };
        count.add(1);
        Ok(out)
    }

    /// What the fault layer works on: this space's machine, map and pmap
    /// space.
    pub(crate) fn fault_target(&self) -> FaultTarget<'_, P> {
        FaultTarget {
            vm: &self.vm,
            map: &self.map,
            pmap: &self.pmap,
        }
    }
}
