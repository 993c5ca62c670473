//! Our figures beside the Linux kernel's own and raw I/O, in the same run
//! (Linux only; elsewhere the peers are skipped).
//!
//! * `anon_fault/{ours,ours_prezeroed,ours_idle_zeroing,kernel}` —
//!   zero-fill write faults over 16 MiB: `VmSpace::fault` on the x86_64
//!   pmap (also with the free frames zeroed before each sample, outside
//!   the timing, and with the page-zeroing thread on the other core) vs
//!   `mmap` + touch.
//! * `fork_cow/{ours,kernel}` — write faults on 4 MiB shared copy-on-write
//!   with a parent after `fork`.
//! * `file_seq/{ours,ours_sync,pread_64k,pread_1m,pread_64k_hot_buffer}` —
//!   sequential fault-in of a cached 64 MiB file with read-ahead (vnode
//!   pager; asynchronous, and all in the faulting thread) vs `pread` of the
//!   same bytes into 64 MiB of distinct memory of our frames' kind (the
//!   floor), in 64 KiB and 1 MiB requests; and, no floor, into one hot
//!   64 KiB buffer.
//! * `file_cold/{ours,ours_sync,pread_1m}` — the same for a 64 MiB file
//!   dropped from the host's page cache before each sample.
//! * `file_slow/{ours,ours_sync}` — sequential reads (every byte) of an
//!   object whose pager takes 100 µs a call: asynchronous against
//!   synchronous read-ahead.
//! * `file_random/{ours,ours_madv_random,pread_4k}` — 4096 random page
//!   reads of a cached 64 MiB file through a fresh mapping (default
//!   behaviour, and `MADV_RANDOM`) vs `pread` of 4 KiB each into distinct
//!   memory.
//! * `swap/{ours,raw,raw_hot_buffer}` — 64 MiB written and read back
//!   through 16 MiB of RAM (page-out and page-in) vs writing the same bytes
//!   from, and reading them back into, 64 MiB of distinct memory (the
//!   floor); and, no floor, through one hot buffer.
//!
//! Before the sequential, cold and swap benches each line prints, from one
//! untimed pass, its read/write system calls per MiB (`/proc/self/io`)
//! and, for ours, how many faults waited for I/O (read in the faulting
//! thread or slept on a page in flight).
//! * `soft_fault/{ours/off,ours/outward_4,ours/window_16,kernel}` — read
//!   faults on pages resident in a file object (page cache) but not mapped,
//!   per page touched: ours with fault-around off, the seed's ±4 and a
//!   16-page window vs the kernel's private file mapping with fault-around.
//! * `parallel/{disjoint,mixed,beside_reader,shared,shared_halves,soft}/{1,2,4,8}` —
//!   zero-fill faults on disjoint mappings of one space (alone; with one
//!   more thread mapping, faulting and unmapping beside them; and, the
//!   baseline of that, with one more thread only faulting beside them),
//!   zero-fill faults
//!   interleaved over one shared mapping and in each thread's own part of
//!   it (`shared_halves`), and soft faults on disjoint
//!   mappings, from 1 to 8 threads; `memset_floor` zeroes the same 16 MiB
//!   of 4 KiB pages (of a 96 MiB region, the machine's size) with as many
//!   threads: how far zeroing itself scales on the machine;
//!   `kernel_disjoint` and `kernel_shared` are the kernel's own zero-fill
//!   faults in the same two shapes (a mapping per thread; one mapping,
//!   pages interleaved), 4 KiB pages.
//! * `region_size/{ours,kernel}/{1,4,16,64,256,1024}` — zero-fill cost per fault
//!   against region size (MiB), plotted by `scripts/plot_region_size.py`.
//! * `superpage/{ours,ours_4k,ours_always,kernel_thp,kernel_4k}` — 64 MiB
//!   of aligned anonymous memory filled by a write to every page: ours
//!   with reservations and promotion (the default), with 4 KiB pages
//!   only, and with `SuperpagePolicy::Always` (one fault per 2 MiB, which
//!   maps all of it: the faults a CPU touching every page would take) —
//!   also with the free frames zeroed before each sample, outside the
//!   timing (`ours_always_prezeroed`), or by the page-zeroing thread on
//!   the other core all along (`ours_always_idle_zeroing`),
//!   the kernel with `MADV_HUGEPAGE` (transparent huge pages: one fault
//!   per 2 MiB) and `MADV_NOHUGEPAGE`. Each line prints, from one untimed
//!   pass, the 2 MiB mappings it made.
//! * `superpage_pmap/{promote,no_promote,demote,no_demote,remove_superpage,
//!   remove_4k,enter_superpage,enter_512}` — the x86_64 pmap alone: the
//!   `enter` that fills a leaf table with frames in order (and so promotes
//!   it, or not with promotion off), a wiring change of one page inside a
//!   superpage (which demotes it) or inside a 4 KiB table, the removal of
//!   the 2 MiB (one entry removed whole, or 512), and mapping the 2 MiB at
//!   once (`enter_superpage`) or by 512 `enter`s with promotion off.
//!
//! `cargo bench --bench peers`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_core::{FaultAround, FaultFlags, MapRequest, Prot, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn machine(bytes: u64) -> Arc<Vm<X86Pmap>> {
    Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_bytes: bytes,
            ..VmConfig::default()
        },
    )
    .unwrap()
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Zero-fill write faults over `pages` fresh pages of a new space.
fn zero_fill_ours(g: &mut Group<'_>, name: &str, vm: &Arc<Vm<X86Pmap>>, pages: u64) {
    zero_fill_ours_as(g, name, vm, pages, 1, false);
}

