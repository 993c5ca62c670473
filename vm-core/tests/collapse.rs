//! Shadow-chain collapse: fork/exit loops keep chains short and leak
//! nothing.

mod common;
use common::*;
use vm_core::Prot;

#[test]
fn a_thousand_fork_exit_cycles_keep_the_chain_bounded() {
    let (vm, parent) = machine(256);
    parent.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for i in 0..8 {
        parent.write_u8(BASE + i * PAGE, 0).unwrap();
    }
    let mut deepest = 0;
    for round in 0..1000u64 {
        let child = parent.fork().unwrap();
        child.write_u8(BASE + (round % 8) * PAGE, 0xcc).unwrap();
        drop(child);
        let v = (round % 251) as u8;
        parent.write_u8(BASE + (round % 8) * PAGE + 1, v).unwrap();
        let (obj, _) = parent.object_at(BASE).unwrap();
        deepest = deepest.max(obj.chain_depth());
    }
    assert!(deepest <= 3, "chain grew to {deepest}");
    assert!(vm.counters().snapshot().v_collapses >= 900);
    // Every page has its last value, and only the parent's pages are used.
    for i in 0..8u64 {
        let last = (0..1000u64).filter(|r| r % 8 == i).max().unwrap();
        assert_eq!(
            parent.read_u8(BASE + i * PAGE + 1).unwrap(),
            (last % 251) as u8
        );
        assert_eq!(
            parent.read_u8(BASE + i * PAGE).unwrap(),
            0,
            "the children's writes stayed theirs"
        );
    }
    let r = vm.check_consistency().unwrap();
    assert_eq!(r.in_objects, 8, "no page leaked");
    drop(parent);
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn collapse_waits_while_a_sibling_still_shares_the_backing_object() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"base").unwrap();
    let child = parent.fork().unwrap();
    parent.write(BASE, b"PAR!").unwrap();
    let (obj, _) = parent.object_at(BASE).unwrap();
    assert_eq!(obj.chain_depth(), 2);
    assert_eq!(
        vm.collapse(&obj),
        0,
        "the child still reads the backing object"
    );
    assert_eq!(child.read_u8(BASE).unwrap(), b'b');
    drop(child);
    assert_eq!(vm.collapse(&obj), 1);
    assert_eq!(obj.chain_depth(), 1);
    assert_eq!(parent.read_u8(BASE).unwrap(), b'P');
    consistent(&vm);
}

#[test]
fn collapse_moves_the_pages_the_shadow_lacks() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4u8 {
        parent.write_u8(BASE + u64::from(i) * PAGE, i + 1).unwrap();
    }
    let child = parent.fork().unwrap();
    parent.write_u8(BASE, 0x10).unwrap();
    drop(child);
    let (obj, _) = parent.object_at(BASE).unwrap();
    let (backing, _) = obj.backing().unwrap();
    let kept = backing.resident_page(2).unwrap();
    drop(backing);
    let free = vm.free_pages();
    assert_eq!(vm.collapse(&obj), 1);
    assert_eq!(obj.resident_page(2), Some(kept), "moved, not copied");
    assert_eq!(vm.free_pages(), free + 1, "the shadowed page 0 was freed");
    for i in 1..4u8 {
        assert_eq!(parent.read_u8(BASE + u64::from(i) * PAGE).unwrap(), i + 1);
    }
    assert_eq!(parent.read_u8(BASE).unwrap(), 0x10);
    consistent(&vm);
}

/// A backing object only one shadow still references is merged into that
/// shadow even when the shadow is itself shared: collapse works down the
/// whole chain, not only at its top (FreeBSD gets there from
/// `vm_object_deallocate`). Found by the red team's swap storm, where such
/// a middle object kept a chain one deeper than it needs to be.
#[test]
fn collapse_merges_below_a_shared_shadow() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"base").unwrap();
    let child = parent.fork().unwrap();
    child.write(BASE, b"kid1").unwrap();
    let grandchild = child.fork().unwrap();
    child.write(BASE + 8, b"more").unwrap();
    // The parent goes: the object it wrote "base" into is now seen only
    // through the child's first object, which the child and the grandchild
    // both still read.
    drop(parent);
    let (top, _) = child.object_at(BASE).unwrap();
    let before = top.chain_depth();
    let merged = vm.collapse(&top);
    let after = top.chain_depth();
    assert!(merged >= 1, "something below the shared object merges");
    assert!(after < before, "chain {before} -> {after}");
    let mut b = [0u8; 4];
    child.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"kid1");
    child.read(BASE + 8, &mut b).unwrap();
    assert_eq!(&b, b"more");
    grandchild.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"kid1");
    grandchild.read(BASE + 8, &mut b).unwrap();
    assert_eq!(b, [0; 4], "the child's later write stays the child's");
    consistent(&vm);
}

