//! Fault-around: the seed's outward prefault (L934-1006) and the aligned
//! window entered as one run.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use vm_core::{FaultAround, FaultFlags, MapRequest, Prot, Vm, VmConfig, VmObject, VmSpace};
use vm_testkit::RefPmap;

/// A machine whose shared object of 16 pages has `resident` pages in
/// memory (written through a first space), and a second space that maps it
/// without having touched it.
fn setup(
    fault_around: FaultAround,
    resident: impl Iterator<Item = u64>,
) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>, Arc<VmObject>) {
    let config = VmConfig {
        fault_around,
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
    let (vm, s, _o) = setup(FaultAround::Outward(4), 0..16);
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
    let (vm, s, _o) = setup(FaultAround::Outward(4), 0..16);
    s.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(mapped(&vm, &s), (0..=4).collect());
    let (vm, s, _o) = setup(FaultAround::Outward(4), 0..16);
    s.fault(BASE + 15 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (11..=15).collect());
}

#[test]
fn stops_at_the_first_page_not_resident() {
    let (vm, s, _o) = setup(FaultAround::Outward(4), (0..16).filter(|&p| p != 6));
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    // Order -1, +1, -2: page 6 is missing, so 10, 5, 11, ... are not tried.
    assert_eq!(mapped(&vm, &s), [7, 8, 9].into_iter().collect());
}

#[test]
fn window_is_a_setting() {
    let (vm, s, _o) = setup(FaultAround::Outward(8), 0..16);
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (0..=15).collect());
    let (vm, s, _o) = setup(FaultAround::Off, 0..16);
    s.fault(BASE + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
}

/// A machine with `fault_around` and a space.
fn machine_with(fault_around: FaultAround) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>) {
    let config = VmConfig {
        fault_around,
        ..vm_testkit::test_config(128)
    };
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    let s = vm.new_space().unwrap();
    (vm, s)
}

#[test]
fn prefault_follows_anonymous_shadow_chains_read_only() {
    let (vm, parent) = machine_with(FaultAround::Outward(4));
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
    let (vm, s, _o) = setup(FaultAround::Outward(4), 0..16);
    s.wire(BASE + 8 * PAGE, PAGE, true).unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
}

#[test]
fn the_default_is_a_sixteen_page_window() {
    assert_eq!(VmConfig::default().fault_around, FaultAround::Window(16));
}

