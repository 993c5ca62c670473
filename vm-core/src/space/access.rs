//! User accesses to a space's memory: read and write bytes as a user
//! thread would, through the pmap's translation, faulting where the
//! hardware would (the seed's `vm_fault_quick` generalised to ranges).
//!
//! A read-only mapping really cannot be written here: the access asks the
//! pmap ([`Pmap::translate`]) whether the hardware would allow it, and on
//! refusal takes the fault, which reports the protection failure.

use crate::addr::{PAGE_SIZE, Pfn, VirtAddr, page_trunc};
use crate::error::FaultError;
use crate::fault::{FaultCtx, FaultFlags};
use crate::pmap::{Pmap, PmapError};
use crate::prot::Prot;
use crate::space::VmSpace;

/// How many faults one page access may take before the pmap is deemed not
/// to keep the mappings the fault handler enters.
const MAX_FAULTS_PER_PAGE: u32 = 64;

impl<P: Pmap> VmSpace<P> {
    /// Reads `buf.len()` bytes at `va`, faulting pages in as needed.
    ///
    /// # Errors
    ///
    /// The [`FaultError`] of the first page that cannot be read; bytes
    /// before it have been read into `buf`.
    pub fn read(&self, va: impl Into<VirtAddr>, buf: &mut [u8]) -> Result<(), FaultError> {
        let va = va.into().as_u64();
        let mut done = 0;
        self.each_page(va, buf.len(), Prot::READ, |pfn, off, len| {
            self.vm.phys().read(pfn, off, &mut buf[done..done + len]);
            done += len;
        })
    }

    /// Writes `data` at `va`, faulting pages in (and copying on write) as
    /// needed.
    ///
    /// # Errors
    ///
    /// The [`FaultError`] of the first page that cannot be written; bytes
    /// before it have been written.
    pub fn write(&self, va: impl Into<VirtAddr>, data: &[u8]) -> Result<(), FaultError> {
        let va = va.into().as_u64();
        let mut done = 0;
        self.each_page(va, data.len(), Prot::WRITE, |pfn, off, len| {
            self.vm.phys().write(pfn, off, &data[done..done + len]);
            done += len;
        })
    }