/// [`zero_fill_ours`], faulting every `stride`th page only: what a CPU
/// that touches every page faults on when each fault maps `stride` pages;
/// with `prezero`, the free frames are zeroed before each sample, outside
/// the timing.
fn zero_fill_ours_as(
    g: &mut Group<'_>,
    name: &str,
    vm: &Arc<Vm<X86Pmap>>,
    pages: u64,
    stride: u64,
    prezero: bool,
) {
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                if prezero {
                    vm.zero_free_pages(u64::MAX);
                }
                let s = vm.new_space().unwrap();
                s.map_anon(BASE, pages * PAGE, Prot::RW).unwrap();
                s
            },
            |s| {
                for i in (0..pages).step_by(stride as usize) {
                    s.fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
                        .unwrap();
                }
                s
            },
            BatchSize::PerIteration,
        );
    });
}

/// The kernel's zero-fill faults: `mmap` then touch every page.
fn zero_fill_kernel(g: &mut Group<'_>, name: &str, pages: u64) {
    zero_fill_kernel_as(g, name, pages, false);
}

/// [`zero_fill_kernel`], with transparent huge pages asked for (`huge`:
/// `MADV_HUGEPAGE` on a 2 MiB-aligned region) or refused.
fn zero_fill_kernel_as(g: &mut Group<'_>, name: &str, pages: u64, huge: bool) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let len = (pages * PAGE) as usize;
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // SAFETY: touched within `len`, unmapped right after.
                unsafe {
                    let (p, whole) = kernel_anon_as(len, huge);
                    let t = Instant::now();
                    for i in 0..pages as usize {
                        p.add(i * PAGE as usize).write_volatile(1);
                    }
                    total += t.elapsed();
                    libc::munmap(whole.0.cast(), whole.1);
                }
            }
            total
        });
    });
}

fn anon_fault(c: &mut Criterion) {
    let pages = (16 << 20) / PAGE;
    let mut g = c.benchmark_group("anon_fault");
    g.throughput(Throughput::Elements(pages));
    let vm = machine(64 << 20);
    zero_fill_ours(&mut g, "ours", &vm, pages);
    // What is left of a fault when zeroing leaves the fault path: the
    // free frames zeroed before each sample (outside the timing), or by
    // the page-zeroing thread on the other core all along.
    zero_fill_ours_as(&mut g, "ours_prezeroed", &vm, pages, 1, true);
    {
        let _zeroer = vm.spawn_page_zeroer(Duration::from_micros(100));
        zero_fill_ours(&mut g, "ours_idle_zeroing", &vm, pages);
    }
    zero_fill_kernel(&mut g, "kernel", pages);
    g.finish();
}

fn fork_cow(c: &mut Criterion) {
    let pages = (4 << 20) / PAGE;
    let mut g = c.benchmark_group("fork_cow");
    g.throughput(Throughput::Elements(pages));
    let vm = machine(64 << 20);
    g.bench_function("ours", |b| {
        b.iter_batched(
            || {
                let p = vm.new_space().unwrap();
                p.map_anon(BASE, pages * PAGE, Prot::RW).unwrap();
                for i in 0..pages {
                    p.write_u8(BASE + i * PAGE, 1).unwrap();
                }
                let c = p.fork().unwrap();
                (p, c)
            },
            |(p, c)| {
                for i in 0..pages {
                    c.fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
                        .unwrap();
                }
                (p, c)
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function("kernel", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| kernel_cow(pages)).sum())
    });
    g.finish();
}

/// A fresh private anonymous mapping of `len` bytes without huge pages.
///
/// # Safety
///
/// The caller unmaps it (`munmap`) and touches only `len` bytes.
unsafe fn kernel_anon(len: usize) -> *mut u8 {
    // SAFETY: as the caller's contract.
    unsafe { kernel_anon_as(len, false).0 }
}

/// [`kernel_anon`], 2 MiB-aligned and with `MADV_HUGEPAGE` when `huge`.
/// Returns the `len` bytes to use and the whole mapping to unmap.
///
/// # Safety
///
/// As [`kernel_anon`], unmapping the whole mapping returned.
unsafe fn kernel_anon_as(len: usize, huge: bool) -> (*mut u8, (*mut u8, usize)) {
    const TWO_MIB: usize = 2 << 20;
    let whole = len + TWO_MIB;
    // SAFETY: plain mmap/madvise on a new mapping, used within `whole`.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            whole,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as *mut u8;
        assert!(p as isize != -1, "mmap failed");
        let aligned = p.add((TWO_MIB - p as usize % TWO_MIB) % TWO_MIB);
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        libc::madvise(aligned.cast(), len, advice);
        (aligned, (p, whole))
    }
}

