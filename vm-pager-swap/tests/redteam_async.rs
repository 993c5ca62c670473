//! Red team of asynchronous read-ahead (commit 0499376) on a real swap
//! device: anonymous memory paged out and read back sequentially, so that
//! swap-ins go to the background; with writes between cycles, fork, many
//! threads and the pageout daemon, and an unmap in the middle of a window
//! in flight. Every byte read is checked.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_core::{Prot, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_testkit::RefPmap;
use vm_testkit::support::ManualExecutor as Manual;
use vm_testkit::support::{TempPath, bounded, scaled_secs};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn vm(pages: u64) -> Arc<Vm<RefPmap>> {
    Vm::new(
        RefPmap::new(),
        VmConfig {
            async_read_ahead: true,
            memory_wait_ms: 1,
            memory_retries: 500,
            ..vm_testkit::test_config(pages)
        },
    )
    .unwrap()
}

fn consistent(vm: &Vm<RefPmap>) {
    if let Err(e) = vm.check_consistency() {
        panic!("inconsistent: {e}");
    }
}

fn byte(p: u64, o: usize, tag: u8) -> u8 {
    ((p.wrapping_mul(2_654_435_761) >> 7) as u8) ^ (o as u8).wrapping_mul(3) ^ tag
}

fn write_page(space: &VmSpace<RefPmap>, base: u64, p: u64, tag: u8) {
    let buf: Vec<u8> = (0..PAGE as usize).map(|o| byte(p, o, tag)).collect();
    space.write(base + p * PAGE, &buf).unwrap();
}

fn check_page(space: &VmSpace<RefPmap>, base: u64, p: u64, tag: u8, who: &str) {
    let mut buf = vec![0u8; PAGE as usize];
    space
        .read(base + p * PAGE, &mut buf)
        .unwrap_or_else(|e| panic!("{who}: page {p}: {e}"));
    for (o, &b) in buf.iter().enumerate() {
        assert_eq!(
            b,
            byte(p, o, tag),
            "{who}: page {p} byte {o} (expected tag {tag:#x})"
        );
    }
}

/// Anonymous memory four times the RAM, written, read back sequentially
/// (swap-ins in the background), rewritten in part, read back again,
/// three cycles: every byte right, background reads happened.
#[test]
fn swap_cycles_read_back_sequentially_in_the_background() {
    bounded(19, || {
        let t = TempPath::new();
        let vm = vm(384);
        let swap = Swap::create(&t.0, 8 << 20).unwrap();
        vm.set_swap(swap.provider());
        let space = vm.new_space().unwrap();
        let n = 1536u64;
        space.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        let mut tags = vec![0u8; n as usize];
        for p in 0..n {
            write_page(&space, BASE, p, 0);
        }
        for cycle in 1..=3u8 {
            for p in 0..n {
                check_page(&space, BASE, p, tags[p as usize], &format!("cycle {cycle}"));
            }
            for p in (0..n).filter(|p| p % (u64::from(cycle) + 1) == 0) {
                tags[p as usize] = cycle;
                write_page(&space, BASE, p, cycle);
            }
        }
        for p in 0..n {
            check_page(&space, BASE, p, tags[p as usize], "final");
        }
        let c = vm.counters().snapshot();
        assert!(c.v_async_reads > 0, "background swap-ins: {c:?}");
        consistent(&vm);
    });
}

