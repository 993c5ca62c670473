//! Helpers of the held-superpage-run red teams (`redteam_held_runs*`):
//! machines at any frame, swap, and checks that every free frame is
//! handed out exactly once.

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::Arc;
use vm_core::{PhysMem, Pmap, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const PAGES: u64 = 512;

/// [`super::config`] under superpage `policy`.
pub fn cfg(pages: u64, policy: SuperpagePolicy) -> VmConfig {
    VmConfig {
        superpages: policy,
        ..super::config(pages)
    }
}

/// A machine whose memory is `frames` frames starting at frame
/// `base_pfn` (not necessarily on a run boundary), zero-filled host
/// memory that lives as long as the test (leaked).
pub fn vm_at<P: Pmap>(pmap: P, base_pfn: u64, frames: u64, c: VmConfig) -> Arc<Vm<P>> {
    let layout = std::alloc::Layout::from_size_align((frames * PAGE) as usize, PAGE as usize)
        .expect("layout");
    // SAFETY: a fresh zeroed, page-aligned allocation that is never freed
    // and used by nothing but this machine.
    let phys = unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        PhysMem::from_raw_parts(NonNull::new(p).expect("host memory"), base_pfn, frames)
    };
    Vm::with_phys(pmap, phys, true, c).unwrap()
}

/// Swap of `mib` MiB in a temporary file, given to `vm`.
pub fn with_swap<P: Pmap>(vm: &Vm<P>, mib: u64) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, mib << 20).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

/// Pages of the 2 MiB at `base` that `s` maps.
pub fn resident<P: Pmap>(s: &VmSpace<P>, base: u64) -> u64 {
    (0..PAGES)
        .filter(|i| s.extract(base + i * PAGE).is_some())
        .count() as u64
}

/// Every frame of `vm` is free.
pub fn no_leak<P: Pmap>(vm: &Vm<P>, what: &str) {
    assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
}

/// Every free frame can be taken, once: a balloon of "everything" takes
/// exactly the free count, no frame twice (a frame lost off the lists and
/// out of its run, or handed out twice, shows here). Gives them back.
pub fn lists_whole<P: Pmap>(vm: &Vm<P>, what: &str) {
    let free = vm.free_pages();
    let b = vm.inflate_balloon(u64::MAX);
    let frames: HashSet<u64> = b.frames().map(|p| p.0).collect();
    assert_eq!(
        (b.len(), frames.len() as u64, vm.free_pages()),
        (free, free, 0),
        "{what}: the free frames are not all handed out exactly once"
    );
    drop(b);
    assert_eq!(
        vm.free_pages(),
        free,
        "{what}: balloon gave back another count"
    );
}

/// The checks of a quiet machine after a storm: the VM's own consistency
/// check, no frame leaked, every free frame handed out once, and the
/// free-page audit (zero flags and counts).
pub fn quiet_checks<P: Pmap>(vm: &Vm<P>, what: &str) {
    super::consistent(vm, what);
    no_leak(vm, what);
    lists_whole(vm, what);
    super::audit(vm, what);
}