/// The process's anonymous memory in transparent huge pages, in KiB
/// (`AnonHugePages` of `/proc/self/smaps_rollup`).
fn anon_huge_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The superpage group: see the module docs.
fn superpage(c: &mut Criterion) {
    let pages = (64 << 20) / PAGE;
    let mut g = c.benchmark_group("superpage");
    g.sample_size(10);
    g.throughput(Throughput::Elements(pages));
    let ours = machine(160 << 20);
    let small = Vm::new(
        X86Pmap::new().with_superpages(false),
        VmConfig {
            memory_bytes: 160 << 20,
            superpages: vm_core::SuperpagePolicy::Never,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let always = Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_bytes: 160 << 20,
            superpages: vm_core::SuperpagePolicy::Always,
            ..VmConfig::default()
        },
    )
    .unwrap();
    // `ours_always` faults once per 2 MiB: that fault maps all of it.
    let ours_kinds = [
        ("ours", &ours, 1),
        ("ours_4k", &small, 1),
        ("ours_always", &always, 512),
    ];
    for (name, vm, stride) in ours_kinds {
        let before = vm.pmap().superpage_stats().made();
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, pages * PAGE, Prot::RW).unwrap();
        for i in (0..pages).step_by(stride) {
            s.fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
                .unwrap();
        }
        let made = vm.pmap().superpage_stats().made() - before;
        let mapped = (0..pages)
            .filter(|&i| s.extract(BASE + i * PAGE).is_some())
            .count();
        println!(
            "superpage/{name}: {made} of {} 2 MiB mapped by one entry, {mapped} of {pages} pages mapped",
            pages / 512
        );
        drop(s);
        zero_fill_ours_as(&mut g, name, vm, pages, stride as u64, false);
    }
    // The same with the free frames zeroed between samples, outside the
    // timing (`Vm::zero_free_pages`, FreeBSD's old idle-time zeroing):
    // the faults then skip zeroing, which is most of the kernel's cost.
    zero_fill_ours_as(&mut g, "ours_always_prezeroed", &always, pages, 512, true);
    // The same with the page-zeroing thread running all along on the
    // other core (`Vm::spawn_page_zeroer`): it zeroes what each sample
    // freed while the next one faults, as far as it keeps up.
    {
        let _zeroer = always.spawn_page_zeroer(std::time::Duration::from_micros(100));
        zero_fill_ours_as(
            &mut g,
            "ours_always_idle_zeroing",
            &always,
            pages,
            512,
            false,
        );
    }
    for (name, huge) in [("kernel_thp", true), ("kernel_4k", false)] {
        let len = (pages * PAGE) as usize;
        let before = anon_huge_kib().unwrap_or(0);
        // SAFETY: touched within `len`, unmapped right after.
        unsafe {
            let (p, whole) = kernel_anon_as(len, huge);
            for i in 0..pages as usize {
                p.add(i * PAGE as usize).write_volatile(1);
            }
            let kib = anon_huge_kib().unwrap_or(0).saturating_sub(before);
            println!(
                "superpage/{name}: {} of {} 2 MiB in huge pages",
                kib / 2048,
                pages / 512
            );
            libc::munmap(whole.0.cast(), whole.1);
        }
        zero_fill_kernel_as(&mut g, name, pages, huge);
    }
    g.finish();
}

/// The pmap's own promotion and demotion cost: see the module docs.
/// Times `op` alone on each of `iters` fresh spaces `setup` makes, each
/// destroyed by `teardown` after, outside the timing.
fn time_each<S>(
    b: &mut criterion::Bencher<'_>,
    setup: impl Fn() -> S,
    op: impl Fn(&S),
    teardown: impl Fn(&S),
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let s = setup();
            let t = Instant::now();
            op(&s);
            total += t.elapsed();
            teardown(&s);
        }
        total
    });
}

fn superpage_pmap(c: &mut Criterion) {
    use vm_core::pmap::{Mapping, PageInfo, Pmap};
    use vm_core::{MemAttr, Pfn, VirtAddr};
    const VA: u64 = 0x40_0000_0000;
    let mut g = c.benchmark_group("superpage_pmap");
    for (name, promote) in [("promote", true), ("no_promote", false)] {
        let vm = Vm::new(
            X86Pmap::new().with_superpages(promote),
            VmConfig::with_memory(16 << 20),
        )
        .unwrap();
        let p = vm.pmap();
        // The top 2 MiB of frames, entered directly (never written).
        let first = vm.phys().base_pfn() + vm.phys().frames() - 512;
        let m = |i: u64| {
            let page = PageInfo {
                pfn: Pfn(first + i),
                managed: true,
                attr: MemAttr::WriteBack,
            };
            Mapping::new(page, Prot::RW).access(Prot::WRITE)
        };
        let filled = |pages: u64| {
            let s = p.create_space().unwrap();
            for i in 0..pages {
                p.enter(&s, VirtAddr(VA + i * PAGE), m(i)).unwrap();
            }
            s
        };
        let destroy = |s: &_| p.destroy_space(s);
        // The `enter` that fills the leaf table (and so promotes it).
        g.bench_function(name, |b| {
            let last = |s: &_| {
                p.enter(s, VirtAddr(VA + 511 * PAGE), m(511)).unwrap();
            };
            time_each(b, || filled(511), last, destroy);
        });
        // A wiring change of one page: demotes a superpage.
        let name = if promote { "demote" } else { "no_demote" };
        g.bench_function(name, |b| {
            let wire = |s: &_| p.change_wiring(s, VirtAddr(VA + 7 * PAGE), true);
            time_each(b, || filled(512), wire, destroy);
        });
        // Unmapping the 2 MiB: one 2 MiB entry removed whole, or 512.
        let name = if promote {
            "remove_superpage"
        } else {
            "remove_4k"
        };
        g.bench_function(name, |b| {
            let unmap = |s: &_| p.remove(s, VirtAddr(VA)..VirtAddr(VA + 512 * PAGE), &mut |_| {});
            time_each(b, || filled(512), unmap, destroy);
        });
        // Mapping the 2 MiB at once (`enter_superpage`), or 512 `enter`s.
        let name = if promote {
            "enter_superpage"
        } else {
            "enter_512"
        };
        g.bench_function(name, |b| {
            let map = |s: &_| {
                if promote {
                    assert_eq!(p.enter_superpage(s, VirtAddr(VA), m(0)), Ok(true));
                } else {
                    for i in 0..512 {
                        p.enter(s, VirtAddr(VA + i * PAGE), m(i)).unwrap();
                    }
                }
            };
            time_each(b, || p.create_space().unwrap(), map, destroy);
        });
    }
    g.finish();
}

