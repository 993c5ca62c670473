//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::sync::Arc;
use vm_core::{MapRequest, PagerKind, Prot, Vm, VmObject, VmSpace};
use vm_testkit::{MemPager, RefPmap};

/// Bytes in a page.
pub const PAGE: u64 = vm_core::PAGE_SIZE;
/// Where the tests map things.
pub const BASE: u64 = 0x1000_0000;

/// A machine of `pages` pages with one space.
pub fn machine(pages: u64) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>) {
    vm_testkit::machine(pages)
}

/// An object of `pages` pages served by a [`MemPager`] of `kind` holding
/// the pattern, mapped shared (or private) at `BASE` with `prot`.
pub fn map_pager(
    vm: &Arc<Vm<RefPmap>>,
    space: &VmSpace<RefPmap>,
    kind: PagerKind,
    pages: u64,
    prot: Prot,
    private: bool,
) -> (Arc<MemPager>, Arc<VmObject>) {
    let pager = Arc::new(MemPager::with_pattern(kind, pages));
    let obj = vm.new_object(pages, pager.clone());
    let mut req = MapRequest::object(BASE, pages * PAGE, obj.clone(), 0, prot);
    if private {
        req = req.private();
    }
    space.map(req).unwrap();
    (pager, obj)
}

/// Reads one byte.
pub fn byte(space: &VmSpace<RefPmap>, va: u64) -> u8 {
    space.read_u8(va).unwrap()
}

/// Asserts the machine is consistent at rest.
pub fn consistent(vm: &Vm<RefPmap>) {
    if let Err(e) = vm.check_consistency() {
        panic!("{e}");
    }
}

/// A `pages`-page pattern file whose pager reads 255 pages either side
/// (the widest read-ahead window).
pub fn wide_file<P: vm_core::Pmap>(vm: &Arc<Vm<P>>, pages: u64) -> (Arc<MemPager>, Arc<VmObject>) {
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, pages));
    pager.set_contiguity(vm_core::Contiguity {
        behind: 255,
        ahead: 255,
    });
    let obj = vm.new_object(pages, pager.clone());
    (pager, obj)
}
