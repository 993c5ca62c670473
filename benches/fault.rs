//! Fault-path benches, each beside its floor measured in the same run.
//!
//! * `zero_fill/{ref_pmap,x86_64}` — a zero-fill write fault per 4 KiB
//!   page on each pmap (pages that must be zeroed), against
//!   `zero_fill/memset`, zeroing 4 KiB pages of a 16 MiB working set.
//! * `cow/{ref_pmap,x86_64}` — a copy-on-write fault after fork, against
//!   `cow/memcpy`.
//!
//! The floors run on host memory of the same kind as the machine's
//! physical memory (see `host_memory`).
//!
//! Run with `cargo bench --bench fault`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use vm_core::{FaultFlags, Pmap, Prot, Vm, VmSpace};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::{RefPmap, test_config};

const PAGES: u64 = 1024;
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

fn setup<P: Pmap>(vm: &Arc<Vm<P>>) -> VmSpace<P> {
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, PAGES * PAGE, Prot::RW).unwrap();
    space
}

fn zero_fill_on<P: Pmap>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    pmap: P,
) {
    let vm = Vm::new(pmap, test_config(4 * PAGES)).unwrap();
    g.bench_function(name, |b| {
        b.iter_batched(
            || setup(&vm),
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
    zero_fill_on(&mut g, "ref_pmap", RefPmap::new());
    zero_fill_on(&mut g, "x86_64", X86Pmap::new());
    let mut cold = host_memory(4 * PAGES);
    cold.fill(1);
    let mut next = 0usize;
    g.bench_function("memset", |b| {
        b.iter(|| {
            for _ in 0..PAGES {
                let at = next % cold.len();
                black_box(&mut cold[at..at + PAGE as usize]).fill(0);
                next += PAGE as usize;
            }
        });
    });
    g.finish();
}

fn cow_on<P: Pmap>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    pmap: P,
) {
    let vm = Vm::new(pmap, test_config(4 * PAGES)).unwrap();
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                let parent = setup(&vm);
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
    cow_on(&mut g, "ref_pmap", RefPmap::new());
    cow_on(&mut g, "x86_64", X86Pmap::new());
    let mut src = host_memory(PAGES);
    src.fill(1);
    let mut dst = host_memory(PAGES);
    dst.fill(0);
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            for i in 0..PAGES as usize {
                let r = i * PAGE as usize..(i + 1) * PAGE as usize;
                black_box(&mut dst[r.clone()]).copy_from_slice(&src[r]);
            }
        });
    });
    g.finish();
}

criterion_group!(benches, zero_fill, cow);
criterion_main!(benches);
