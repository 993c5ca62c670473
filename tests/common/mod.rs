//! Setup the workspace's red-team scenario tests share: a patient test
//! machine on either pmap, the consistency check, and memory pressure.
#![allow(dead_code)]

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
