//! Wired faults and wiring: seed L247-270, L307-308, L906-913,
//! L1026-1086, and fork of wired memory (L1088-1200).

mod common;
use common::*;
use vm_core::{FaultError, MapError, PageQueue, PagerKind, Prot};
use vm_testkit::{Injected, MemPager};

#[test]
fn wiring_maps_and_wires_every_page_and_unwiring_undoes_it() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space.wire(BASE, 4 * PAGE, true).unwrap();
    let (_, _, wired) = vm.queue_counts();
    assert_eq!(wired, 4);
    for i in 0..4 {
        let va = BASE + i * PAGE;
        let pte = vm
            .pmap()
            .pte(space.pmap_space(), va)
            .expect("wired pages are mapped");
        assert!(pte.wired);
        let page = vm.page(vm.page_of(pte.pfn).unwrap());
        assert_eq!((page.wire_count(), page.queue()), (1, PageQueue::None));
    }
    assert!(
        space.entries()[0]
            .eflags
            .contains(vm_core::EntryFlags::USER_WIRED)
    );
    consistent(&vm);
    space.unwire(BASE, 4 * PAGE, true).unwrap();
    assert_eq!(vm.queue_counts().2, 0);
    assert!(!vm.pmap().pte(space.pmap_space(), BASE).unwrap().wired);
    assert_eq!(
        space.unwire(BASE, PAGE, true),
        Err(MapError::NotWired {
            start: BASE,
            end: BASE + PAGE
        })
    );
    consistent(&vm);
}

#[test]
fn wired_faults_use_the_entry_protection() {
    // A user wiring faults for read only, but a wired fault takes the
    // entry's protection as its type (seed L307-308): on a copy-on-write
    // entry that means the private copy is made now and mapped writable,
    // so writes to wired memory never fault.
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"w").unwrap();
    let child = parent.fork().unwrap();
    child.wire(BASE, PAGE, true).unwrap();
    let pte = vm.pmap().pte(child.pmap_space(), BASE).unwrap();
    assert_eq!(pte.prot, Prot::RW);
    assert_ne!(Some(pte.pfn), parent.extract(BASE), "copied at wiring time");
    assert_eq!(vm.counters().snapshot().v_cow_faults, 1);
    child.write(BASE, b"x").unwrap();
    assert_eq!(
        vm.counters().snapshot().v_cow_faults,
        1,
        "no fault after wiring"
    );
    assert_eq!(parent.read_u8(BASE).unwrap(), b'w');
    child.unwire(BASE, PAGE, true).unwrap();
    consistent(&vm);
}

#[test]
fn a_wiring_that_fails_half_way_leaves_nothing_wired() {
    let (vm, space) = machine(32);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::READ, false);
    pager.inject(Injected::Normal);
    pager.inject(Injected::Normal);
    pager.inject(Injected::Fail(MemPager::io_error()));
    let e = space.wire(BASE, 4 * PAGE, true).unwrap_err();
    assert!(
        matches!(e, MapError::Fault(FaultError::Pager { pindex: 2, .. })),
        "{e}"
    );
    assert_eq!(vm.queue_counts().2, 0, "nothing stays wired");
    assert_eq!(space.entries()[0].wired_count, 0);
    assert!(
        !space.entries()[0]
            .eflags
            .contains(vm_core::EntryFlags::USER_WIRED)
    );
    for i in 0..2 {
        assert!(
            !vm.pmap()
                .pte(space.pmap_space(), BASE + i * PAGE)
                .unwrap()
                .wired
        );
    }
    consistent(&vm);
    // And the range can be wired afterwards.
    space.wire(BASE, 4 * PAGE, true).unwrap();
    consistent(&vm);
}

