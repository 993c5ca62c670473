//! How the fault cost grows (or should not): with the number of map
//! entries, with the depth of the shadow chain, with the spread of the
//! address space; and the crate combinations — {reference, x86_64 pmap} ×
//! {anonymous, swap-backed, file-backed}. Also how msync and fork of a
//! range with a held page grow: with what is resident (linearly), not
//! with the range's virtual size (flat), and how unmapping a spread range
//! grows (with what it maps, not with its tables' 512 slots each). Each
//! group's first member is its baseline, measured in the same run. The
//! spread group also times the kernel's faults in the same two shapes.
//!
//! `cargo bench --bench growth`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::borrow::Borrow;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_core::{
    FaultAround, FaultFlags, MapRequest, Pmap, Prot, SuperpageAdvice, Vm, VmConfig, VmSpace,
};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;
const FAULTS: u64 = 256;

fn machine<P: Pmap>(pmap: P) -> Arc<Vm<P>> {
    Vm::new(
        pmap,
        VmConfig {
            memory_bytes: 256 << 20,
            fault_around: FaultAround::Off,
            ..VmConfig::default()
        },
    )
    .unwrap()
}

/// Times `FAULTS` write faults at `va(i)` on the space `setup` makes (or
/// lends).
fn faults<P: Pmap, S: Borrow<VmSpace<P>>>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    setup: impl Fn() -> S,
    va: impl Fn(u64) -> u64,
) {
    g.bench_function(name, |b| {
        b.iter_batched(
            &setup,
            |s| {
                for i in 0..FAULTS {
                    let s: &VmSpace<P> = s.borrow();
                    s.fault(va(i), Prot::WRITE, FaultFlags::DIRTY).unwrap();
                }
                s
            },
            BatchSize::PerIteration,
        );
    });
}

/// The map's size: one space per count keeps its entries across samples
/// (building and tearing down 100 000 entries around every sample would
/// measure the cache damage of that, not the faults); each sample remaps
/// the faulted range fresh.
fn entries(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_entries");
    g.throughput(Throughput::Elements(FAULTS));
    let vm = machine(X86Pmap::new());
    for n in [1u64, 1_000, 100_000] {
        let s = vm.new_space().unwrap();
        // n - 1 entries besides the faulted one, spaced by a guard page.
        for k in 1..n {
            s.map_anon(0x1_0000_0000 + k * 2 * PAGE, PAGE, Prot::RW)
                .unwrap();
        }
        let fresh_range = || {
            let _ = s.unmap(BASE, FAULTS * PAGE);
            s.map_anon(BASE, FAULTS * PAGE, Prot::RW).unwrap();
            &s
        };
        faults(&mut g, &n.to_string(), fresh_range, |i| BASE + i * PAGE);
    }
    g.finish();
}

fn shadow_depth(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow_depth");
    g.throughput(Throughput::Elements(FAULTS));
    let vm = machine(X86Pmap::new());
    // `covered`: after each fork the parent rewrites page 0, which is all
    // the object below holds, so its shadow bypasses it and the chain
    // stays short. `kept`: the parent writes a new page each time, so each
    // object below holds a page the parent still reads through it and
    // stays in its chain (the first fault at an index walks them all).
    for (kind, depth) in [
        ("covered", 1u64),
        ("covered", 8),
        ("covered", 64),
        ("kept", 64),
    ] {
        let vm = vm.clone();
        // The children of the previous sample, dropped when the next one
        // is set up.
        let children = std::sync::Mutex::new(Vec::new());
        let page_of = move |round: u64| if kind == "kept" { round } else { 0 };
        faults(
            &mut g,
            &format!("{kind}/{depth}"),
            move || {
                // Each fork leaves the parent one shadow deeper when a
                // child that wrote stays alive (collapse cannot merge).
                let mut kids = children.lock().unwrap();
                kids.clear();
                let s = vm.new_space().unwrap();
                s.map_anon(BASE, 2 * FAULTS * PAGE, Prot::RW).unwrap();
                s.write_u8(BASE, 1).unwrap();
                for round in 1..depth {
                    let child = s.fork().unwrap();
                    child.write_u8(BASE, 2).unwrap();
                    s.write_u8(BASE + page_of(round) * PAGE, 3).unwrap();
                    kids.push(child);
                }
                s
            },
            // Pages no object of the chain holds: each fault looks through
            // the chain, then zero-fills.
            |i| BASE + (FAULTS + i) * PAGE,
        );
    }
    g.finish();
}

