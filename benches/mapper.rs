//! `pmap/{ours,x86_64_crate}` — map then translate 4096 random 4 KiB pages
//! of the 48-bit user space: our x86_64 pmap (`enter` + `extract`) beside
//! the `x86_64` crate's `OffsetPageTable` (`map_to` + `translate_addr`) on
//! page tables in the same kind of memory (an anonymous host mapping seen
//! as physical memory at an offset).
//!
//! `translate/{ours_software_mmu,ours_extract,x86_64_crate}` — translation
//! alone over the same pages mapped once: our software MMU (a user read)
//! and our pmap's `extract` beside the crate's `translate_addr`.
//!
//! `cargo bench --bench mapper`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vm_core::pmap::{Mapping, PageInfo, Pmap};
use vm_core::{MemAttr, Pfn, PhysMem, Prot, Vm, VmConfig};
use vm_pmap_x86_64::X86Pmap;
use vm_pmap_x86_64::mmu::Access;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
    Translate,
};
use x86_64::{PhysAddr, VirtAddr};

const N: u64 = 4096;

/// Deterministic random user page addresses.
fn addresses() -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (1 << 35)) << 12 // below 2^47
        })
        .collect()
}

fn ours(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, vas: &[u64]) {
    let vm = Vm::new(X86Pmap::new(), VmConfig::with_memory(128 << 20)).unwrap();
    c.bench_function("ours", |b| {
        b.iter_batched(
            || Owned(vm.pmap(), vm.pmap().create_space().unwrap()),
            |owned| {
                let space = &owned.1;
                for (i, &va) in vas.iter().enumerate() {
                    let page = PageInfo {
                        pfn: Pfn(0x10_0000 + i as u64),
                        managed: false,
                        attr: MemAttr::WriteBack,
                    };
                    vm.pmap()
                        .enter(
                            space,
                            vm_core::VirtAddr(va),
                            Mapping::new(page, Prot::RW).access(Prot::NONE),
                        )
                        .unwrap();
                }
                for &va in vas {
                    black_box(vm.pmap().extract(space, vm_core::VirtAddr(va)));
                }
                owned
            },
            BatchSize::PerIteration,
        );
    });
}

/// A space whose tables are released when dropped, outside the timing.
struct Owned<'a>(&'a X86Pmap, vm_pmap_x86_64::X86Space);

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        self.0.destroy_space(&self.1);
    }
}

/// Bump allocation of zeroed frames from an anonymous region.
struct Bump {
    next: u64,
    end: u64,
}

// SAFETY: hands out each frame of the region once; the region is fresh and
// zeroed, as page tables require.
unsafe impl FrameAllocator<Size4KiB> for Bump {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        (self.next < self.end).then(|| {
            self.next += 4096;
            PhysFrame::containing_address(PhysAddr::new(self.next - 4096))
        })
    }
}

/// The `x86_64` crate's mapper over tables in `mem` (fresh and zeroed, so
/// frame 0 is an empty root), with `vas` mapped as our bench maps them.
fn crate_mapped<'a>(mem: &'a PhysMem, vas: &[u64]) -> OffsetPageTable<'a> {
    let (base, len) = mem.host_region();
    // SAFETY: frame 0 of the fresh region is the root table; the mapper
    // reaches every other table through the offset, inside the region the
    // bump allocator hands out, and the region outlives the mapper ('a).
    let mut mapper = unsafe {
        OffsetPageTable::new(
            &mut *(base.as_ptr() as *mut PageTable),
            VirtAddr::new(base.as_ptr() as u64),
        )
    };
    let mut alloc = Bump {
        next: 4096,
        end: len,
    };
    let flags =
        PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::USER_ACCESSIBLE;
    for (i, &va) in vas.iter().enumerate() {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
        let frame = PhysFrame::containing_address(PhysAddr::new((0x10_0000 + i as u64) << 12));
        // SAFETY: the frames mapped are never accessed; only the tables are
        // written.
        unsafe { mapper.map_to(page, frame, flags, &mut alloc) }
            .unwrap()
            .ignore();
    }
    mapper
}

fn peer(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, vas: &[u64]) {
    c.bench_function("x86_64_crate", |b| {
        b.iter_batched(
            || {
                // Touched in advance, like the frames our pmap reuses, so
                // the host's own page faults stay out of the timing.
                let mem = PhysMem::anonymous(64 << 20).unwrap();
                let (base, len) = mem.host_region();
                for off in (0..len as usize).step_by(4096) {
                    // SAFETY: inside the fresh mapping.
                    unsafe { base.as_ptr().add(off).write_volatile(0) };
                }
                mem
            },
            |mem| {
                let mapper = crate_mapped(&mem, vas);
                for &va in vas {
                    black_box(mapper.translate_addr(VirtAddr::new(va)));
                }
                mem
            },
            BatchSize::PerIteration,
        );
    });
}

/// Translation alone, over the same 4096 random pages mapped once: our
/// software MMU (`translate_access`, a user read, as each touch of a
/// `read_u8` walks) and our pmap's `extract`, beside the `x86_64` crate's
/// `translate_addr` over its own tables of the same pages.
fn translate(c: &mut Criterion) {
    let vas = addresses();
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(N));
    let vm = Vm::new(X86Pmap::new(), VmConfig::with_memory(128 << 20)).unwrap();
    let owned = Owned(vm.pmap(), vm.pmap().create_space().unwrap());
    for (i, &va) in vas.iter().enumerate() {
        let page = PageInfo {
            pfn: Pfn(0x10_0000 + i as u64),
            managed: false,
            attr: MemAttr::WriteBack,
        };
        let m = Mapping::new(page, Prot::RW).access(Prot::READ);
        vm.pmap().enter(&owned.1, vm_core::VirtAddr(va), m).unwrap();
    }
    g.bench_function("ours_software_mmu", |b| {
        b.iter(|| {
            for &va in &vas {
                let t = vm.pmap().translate_access(&owned.1, va, Access::USER_READ);
                black_box(t.is_ok());
            }
        });
    });
    g.bench_function("ours_extract", |b| {
        b.iter(|| {
            for &va in &vas {
                black_box(vm.pmap().extract(&owned.1, vm_core::VirtAddr(va)));
            }
        });
    });
    let mem = PhysMem::anonymous(64 << 20).unwrap();
    let mapper = crate_mapped(&mem, &vas);
    g.bench_function("x86_64_crate", |b| {
        b.iter(|| {
            for &va in &vas {
                black_box(mapper.translate_addr(VirtAddr::new(va)));
            }
        });
    });
    g.finish();
}

fn pmap(c: &mut Criterion) {
    let vas = addresses();
    let mut g = c.benchmark_group("pmap");
    g.throughput(Throughput::Elements(N));
    ours(&mut g, &vas);
    peer(&mut g, &vas);
    g.finish();
}

criterion_group!(benches, pmap, translate);
criterion_main!(benches);
