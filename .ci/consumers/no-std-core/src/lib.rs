//! An embedder's first use of vm-core without std: its own (trivial) pmap,
//! its own physical memory, a fault.
#![no_std]

extern crate alloc;

use core::ops::Range;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use vm_core::sync::{Parker, set_parker};
use vm_core::pmap::{Displaced, DisplacedSink, Mapping, PageInfo, Pmap, PmapError, RefMod};
use vm_core::{FaultFlags, Pfn, PhysMem, Prot, VirtAddr, Vm, VmConfig};

/// A pmap with no page tables: every mapping is forgotten at once (enough
/// to run faults; a real kernel keeps tables here).
struct NullPmap;

impl Pmap for NullPmap {
    type Space = ();
    fn create_space(&self) -> Result<(), PmapError> {
        Ok(())
    }
    fn destroy_space(&self, _: &()) {}
    fn enter(&self, _: &(), _: VirtAddr, _: Mapping) -> Result<Option<Displaced>, PmapError> {
        Ok(None)
    }
    fn enter_quick(&self, _: &(), _: VirtAddr, _: PageInfo, _: Prot) -> bool {
        false
    }
    fn remove(&self, _: &(), _: Range<VirtAddr>, _: &mut DisplacedSink<'_>) {}
    fn protect(&self, _: &(), _: Range<VirtAddr>, _: Prot, _: &mut DisplacedSink<'_>) {}
    fn extract(&self, _: &(), _: VirtAddr) -> Option<Pfn> {
        None
    }
    fn is_prefaultable(&self, _: &(), _: VirtAddr) -> bool {
        false
    }
    fn change_wiring(&self, _: &(), _: VirtAddr, _: bool) {}
    fn translate(&self, _: &(), _: VirtAddr, _: Prot) -> Option<Pfn> {
        None
    }
    fn remove_all(&self, _: Pfn) -> RefMod {
        RefMod::default()
    }
    fn page_protect(&self, _: Pfn, _: Prot) -> RefMod {
        RefMod::default()
    }
    fn is_modified(&self, _: Pfn) -> bool {
        false
    }
    fn clear_modify(&self, _: Pfn) {}
    fn ts_referenced(&self, _: Pfn) -> u32 {
        0
    }
    fn mapping_count(&self, _: Pfn) -> usize {
        0
    }
}

#[repr(align(4096))]
struct Ram(#[expect(dead_code, reason = "only its address is used")] [u8; 64 * 4096]);
static mut RAM: Ram = Ram([0; 64 * 4096]);

/// The embedder's scheduler, as vm-core's locks see it: here a machine
/// with one thread, where a waiter can only yield the CPU.
struct Yield;
impl Parker for Yield {
    fn park(&self, _: &AtomicU32, _: u32) {
        core::hint::spin_loop();
    }
    fn park_timeout(&self, _: &AtomicU32, _: u32, _: u64) {
        core::hint::spin_loop();
    }
    fn unpark_all(&self, _: &AtomicU32) {}
}
static YIELD: Yield = Yield;

/// Faults one page of anonymous memory in; returns its frame number, or
/// `u64::MAX` on failure.
#[unsafe(no_mangle)]
pub extern "C" fn consumer_fault_once() -> u64 {
    set_parker(&YIELD);
    // SAFETY: the static is page aligned, 64 pages long, and used only
    // through this PhysMem (this function is the only user of RAM).
    let phys =
        unsafe { PhysMem::from_raw_parts(NonNull::new_unchecked((&raw mut RAM).cast()), 0, 64) };
    let Ok(vm) = Vm::with_phys(NullPmap, phys, true, VmConfig::default()) else {
        return u64::MAX;
    };
    let Ok(space) = vm.new_space() else {
        return u64::MAX;
    };
    if space.map_anon(0x10_0000, 0x1000, Prot::RW).is_err() {
        return u64::MAX;
    }
    match space.fault(VirtAddr(0x10_0000), Prot::WRITE, FaultFlags::DIRTY) {
        Ok(out) => out.pfn.0,
        Err(_) => u64::MAX,
    }
}

/// A bump allocator over a static arena: the embedder's allocator.
struct Bump;
static NEXT: AtomicUsize = AtomicUsize::new(0);
#[repr(align(64))]
struct Arena(#[expect(dead_code, reason = "only its address is used")] [u8; 1 << 20]);
static mut ARENA: Arena = Arena([0; 1 << 20]);

// SAFETY: every allocation is a distinct, suitably aligned range of the
// arena (or null when it is exhausted); nothing is ever freed.
unsafe impl core::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        let base = (&raw mut ARENA).cast::<u8>();
        let mut cur = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (base as usize + cur).next_multiple_of(layout.align()) - base as usize;
            let end = start + layout.size();
            if end > 1 << 20 {
                return core::ptr::null_mut();
            }
            match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                // SAFETY: start..end lies inside the arena.
                Ok(_) => return unsafe { base.add(start) },
                Err(now) => cur = now,
            }
        }
    }
    unsafe fn dealloc(&self, _: *mut u8, _: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
