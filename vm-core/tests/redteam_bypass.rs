//! Red-team tests for collapse's bypass and the "a live handle keeps its
//! object whole" rule (commit 4b23626).
//!
//! Section 1 (`rt_*`): tests that assert what a correct implementation
//! guarantees and FAIL on the code they were written against.
//! Section 2 (`keep_*`): combinations that pass; kept as regression tests.
#![allow(clippy::unwrap_used, dead_code)]

mod common;

use common::{BASE, PAGE, consistent, machine};
use std::sync::{Arc, Mutex, PoisonError};
use vm_core::{Inheritance, MapRequest, Pager, PagerKind, Prot, SwapProvider};
use vm_testkit::MemPager;

#[derive(Default)]
struct MemSwap(Mutex<Vec<Arc<MemPager>>>);

impl SwapProvider for MemSwap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        let p = Arc::new(MemPager::new(PagerKind::ANONYMOUS));
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p.clone());
        Some(p)
    }
}

fn bypasses(vm: &vm_core::Vm<vm_testkit::RefPmap>) -> u64 {
    vm.counters().snapshot().v_bypasses
}

// ===================================================================
// Section 1: failing tests
// ===================================================================

/// A handle from `object_at` to the parent's object before a fork: once
/// the child is gone the parent's write fault renames (moves) the page out
/// of the handle's object (`try_rename`, the COW optimisation) although
/// the commit says a live handle keeps its object whole. Mapped again, the
/// handle's object shows zeros where it held 'B'.
#[test]
fn rt_object_at_handle_keeps_its_page_across_cow_rename() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, b'A').unwrap();
    parent.write_u8(BASE + PAGE, b'B').unwrap();
    let (held, _) = parent.object_at(BASE).unwrap();
    let child = parent.fork().unwrap();
    parent.write_u8(BASE, b'a').unwrap(); // parent's shadow, copy of page 0
    drop(child); // the held object now has one reference (the shadow)
    parent.write_u8(BASE + PAGE, b'b').unwrap(); // COW of page 1
    let other = vm.new_space().unwrap();
    other
        .map(MapRequest::object(BASE, 2 * PAGE, held, 0, Prot::READ))
        .unwrap();
    assert_eq!(other.read_u8(BASE).unwrap(), b'A', "handle page 0");
    assert_eq!(
        other.read_u8(BASE + PAGE).unwrap(),
        b'B',
        "the handle's page 1 was moved into the parent's shadow by the COW rename"
    );
    assert_eq!(parent.read_u8(BASE + PAGE).unwrap(), b'b');
    consistent(&vm);
}

/// Same through `VmObject::backing` (the handle the commit's docs name).
#[test]
fn rt_backing_handle_keeps_its_page_across_cow_rename() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, b'A').unwrap();
    parent.write_u8(BASE + PAGE, b'B').unwrap();
    let child = parent.fork().unwrap();
    parent.write_u8(BASE, b'a').unwrap();
    let (top, _) = parent.object_at(BASE).unwrap();
    let (held, off) = top.backing().unwrap();
    drop(top);
    assert_eq!(off, 0);
    drop(child);
    parent.write_u8(BASE + PAGE, b'b').unwrap();
    let other = vm.new_space().unwrap();
    other
        .map(MapRequest::object(BASE, 2 * PAGE, held, 0, Prot::READ))
        .unwrap();
    assert_eq!(
        other.read_u8(BASE + PAGE).unwrap(),
        b'B',
        "the backing() handle's page 1 was moved out by the COW rename"
    );
    consistent(&vm);
}

/// Builds: A (page0 'a', page1 'p') <- S (page0 'b') <- {C2 (child2), P
/// (parent, page0 'c')}; the parent's write makes P bypass S (P -> A).
/// Returns (vm, parent, child1, child2).
#[allow(clippy::type_complexity)]
fn bypassed_chain() -> (
    Arc<vm_core::Vm<vm_testkit::RefPmap>>,
    vm_core::VmSpace<vm_testkit::RefPmap>,
    vm_core::VmSpace<vm_testkit::RefPmap>,
    vm_core::VmSpace<vm_testkit::RefPmap>,
) {
    let (vm, parent) = machine(128);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, b'a').unwrap();
    parent.write_u8(BASE + PAGE, b'p').unwrap();
    let child1 = parent.fork().unwrap();
    parent.write_u8(BASE, b'b').unwrap(); // S (-> A) holds 'b'
    let child2 = parent.fork().unwrap();
    child2.write_u8(BASE + PAGE, b'x').unwrap(); // C2 (-> S)
    let before = bypasses(&vm);
    parent.write_u8(BASE, b'c').unwrap(); // P (-> S) covers S: bypass
    assert!(bypasses(&vm) > before, "set-up: no bypass happened");
    (vm, parent, child1, child2)
}

