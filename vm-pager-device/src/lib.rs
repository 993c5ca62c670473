//! # vm-pager-device
//!
//! FreeBSD's device pager for `vm-core`. A driver says, through
//! [`DeviceMmap`] (the seed era's `d_mmap`), which physical address and
//! memory type each page offset of its device has; faults on the mapping
//! then map *fictitious* pages for those addresses: unmanaged (no pv
//! entries, never paged out), one page per fault (no clustering), and
//! never written back.
//!
//! ```
//! use std::sync::Arc;
//! use vm_core::{MapRequest, MemAttr, PhysAddr, Prot, Vm, VmConfig};
//! use vm_pager_device::{DeviceMmap, DevicePager};
//!
//! /// A 64 KiB frame buffer at physical 0xfd00_0000.
//! struct FrameBuffer;
//! impl DeviceMmap for FrameBuffer {
//!     fn mmap(&self, offset: u64, _prot: Prot) -> Option<(PhysAddr, MemAttr)> {
//!         (offset < 0x1_0000).then(|| (PhysAddr(0xfd00_0000 + offset), MemAttr::WriteCombining))
//!     }
//! }
//!
//! let vm = Vm::new(vm_testkit::RefPmap::new(), VmConfig::with_memory(1 << 20)).unwrap();
//! let dev = DevicePager::object(&vm, FrameBuffer, 16);
//! let space = vm.new_space().unwrap();
//! space.map(MapRequest::object(0x4000_0000, 0x1_0000, dev, 0, Prot::RW)).unwrap();
//! let out = space.fault(0x4000_3000, Prot::WRITE, vm_core::FaultFlags::DIRTY).unwrap();
//! assert_eq!(out.pfn.phys_addr(), PhysAddr(0xfd00_3000));
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

use alloc::sync::Arc;
use vm_core::{
    Contiguity, MemAttr, PAGE_SIZE, PageSlot, Pager, PagerError, PagerKind, PhysAddr, Pmap, Prot,
    Vm, VmObject,
};

/// A driver's answer to "where is page `offset` of the device": the
/// physical address and memory type to map, or `None` past the device
/// (FreeBSD `d_mmap`).
pub trait DeviceMmap: Send + Sync {
    /// The physical address (page aligned) and memory type of byte
    /// `offset` (page aligned) of the device for an access of `prot`, or
    /// `None` if the device has nothing there.
    fn mmap(&self, offset: u64, prot: Prot) -> Option<(PhysAddr, MemAttr)>;
}

/// The device pager. See the [crate docs](crate).
pub struct DevicePager<D: DeviceMmap> {
    dev: D,
}

impl<D: DeviceMmap + 'static> DevicePager<D> {
    /// A pager over `dev`.
    pub fn new(dev: D) -> Self {
        DevicePager { dev }
    }

    /// A device object of `pages` pages on `vm`.
    pub fn object<P: Pmap>(vm: &Vm<P>, dev: D, pages: u64) -> Arc<VmObject> {
        vm.new_object(pages, Arc::new(DevicePager::new(dev)))
    }

    /// The driver.
    pub fn device(&self) -> &D {
        &self.dev
    }
}

impl<D: DeviceMmap + 'static> Pager for DevicePager<D> {
    fn kind(&self) -> PagerKind {
        PagerKind::DEVICE
    }

    fn has_page(&self, _pindex: u64) -> Option<Contiguity> {
        // Every page of a device object comes from the device: a hole the
        // driver does not map is an error at get_pages (SIGBUS), never a
        // zero-filled page of RAM in the middle of device memory.
        Some(Contiguity::default())
    }

    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        // One page only: the fault path never clusters device objects.
        let slot = pages.get_mut(reqpage).ok_or(PagerError::Bad)?;
        let offset = slot
            .pindex()
            .checked_mul(PAGE_SIZE)
            .ok_or(PagerError::Bad)?;
        let (pa, attr) = self.dev.mmap(offset, Prot::READ).ok_or(PagerError::Bad)?;
        if !pa.is_page_aligned() {
            // A driver handing out a misaligned address is broken.
            return Err(PagerError::Bad);
        }
        slot.set_device(pa, attr);
        Ok(())
    }

    // put_pages: the trait's default refuses; device memory is never
    // written back.
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
