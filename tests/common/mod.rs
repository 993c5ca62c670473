//! Setup the workspace's red-team scenario tests share: a patient test
//! machine on either pmap, the consistency check, and memory pressure.
#![allow(dead_code)]

pub mod held;

use std::sync::Arc;
use vm_core::{Pmap, Vm, VmConfig};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;

/// A test machine of `pages` pages whose faults wait for memory in short
/// naps (2 ms, up to 100 times) when a scenario squeezes it.
pub fn config(pages: u64) -> VmConfig {
    VmConfig {
        memory_wait_ms: 2,
        memory_retries: 100,
        ..vm_testkit::test_config(pages)
    }
}

/// [`config`] on the reference pmap.
pub fn ref_vm(pages: u64) -> Arc<Vm<RefPmap>> {
    Vm::new(RefPmap::new(), config(pages)).unwrap()
}

/// [`config`] on the x86_64 pmap (4-level paging).
pub fn x86_vm(pages: u64) -> Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new(), config(pages)).unwrap()
}

/// Panics with `what` if the machine's books do not balance.
pub fn consistent<P: Pmap>(vm: &Vm<P>, what: &str) {
    if let Err(e) = vm.check_consistency() {
        panic!("{what}: inconsistent: {e}");
    }
}

/// Memory pressure: four page-out passes, each asked to free every page.
pub fn squeeze<P: Pmap>(vm: &Vm<P>) {
    for _ in 0..4 {
        vm.pageout(vm.total_pages());
    }
}

#[allow(unused_imports)] // not every scenario draws numbers
pub use vm_testkit::support::Rng;

const PAGE: u64 = vm_core::PAGE_SIZE;

/// The 8-byte tag at `va`.
pub fn rd64<P: Pmap>(s: &vm_core::VmSpace<P>, va: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    s.read(va, &mut b).map_err(|e| e.to_string())?;
    Ok(u64::from_le_bytes(b))
}

/// The tag at both ends of the page at `va`, which must agree.
pub fn rdpage<P: Pmap>(s: &vm_core::VmSpace<P>, va: u64) -> Result<u64, String> {
    let a = rd64(s, va)?;
    let b = rd64(s, va + PAGE - 8)?;
    if a != b {
        return Err(format!("torn page: head {a:#x} tail {b:#x}"));
    }
    Ok(a)
}

/// The tag of a page in a space forked while a thread of its parent may
/// have been inside [`wrpage`] on it, changing it from `old` to `new`: the
/// fork is a snapshot of one instant, which may fall between the two
/// stores, so the head may hold `new` while the tail still holds `old`
/// (the head's tag is returned then). Any other disagreement is torn.
pub fn rdpage_forked_mid_write<P: Pmap>(
    s: &vm_core::VmSpace<P>,
    va: u64,
    old: u64,
    new: u64,
) -> Result<u64, String> {
    let a = rd64(s, va)?;
    let b = rd64(s, va + PAGE - 8)?;
    if a != b && (a, b) != (new, old) {
        return Err(format!("torn page: head {a:#x} tail {b:#x}"));
    }
    Ok(a)
}

/// Writes tag `v` at both ends of the page at `va`.
pub fn wrpage<P: Pmap>(s: &vm_core::VmSpace<P>, va: u64, v: u64) -> Result<(), String> {
    s.write(va, &v.to_le_bytes()).map_err(|e| e.to_string())?;
    s.write(va + PAGE - 8, &v.to_le_bytes())
        .map_err(|e| format!("second half: {e}"))
}

/// Walks every RAM page record: free frames flagged ZERO must hold zeros;
/// the counts of free and free-zeroed records must match the counters.
/// Only on a quiet machine (no zeroer, no fault running).
pub fn audit<P: Pmap>(vm: &Vm<P>, what: &str) {
    let (mut free, mut zeroed) = (0u64, 0u64);
    let mut bad = Vec::new();
    for i in 0..vm.total_pages() {
        let id = vm_core::PageId(i as u32);
        let page = vm.page(id);
        if page.queue() != vm_core::PageQueue::Free {
            continue;
        }
        free += 1;
        if page.flags().contains(vm_core::PageFlags::ZERO) {
            zeroed += 1;
            if !vm.phys().is_zero(vm.page_pfn(id)) {
                bad.push(i);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} free frames flagged ZERO hold data (first ids {:?})",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    assert_eq!(free, vm.free_pages(), "{what}: free count drifted");
    assert_eq!(
        zeroed,
        vm.free_zeroed_pages(),
        "{what}: free-zeroed count drifted"
    );
    consistent(vm, what);
}
