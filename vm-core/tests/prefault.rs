//! Prefault around a fault: seed L934-1006.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use vm_core::{FaultFlags, MapRequest, Prot, Vm, VmConfig, VmObject, VmSpace};
use vm_testkit::RefPmap;

/// A machine whose shared object of 16 pages has `resident` pages in
/// memory (written through a first space), and a second space that maps it
/// without having touched it.
fn setup(
    window: u32,
    resident: impl Iterator<Item = u64>,
) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>, Arc<VmObject>) {
    let config = VmConfig {
        prefault_pages: window,
        ..vm_testkit::test_config(128)
    };
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    let obj = vm.new_anon_object(16);
    let writer = vm.new_space().unwrap();
    writer
        .map(MapRequest::object(
            BASE,
            16 * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    for p in resident {
        writer.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let reader = vm.new_space().unwrap();
    reader
        .map(MapRequest::object(
            BASE,
            16 * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    (vm, reader, obj)
}

fn mapped(vm: &Vm<RefPmap>, s: &VmSpace<RefPmap>) -> BTreeSet<u64> {
    vm.pmap()
        .mappings(s.pmap_space())
        .iter()
        .map(|(va, _)| (va - BASE) / PAGE)
        .collect()
}

#[test]
fn four_pages_each_side_in_the_middle() {
    let (vm, s, _o) = setup(4, 0..16);
    let before = vm.counters().snapshot();
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (4..=12).collect());
    assert_eq!(vm.counters().snapshot().since(&before).v_prefaults, 8);
    // Prefaulted mappings are read-only and carry no A/M.
    let pte = vm.pmap().pte(s.pmap_space(), BASE + 9 * PAGE).unwrap();
    assert!(!pte.prot.contains(Prot::WRITE) && !pte.referenced && !pte.modified);
    assert!(
        vm.pmap()
            .pte(s.pmap_space(), BASE + 8 * PAGE)
            .unwrap()
            .prot
            .contains(Prot::WRITE)
    );
    consistent(&vm);
}

#[test]
fn only_inside_the_entry_at_its_start_and_end() {
    let (vm, s, _o) = setup(4, 0..16);
    s.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(mapped(&vm, &s), (0..=4).collect());
    let (vm, s, _o) = setup(4, 0..16);
    s.fault(BASE + 15 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (11..=15).collect());
}

#[test]
fn stops_at_the_first_page_not_resident() {
    let (vm, s, _o) = setup(4, (0..16).filter(|&p| p != 6));
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // Order -1, +1, -2: page 6 is missing, so 10, 5, 11, ... are not tried.
    assert_eq!(mapped(&vm, &s), [7, 8, 9].into_iter().collect());
}

#[test]
fn window_is_a_setting() {
    let (vm, s, _o) = setup(8, 0..16);
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (0..=15).collect());
    let (vm, s, _o) = setup(0, 0..16);
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
}

#[test]
fn prefault_follows_anonymous_shadow_chains_read_only() {
    let (vm, parent) = machine(128);
    parent.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    for p in 0..16 {
        parent.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let child = parent.fork().unwrap();
    child.write_u8(BASE, 0xff).unwrap(); // the child now has a shadow
    // That write prefaulted 1..=4 through the chain; this read adds 5..=12.
    child
        .fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &child), (0..=12).collect());
    let pte = vm.pmap().pte(child.pmap_space(), BASE + 9 * PAGE).unwrap();
    assert_eq!(
        Some(pte.pfn),
        parent.extract(BASE + 9 * PAGE),
        "the parent's page, shared"
    );
    assert!(!pte.prot.contains(Prot::WRITE));
    child.write_u8(BASE + 9 * PAGE, 0xee).unwrap();
    assert_eq!(parent.read_u8(BASE + 9 * PAGE).unwrap(), 9);
    consistent(&vm);
}

#[test]
fn wired_faults_do_not_prefault() {
    let (vm, s, _o) = setup(4, 0..16);
    s.wire(BASE + 8 * PAGE, PAGE, true).unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
}
