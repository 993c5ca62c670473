//! Red-team regression tests across the three #16 commits (sharded map
//! lock, split page-table locks, collapse bypass), on both pmaps. These
//! passed on the code they were written against.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use vm_core::{Pmap, Prot, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;
const N: u64 = 8;

/// The parent forks 40 times with up to 10 children alive (each round's
/// covering write makes the parent's shadow bypass the previous one),
/// while two threads write the parent's pages 1..N (each its own), one
/// toggles the protection of page N-1 (mprotect, so the entry is clipped
/// and merged back in the pmap) and runs the pageout daemon with swap.
/// Every child reads exactly the parent's memory at its fork plus its own
/// write; the parent its last writes; at the end every frame (pages and
/// page tables) is free again.
fn forks_bypass_and_faults_under_pressure<P: Pmap>(tag: &str, pmap: P) {
    let swap_path = TempPath::new();
    let config = VmConfig {
        memory_wait_ms: 2,
        memory_retries: 100,
        ..vm_testkit::test_config(256)
    };
    let vm = Vm::new(pmap, config).unwrap();
    let swap = Swap::create(&swap_path.0, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let parent = vm.new_space().unwrap();
    parent.map_anon(BASE, N * PAGE, Prot::RW).unwrap();
    for p in 0..N {
        parent.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let stop = AtomicBool::new(false);
    let kids: Mutex<Vec<(VmSpace<P>, u8)>> = Mutex::new(Vec::new());
    let last = [
        std::sync::atomic::AtomicU8::new(0),
        std::sync::atomic::AtomicU8::new(0),
    ];
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (parent, stop, last) = (&parent, &stop, &last[t as usize]);
            s.spawn(move || {
                let mut n = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_add(1);
                    // Thread t owns pages 1+t, 3+t, 5+t (not N-1).
                    for p in (1 + t..N - 1).step_by(2) {
                        parent.write_u8(BASE + p * PAGE + 1, n).unwrap();
                        assert_eq!(parent.read_u8(BASE + p * PAGE).unwrap(), p as u8);
                        assert_eq!(parent.read_u8(BASE + p * PAGE + 1).unwrap(), n);
                    }
                    last.store(n, Ordering::Relaxed);
                }
            });
        }
        let (parent2, stop2, vm2) = (&parent, &stop, &vm);
        s.spawn(move || {
            let mut k = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let prot = if k.is_multiple_of(2) {
                    Prot::READ
                } else {
                    Prot::RW
                };
                parent2.protect(BASE + (N - 1) * PAGE, PAGE, prot).unwrap();
                let _ = parent2.read_u8(BASE + (N - 1) * PAGE).unwrap();
                if k.is_multiple_of(4) {
                    vm2.pageout(vm2.total_pages());
                }
                k += 1;
                std::thread::yield_now();
            }
            parent2
                .protect(BASE + (N - 1) * PAGE, PAGE, Prot::RW)
                .unwrap();
        });
        for round in 0..40u8 {
            parent.write_u8(BASE, round).unwrap();
            let child = parent.fork().unwrap();
            child.write_u8(BASE + 2, 0xcc).unwrap();
            assert_eq!(
                child.read_u8(BASE).unwrap(),
                round,
                "{tag}: child {round} at once"
            );
            let mut k = kids.lock().unwrap();
            k.push((child, round));
            if k.len() > 10 {
                k.remove(0);
            }
            drop(k);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
    });
    vm.pageout(vm.total_pages());
    for (child, round) in kids.lock().unwrap().iter() {
        assert_eq!(
            child.read_u8(BASE).unwrap(),
            *round,
            "{tag}: child of round {round}"
        );
        assert_eq!(
            child.read_u8(BASE + 2).unwrap(),
            0xcc,
            "{tag}: child {round} own write"
        );
        for p in 1..N {
            assert_eq!(
                child.read_u8(BASE + p * PAGE).unwrap(),
                p as u8,
                "{tag}: child {round} page {p}"
            );
        }
    }
    assert_eq!(parent.read_u8(BASE).unwrap(), 39);
    for t in 0..2u64 {
        let n = last[t as usize].load(Ordering::Relaxed);
        for p in (1 + t..N - 1).step_by(2) {
            assert_eq!(
                parent.read_u8(BASE + p * PAGE + 1).unwrap(),
                n,
                "{tag}: parent page {p}"
            );
        }
    }
    vm.check_consistency().unwrap();
    kids.lock().unwrap().clear();
    drop(parent);
    assert_eq!(
        vm.free_pages(),
        vm.total_pages(),
        "{tag}: frames not all freed"
    );
}

#[test]
fn keep_forks_bypass_and_faults_under_pressure_ref() {
    forks_bypass_and_faults_under_pressure("ref", RefPmap::new());
}

#[test]
fn keep_forks_bypass_and_faults_under_pressure_x86() {
    forks_bypass_and_faults_under_pressure("x86", vm_pmap_x86_64::X86Pmap::new());
}

/// munmap in the middle of a forked, partly wired entry while children
/// are alive and the parent's shadow bypassed its backing object: the
/// pmap's counts (resident, wired) match what is mapped and everything is
/// freed at the end (x86 only: counts are the x86 space's).
#[test]
fn munmap_middle_of_wired_bypassed_entry_keeps_x86_counts() {
    let vm = Vm::new(vm_pmap_x86_64::X86Pmap::new(), vm_testkit::test_config(256)).unwrap();
    let parent = vm.new_space().unwrap();
    parent.map_anon(BASE, N * PAGE, Prot::RW).unwrap();
    for p in 0..N {
        parent.write_u8(BASE + p * PAGE, 0x40 + p as u8).unwrap();
    }
    let c1 = parent.fork().unwrap();
    parent.write_u8(BASE, 1).unwrap();
    let c2 = parent.fork().unwrap();
    c2.write_u8(BASE + PAGE, 2).unwrap();
    parent.write_u8(BASE, 3).unwrap(); // bypass
    assert!(vm.counters().snapshot().v_bypasses > 0, "set-up: no bypass");
    parent.wire(BASE + 2 * PAGE, 4 * PAGE, true).unwrap();
    parent.unmap(BASE + 3 * PAGE, 2 * PAGE).unwrap();
    let sp = parent.pmap_space();
    assert_eq!(sp.wired_count(), 2, "wired pages 2 and 5 remain");
    for p in [0, 1, 2, 5, 6, 7] {
        let _ = parent.read_u8(BASE + p * PAGE).unwrap();
    }
    assert_eq!(sp.resident_count(), 6);
    assert_eq!(parent.read_u8(BASE).unwrap(), 3);
    assert_eq!(parent.read_u8(BASE + 5 * PAGE).unwrap(), 0x45);
    assert_eq!(c1.read_u8(BASE).unwrap(), 0x40);
    assert_eq!(c2.read_u8(BASE).unwrap(), 1);
    assert_eq!(c2.read_u8(BASE + 3 * PAGE).unwrap(), 0x43);
    parent.unwire(BASE + 2 * PAGE, PAGE, true).unwrap();
    parent.unwire(BASE + 5 * PAGE, PAGE, true).unwrap();
    assert_eq!(sp.wired_count(), 0);
    vm.check_consistency().unwrap();
    drop((c1, c2, parent));
    assert_eq!(vm.free_pages(), vm.total_pages());
}