#[test]
fn a_window_maps_every_resident_page_of_its_aligned_block() {
    // Holes do not stop it (unlike the seed's walk), the block is aligned
    // to its size, and the pages are mapped read-only without A/M.
    let (vm, s, _o) = setup(
        FaultAround::Window(8),
        (0..16).filter(|&p| p != 9 && p != 3),
    );
    let before = vm.counters().snapshot();
    s.fault(BASE + 10 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(
        mapped(&vm, &s),
        [8, 10, 11, 12, 13, 14, 15].into_iter().collect()
    );
    assert_eq!(vm.counters().snapshot().since(&before).v_prefaults, 6);
    let pte = vm.pmap().pte(s.pmap_space(), BASE + 12 * PAGE).unwrap();
    assert!(!pte.prot.contains(Prot::WRITE) && !pte.referenced && !pte.modified);
    // The next block is a separate window.
    s.fault(BASE + 3 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    let mut want: BTreeSet<u64> = (0..8).collect();
    want.extend([8, 10, 11, 12, 13, 14, 15]);
    assert_eq!(mapped(&vm, &s), want, "page 3 zero-filled, 0..8 mapped");
    consistent(&vm);
}

#[test]
fn a_window_is_rounded_to_a_power_of_two_and_clipped_to_the_entry() {
    // 5 rounds up to 8; the entry starts at page 2 of the object's block.
    let (vm, _whole, obj) = setup(FaultAround::Window(5), 0..16);
    let reader = vm.new_space().unwrap();
    reader
        .map(MapRequest::object(
            BASE + 2 * PAGE,
            4 * PAGE,
            obj,
            2 * PAGE,
            Prot::READ,
        ))
        .unwrap();
    reader
        .fault(BASE + 3 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &reader), (2..6).collect());
    for p in 2..6 {
        assert_eq!(reader.read_u8(BASE + p * PAGE).unwrap(), p as u8);
    }
    consistent(&vm);
}

#[test]
fn a_window_finds_pages_below_a_shadow_and_never_lets_a_write_through() {
    let (vm, parent) = machine_with(FaultAround::Window(16));
    parent.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    for p in 0..16 {
        parent.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let child = parent.fork().unwrap();
    // The child's write makes its shadow (a write maps no window); a
    // read then maps the parent's pages from below, read-only.
    child.write_u8(BASE + 5 * PAGE, 0xff).unwrap();
    assert_eq!(mapped(&vm, &child), [5].into_iter().collect());
    child
        .fault(BASE + 6 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(mapped(&vm, &child), (0..16).collect());
    assert_eq!(
        child.read_u8(BASE + 5 * PAGE).unwrap(),
        0xff,
        "its own copy"
    );
    let pte = vm.pmap().pte(child.pmap_space(), BASE + 9 * PAGE).unwrap();
    assert_eq!(Some(pte.pfn), parent.extract(BASE + 9 * PAGE), "shared");
    assert!(!pte.prot.contains(Prot::WRITE));
    for p in 0..16 {
        child.write_u8(BASE + p * PAGE, 0xe0 | p as u8).unwrap();
    }
    for p in 0..16 {
        assert_eq!(parent.read_u8(BASE + p * PAGE).unwrap(), p as u8);
        assert_eq!(child.read_u8(BASE + p * PAGE).unwrap(), 0xe0 | p as u8);
    }
    consistent(&vm);
}

#[test]
fn a_window_maps_the_shadows_own_page_not_the_one_below() {
    // A page of the child's shadow hides the parent's page at the same
    // index: the window must map the child's copy there.
    let (vm, parent) = machine_with(FaultAround::Window(16));
    parent.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    for p in 0..16 {
        parent.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    let child = parent.fork().unwrap();
    child.write_u8(BASE + 2 * PAGE, 0xaa).unwrap();
    let own = child.extract(BASE + 2 * PAGE).unwrap();
    // Drop the child's mappings; its shadow keeps page 2.
    child.protect(BASE, 16 * PAGE, Prot::NONE).unwrap();
    child.protect(BASE, 16 * PAGE, Prot::RW).unwrap();
    assert!(mapped(&vm, &child).is_empty());
    child
        .fault(BASE + 7 * PAGE, Prot::READ, FaultFlags::NORMAL)
        .unwrap();
    assert_eq!(child.extract(BASE + 2 * PAGE), Some(own), "its own copy");
    assert_eq!(child.read_u8(BASE + 2 * PAGE).unwrap(), 0xaa);
    consistent(&vm);
}

#[test]
fn a_window_is_off_for_wiring_faults() {
    let (vm, s, _o) = setup(FaultAround::Window(16), 0..16);
    s.wire(BASE + 8 * PAGE, PAGE, true).unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
}

#[test]
fn a_write_fault_maps_no_window() {
    // Linux's rule: the neighbours would be read-only, and the next write
    // to one faults anyway (zero-fill and copy-on-write runs).
    let (vm, s, _o) = setup(FaultAround::Window(16), 0..16);
    let before = vm.counters().snapshot();
    s.fault(BASE + 8 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert_eq!(mapped(&vm, &s), [8].into_iter().collect());
    assert_eq!(vm.counters().snapshot().since(&before).v_prefaults, 0);
    // The seed's walk does map after a write, read-only.
    let (vm, s, _o) = setup(FaultAround::Outward(2), 0..16);
    s.fault(BASE + 8 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert_eq!(mapped(&vm, &s), (6..=10).collect());
    assert!(
        !vm.pmap()
            .pte(s.pmap_space(), BASE + 9 * PAGE)
            .unwrap()
            .prot
            .contains(Prot::WRITE)
    );
}
