//! Copy-on-write: seed L701-787, fork, and the stale-mapping fix of
//! FreeBSD-SA-21:08.vm.

mod common;
use common::*;
use vm_core::{FaultFlags, FaultKind, Inheritance, PagerKind, Prot};

#[test]
fn write_after_fork_copies_into_the_child() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"parent").unwrap();
    let child = parent.fork().unwrap();
    let before = vm.counters().snapshot();
    let out = child.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert_eq!(out.kind, FaultKind::CowCopy);
    child.write(BASE, b"child!").unwrap();
    let d = vm.counters().snapshot().since(&before);
    assert_eq!((d.v_cow_faults, d.v_cow_optim), (1, 0));
    let mut b = [0u8; 6];
    parent.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"parent");
    child.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"child!");
    assert_ne!(parent.extract(BASE), child.extract(BASE));
    consistent(&vm);
}

#[test]
fn fork_write_protects_the_parent() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"x").unwrap();
    let pte = vm.pmap().pte(parent.pmap_space(), BASE).unwrap();
    assert!(pte.prot.contains(Prot::WRITE));
    let _child = parent.fork().unwrap();
    let pte = vm.pmap().pte(parent.pmap_space(), BASE).unwrap();
    assert!(
        !pte.prot.contains(Prot::WRITE),
        "parent must fault on its next write"
    );
    parent.write(BASE, b"y").unwrap();
    assert_eq!(_child.read_u8(BASE).unwrap(), b'x');
}

#[test]
fn read_of_a_shared_page_maps_it_read_only() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"p").unwrap();
    let child = parent.fork().unwrap();
    let out = child.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(out.prot, Prot::READ);
    assert_eq!(Some(out.pfn), parent.extract(BASE));
    assert_eq!(
        vm.pmap().pte(child.pmap_space(), BASE).unwrap().prot,
        Prot::READ
    );
    consistent(&vm);
}

#[test]
fn private_backing_page_is_moved_not_copied() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"orig").unwrap();
    let pfn = parent.extract(BASE).unwrap();
    let child = parent.fork().unwrap();
    drop(child);
    let before = vm.counters().snapshot();
    let out = parent.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert_eq!(out.kind, FaultKind::CowMoved);
    assert_eq!(out.pfn, pfn, "the page moved up, no copy");
    let d = vm.counters().snapshot().since(&before);
    assert_eq!((d.v_cow_faults, d.v_cow_optim), (1, 1));
    let mut b = [0u8; 4];
    parent.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"orig");
    consistent(&vm);
}

#[test]
fn shared_backing_page_is_copied() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"orig").unwrap();
    let child = parent.fork().unwrap();
    parent.write(BASE, b"new!").unwrap();
    let s = vm.counters().snapshot();
    assert_eq!((s.v_cow_faults, s.v_cow_optim), (1, 0));
    assert_eq!(child.read_u8(BASE).unwrap(), b'o');
    consistent(&vm);
}

#[test]
fn copying_into_a_shared_shadow_removes_stale_mappings_elsewhere() {
    // A writes a page, forks B (copy), then shares the region with C: A and
    // C now share a shadow whose backing holds the page. Both read it (and
    // map the backing page read-only). When A writes, the copy lands in the
    // shared shadow; C must see A's write, not the stale backing page.
    let (vm, a) = machine(64);
    a.map_anon(BASE, PAGE, Prot::RW).unwrap();
    a.write(BASE, b"old").unwrap();
    let b = a.fork().unwrap();
    a.set_inheritance(BASE, PAGE, Inheritance::Share).unwrap();
    let c = a.fork().unwrap();
    assert_eq!(a.read_u8(BASE).unwrap(), b'o');
    assert_eq!(c.read_u8(BASE).unwrap(), b'o');
    assert!(c.extract(BASE).is_some());
    a.write(BASE, b"NEW").unwrap();
    let mut buf = [0u8; 3];
    c.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf, b"NEW", "C shares A's memory and must see the write");
    b.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf, b"old", "B has its own copy");
    assert!(vm.counters().snapshot().v_cow_unmapped >= 1);
    consistent(&vm);
}

#[test]
fn private_file_mapping_writes_to_a_shadow_only() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::RW, true);
    space.write(BASE + PAGE, b"mine").unwrap();
    let (first, _) = space.object_at(BASE).unwrap();
    assert_ne!(first.id(), obj.id(), "a shadow was made");
    assert_eq!(first.backing().unwrap().0.id(), obj.id());
    // The file's page in the object is untouched.
    let other = vm.new_space().unwrap();
    other
        .map(vm_core::MapRequest::object(
            BASE,
            4 * PAGE,
            obj,
            0,
            Prot::READ,
        ))
        .unwrap();
    assert_eq!(
        other.read_u8(BASE + PAGE).unwrap(),
        vm_testkit::pattern_byte(1, 0)
    );
    assert_eq!(space.read_u8(BASE + PAGE).unwrap(), b'm');
    assert_eq!(pager.calls().len(), 1);
    consistent(&vm);
}

#[test]
fn shared_inheritance_shares_writes_and_none_leaves_nothing() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.map_anon(BASE + 16 * PAGE, PAGE, Prot::RW).unwrap();
    parent
        .set_inheritance(BASE, PAGE, Inheritance::Share)
        .unwrap();
    parent
        .set_inheritance(BASE + 16 * PAGE, PAGE, Inheritance::None)
        .unwrap();
    let child = parent.fork().unwrap();
    child.write(BASE, b"c").unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'c');
    assert!(child.read_u8(BASE + 16 * PAGE).is_err());
    assert_eq!(child.entries().len(), 1);
    consistent(&vm);
}
