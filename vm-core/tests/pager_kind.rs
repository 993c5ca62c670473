//! Issue 15 item 5: the policy a pager's objects get follows the
//! [`PagerKind`] the pager declares, switch by switch, the same way for a
//! custom pager as for the built-in ones.

mod common;
use common::*;
use vm_core::{Contiguity, FaultFlags, MapError, MapRequest, PagerKind, Pmap, Prot, VirtAddr};
use vm_testkit::{GetCall, MemPager};

/// A read fault on a 32-page object served by a pager of `kind` that could
/// read 8 pages each way: the pages the pager was asked for.
fn first_read(kind: PagerKind) -> Vec<GetCall> {
    let (vm, space) = machine(128);
    let pager = std::sync::Arc::new(MemPager::with_pattern(kind, 32));
    pager.set_contiguity(Contiguity {
        behind: 8,
        ahead: 8,
    });
    let obj = vm.new_object(32, pager.clone());
    space
        .map(MapRequest::object(BASE, 32 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    space
        .fault(BASE + 16 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    consistent(&vm);
    pager.calls()
}

#[test]
fn clustering_follows_the_kind_not_the_class() {
    let one = vec![GetCall {
        pindexes: vec![16],
        reqpage: 0,
    }];
    assert_eq!(first_read(PagerKind::FILE.with_clustering(false)), one);
    assert!(first_read(PagerKind::FILE)[0].pindexes.len() > 1);
    // A device-class pager that can cluster is asked for neighbours too.
    assert!(
        first_read(PagerKind::DEVICE.with_clustering(true))[0]
            .pindexes
            .len()
            > 1
    );
}

/// Whether a read fault of a clean page with a copy on a pager of `kind`,
/// through a writable shared mapping, maps it writable.
fn read_maps_writable(kind: PagerKind) -> bool {
    let (vm, space) = machine(64);
    let (_pager, _obj) = map_pager(&vm, &space, kind, 4, Prot::RW, false);
    space.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    vm.pmap()
        .translate(space.pmap_space(), VirtAddr(BASE), Prot::WRITE)
        .is_some()
}

#[test]
fn clean_pages_are_mapped_read_only_when_the_kind_says_so() {
    assert!(!read_maps_writable(PagerKind::ANONYMOUS));
    assert!(read_maps_writable(
        PagerKind::ANONYMOUS.with_clean_read_only(false)
    ));
    assert!(read_maps_writable(PagerKind::FILE));
    assert!(!read_maps_writable(
        PagerKind::FILE.with_clean_read_only(true)
    ));
}

/// Whether an 8-page mapping of a 4-page object of `kind` is accepted.
fn maps_past_the_end(kind: PagerKind) -> Result<(), MapError> {
    let (vm, space) = machine(64);
    let obj = vm.new_object(4, std::sync::Arc::new(MemPager::with_pattern(kind, 4)));
    space
        .map(MapRequest::object(BASE, 8 * PAGE, obj, 0, Prot::READ))
        .map(|_| ())
}

#[test]
fn only_growing_objects_are_mapped_past_their_end() {
    assert!(maps_past_the_end(PagerKind::FILE).is_ok());
    assert!(maps_past_the_end(PagerKind::FILE.with_growth(false)).is_err());
    assert!(maps_past_the_end(PagerKind::ANONYMOUS).is_err());
    assert!(maps_past_the_end(PagerKind::ANONYMOUS.with_growth(true)).is_ok());
}

#[test]
fn device_class_objects_are_shared_only() {
    let (vm, space) = machine(64);
    let obj = vm.new_object(
        4,
        std::sync::Arc::new(MemPager::with_pattern(PagerKind::DEVICE, 4)),
    );
    let err = space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap_err();
    assert!(matches!(err, MapError::PrivateDevice { .. }), "{err}");
    assert_eq!(obj.kind().class(), vm_core::ObjectClass::Device);
}