/// The kernel's COW: the child of a fork writes every page the parent
/// touched, timing itself and reporting the time through a pipe.
fn kernel_cow(pages: u64) -> Duration {
    let len = (pages * PAGE) as usize;
    // SAFETY: plain POSIX calls on memory and descriptors this function
    // owns; the child only writes memory, one pipe and exits.
    unsafe {
        let p = kernel_anon(len);
        for i in 0..pages as usize {
            p.add(i * PAGE as usize).write_volatile(1);
        }
        let mut fds = [0; 2];
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        if pid == 0 {
            let mut t0 = std::mem::zeroed::<libc::timespec>();
            let mut t1 = std::mem::zeroed::<libc::timespec>();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
            for i in 0..pages as usize {
                p.add(i * PAGE as usize).write_volatile(2);
            }
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
            let ns: u64 =
                ((t1.tv_sec - t0.tv_sec) * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec)) as u64;
            libc::write(fds[1], (&ns as *const u64).cast(), 8);
            libc::_exit(0);
        }
        let mut ns = 0u64;
        libc::read(fds[0], (&mut ns as *mut u64).cast(), 8);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
        libc::munmap(p.cast(), len);
        Duration::from_nanos(ns)
    }
}

/// The kernel's zero-fill faults on `pages` pages by `threads` threads of
/// `pool`: each thread its own fresh mapping, or (`interleave`) one
/// mapping whose pages the threads take in turn. Times the touches only.
fn kernel_touch(pool: &rayon::ThreadPool, pages: u64, threads: u64, interleave: bool) -> Duration {
    let per = pages / threads;
    let regions = if interleave { 1 } else { threads };
    let len = (pages / regions * PAGE) as usize;
    // Addresses as integers, so that the threads may share them.
    let maps: Vec<(usize, (usize, usize))> = (0..regions)
        .map(|_| {
            // SAFETY: touched within `len` and unmapped whole below.
            let (p, (whole, whole_len)) = unsafe { kernel_anon_as(len, false) };
            (p as usize, (whole as usize, whole_len))
        })
        .collect();
    let t = Instant::now();
    on_threads(pool, |t| {
        let (base, first, step) = if interleave {
            (maps[0].0, t, threads)
        } else {
            (maps[t as usize].0, 0, 1)
        };
        for k in 0..per {
            let i = (first + k * step) as usize;
            // SAFETY: page `i` lies within its mapping of `len` bytes.
            unsafe { (base as *mut u8).add(i * PAGE as usize).write_volatile(1) };
        }
    });
    let spent = t.elapsed();
    for (_, (whole, whole_len)) in maps {
        // SAFETY: each whole mapping made above, no longer used.
        unsafe { libc::munmap(whole as *mut libc::c_void, whole_len) };
    }
    spent
}

/// Read and write system calls this process made so far, every thread's
/// (Linux `/proc/self/io`: `syscr` + `syscw`); `None` elsewhere.
fn io_syscalls() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

/// Runs `pass` once, untimed, and prints the read and write system calls
/// it made per MiB of `bytes`.
fn report_io(label: &str, bytes: u64, pass: impl FnOnce()) {
    let before = io_syscalls();
    pass();
    if let (Some(a), Some(b)) = (before, io_syscalls()) {
        let mib = bytes as f64 / f64::from(1u32 << 20);
        eprintln!(
            "{label}: {:.1} read/write system calls per MiB",
            (b - a) as f64 / mib
        );
    }
}

/// Sequential fault-in of the file at `path` (`len` bytes) through a
/// fresh mapping on a machine of `machine.0` bytes with asynchronous
/// read-ahead `machine.1`, one byte read a page; each sample waits for the
/// background reads it started, so no work spills out of it. `before`
/// runs before each sample, untimed.
fn fault_in_file(
    g: &mut Group<'_>,
    (group, name): (&str, &str),
    machine: (u64, bool),
    path: &std::path::Path,
    len: u64,
    before: impl Fn(),
) {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_bytes: machine.0,
            async_read_ahead: machine.1,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let setup = || {
        let pager = VnodePager::open(path, false).unwrap();
        let s = vm.new_space().unwrap();
        s.map(MapRequest::object(
            BASE,
            len,
            pager.object(&vm),
            0,
            Prot::READ,
        ))
        .unwrap();
        s
    };
    let scan = |s: &vm_core::VmSpace<X86Pmap>| {
        for i in 0..len / PAGE {
            black_box(s.read_u8(BASE + i * PAGE).unwrap());
        }
        vm.wait_for_background_io();
    };
    let mut first = true;
    g.bench_function(name, |b| {
        // One untimed pass first, counted: system calls and faults that
        // waited (only when the filter selects this bench).
        if std::mem::take(&mut first) {
            before();
            let s = setup();
            let counts = vm.counters().snapshot();
            report_io(&format!("{group}/{name}"), len, || scan(&s));
            let c = vm.counters().snapshot().since(&counts);
            let waits = c.v_io_faults + c.v_intrans;
            eprintln!(
                "{group}/{name}: the faulting thread waited for I/O on {waits} of {} faults",
                c.v_vm_faults
            );
        }
        b.iter_batched(
            || {
                before();
                setup()
            },
            |s| {
                scan(&s);
                s
            },
            BatchSize::PerIteration,
        );
    });
}