/// Issue 16 item 3: a parent that forks again and again while its
/// children live (each writes its page 0, so no collapse can merge) leaves
/// a shadow per fork between it and its memory. Each of those backing
/// objects holds only a page the parent's next shadow has its own copy
/// of, so the parent's shadow bypasses it (FreeBSD's `object_bypasses`):
/// the parent's chain stays short and its faults do not walk 64 objects,
/// while every child still reads what the parent held when it forked.
#[test]
fn forks_with_children_alive_keep_the_parents_chain_short() {
    let (vm, parent) = machine(512);
    parent.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    parent.write_u8(BASE, 0xaa).unwrap();
    let mut kids = Vec::new();
    for round in 0..64u8 {
        let child = parent.fork().unwrap();
        child.write_u8(BASE, round).unwrap();
        parent.write_u8(BASE, 0x80 | round).unwrap();
        kids.push(child);
    }
    let (obj, _) = parent.object_at(BASE).unwrap();
    assert!(obj.chain_depth() <= 2, "chain of {}", obj.chain_depth());
    drop(obj);
    assert!(vm.counters().snapshot().v_bypasses >= 60);
    assert_eq!(parent.read_u8(BASE).unwrap(), 0x80 | 63);
    for (round, child) in (0u8..).zip(&kids) {
        assert_eq!(child.read_u8(BASE).unwrap(), round, "child {round}");
        assert_eq!(child.read_u8(BASE + 5 * PAGE).unwrap(), 0);
    }
    vm.check_consistency().unwrap();
    drop(kids);
    drop(parent);
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// Bypassing must not hide what a backing object holds for the parent:
/// each round the parent writes one of four pages before forking, so some
/// backing objects hold pages the parent's shadow lacks (those stay in its
/// chain) and others are fully covered (those are bypassed). Every child
/// reads exactly the parent's memory at its fork, plus its own write.
#[test]
fn bypassed_and_kept_backing_objects_leave_every_view_intact() {
    let (vm, parent) = machine(1024);
    parent.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    let mut now = [0u8; 4];
    let mut kids = Vec::new();
    for round in 0..48u8 {
        let at = u64::from(round) * 7 % 4;
        parent.write_u8(BASE + at * PAGE, round).unwrap();
        now[at as usize] = round;
        let child = parent.fork().unwrap();
        child
            .write_u8(BASE + PAGE * u64::from(round % 4) + 1, 0xee)
            .unwrap();
        kids.push((child, now, round % 4));
        // The parent writes page 0 after each fork: its shadow covers it.
        parent.write_u8(BASE, 0x40 | round).unwrap();
        now[0] = 0x40 | round;
    }
    for (k, (child, seen, mine)) in kids.iter().enumerate() {
        for p in 0..4u64 {
            assert_eq!(
                child.read_u8(BASE + p * PAGE).unwrap(),
                seen[p as usize],
                "child {k} page {p}"
            );
            let own = if p == u64::from(*mine) { 0xee } else { 0 };
            assert_eq!(
                child.read_u8(BASE + p * PAGE + 1).unwrap(),
                own,
                "child {k} page {p}+1"
            );
        }
    }
    for p in 0..4u64 {
        assert_eq!(parent.read_u8(BASE + p * PAGE).unwrap(), now[p as usize]);
    }
    assert!(vm.counters().snapshot().v_bypasses > 0);
    vm.check_consistency().unwrap();
    drop(kids);
    drop(parent);
    assert_eq!(vm.free_pages(), vm.total_pages());
}

/// A handle to a backing object (from `object_at` before the fork) shows
/// its pages: collapse must not merge them into the shadow and free the
/// ones the shadow covers while the handle lives. Mapped again, the object
/// still holds what was written before the fork.
#[test]
fn a_handle_keeps_its_object_from_being_collapsed_away() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"before").unwrap();
    let (held, _) = parent.object_at(BASE).unwrap();
    let child = parent.fork().unwrap();
    parent.write(BASE, b"after!").unwrap();
    drop(child);
    // The child's exit leaves the old object to the parent's shadow alone.
    let (top, _) = parent.object_at(BASE).unwrap();
    vm.collapse(&top);
    drop(top);
    let other = vm.new_space().unwrap();
    other
        .map(vm_core::MapRequest::object(BASE, PAGE, held, 0, Prot::READ))
        .unwrap();
    let mut buf = [0u8; 6];
    other.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf, b"before", "the handle's page was collapsed away");
    parent.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf, b"after!");
}
