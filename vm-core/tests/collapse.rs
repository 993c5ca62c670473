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