/// Seed L247-270 through `wire()`: user wiring of copy-on-write memory
/// behaves as mlock does. A writable private range gets its own copies at
/// wiring time (the seed's forced copy for "a r/w segment"); a read-only
/// one is wired where its pages are, without a copy (the seed: "we don't
/// COW currently RO sections"), and a later grant of write copies in place;
/// a range with no access cannot be wired (modern FreeBSD's
/// `MAP_ENTRY_WIRE_SKIPPED` without holes allowed).
#[test]
fn user_wiring_of_copy_on_write_memory_through_wire() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, b"text").unwrap();
    parent.write(BASE + PAGE, b"data").unwrap();
    let child = parent.fork().unwrap();
    // Writable: copied now.
    child.wire(BASE + PAGE, PAGE, true).unwrap();
    assert_ne!(child.extract(BASE + PAGE), parent.extract(BASE + PAGE));
    assert_eq!(vm.counters().snapshot().v_cow_faults, 1);
    // Read-only: shared and wired, not copied.
    child.protect(BASE, PAGE, Prot::READ).unwrap();
    child.wire(BASE, PAGE, true).unwrap();
    assert_eq!(child.extract(BASE), parent.extract(BASE));
    assert_eq!(vm.counters().snapshot().v_cow_faults, 1);
    let shared = vm.page(vm.page_of(child.extract(BASE).unwrap()).unwrap());
    assert_eq!(shared.wire_count(), 1);
    // The parent's write copies for the parent; the child keeps the old.
    parent.write(BASE, b"T").unwrap();
    assert_eq!(child.read_u8(BASE).unwrap(), b't');
    // A grant of write gives the wired child its own copy, still wired.
    child.protect(BASE, PAGE, Prot::RW).unwrap();
    child.write(BASE, b"X").unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'T');
    assert_eq!(vm.queue_counts().2, 2, "the child's two wired copies");
    child.unwire(BASE, 2 * PAGE, true).unwrap();
    assert_eq!(vm.queue_counts().2, 0);
    // No access: refused, nothing wired.
    child.protect(BASE, PAGE, Prot::NONE).unwrap();
    assert_eq!(
        child.wire(BASE, 2 * PAGE, true),
        Err(MapError::NoAccess {
            start: BASE,
            end: BASE + PAGE
        })
    );
    assert_eq!(child.entries()[1].wired_count, 0);
    consistent(&vm);
}

#[test]
fn fork_copies_wired_entries_page_by_page() {
    let (vm, parent) = machine(32);
    parent.map_anon(BASE, 3 * PAGE, Prot::RW).unwrap();
    for i in 0..3u8 {
        parent
            .write(BASE + u64::from(i) * PAGE, &[i + 1; 100])
            .unwrap();
    }
    parent.wire(BASE, 3 * PAGE, true).unwrap();
    let child = parent.fork().unwrap();
    for i in 0..3 {
        let va = BASE + i * PAGE;
        let (p, c) = (
            parent.extract(va).unwrap(),
            child.extract(va).expect("copied pages are entered"),
        );
        assert_ne!(p, c, "the child has its own frames");
        assert_eq!(child.read_u8(va).unwrap(), i as u8 + 1);
    }
    child.write(BASE, b"z").unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), 1);
    assert_eq!(child.entries()[0].wired_count, 0);
    consistent(&vm);
}

#[test]
fn unmapping_a_wired_range_unwires_it() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    space.wire(BASE, 2 * PAGE, false).unwrap();
    space.unmap(BASE, 2 * PAGE).unwrap();
    assert_eq!(vm.queue_counts().2, 0);
    assert_eq!(vm.free_pages(), vm.total_pages());
    consistent(&vm);
}

/// A user-wired private mapping of an object that a shared mapping also
/// shows, in both orders: wired writable (copied at wiring), and wired
/// read-only (sharing the object's pages) then made writable.
#[test]
fn a_user_wired_private_mapping_stays_writable_across_protect_and_never_writes_through() {
    for wired_writable in [true, false] {
        let (vm, space) = machine(32);
        let obj = vm.new_anon_object(2);
        let shared = BASE + 16 * PAGE;
        space
            .map(vm_core::MapRequest::object(
                shared,
                2 * PAGE,
                obj.clone(),
                0,
                Prot::RW,
            ))
            .unwrap();
        space.write(shared, b"A").unwrap();
        space.write(shared + PAGE, b"B").unwrap();
        let prot = if wired_writable { Prot::RW } else { Prot::READ };
        space
            .map(vm_core::MapRequest::object(BASE, 2 * PAGE, obj, 0, prot).private())
            .unwrap();
        space.wire(BASE, 2 * PAGE, true).unwrap();
        assert_eq!(vm.queue_counts().2, 2);
        // No change, a restriction, a grant: writes work after each.
        space.protect(BASE, 2 * PAGE, prot).unwrap();
        space.protect(BASE, 2 * PAGE, Prot::READ).unwrap();
        assert!(matches!(
            space.write(BASE, b"x"),
            Err(FaultError::ProtectionFailure { .. })
        ));
        space.protect(BASE, 2 * PAGE, Prot::RW).unwrap();
        space.write(BASE, b"a").unwrap();
        space.write(BASE + PAGE, b"b").unwrap();
        assert_eq!(byte(&space, BASE), b'a');
        assert_eq!(byte(&space, shared), b'A', "the shared object is untouched");
        assert_eq!(byte(&space, shared + PAGE), b'B');
        // Still exactly two wired pages, the private copies, mapped wired.
        assert_eq!(vm.queue_counts().2, 2, "wired_writable={wired_writable}");
        let pte = vm.pmap().pte(space.pmap_space(), BASE).unwrap();
        assert!(pte.wired);
        assert_eq!(vm.page(vm.page_of(pte.pfn).unwrap()).wire_count(), 1);
        consistent(&vm);
        space.unwire(BASE, 2 * PAGE, true).unwrap();
        assert_eq!(vm.queue_counts().2, 0);
        consistent(&vm);
    }
}