fn file_seq(c: &mut Criterion) {
    let len = 64u64 << 20;
    let path = hot_file("file", len);
    let mut g = c.benchmark_group("file_seq");
    g.throughput(Throughput::Bytes(len));
    g.sample_size(20);
    // Asynchronous read-ahead, and every read made by the fault that
    // needs it (the default).
    for (name, background) in [("ours", true), ("ours_sync", false)] {
        fault_in_file(
            &mut g,
            ("file_seq", name),
            (128 << 20, background),
            &path,
            len,
            || {},
        );
    }
    let file = std::fs::File::open(&path).unwrap();
    // The fair floor: the same bytes into the same amount of distinct
    // memory of the kind our frames are, in 64 KiB and 1 MiB requests.
    let mut dest = host_memory(len);
    for (name, request) in [("pread_64k", 64usize << 10), ("pread_1m", 1 << 20)] {
        let mut pass = || {
            for at in (0..len as usize).step_by(request) {
                file.read_exact_at(&mut dest[at..at + request], at as u64)
                    .unwrap();
            }
        };
        let mut first = true;
        g.bench_function(name, |b| {
            if std::mem::take(&mut first) {
                report_io(&format!("file_seq/{name}"), len, &mut pass);
            }
            b.iter(&mut pass);
        });
    }
    // The old line, kept for comparison: one hot 64 KiB buffer (no floor).
    let mut buf = vec![0u8; 64 << 10];
    g.bench_function("pread_64k_hot_buffer", |b| {
        b.iter(|| {
            let mut off = 0;
            while off < len {
                off += file.read_at(&mut buf, off).unwrap() as u64;
            }
        });
    });
    g.finish();
}

/// Sequential fault-in of a 64 MiB file that is not in the host's page
/// cache (dropped with `posix_fadvise(DONTNEED)` before each sample), with
/// asynchronous and synchronous read-ahead, beside `pread` of it in 1 MiB
/// requests into distinct memory.
fn file_cold(c: &mut Criterion) {
    use std::os::fd::AsRawFd;
    let len = 64u64 << 20;
    let path = hot_file("cold", len);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.sync_all().unwrap();
    let drop_cache = || {
        // SAFETY: a plain advice call on an open descriptor.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0, "posix_fadvise");
    };
    let mut g = c.benchmark_group("file_cold");
    g.throughput(Throughput::Bytes(len));
    g.sample_size(10);
    for (name, background) in [("ours", true), ("ours_sync", false)] {
        fault_in_file(
            &mut g,
            ("file_cold", name),
            (128 << 20, background),
            &path,
            len,
            drop_cache,
        );
    }
    let mut dest = host_memory(len);
    let mut pass = || {
        for at in (0..len as usize).step_by(1 << 20) {
            file.read_exact_at(&mut dest[at..at + (1 << 20)], at as u64)
                .unwrap();
        }
    };
    let mut first = true;
    g.bench_function("pread_1m", |b| {
        if std::mem::take(&mut first) {
            drop_cache();
            report_io("file_cold/pread_1m", len, &mut pass);
        }
        b.iter_batched(drop_cache, |()| pass(), BatchSize::PerIteration);
    });
    g.finish();
}