// Accepted as FreeBSD's behaviour, not tested: after P bypassed S, a user
// who takes a handle to P and then shrinks and regrows P through it
// (`resize_object`) reads A's page at the regrown index, where an
// unshortened chain P -> S -> A would show S's. (The other finding of that
// kind, the parent's munmap freeing P's pages under a handle, is gone: an
// unmap leaves the pages of an object a user holds.)

/// A page held (pinned) across a fork stays the parent's even when a user
/// holds the object through `object_at`: the hold's guarantee comes first
/// (CVE-2020-29374: the holder and the parent must not part). The handle
/// then no longer shows that page — it moved into the parent's shadow —
/// and reads what the object has there now (nothing: zero). On the red
/// team's first run the handle kept the page and the holder lost the
/// parent's writes under a concurrent scan; the second red team showed
/// the two rules conflict and this order was chosen.
#[test]
fn rt_a_held_page_moves_with_the_parent_even_under_a_handle() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, b'H').unwrap();
    let (held_obj, _) = parent.object_at(BASE).unwrap();
    let pin = parent.hold(BASE, PAGE, Prot::READ).unwrap();
    let child = parent.fork().unwrap();
    parent.write_u8(BASE, b'P').unwrap();
    let mut seen = [0u8; 1];
    pin.read(0, &mut seen).unwrap();
    assert_eq!(
        seen[0], b'P',
        "the holder no longer sees the parent's write"
    );
    assert_eq!(child.read_u8(BASE).unwrap(), b'H');
    drop(pin);
    let other = vm.new_space().unwrap();
    other
        .map(MapRequest::object(BASE, PAGE, held_obj, 0, Prot::READ))
        .unwrap();
    assert_eq!(other.read_u8(BASE).unwrap(), 0, "the held page moved up");
    consistent(&vm);
}

// ===================================================================
// Section 2: passing regression tests
// ===================================================================

/// The plain bypassed chain: every view is what fork semantics say.
#[test]
fn keep_bypassed_chain_views() {
    let (vm, parent, child1, child2) = bypassed_chain();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'c');
    assert_eq!(parent.read_u8(BASE + PAGE).unwrap(), b'p');
    assert_eq!(child1.read_u8(BASE).unwrap(), b'a');
    assert_eq!(child1.read_u8(BASE + PAGE).unwrap(), b'p');
    assert_eq!(child2.read_u8(BASE).unwrap(), b'b');
    assert_eq!(child2.read_u8(BASE + PAGE).unwrap(), b'x');
    let (p, _) = parent.object_at(BASE).unwrap();
    assert_eq!(p.chain_depth(), 2, "P backs onto A");
    drop(p);
    consistent(&vm);
    drop((child1, child2, parent));
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// A handle to the backing object S taken before the parent's covering
/// write blocks the bypass; S's pages stay.
#[test]
fn keep_handle_on_backing_blocks_bypass() {
    let (vm, parent) = machine(128);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, b'a').unwrap();
    let _child1 = parent.fork().unwrap();
    parent.write_u8(BASE, b'b').unwrap();
    let (s, _) = parent.object_at(BASE).unwrap();
    let child2 = parent.fork().unwrap();
    child2.write_u8(BASE + PAGE, b'x').unwrap();
    let before = bypasses(&vm);
    parent.write_u8(BASE, b'c').unwrap();
    assert_eq!(bypasses(&vm), before, "bypassed an object a handle holds");
    drop(child2);
    let other = vm.new_space().unwrap();
    other
        .map(MapRequest::object(BASE, 2 * PAGE, s, 0, Prot::READ))
        .unwrap();
    assert_eq!(other.read_u8(BASE).unwrap(), b'b');
    consistent(&vm);
}

