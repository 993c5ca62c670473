//! Fault-path benches, each beside its floor measured in the same run.
//!
//! * `zero_fill/{ref_pmap,x86_64,x86_64_256m,x86_64_256m_4k}` — a
//!   zero-fill write fault per 4 KiB page on each pmap (pages that must be
//!   zeroed; machines of 16 MiB, and of 256 MiB for the last two, the last
//!   without superpage reservations), against
//!   `zero_fill/memset`, zeroing 4 KiB pages of a 16 MiB working set (the
//!   machine's size), and `zero_fill/memset_cold`, of a 256 MiB one
//!   (several times the last-level cache: every page cold).
//! * `cow/{ref_pmap,x86_64,x86_64_256m}` — a copy-on-write fault after
//!   fork (16 MiB and 256 MiB machines), against
//!   `cow/memcpy` (the same 4 MiB copied each sample, cache-warm) and
//!   `cow/memcpy_cold` (4 KiB pages of a 256 MiB source into a 256 MiB
//!   destination, every page cold).
//!
//! The floors run on host memory of the same kind as the machine's
//! physical memory (see `host_memory`).
//!
//! Run with `cargo bench --bench fault`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::cell::LazyCell;
use std::hint::black_box;
use std::sync::Arc;
use vm_core::{FaultFlags, Pmap, Prot, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::{RefPmap, test_config};

const PAGES: u64 = 1024;
/// Pages of the cold floors' working sets (256 MiB).
const COLD_PAGES: u64 = 65536;
const BASE: u64 = 0x1000_0000;
const PAGE: u64 = vm_core::PAGE_SIZE;

/// `pages` pages of host memory made the way `vm_core::PhysMem` makes the
/// machine's (an anonymous mapping with huge-page advice), so the floors
/// touch memory of the same kind as the faults do.
fn host_memory(pages: u64) -> memmap2::MmapMut {
    let m = memmap2::MmapMut::map_anon((pages * PAGE) as usize).unwrap();
    #[cfg(target_os = "linux")]
    let _ = m.advise(memmap2::Advice::HugePage);
    m
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn setup<P: Pmap>(vm: &Arc<Vm<P>>) -> VmSpace<P> {
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, PAGES * PAGE, Prot::RW).unwrap();
    space
}

/// A machine made when its bench first runs, not when a filter skips it:
/// each is a host mapping of its size, and idle ones would crowd the
/// host's memory (and its reclaim) while the others are measured.
fn lazy_vm<P: Pmap>(
    pmap: P,
    config: VmConfig,
) -> LazyCell<Arc<Vm<P>>, impl FnOnce() -> Arc<Vm<P>>> {
    LazyCell::new(move || Vm::new(pmap, config).unwrap())
}

/// Zero-fill faults on a machine configured by `config`.
fn zero_fill_on<P: Pmap>(g: &mut Group<'_>, name: &str, pmap: P, config: VmConfig) {
    let vm = lazy_vm(pmap, config);
    g.bench_function(name, |b| {
        let vm = &*vm;
        b.iter_batched(
            || setup(vm),
            |space| {
                for i in 0..PAGES {
                    space
                        .fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
                        .unwrap();
                }
                space
            },
            BatchSize::PerIteration,
        );
    });
}

fn zero_fill(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_fill");
    g.throughput(Throughput::Elements(PAGES));
    zero_fill_on(&mut g, "ref_pmap", RefPmap::new(), test_config(4 * PAGES));
    zero_fill_on(&mut g, "x86_64", X86Pmap::new(), test_config(4 * PAGES));
    // On a 256 MiB machine, beside the cold floor of the same size; with
    // superpage reservations (the default) and without.
    zero_fill_on(
        &mut g,
        "x86_64_256m",
        X86Pmap::new(),
        test_config(COLD_PAGES),
    );
    let no_reservations = VmConfig {
        superpages: SuperpagePolicy::Never,
        ..test_config(COLD_PAGES)
    };
    zero_fill_on(&mut g, "x86_64_256m_4k", X86Pmap::new(), no_reservations);
    memset_floor(&mut g, "memset", 4 * PAGES);
    memset_floor(&mut g, "memset_cold", COLD_PAGES);
    g.finish();
}

/// Copy-on-write faults on a machine of `machine_pages` pages.
fn cow_on<P: Pmap>(g: &mut Group<'_>, name: &str, (pmap, machine_pages): (P, u64)) {
    let vm = lazy_vm(pmap, test_config(machine_pages));
    g.bench_function(name, |b| {
        let vm = &*vm;
        b.iter_batched(
            || {
                let parent = setup(vm);
                for i in 0..PAGES {
                    parent.write_u8(BASE + i * PAGE, 1).unwrap();
                }
                let child = parent.fork().unwrap();
                (parent, child)
            },
            |(parent, child)| {
                for i in 0..PAGES {
                    child
                        .fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
                        .unwrap();
                }
                (parent, child)
            },
            BatchSize::PerIteration,
        );
    });
}

fn cow(c: &mut Criterion) {
    let mut g = c.benchmark_group("cow");
    g.throughput(Throughput::Elements(PAGES));
    cow_on(&mut g, "ref_pmap", (RefPmap::new(), 4 * PAGES));
    cow_on(&mut g, "x86_64", (X86Pmap::new(), 4 * PAGES));
    cow_on(&mut g, "x86_64_256m", (X86Pmap::new(), COLD_PAGES));
    memcpy_floor(&mut g, "memcpy", PAGES);
    memcpy_floor(&mut g, "memcpy_cold", COLD_PAGES);
    g.finish();
}

/// Zeroes `PAGES` 4 KiB pages a sample, walking in order through a region
/// of `region_pages` pages (wrapping), so a region several times the
/// last-level cache gives cold pages and a small one warm pages.
fn memset_floor(g: &mut Group<'_>, name: &str, region_pages: u64) {
    let mut mem = None;
    let mut next = 0usize;
    g.bench_function(name, |b| {
        let mem = mem.get_or_insert_with(|| {
            let mut m = host_memory(region_pages);
            m.fill(1);
            m
        });
        b.iter(|| {
            for _ in 0..PAGES {
                let at = next % mem.len();
                black_box(&mut mem[at..at + PAGE as usize]).fill(0);
                next += PAGE as usize;
            }
        });
    });
}

/// Copies `PAGES` 4 KiB pages a sample between two regions of
/// `region_pages` pages, walking in order (wrapping), as `memset_floor`.
fn memcpy_floor(g: &mut Group<'_>, name: &str, region_pages: u64) {
    let mut mem = None;
    let mut next = 0usize;
    g.bench_function(name, |b| {
        let (src, dst) = mem.get_or_insert_with(|| {
            let mut src = host_memory(region_pages);
            src.fill(1);
            let mut dst = host_memory(region_pages);
            dst.fill(0);
            (src, dst)
        });
        b.iter(|| {
            for _ in 0..PAGES {
                let at = next % src.len();
                let r = at..at + PAGE as usize;
                black_box(&mut dst[r.clone()]).copy_from_slice(&src[r]);
                next += PAGE as usize;
            }
        });
    });
}

criterion_group!(benches, zero_fill, cow);
criterion_main!(benches);
