//! Lookup, protection and stack growth: seed L224-277, L321-324.

mod common;
use common::*;
use vm_core::{
    BusCode, EntryFlags, FaultError, FaultFlags, KernReturn, MapRequest, PagerKind, Prot, SegvCode,
    Signal,
};

#[test]
fn unmapped_address_is_invalid_and_allocates_nothing() {
    let (vm, space) = machine(32);
    let free = vm.free_pages();
    let e = space
        .fault(BASE + 5, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert_eq!(e, FaultError::InvalidAddress { addr: BASE });
    assert_eq!(e.signal(), Signal::Segv(SegvCode::MapErr));
    assert_eq!(e.kern_return(), KernReturn::InvalidAddress);
    assert_eq!(vm.free_pages(), free);
    consistent(&vm);
}

#[test]
fn addresses_outside_the_space_are_invalid() {
    let (_vm, space) = machine(8);
    for va in [0, 0x0000_8000_0000_0000, 0xffff_8000_0000_0000, u64::MAX] {
        let e = space.fault(va, Prot::READ, FaultFlags::NORMAL).unwrap_err();
        assert!(
            matches!(e, FaultError::InvalidAddress { addr } if addr == va),
            "{va:#x}: {e}"
        );
    }
    assert!(space.read(u64::MAX - 1, &mut [0u8; 4]).is_err());
}

#[test]
fn protection_failure_maps_nothing() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 4 * PAGE, Prot::READ).unwrap();
    let free = vm.free_pages();
    let e = space
        .fault(BASE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap_err();
    assert_eq!(
        e,
        FaultError::ProtectionFailure {
            addr: BASE,
            access: Prot::WRITE,
            allowed: Prot::READ
        }
    );
    assert_eq!(e.signal(), Signal::Segv(SegvCode::AccErr));
    assert_eq!(space.extract(BASE), None);
    assert_eq!(vm.free_pages(), free);
    // The user-access path reports the same.
    assert!(matches!(
        space.write(BASE + 1, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    // Reading is allowed and maps the page read-only.
    assert_eq!(byte(&space, BASE), 0);
    assert!(matches!(
        space.write(BASE, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    consistent(&vm);
}

#[test]
fn nofault_entry_is_an_error_not_a_panic() {
    let (vm, space) = machine(8);
    space
        .map(MapRequest::anon(BASE, PAGE, Prot::RW).flags(EntryFlags::NOFAULT))
        .unwrap();
    let e = space
        .fault(BASE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert_eq!(e, FaultError::NoFaultEntry { addr: BASE });
    assert_eq!(e.signal(), Signal::Segv(SegvCode::MapErr));
    consistent(&vm);
}

#[test]
fn fault_below_a_stack_grows_it_once() {
    let (vm, space) = machine(64);
    let top = 0x7fff_0000_0000;
    space.map_stack(top, 4 * PAGE, 64 * PAGE).unwrap();
    assert_eq!(space.entries().len(), 1);
    space.write(top - 10 * PAGE, b"deep").unwrap();
    let entries = space.entries();
    assert_eq!(entries.len(), 2);
    assert!(entries[0].start <= top - 10 * PAGE);
    assert!(entries[0].eflags.contains(EntryFlags::GROWS_DOWN));
    assert!(!entries[1].eflags.contains(EntryFlags::GROWS_DOWN));
    assert_eq!(vm.counters().snapshot().v_stack_growths, 1);
    let mut b = [0u8; 4];
    space.read(top - 10 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"deep");
    consistent(&vm);
}

#[test]
fn a_fault_past_the_stack_limit_is_an_unmapped_address() {
    let (vm, space) = machine(64);
    let top = 0x7fff_0000_0000;
    space.map_stack(top, 4 * PAGE, 16 * PAGE).unwrap();
    let e = space
        .fault(top - 17 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap_err();
    assert_eq!(
        e,
        FaultError::InvalidAddress {
            addr: top - 17 * PAGE
        }
    );
    assert_eq!(space.entries().len(), 1);
    assert_eq!(vm.counters().snapshot().v_stack_growths, 0);
    // At the limit it still works.
    space
        .fault(top - 16 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    consistent(&vm);
}

#[test]
fn stack_does_not_grow_into_the_mapping_below() {
    let (_vm, space) = machine(64);
    let top = 0x7fff_0000_0000;
    space.map_stack(top, 4 * PAGE, 64 * PAGE).unwrap();
    space.map_anon(top - 12 * PAGE, 4 * PAGE, Prot::RW).unwrap();
    // The gap is 4 pages: growing to 6 pages below the stack is fine...
    space
        .fault(top - 6 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // ...and the growth stopped at the neighbour.
    let entries = space.entries();
    assert!(entries.windows(2).all(|w| w[0].end <= w[1].start));
}

#[test]
fn dead_object_is_a_protection_failure() {
    let (vm, space) = machine(32);
    let (_pager, obj) = map_pager(&vm, &space, PagerKind::DEVICE, 4, Prot::READ, false);
    assert_eq!(byte(&space, BASE), vm_testkit::pattern_byte(0, 0));
    vm.terminate_object(&obj);
    assert_eq!(space.extract(BASE), None, "terminate removes mappings");
    let e = space
        .fault(BASE + PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap_err();
    assert_eq!(
        e,
        FaultError::DeadObject {
            addr: BASE + PAGE,
            object: obj.id()
        }
    );
    assert_eq!(e.kern_return(), KernReturn::ProtectionFailure);
    consistent(&vm);
}

#[test]
fn errors_name_their_signal_and_facts() {
    let e = FaultError::ResourceShortage { addr: 0x1000 };
    assert_eq!(e.signal(), Signal::Bus(BusCode::OomErr));
    assert_eq!(e.signal().number(), 10);
    assert_eq!(e.to_string(), "out of memory resolving a fault at 0x1000");
    let e = FaultError::ProtectionFailure {
        addr: 0x2000,
        access: Prot::WRITE,
        allowed: Prot::READ,
    };
    assert_eq!(
        e.to_string(),
        "-w- access to 0x2000 denied: mapping allows r--"
    );
    assert_eq!(e.addr(), 0x2000);
}
