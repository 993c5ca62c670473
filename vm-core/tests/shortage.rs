//! A frame allocator run dry on command (a [`vm_core::Balloon`] holding
//! every free frame): each kind of fault and map operation that needs a
//! frame reports the shortage to its caller, leaves nothing busy, held,
//! wired or leaked, and works once memory is back.

mod common;
use common::*;
use vm_core::{BusCode, FaultError, FaultFlags, MapError, PagerKind, Prot, Signal};

fn is_shortage(e: &FaultError) -> bool {
    matches!(e, FaultError::ResourceShortage { .. }) && e.signal() == Signal::Bus(BusCode::OomErr)
}

#[test]
fn a_zero_fill_fault_without_memory_is_a_shortage_and_works_afterwards() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    let balloon = vm.inflate_balloon(u64::MAX);
    assert_eq!(vm.free_pages(), 0);
    let e = space
        .fault(BASE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap_err();
    assert!(is_shortage(&e), "{e}");
    assert_eq!(space.extract(BASE), None);
    consistent(&vm);
    let held = balloon.len();
    drop(balloon);
    assert_eq!(vm.free_pages(), held);
    space.write(BASE, b"ok").unwrap();
    assert_eq!(byte(&space, BASE), b'o');
    consistent(&vm);
}

#[test]
fn a_copy_on_write_fault_without_memory_changes_neither_side() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"P").unwrap();
    let child = parent.fork().unwrap();
    let mut balloon = vm.inflate_balloon(u64::MAX);
    let e = child.write(BASE, b"C").unwrap_err();
    assert!(is_shortage(&e), "{e}");
    consistent(&vm);
    // The parent's page is still mapped (read-only): reading it needs no
    // frame. The child's first read does: the fault puts a busy
    // placeholder in the first object before it looks below (seed L434).
    assert_eq!(byte(&parent, BASE), b'P');
    assert!(is_shortage(&child.read_u8(BASE).unwrap_err()));
    balloon.deflate(1);
    assert_eq!(byte(&child, BASE), b'P');
    child.write(BASE, b"C").unwrap();
    assert_eq!((byte(&parent, BASE), byte(&child, BASE)), (b'P', b'C'));
    consistent(&vm);
}

#[test]
fn a_page_in_without_memory_never_reaches_the_pager_and_leaves_no_paging_in_progress() {
    let (vm, space) = machine(32);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    let balloon = vm.inflate_balloon(u64::MAX);
    let e = space
        .fault(BASE + PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert!(is_shortage(&e), "{e}");
    assert!(pager.calls().is_empty());
    assert_eq!((obj.resident_count(), obj.paging_in_progress()), (0, 0));
    consistent(&vm);
    drop(balloon);
    assert_eq!(byte(&space, BASE + PAGE), vm_testkit::pattern_byte(1, 0));
    consistent(&vm);
}

#[test]
fn wiring_without_memory_fails_and_leaves_nothing_wired() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space.write(BASE, b"x").unwrap(); // one page resident already
    let balloon = vm.inflate_balloon(u64::MAX);
    let e = space.wire(BASE, 4 * PAGE, true).unwrap_err();
    assert!(
        matches!(e, MapError::Fault(FaultError::ResourceShortage { addr }) if addr == BASE + PAGE),
        "{e}"
    );
    assert_eq!(
        vm.queue_counts().2,
        balloon.len(),
        "only the balloon is wired"
    );
    assert!(
        !space.entries()[0]
            .eflags
            .contains(vm_core::EntryFlags::USER_WIRED)
    );
    consistent(&vm);
    drop(balloon);
    space.wire(BASE, 4 * PAGE, true).unwrap();
    assert_eq!(vm.queue_counts().2, 4);
    consistent(&vm);
}

#[test]
fn forking_wired_memory_without_memory_fails_and_the_parent_is_intact() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"w").unwrap();
    parent.wire(BASE, 2 * PAGE, true).unwrap();
    let balloon = vm.inflate_balloon(u64::MAX);
    let e = parent.fork().unwrap_err();
    assert_eq!(e, MapError::ResourceShortage);
    assert_eq!(byte(&parent, BASE), b'w');
    parent.write(BASE + PAGE, b"v").unwrap();
    consistent(&vm);
    drop(balloon);
    let child = parent.fork().unwrap();
    assert_eq!(byte(&child, BASE), b'w');
    consistent(&vm);
}

#[test]
fn a_balloon_gives_back_what_it_took() {
    let (vm, _space) = machine(32);
    let free = vm.free_pages();
    let mut b = vm.inflate_balloon(5);
    assert_eq!((b.len(), vm.free_pages()), (5, free - 5));
    assert_eq!(b.frames().count(), 5);
    assert_eq!(b.inflate(u64::MAX), free - 5);
    assert_eq!(b.deflate(3), 3);
    assert_eq!(vm.free_pages(), 3);
    consistent(&vm);
    drop(b);
    assert_eq!(vm.free_pages(), free);
    consistent(&vm);
}