/// Sequential reads of a 16 MiB object whose pager answers after 100 µs a
/// call (a network or disk device; `MemPager` with a delay), the reader
/// summing every byte of each page: asynchronous read-ahead overlaps the
/// device's latency with the reading, synchronous read-ahead waits for it.
fn file_slow(c: &mut Criterion) {
    let pages = (16u64 << 20) / PAGE;
    let pager = Arc::new(vm_testkit::MemPager::with_pattern(
        vm_core::PagerKind::FILE,
        pages,
    ));
    pager.set_contiguity(vm_core::Contiguity {
        behind: 255,
        ahead: 255,
    });
    pager.set_delay(Some(Duration::from_micros(100)));
    let mut g = c.benchmark_group("file_slow");
    g.throughput(Throughput::Bytes(pages * PAGE));
    g.sample_size(10);
    for (name, background) in [("ours", true), ("ours_sync", false)] {
        let vm = Vm::new(
            X86Pmap::new(),
            VmConfig {
                memory_bytes: 64 << 20,
                async_read_ahead: background,
                ..VmConfig::default()
            },
        )
        .unwrap();
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let s = vm.new_space().unwrap();
                    let obj = vm.new_object(pages, pager.clone());
                    s.map(MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ))
                        .unwrap();
                    s
                },
                |s| {
                    let mut buf = vec![0u8; PAGE as usize];
                    let mut sum = 0u64;
                    for i in 0..pages {
                        s.read(BASE + i * PAGE, &mut buf).unwrap();
                        sum += buf.iter().map(|&b| u64::from(b)).sum::<u64>();
                    }
                    vm.wait_for_background_io();
                    black_box(sum);
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// Random 4 KiB reads of a cached 64 MiB file through a fresh mapping:
/// 4096 distinct pages in a scrambled order, one byte each, beside `pread`
/// of the same pages, 4 KiB each, into cold distinct memory (the floor;
/// the goal adds one soft fault, `soft_fault/ours/off`, per page).
fn file_random(c: &mut Criterion) {
    let len = 64u64 << 20;
    let pages = len / PAGE;
    let touched = 4096u64;
    let path = hot_file("random", len);
    // Distinct pages, scattered: i * a prime stride modulo the file.
    let order: Vec<u64> = (0..touched).map(|i| (i * 7919) % pages).collect();
    let mut g = c.benchmark_group("file_random");
    g.throughput(Throughput::Elements(touched));
    let vm = machine(128 << 20);
    // The default behaviour, and `MADV_RANDOM` (no read-around from the
    // first fault: one page read per fault).
    for (name, behavior) in [
        ("ours", vm_core::Behavior::Normal),
        ("ours_madv_random", vm_core::Behavior::Random),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let pager = VnodePager::open(&path, false).unwrap();
                    let s = vm.new_space().unwrap();
                    let req = MapRequest::object(BASE, len, pager.object(&vm), 0, Prot::READ);
                    s.map(req.behavior(behavior)).unwrap();
                    s
                },
                |s| {
                    for &p in &order {
                        black_box(s.read_u8(BASE + p * PAGE).unwrap());
                    }
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    let file = std::fs::File::open(&path).unwrap();
    // Cold frames, as ours: the destination walks through memory the size
    // of our machine's, so a page is not written again for 8 samples.
    let mut dest = host_memory(128 << 20);
    let dest_pages = dest.len() / PAGE as usize;
    let mut cursor = 0usize;
    g.bench_function("pread_4k", |b| {
        b.iter(|| {
            for &p in &order {
                let at = cursor * PAGE as usize;
                cursor = (cursor + 1) % dest_pages;
                file.read_exact_at(&mut dest[at..at + PAGE as usize], p * PAGE)
                    .unwrap();
            }
        });
    });
    g.finish();
}

/// `bytes` of host memory made the way `vm_core::PhysMem` makes the
/// machine's (an anonymous mapping with huge-page advice), touched once,
/// so a floor writes memory of the same kind as our frames.
fn host_memory(bytes: u64) -> memmap2::MmapMut {
    let mut m = memmap2::MmapMut::map_anon(bytes as usize).unwrap();
    #[cfg(target_os = "linux")]
    let _ = m.advise(memmap2::Advice::HugePage);
    m.fill(1);
    m
}

fn swap(c: &mut Criterion) {
    let len = 64u64 << 20;
    let mut g = c.benchmark_group("swap");
    g.throughput(Throughput::Bytes(2 * len));
    g.sample_size(10);
    let vm = machine(16 << 20);
    let sw = Swap::create(&scratch("swap"), 2 * len).unwrap();
    vm.set_swap(sw.provider());
    let setup = || {
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, len, Prot::RW).unwrap();
        s
    };
    let out_and_back = |s: &vm_core::VmSpace<X86Pmap>| {
        let page = [3u8; PAGE as usize];
        let mut back = [0u8; PAGE as usize];
        for i in 0..len / PAGE {
            s.write(BASE + i * PAGE, &page).unwrap();
        }
        for i in 0..len / PAGE {
            s.read(BASE + i * PAGE, &mut back).unwrap();
        }
    };
    let mut first = true;
    g.bench_function("ours", |b| {
        if std::mem::take(&mut first) {
            report_io("swap/ours", 2 * len, || out_and_back(&setup()));
        }
        b.iter_batched(
            setup,
            |s| {
                out_and_back(&s);
                s
            },
            BatchSize::PerIteration,
        );
    });
    let raw = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(scratch("raw"))
        .unwrap();
    // The fair floor: the same bytes written from and read back into
    // distinct memory of our frames' kind, in 64 KiB requests.
    let mut mem = host_memory(len);
    let mut raw_pass = || {
        for at in (0..len as usize).step_by(64 << 10) {
            raw.write_all_at(&mem[at..at + (64 << 10)], at as u64)
                .unwrap();
        }
        for at in (0..len as usize).step_by(64 << 10) {
            raw.read_exact_at(&mut mem[at..at + (64 << 10)], at as u64)
                .unwrap();
        }
    };
    let mut first = true;
    g.bench_function("raw", |b| {
        if std::mem::take(&mut first) {
            report_io("swap/raw", 2 * len, &mut raw_pass);
        }
        b.iter(&mut raw_pass);
    });
    // The old line: one hot 64 KiB buffer (no floor).
    let mut buf = vec![3u8; 64 << 10];
    g.bench_function("raw_hot_buffer", |b| {
        b.iter(|| {
            let mut off = 0;
            while off < len {
                raw.write_all_at(&buf, off).unwrap();
                off += buf.len() as u64;
            }
            off = 0;
            while off < len {
                off += raw.read_at(&mut buf, off).unwrap() as u64;
            }
        });
    });
    g.finish();
}

/// Runs `work(thread)` once on each of `pool`'s threads, which live
/// across samples (spawning them per sample timed thread start-up, a
/// quarter of an 8-thread sample).
fn on_threads(pool: &rayon::ThreadPool, work: impl Fn(u64) + Sync) {
    pool.broadcast(|ctx| work(ctx.index() as u64));
}

/// 1, 2, 4 and 8 threads: zero-fill faults on disjoint mappings (alone,
/// and mixed with a thread that maps, faults and unmaps beside them),
/// zero-fill faults interleaved over one shared mapping (one object), and
/// soft faults on disjoint mappings of resident objects. Prefault is off so
/// every page touched is a fault. Each kind runs its thread counts back to
/// back, so that the ratios between them come from one stretch of the
/// machine's time (its speed drifts by a third over minutes).
fn parallel(c: &mut Criterion) {
    let pages = (16 << 20) / PAGE;
    let mut g = c.benchmark_group("parallel");
    g.throughput(Throughput::Elements(pages));
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_bytes: 96 << 20,
            fault_around: FaultAround::Off,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let fault = |s: &vm_core::VmSpace<X86Pmap>, i: u64| {
        s.fault(BASE + i * PAGE, Prot::WRITE, FaultFlags::DIRTY)
            .unwrap();
    };
    let pools: Vec<(u64, rayon::ThreadPool)> = [1u64, 2, 4, 8]
        .into_iter()
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads as usize)
                .build()
                .unwrap();
            (threads, pool)
        })
        .collect();
    // One mapping (so one object) per thread's region.
    let disjoint_space = |threads: u64| {
        let per = pages / threads;
        let s = vm.new_space().unwrap();
        for t in 0..threads {
            s.map_anon(BASE + t * per * PAGE, per * PAGE, Prot::RW)
                .unwrap();
        }
        s
    };
    let disjoint_faults = |s: &vm_core::VmSpace<X86Pmap>, threads: u64, pool| {
        let per = pages / threads;
        on_threads(pool, |t| {
            (t * per..(t + 1) * per).for_each(|i| fault(s, i));
        });
    };
    for (threads, pool) in &pools {
        let threads = *threads;
        g.bench_function(format!("disjoint/{threads}"), |b| {
            b.iter_batched(
                || disjoint_space(threads),
                |s| {
                    disjoint_faults(&s, threads, pool);
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    // The same while one more thread maps, faults and unmaps a small
    // region of the same space over and over (map writers against
    // faulting readers); and, as its baseline, while one more thread only
    // faults in the same space (a reader of the map beside them, which
    // also keeps the other CPU as busy).
    let far = BASE + (1 << 36);
    for (kind, writes) in [("mixed", true), ("beside_reader", false)] {
        for (threads, pool) in &pools {
            let threads = *threads;
            g.bench_function(format!("{kind}/{threads}"), |b| {
                b.iter_batched(
                    || {
                        let s = disjoint_space(threads);
                        if !writes {
                            s.map_anon(far, 16 * PAGE, Prot::RW).unwrap();
                            fault(&s, (far - BASE) / PAGE);
                        }
                        s
                    },
                    |s| {
                        let done = std::sync::atomic::AtomicBool::new(false);
                        std::thread::scope(|sc| {
                            sc.spawn(|| {
                                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                                    if writes {
                                        s.map_anon(far, 16 * PAGE, Prot::RW).unwrap();
                                    }
                                    fault(&s, (far - BASE) / PAGE);
                                    if writes {
                                        s.unmap(far, 16 * PAGE).unwrap();
                                    }
                                }
                            });
                            disjoint_faults(&s, threads, pool);
                            done.store(true, std::sync::atomic::Ordering::Relaxed);
                        });
                        s
                    },
                    BatchSize::PerIteration,
                );
            });
        }
    }
    let one_mapping = || {
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, pages * PAGE, Prot::RW).unwrap();
        s
    };
    for (threads, pool) in &pools {
        let threads = *threads;
        g.bench_function(format!("shared/{threads}"), |b| {
            b.iter_batched(
                one_mapping,
                |s| {
                    on_threads(pool, |t| {
                        (t..pages)
                            .step_by(threads as usize)
                            .for_each(|i| fault(&s, i));
                    });
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    // One mapping (one object) again, each thread faulting its own part:
    // the object is shared, its 2 MiB extents are not.
    for (threads, pool) in &pools {
        let threads = *threads;
        g.bench_function(format!("shared_halves/{threads}"), |b| {
            b.iter_batched(
                one_mapping,
                |s| {
                    disjoint_faults(&s, threads, pool);
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    // The kernel's own faults in both shapes, the same pages and threads:
    // `disjoint`, a mapping per thread; `shared`, one mapping with the
    // threads' pages interleaved (4 KiB pages, `MADV_NOHUGEPAGE`).
    for (kind, interleave) in [("kernel_disjoint", false), ("kernel_shared", true)] {
        for (threads, pool) in &pools {
            let threads = *threads;
            g.bench_function(format!("{kind}/{threads}"), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| kernel_touch(pool, pages, threads, interleave))
                        .sum()
                });
            });
        }
    }
    // The floor of a zero-fill fault: the same 16 MiB of 4 KiB pages
    // zeroed by as many threads (the same pool), walking a region the
    // machine's size (a multiple of the 16 MiB a sample zeroes), as our
    // faults zero its frames.
    let mut floor = host_memory(96 << 20);
    let mut floor_next = 0usize;
    for (threads, pool) in &pools {
        let threads = *threads;
        g.bench_function(format!("memset_floor/{threads}"), |b| {
            b.iter(|| {
                let at = floor_next;
                floor_next = (floor_next + pages as usize * PAGE as usize) % floor.len();
                let span = &mut floor[at..at + (pages * PAGE) as usize];
                let parts: Vec<std::sync::Mutex<&mut [u8]>> = span
                    .chunks_mut(span.len() / threads as usize)
                    .map(std::sync::Mutex::new)
                    .collect();
                on_threads(pool, |t| {
                    let mut part = parts[t as usize].lock().unwrap();
                    for page in part.chunks_mut(PAGE as usize) {
                        black_box(page).fill(0);
                    }
                });
            });
        });
    }
    for (threads, pool) in &pools {
        let threads = *threads;
        let per = pages / threads;
        // Resident objects, one per thread's region, filled once (and
        // freed before the next thread count's).
        let objects: Vec<_> = (0..threads)
            .map(|_| {
                let o = vm.new_anon_object(per);
                let w = vm.new_space().unwrap();
                w.map(MapRequest::object(BASE, per * PAGE, o.clone(), 0, Prot::RW))
                    .unwrap();
                (0..per).for_each(|i| fault(&w, i));
                o
            })
            .collect();
        g.bench_function(format!("soft/{threads}"), |b| {
            b.iter_batched(
                || {
                    let s = vm.new_space().unwrap();
                    for (t, o) in (0..).zip(&objects) {
                        let req = MapRequest::object(
                            BASE + t * per * PAGE,
                            per * PAGE,
                            o.clone(),
                            0,
                            Prot::READ,
                        );
                        s.map(req).unwrap();
                    }
                    s
                },
                |s| {
                    on_threads(pool, |t| {
                        for i in t * per..(t + 1) * per {
                            s.fault(BASE + i * PAGE, Prot::READ, FaultFlags::NORMAL)
                                .unwrap();
                        }
                    });
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

/// A file of `len` bytes of 7s in the page cache.
fn hot_file(name: &str, len: u64) -> PathBuf {
    let path = scratch(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![7u8; len as usize])
        .unwrap();
    path
}

/// Faults on pages already in memory (the page cache / the object) but
/// not mapped: ours through the vnode pager's object with fault-around off,
/// the seed's ±4 outward prefault and a 16-page window (the default, as
/// Linux), each touch through the software MMU; the kernel's private file mapping of a
/// page-cache-hot file (fault-around on, as shipped). One read per page
/// touched, as a program would.
fn soft_fault(c: &mut Criterion) {
    let len = 16u64 << 20;
    let pages = len / PAGE;
    let path = hot_file("soft", len);
    let mut g = c.benchmark_group("soft_fault");
    g.throughput(Throughput::Elements(pages));
    for (name, fault_around) in [
        ("ours/off", FaultAround::Off),
        ("ours/outward_4", FaultAround::Outward(4)),
        ("ours/window_16", FaultAround::Window(16)),
    ] {
        let vm = Vm::new(
            X86Pmap::new(),
            VmConfig {
                memory_bytes: 64 << 20,
                fault_around,
                ..VmConfig::default()
            },
        )
        .unwrap();
        let object = VnodePager::open(&path, false).unwrap().object(&vm);
        let space = || {
            let s = vm.new_space().unwrap();
            s.map(MapRequest::object(BASE, len, object.clone(), 0, Prot::READ))
                .unwrap();
            s
        };
        let touch = |s: &vm_core::VmSpace<X86Pmap>| {
            for i in 0..pages {
                black_box(s.read_u8(BASE + i * PAGE).unwrap());
            }
        };
        touch(&space()); // the pages are now resident in the object
        assert_eq!(object.resident_count() as u64, pages);
        g.bench_function(name, |b| {
            b.iter_batched(
                space,
                |s| {
                    touch(&s);
                    s
                },
                BatchSize::PerIteration,
            );
        });
    }
    let file = std::fs::File::open(&path).unwrap();
    let mut warm = vec![0u8; len as usize];
    file.read_exact_at(&mut warm, 0).unwrap();
    g.bench_function("kernel", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // SAFETY: a fresh read-only mapping of `len` bytes of our
                // file, read within bounds and unmapped right after.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE,
                        std::os::fd::AsRawFd::as_raw_fd(&file),
                        0,
                    ) as *const u8;
                    assert!(p as isize != -1, "mmap failed");
                    let t = Instant::now();
                    for i in 0..pages as usize {
                        black_box(p.add(i * PAGE as usize).read_volatile());
                    }
                    total += t.elapsed();
                    libc::munmap(p as *mut _, len as usize);
                }
            }
            total
        });
    });
    g.finish();
}

/// Per-fault cost against region size, ours and the kernel's, for the
/// README's plot (`scripts/plot_region_size.py`).
fn region_size(c: &mut Criterion) {
    let vm = machine(1088 << 20);
    let mut g = c.benchmark_group("region_size");
    g.sample_size(10);
    // A sample of the largest takes the kernel most of a second: as many
    // iterations in each sample, not criterion's 1, 2, .. 10.
    g.sampling_mode(criterion::SamplingMode::Flat);
    for mib in [1u64, 4, 16, 64, 256, 1024] {
        let pages = (mib << 20) / PAGE;
        g.throughput(Throughput::Elements(pages));
        zero_fill_ours(&mut g, &format!("ours/{mib}"), &vm, pages);
        zero_fill_kernel(&mut g, &format!("kernel/{mib}"), pages);
    }
    g.finish();
}

criterion_group!(
    benches,
    anon_fault,
    fork_cow,
    file_seq,
    file_cold,
    file_slow,
    file_random,
    swap,
    soft_fault,
    parallel,
    region_size,
    superpage,
    superpage_pmap
);
criterion_main!(benches);