fn sparse(c: &mut Criterion) {
    let mut g = c.benchmark_group("address_spread");
    g.throughput(Throughput::Elements(FAULTS));
    let vm = machine(X86Pmap::new());
    // `_nohuge`: the range advised not to use superpages, so no fault
    // claims a reservation (what a sparse space should ask for).
    for (name, span, huge) in [
        ("1MiB", 1u64 << 20, true),
        ("64GiB", 64u64 << 30, true),
        ("64GiB_nohuge", 64u64 << 30, false),
    ] {
        let vm = vm.clone();
        let step = span / FAULTS;
        faults(
            &mut g,
            name,
            move || {
                let s = vm.new_space().unwrap();
                s.map_anon(BASE, span, Prot::RW).unwrap();
                if !huge {
                    s.advise_superpages(BASE, span, SuperpageAdvice::NoHuge)
                        .unwrap();
                }
                s
            },
            move |i| BASE + i * step,
        );
    }
    // The kernel's zero-fill faults in the same shapes (4 KiB pages,
    // `MADV_NOHUGEPAGE`), the mapping made and unmapped outside the timing.
    for (name, span) in [
        ("kernel_1MiB", 1usize << 20),
        ("kernel_64GiB", 64usize << 30),
    ] {
        let step = span / FAULTS as usize;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| kernel_spread(span, step)).sum());
        });
    }
    // Taking the same spaces down: `unmap` of the whole range with its
    // `FAULTS` pages resident (the tables it empties freed with them).
    for (name, span) in [("unmap_1MiB", 1u64 << 20), ("unmap_64GiB", 64u64 << 30)] {
        let step = span / FAULTS;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let s = vm.new_space().unwrap();
                    s.map_anon(BASE, span, Prot::RW).unwrap();
                    for i in 0..FAULTS {
                        s.fault(BASE + i * step, Prot::WRITE, FaultFlags::DIRTY)
                            .unwrap();
                    }
                    s
                },
                |s| {
                    s.unmap(BASE, span).unwrap();
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// `FAULTS` writes `step` apart into a fresh private anonymous mapping
/// of `span` bytes (reserving no swap, no transparent huge pages); the
/// time of the writes.
fn kernel_spread(span: usize, step: usize) -> Duration {
    // SAFETY: a new mapping, written only within `span` and unmapped
    // before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap of {span} bytes failed");
        libc::madvise(p, span, libc::MADV_NOHUGEPAGE);
        let p = p.cast::<u8>();
        let t = Instant::now();
        for i in 0..FAULTS as usize {
            p.add(i * step).write_volatile(1);
        }
        let spent = t.elapsed();
        libc::munmap(p.cast(), span);
        spent
    }
}

fn combinations(c: &mut Criterion) {
    let mut g = c.benchmark_group("combinations");
    g.throughput(Throughput::Elements(FAULTS));
    let dir = std::env::temp_dir().join(format!("vm-growth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file");
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&vec![1u8; (FAULTS * PAGE) as usize])
        .unwrap();
    combo(&mut g, "ref_pmap", machine(RefPmap::new()), &file, &dir);
    combo(&mut g, "x86_64", machine(X86Pmap::new()), &file, &dir);
    g.finish();
}

fn combo<P: Pmap>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    pmap: &str,
    vm: Arc<Vm<P>>,
    file: &std::path::Path,
    dir: &std::path::Path,
) {
    let swap = Swap::create(&dir.join(format!("swap-{pmap}")), 64 << 20).unwrap();
    vm.set_swap(swap.provider());
    let v = vm.clone();
    let anon = move || {
        let s = v.new_space().unwrap();
        s.map_anon(BASE, FAULTS * PAGE, Prot::RW).unwrap();
        s
    };
    faults(g, &format!("{pmap}/anon"), anon, |i| BASE + i * PAGE);
    // Swap-backed: the pages were paged out; the fault reads them back.
    let v = vm.clone();
    faults(
        g,
        &format!("{pmap}/swap"),
        move || {
            let s = v.new_space().unwrap();
            s.map_anon(BASE, FAULTS * PAGE, Prot::RW).unwrap();
            for i in 0..FAULTS {
                s.write_u8(BASE + i * PAGE, 1).unwrap();
            }
            v.pageout(v.total_pages());
            s
        },
        |i| BASE + i * PAGE,
    );
    let v = vm.clone();
    let f = file.to_path_buf();
    faults(
        g,
        &format!("{pmap}/vnode"),
        move || {
            let s = v.new_space().unwrap();
            let pager = VnodePager::open(&f, true).unwrap();
            s.map(MapRequest::object(
                BASE,
                FAULTS * PAGE,
                pager.object(&v),
                0,
                Prot::RW,
            ))
            .unwrap();
            s
        },
        |i| BASE + i * PAGE,
    );
}

/// msync and fork cost what is resident, not what is mapped: one dirty
/// page in a 1 MiB and in a 64 GiB file mapping, then 16 and 256 dirty
/// pages in the 64 GiB one; fork of an anonymous mapping of each size with
/// one held page.
fn resident_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("resident_cost");
    let vm = machine(X86Pmap::new());
    let dir = std::env::temp_dir().join(format!("vm-resident-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, span, dirty) in [
        ("msync/1MiB/1", 1u64 << 20, 1u64),
        ("msync/64GiB/1", 64 << 30, 1),
        ("msync/64GiB/16", 64 << 30, 16),
        ("msync/64GiB/256", 64 << 30, 256),
    ] {
        let path = dir.join(name.replace('/', "-"));
        std::fs::File::create(&path).unwrap().set_len(span).unwrap();
        let s = vm.new_space().unwrap();
        let obj = VnodePager::open(&path, true).unwrap().object(&vm);
        s.map(MapRequest::object(BASE, span, obj, 0, Prot::RW))
            .unwrap();
        let stride = span / dirty;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    for i in 0..dirty {
                        s.write_u8(BASE + i * stride, 1).unwrap();
                    }
                },
                |()| s.msync(BASE, span).unwrap(),
                BatchSize::PerIteration,
            );
        });
    }
    for (name, span) in [
        ("fork_held/1MiB", 1u64 << 20),
        ("fork_held/64GiB", 64 << 30),
    ] {
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, span, Prot::RW).unwrap();
        s.write_u8(BASE, 1).unwrap();
        let held = s.hold(BASE, PAGE, Prot::RW).unwrap();
        g.bench_function(name, |b| b.iter(|| s.fork().unwrap()));
        drop(held);
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    entries,
    shadow_depth,
    sparse,
    combinations,
    resident_cost
);
criterion_main!(benches);