/// Chains with non-zero offsets at both levels (entries clipped by munmap
/// before each shadow), then a bypass: the composed offset must be right.
#[test]
fn keep_bypass_with_offsets_at_both_levels() {
    let (vm, parent) = machine(256);
    parent.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for i in 0..8u64 {
        parent.write_u8(BASE + i * PAGE, 0x10 + i as u8).unwrap();
    }
    let child1 = parent.fork().unwrap();
    parent.unmap(BASE, 2 * PAGE).unwrap(); // entry at offset 2 in A
    parent.write_u8(BASE + 2 * PAGE, 0x22).unwrap(); // S (size 6, A+2)
    parent.write_u8(BASE + 4 * PAGE, 0x24).unwrap();
    let child2 = parent.fork().unwrap();
    child2.write_u8(BASE + 7 * PAGE, 0x77).unwrap();
    parent.unmap(BASE + 2 * PAGE, PAGE).unwrap(); // entry at offset 1 in S
    let before = bypasses(&vm);
    parent.write_u8(BASE + 4 * PAGE, 0x34).unwrap(); // P (S+1) covers S[2]
    assert!(bypasses(&vm) > before, "set-up: no bypass");
    let (p, _) = parent.object_at(BASE + 3 * PAGE).unwrap();
    assert_eq!(p.backing().unwrap().1, 3, "P backs onto A at offset 3");
    drop(p);
    let want_parent = [0x13, 0x34, 0x15, 0x16, 0x17];
    for (i, w) in (3..8u64).zip(want_parent) {
        assert_eq!(
            parent.read_u8(BASE + i * PAGE).unwrap(),
            w,
            "parent page {i}"
        );
    }
    for i in 0..8u64 {
        assert_eq!(
            child1.read_u8(BASE + i * PAGE).unwrap(),
            0x10 + i as u8,
            "child1 {i}"
        );
    }
    let want_c2 = [0x22, 0x13, 0x24, 0x15, 0x16, 0x77];
    for (i, w) in (2..8u64).zip(want_c2) {
        assert_eq!(
            child2.read_u8(BASE + i * PAGE).unwrap(),
            w,
            "child2 page {i}"
        );
    }
    consistent(&vm);
    drop((child1, child2, parent));
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// Forks with children alive under memory pressure with swap: each round
/// everything is paged out to swap, so shadows gain swap pagers (covered
/// via `has_page`) and backing objects gain pagers (bypass refused). All
/// views must stay exact.
#[test]
fn keep_forks_with_swap_pressure_keep_every_view() {
    let (vm, parent) = machine(160);
    vm.set_swap(Arc::new(MemSwap::default()));
    const N: u64 = 4;
    parent.map_anon(BASE, N * PAGE, Prot::RW).unwrap();
    let mut now = [0u8; N as usize];
    let mut kids = Vec::new();
    for round in 0..24u8 {
        let at = u64::from(round) % N;
        parent.write_u8(BASE + at * PAGE, round).unwrap();
        now[at as usize] = round;
        let child = parent.fork().unwrap();
        child
            .write_u8(BASE + (u64::from(round) * 3 % N) * PAGE + 7, 0xee)
            .unwrap();
        kids.push((child, now, u64::from(round) * 3 % N));
        parent.write_u8(BASE, 0x80 | round).unwrap();
        now[0] = 0x80 | round;
        if round % 3 == 0 {
            vm.pageout(vm.total_pages());
        }
        if round % 5 == 4 {
            // An older child exits: collapses become possible.
            kids.remove(0);
        }
    }
    vm.pageout(vm.total_pages());
    for (k, (child, seen, mine)) in kids.iter().enumerate() {
        for p in 0..N {
            assert_eq!(
                child.read_u8(BASE + p * PAGE).unwrap(),
                seen[p as usize],
                "child {k} page {p}"
            );
            let own = if p == *mine { 0xee } else { 0 };
            assert_eq!(
                child.read_u8(BASE + p * PAGE + 7).unwrap(),
                own,
                "child {k} page {p}+7"
            );
        }
    }
    for p in 0..N {
        assert_eq!(
            parent.read_u8(BASE + p * PAGE).unwrap(),
            now[p as usize],
            "parent {p}"
        );
    }
    consistent(&vm);
}

/// After a bypass, the region is made Share-inherited and forked: the
/// sharing child writes into P directly (P gains pages), the parent sees
/// them; the old children keep their views.
#[test]
fn keep_bypass_then_share_inheritance() {
    let (vm, parent, child1, child2) = bypassed_chain();
    parent
        .set_inheritance(BASE, 2 * PAGE, Inheritance::Share)
        .unwrap();
    let sharer = parent.fork().unwrap();
    sharer.write_u8(BASE + PAGE, b'S').unwrap();
    assert_eq!(parent.read_u8(BASE + PAGE).unwrap(), b'S');
    sharer.write_u8(BASE, b'T').unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'T');
    assert_eq!(child1.read_u8(BASE + PAGE).unwrap(), b'p');
    assert_eq!(child2.read_u8(BASE + PAGE).unwrap(), b'x');
    assert_eq!(child2.read_u8(BASE).unwrap(), b'b');
    drop(parent);
    assert_eq!(sharer.read_u8(BASE).unwrap(), b'T');
    consistent(&vm);
}