    /// Writes `data` at `va` the way a debugger does (`ptrace(PT_WRITE_D)`,
    /// FreeBSD `proc_rwmem` with `VM_PROT_COPY`, Linux `FOLL_FORCE`): even
    /// where the mapping is read-only, if it is private. A private mapping
    /// (copy-on-write, or anonymous memory of this mapping alone) whose
    /// maximum protection allows write gets its own copy of the page, and
    /// the bytes go into that copy and only there: never into the file or
    /// object the mapping was made from, nor into memory another space
    /// shares copy-on-write. A shared mapping is written only if it is
    /// writable now.
    ///
    /// The copy is checked under the map lock, with the page held, to be
    /// the mapping's own before a byte is written, so a concurrent page-out,
    /// `msync`, collapse or unmap and map again cannot redirect the write
    /// (the Dirty COW class, CVE-2016-5195).
    ///
    /// # Errors
    ///
    /// [`FaultError::InvalidAddress`] where nothing is mapped,
    /// [`FaultError::ProtectionFailure`] for a shared mapping that is not
    /// writable or a private one that may never be (maximum protection), or
    /// the error of the fault that could not bring the page in. Bytes
    /// before the failing page have been written.
    pub fn write_forced(&self, va: impl Into<VirtAddr>, data: &[u8]) -> Result<(), FaultError> {
        let va = va.into().as_u64();
        let end = va
            .checked_add(data.len() as u64)
            .ok_or(FaultError::InvalidAddress { addr: va })?;
        let mut at = va;
        while at < end {
            let page = page_trunc(at);
            let off = (at - page) as usize;
            let n = ((PAGE_SIZE - off as u64).min(end - at)) as usize;
            let done = (at - va) as usize;
            self.poke(page, off, &data[done..done + n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// One page of [`write_forced`](Self::write_forced).
    fn poke(&self, page: u64, off: usize, bytes: &[u8]) -> Result<(), FaultError> {
        let pages = &self.vm.machine.pages;
        for _ in 0..MAX_FAULTS_PER_PAGE {
            {
                let map = self.map.read();
                let Some(e) = map.find(page) else {
                    return Err(FaultError::InvalidAddress { addr: page });
                };
                let refused = FaultError::ProtectionFailure {
                    addr: page,
                    access: Prot::WRITE,
                    allowed: e.protection,
                };
                if !e.private_memory() {
                    if !e.protection.contains(Prot::WRITE) {
                        return Err(refused);
                    }
                    drop(map);
                    return self.write(page + off as u64, bytes);
                }
                if !e.max_protection.contains(Prot::WRITE) {
                    return Err(refused);
                }
                if let Some(own) = e.own_object() {
                    if let Some(id) = self.hold_mapped(page, Prot::READ)? {
                        if pages.get(id).object_raw() == own {
                            self.vm.phys().write(pages.pfn(id), off, bytes);
                            pages.get(id).dirty_all();
                            pages.unhold(id);
                            return Ok(());
                        }
                        pages.unhold(id);
                    }
                }
            }
            self.fault_with(page, Prot::READ, FaultCtx::copy())?;
        }
        Err(FaultError::Pmap {
            addr: page,
            error: PmapError::NotKept(VirtAddr(page)),
        })
    }

    /// Reads one byte (`fubyte`).
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    pub fn read_u8(&self, va: impl Into<VirtAddr>) -> Result<u8, FaultError> {
        let va = va.into().as_u64();
        let mut b = [0];
        self.read(va, &mut b)?;
        Ok(b[0])
    }

    /// Writes one byte (`subyte`).
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write).
    pub fn write_u8(&self, va: impl Into<VirtAddr>, v: u8) -> Result<(), FaultError> {
        let va = va.into().as_u64();
        self.write(va, &[v])
    }

    /// Calls `f(frame, offset, len)` for each page piece of `va..va+len`,
    /// with the frame held and mapped for `access` while `f` runs.
    fn each_page(
        &self,
        va: u64,
        len: usize,
        access: Prot,
        mut f: impl FnMut(Pfn, usize, usize),
    ) -> Result<(), FaultError> {
        let end = va
            .checked_add(len as u64)
            .ok_or(FaultError::InvalidAddress { addr: va })?;
        let mut at = va;
        while at < end {
            let page = page_trunc(at);
            let off = (at - page) as usize;
            let n = ((PAGE_SIZE - off as u64).min(end - at)) as usize;
            self.with_frame(page, access, |pfn| f(pfn, off, n))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Translates `page` for `access` as the hardware would, faulting until
    /// it succeeds, and runs `f` on the frame while the map is read-locked
    /// (so it cannot be unmapped or forked) and the page is held (so it
    /// cannot be paged out or reused). The mapping is checked again once the page is
    /// held (see [`hold_mapped`](Self::hold_mapped)), and a write marks the
    /// page dirty after it lands, so a write-back that raced it (`msync`
    /// cleaning the page between the check and the write) cannot lose it.
    fn with_frame(&self, page: u64, access: Prot, f: impl FnOnce(Pfn)) -> Result<(), FaultError> {
        let flags = if access.contains(Prot::WRITE) {
            FaultFlags::DIRTY
        } else {
            FaultFlags::NORMAL
        };
        let pages = &self.vm.machine.pages;
        let mut f = Some(f);
        for _ in 0..MAX_FAULTS_PER_PAGE {
            {
                let _map = self.map.read();
                if let Some(id) = self.hold_mapped(page, access)? {
                    if let Some(f) = f.take() {
                        f(pages.pfn(id));
                    }
                    if access.contains(Prot::WRITE) {
                        pages.get(id).dirty_all();
                    }
                    pages.unhold(id);
                    return Ok(());
                }
            }
            self.fault(page, access, flags)?;
        }
        Err(FaultError::Pmap {
            addr: page,
            error: PmapError::NotKept(VirtAddr(page)),
        })
    }
}