/// Fork of swapped memory: the child reads sequentially (background
/// swap-ins in the shared object) while the parent writes the same pages;
/// each sees its own bytes.
#[test]
fn fork_child_reads_while_parent_writes_swapped_memory() {
    bounded(19, || {
        let t = TempPath::new();
        let vm = vm(320);
        let swap = Swap::create(&t.0, 8 << 20).unwrap();
        vm.set_swap(swap.provider());
        let space = Arc::new(vm.new_space().unwrap());
        let n = 1024u64;
        space.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for p in 0..n {
            write_page(&space, BASE, p, 0);
        }
        vm.pageout(vm.total_pages());
        let child = Arc::new(space.fork().unwrap());
        let c2 = child.clone();
        let reader = std::thread::spawn(move || {
            for round in 0..2 {
                for p in 0..n {
                    check_page(&c2, BASE, p, 0, &format!("child round {round}"));
                }
            }
        });
        for p in (0..n).step_by(3) {
            write_page(&space, BASE, p, 0x55);
        }
        reader.join().unwrap();
        for p in 0..n {
            let tag = if p % 3 == 0 { 0x55 } else { 0 };
            check_page(&space, BASE, p, tag, "parent");
        }
        for p in 0..n {
            check_page(&child, BASE, p, 0, "child after");
        }
        drop(child);
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}

/// Threads scan their own swapped regions and one shared region with the
/// pageout daemon running; every byte is checked.
#[test]
fn threads_scan_swapped_memory_with_the_pageout_daemon() {
    bounded(19, || {
        let t = TempPath::new();
        let vm = vm(512);
        let swap = Swap::create(&t.0, 16 << 20).unwrap();
        vm.set_swap(swap.provider());
        let space = Arc::new(vm.new_space().unwrap());
        let per = 384u64;
        let regions = 4u64;
        for r in 0..regions {
            let base = BASE + r * 0x1000_0000;
            space.map_anon(base, per * PAGE, Prot::RW).unwrap();
            for p in 0..per {
                write_page(&space, base, p, r as u8);
            }
        }
        let daemon = vm.spawn_pageout_daemon(Duration::from_millis(2));
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for th in 0..4u64 {
            let (space, stop) = (space.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                // Own region, then the shared region 0, twice.
                for round in 0..2 {
                    for r in [th, 0] {
                        let base = BASE + r * 0x1000_0000;
                        for p in 0..per {
                            check_page(
                                &space,
                                base,
                                p,
                                r as u8,
                                &format!("thread {th} round {round} region {r}"),
                            );
                        }
                    }
                }
                let _ = stop;
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        drop(daemon);
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}

/// A background swap-in of a window held (manual executor) while the
/// middle of the anonymous range is unmapped and mapped again (fresh
/// memory): the new mapping reads zeros, never the old swap contents; the
/// rest reads right.
#[test]
fn unmap_the_middle_of_a_window_in_flight_and_map_fresh_memory() {
    bounded(19, || {
        let t = TempPath::new();
        let vm = vm(256);
        let manual = Arc::new(Manual::default());
        vm.set_io_executor(Some(manual.clone()));
        let swap = Swap::create(&t.0, 8 << 20).unwrap();
        vm.set_swap(swap.provider());
        let space = Arc::new(vm.new_space().unwrap());
        let n = 200u64;
        space.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for p in 0..n {
            write_page(&space, BASE, p, 0x11);
        }
        vm.pageout(vm.total_pages());
        let (obj, _) = space.object_at(BASE).unwrap();
        assert!(obj.resident_between(0, n).len() < n as usize);
        // Read until a background swap-in is queued.
        let mut at = None;
        for p in 0..n {
            check_page(&space, BASE, p, 0x11, "scan");
            if manual.pending() > 0 {
                at = Some(p);
                break;
            }
        }
        let at = at.expect("a background swap-in was queued");
        let busy: Vec<u64> = (at + 1..n)
            .filter(|&p| obj.resident_page(p).is_some_and(|id| vm.page(id).is_busy()))
            .collect();
        assert!(busy.len() >= 2, "window in flight: {busy:?}");
        let (lo, hi) = (busy[0] + 1, busy[busy.len() - 1] + 3);
        // Unmap from the middle of the window to past its end, on a
        // thread: it may wait for the busy pages.
        let sp = space.clone();
        let un = std::thread::spawn(move || sp.unmap(BASE + lo * PAGE, (hi - lo) * PAGE).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        manual.run_all();
        let t0 = Instant::now();
        while !un.is_finished() {
            assert!(t0.elapsed() < scaled_secs(5), "unmap stuck");
            manual.run_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        un.join().unwrap();
        space
            .map_anon(BASE + lo * PAGE, (hi - lo) * PAGE, Prot::RW)
            .unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        for p in 0..n {
            if (lo..hi).contains(&p) {
                space.read(BASE + p * PAGE, &mut buf).unwrap();
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "fresh page {p} shows old bytes"
                );
            } else {
                check_page(&space, BASE, p, 0x11, "after unmap");
            }
            manual.run_all();
        }
        // And again after another page-out cycle.
        vm.pageout(vm.total_pages());
        for p in 0..n {
            if (lo..hi).contains(&p) {
                space.read(BASE + p * PAGE, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == 0), "fresh page {p} (2)");
            } else {
                check_page(&space, BASE, p, 0x11, "after unmap (2)");
            }
            manual.run_all();
        }
        manual.run_all();
        consistent(&vm);
    });
}

/// Swapped memory whose window is in flight (held) when the space is
/// dropped: the drop may wait for the read; run it from a pump; then
/// every block is freed and the machine is consistent.
#[test]
fn space_dropped_with_a_swap_in_in_flight() {
    bounded(19, || {
        let t = TempPath::new();
        let vm = vm(256);
        let manual = Arc::new(Manual::default());
        vm.set_io_executor(Some(manual.clone()));
        let swap = Swap::create(&t.0, 8 << 20).unwrap();
        vm.set_swap(swap.provider());
        let space = vm.new_space().unwrap();
        let n = 200u64;
        space.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for p in 0..n {
            write_page(&space, BASE, p, 0x22);
        }
        vm.pageout(vm.total_pages());
        for p in 0..n {
            check_page(&space, BASE, p, 0x22, "scan");
            if manual.pending() > 0 {
                break;
            }
        }
        assert_eq!(manual.pending(), 1);
        let d = std::thread::spawn(move || drop(space));
        let t0 = Instant::now();
        while !d.is_finished() {
            assert!(t0.elapsed() < scaled_secs(5), "drop stuck");
            manual.run_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        d.join().unwrap();
        manual.run_all();
        consistent(&vm);
        assert_eq!(swap.stats().used, 0, "every block freed: {}", swap.stats());
    });
}