/// After a bypass, wiring the parent's range (mlock), forking a wired copy
/// entry, unwiring: every view exact.
#[test]
fn keep_bypass_then_wire_and_fork() {
    let (vm, parent, child1, child2) = bypassed_chain();
    parent.wire(BASE, 2 * PAGE, true).unwrap();
    let child3 = parent.fork().unwrap();
    parent.write_u8(BASE + PAGE, b'q').unwrap();
    assert_eq!(child3.read_u8(BASE).unwrap(), b'c');
    assert_eq!(child3.read_u8(BASE + PAGE).unwrap(), b'p');
    parent.unwire(BASE, 2 * PAGE, true).unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'c');
    assert_eq!(parent.read_u8(BASE + PAGE).unwrap(), b'q');
    assert_eq!(child1.read_u8(BASE).unwrap(), b'a');
    assert_eq!(child2.read_u8(BASE).unwrap(), b'b');
    consistent(&vm);
}

/// Several threads: one forks repeatedly (children alive, so bypasses),
/// one writes the parent's other pages, one runs the pageout daemon with
/// swap, one reads through the youngest child. Final views are exact.
#[test]
fn keep_concurrent_forks_bypass_pageout_and_faults() {
    let (vm, parent) = machine(512);
    vm.set_swap(Arc::new(MemSwap::default()));
    const N: u64 = 8;
    parent.map_anon(BASE, N * PAGE, Prot::RW).unwrap();
    for p in 0..N {
        parent.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let parent = Arc::new(parent);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kids: Mutex<Vec<(vm_core::VmSpace<vm_testkit::RefPmap>, u8)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let (parent2, stop2) = (&parent, &stop);
        // Writer of pages 1..N: each page holds its index in byte 0 and a
        // counter in byte 1.
        s.spawn(move || {
            let mut n = 0u8;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                n = n.wrapping_add(1);
                for p in 1..N {
                    parent2.write_u8(BASE + p * PAGE + 1, n).unwrap();
                    assert_eq!(parent2.read_u8(BASE + p * PAGE).unwrap(), p as u8);
                }
            }
        });
        let vm2 = vm.clone();
        s.spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                vm2.pageout(vm2.total_pages());
                std::thread::yield_now();
            }
        });
        for round in 0..40u8 {
            parent.write_u8(BASE, round).unwrap();
            let child = parent.fork().unwrap();
            child.write_u8(BASE + 2, 0xcc).unwrap();
            assert_eq!(child.read_u8(BASE).unwrap(), round);
            let mut k = kids.lock().unwrap();
            k.push((child, round));
            if k.len() > 12 {
                k.remove(0);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    for (child, round) in kids.lock().unwrap().iter() {
        assert_eq!(
            child.read_u8(BASE).unwrap(),
            *round,
            "child of round {round}"
        );
        assert_eq!(child.read_u8(BASE + 2).unwrap(), 0xcc);
        for p in 1..N {
            assert_eq!(child.read_u8(BASE + p * PAGE).unwrap(), p as u8);
        }
    }
    assert_eq!(parent.read_u8(BASE).unwrap(), 39);
    consistent(&vm);
}
