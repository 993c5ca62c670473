//! Device mappings: fictitious, unmanaged pages with exact cache bits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use vm_core::pmap::Pmap;
use vm_core::{
    FaultError, FaultFlags, MapRequest, MemAttr, PageFlags, PhysAddr, Prot, Vm, VmConfig,
};
use vm_pager_device::{DeviceMmap, DevicePager};
use vm_pmap_x86_64::{PteFlags, X86Pmap};

const BASE: u64 = 0x4000_0000;
const DEV_PA: u64 = 0xfd00_0000;

/// Four pages of registers (uncacheable) then twelve of frame buffer
/// (write-combining); counts calls.
struct Card {
    calls: AtomicU32,
}

impl DeviceMmap for Card {
    fn mmap(&self, offset: u64, _prot: Prot) -> Option<(PhysAddr, MemAttr)> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match offset / 4096 {
            0..4 => Some((PhysAddr(DEV_PA + offset), MemAttr::Uncacheable)),
            4..16 => Some((PhysAddr(DEV_PA + offset), MemAttr::WriteCombining)),
            _ => None,
        }
    }
}

fn setup() -> (Arc<Vm<X86Pmap>>, vm_core::VmSpace<X86Pmap>) {
    let vm = Vm::new(X86Pmap::new(), VmConfig::with_memory(4 << 20)).unwrap();
    let space = vm.new_space().unwrap();
    let obj = DevicePager::object(
        &vm,
        Card {
            calls: AtomicU32::new(0),
        },
        20,
    );
    space
        .map(MapRequest::object(BASE, 20 * 4096, obj, 0, Prot::RW))
        .unwrap();
    (vm, space)
}

#[test]
fn device_pages_map_the_device_address_with_exact_cache_bits_and_no_pv() {
    let (vm, space) = setup();
    let free = vm.free_pages();
    let out = space
        .fault(BASE + 5 * 4096, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert_eq!(out.pfn.phys_addr(), PhysAddr(DEV_PA + 5 * 4096));
    let pte = vm.pmap().pte(space.pmap_space(), BASE + 5 * 4096).unwrap();
    assert_eq!(pte & 0x000f_ffff_ffff_f000, DEV_PA + 5 * 4096);
    assert_eq!(
        pte & (PteFlags::WRITE_THROUGH | PteFlags::NO_CACHE | PteFlags::PTE_PAT).bits(),
        0x90,
        "WC"
    );
    assert_eq!(pte & PteFlags::MANAGED.bits(), 0, "unmanaged");
    assert_eq!(vm.pmap().mapping_count(out.pfn), 0, "no pv entry");
    space
        .fault(BASE + 4096, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    let pte = vm.pmap().pte(space.pmap_space(), BASE + 4096).unwrap();
    assert_eq!(pte & 0x98, 0x18, "UC");
    // No RAM was used for the device pages (only page tables).
    let (obj, _) = space.object_at(BASE).unwrap();
    let id = obj.resident_page(5).unwrap();
    assert!(
        vm.page(id)
            .flags()
            .contains(PageFlags::FICTITIOUS | PageFlags::UNMANAGED)
    );
    assert!(
        free - vm.free_pages() <= 3,
        "only page-table pages came from RAM"
    );
    // The CPU-side byte access of this machine reaches only RAM: device
    // memory outside it is an error, not a crash.
    assert!(matches!(
        space.read_u8(BASE + 5 * 4096),
        Err(FaultError::Pmap { .. })
    ));
    vm.check_consistency().unwrap();
}

#[test]
fn no_clustering_no_prefault_and_past_the_device_is_sigbus() {
    let (vm, space) = setup();
    space
        .fault(BASE + 8 * 4096, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(
        vm.counters().snapshot().v_pager_pages,
        0,
        "device pages are not read"
    );
    assert!(space.extract(BASE + 7 * 4096).is_none() && space.extract(BASE + 9 * 4096).is_none());
    let e = space
        .fault(BASE + 17 * 4096, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert!(
        matches!(e, FaultError::OutOfBounds { pindex: 17, .. }),
        "{e}"
    );
    vm.check_consistency().unwrap();
}

#[test]
fn device_memory_is_shared_only() {
    let (vm, space) = setup();
    let obj = DevicePager::object(
        &vm,
        Card {
            calls: AtomicU32::new(0),
        },
        4,
    );
    let e = space
        .map(MapRequest::object(BASE + 0x10_0000, 4096, obj, 0, Prot::RW).private())
        .unwrap_err();
    assert!(matches!(e, vm_core::MapError::PrivateDevice { .. }), "{e}");
    space.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    let child = space.fork().unwrap();
    let out = child.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert_eq!(
        out.pfn.phys_addr(),
        PhysAddr(DEV_PA),
        "the child shares the device, no copy"
    );
    assert_eq!(child.entries()[0].inheritance, vm_core::Inheritance::Share);
}

#[test]
fn device_memory_is_never_written_back_and_unmapping_releases_the_records() {
    let (vm, space) = setup();
    space.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert_eq!(
        space.msync(BASE, 20 * 4096).unwrap(),
        0,
        "device memory is not written back"
    );
    space.unmap(BASE, 20 * 4096).unwrap();
    vm.check_consistency().unwrap();
    drop(space);
    assert_eq!(vm.free_pages(), vm.total_pages());
}
