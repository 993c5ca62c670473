//! Held (pinned) pages: never freed, moved or diverging from the space
//! after a fork, in either direction (the CVE-2020-29374 class).

mod common;
use common::*;
use vm_core::{FaultError, Prot};

#[test]
fn held_frames_are_the_mapped_frames_and_see_the_space_writes() {
    let (vm, space) = machine(64);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space.write(BASE + 10, b"hello").unwrap();
    let held = space.hold(BASE, 2 * PAGE, Prot::RW).unwrap();
    assert_eq!(
        held.frames(),
        vec![
            space.extract(BASE).unwrap(),
            space.extract(BASE + PAGE).unwrap()
        ]
    );
    let mut b = [0u8; 5];
    held.read(10, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    space.write(BASE + PAGE, b"more").unwrap();
    held.read(PAGE as usize, &mut b[..4]).unwrap();
    assert_eq!(&b[..4], b"more");
    held.write(20, b"dma").unwrap();
    let mut c = [0u8; 3];
    space.read(BASE + 20, &mut c).unwrap();
    assert_eq!(&c, b"dma");
    drop(held);
    consistent(&vm);
}

#[test]
fn a_page_freed_while_held_is_freed_on_release() {
    let (vm, space) = machine(64);
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    space.write(BASE, b"keep").unwrap();
    let held = space.hold(BASE, PAGE, Prot::READ).unwrap();
    space.unmap(BASE, PAGE).unwrap();
    assert_eq!(vm.free_pages(), vm.total_pages() - 1, "still held");
    let mut b = [0u8; 4];
    held.read(0, &mut b).unwrap();
    assert_eq!(&b, b"keep");
    drop(held);
    assert_eq!(vm.free_pages(), vm.total_pages());
    consistent(&vm);
}

#[test]
fn holding_in_a_child_after_fork_first_copies() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"orig").unwrap();
    let child = parent.fork().unwrap();
    let held = child.hold(BASE, PAGE, Prot::READ).unwrap();
    assert_ne!(
        Some(held.frames()[0]),
        parent.extract(BASE),
        "a read hold still unshares"
    );
    parent.write(BASE, b"PARE").unwrap();
    let mut b = [0u8; 4];
    held.read(0, &mut b).unwrap();
    assert_eq!(
        &b, b"orig",
        "the parent's write is not seen through the child's hold"
    );
    child.write(BASE, b"CHLD").unwrap();
    held.read(0, &mut b).unwrap();
    assert_eq!(&b, b"CHLD", "the child's write is");
    drop(held);
    consistent(&vm);
}

#[test]
fn forking_a_parent_with_held_pages_gives_the_child_copies() {
    let (vm, parent) = machine(64);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"orig").unwrap();
    let held = parent.hold(BASE, PAGE, Prot::READ).unwrap();
    let child = parent.fork().unwrap();
    assert_ne!(
        child
            .fault(BASE, Prot::READ, vm_core::FaultFlags::NORMAL)
            .unwrap()
            .pfn,
        held.frames()[0]
    );
    parent.write(BASE, b"PARE").unwrap();
    let mut b = [0u8; 4];
    held.read(0, &mut b).unwrap();
    assert_eq!(&b, b"PARE", "the holder follows the parent");
    child.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"orig", "the child kept the value at fork");
    child.write(BASE + PAGE, b"z").unwrap();
    assert_eq!(parent.read_u8(BASE + PAGE).unwrap(), 0);
    drop(held);
    consistent(&vm);
}

#[test]
fn the_cow_optimisation_never_moves_a_held_page() {
    let (vm, a) = machine(64);
    a.map_anon(BASE, PAGE, Prot::RW).unwrap();
    a.write(BASE, b"orig").unwrap();
    // B shares A's object and pins its page through a shared mapping (no
    // copy is taken for a hold through a shared mapping).
    a.set_inheritance(BASE, PAGE, vm_core::Inheritance::Share)
        .unwrap();
    let b = a.fork().unwrap();
    let held = b.hold(BASE, PAGE, Prot::READ).unwrap();
    // A copy-inherited fork makes A's entry copy-on-write over the object;
    // once B and C are gone A is its only user, so A's next write would
    // move the page up instead of copying it — but the page is held.
    a.set_inheritance(BASE, PAGE, vm_core::Inheritance::Copy)
        .unwrap();
    let c = a.fork().unwrap();
    drop(c);
    b.unmap(BASE, PAGE).unwrap();
    a.write(BASE, b"new!").unwrap();
    assert_eq!(
        vm.counters().snapshot().v_cow_optim,
        0,
        "would have moved a held page"
    );
    assert_ne!(a.extract(BASE), Some(held.frames()[0]));
    let mut got = [0u8; 4];
    held.read(0, &mut got).unwrap();
    assert_eq!(&got, b"orig");
    drop(held);
    drop(b);
    consistent(&vm);
}

#[test]
fn a_hold_that_fails_holds_nothing() {
    let (vm, space) = machine(64);
    space.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    let e = space.hold(BASE, 3 * PAGE, Prot::READ).unwrap_err();
    assert_eq!(
        e,
        FaultError::InvalidAddress {
            addr: BASE + 2 * PAGE
        }
    );
    consistent(&vm);
}
