//! vm-core end to end on real x86_64 tables: the testkit's scenarios.

#[test]
fn scenarios_on_four_level_tables() {
    vm_testkit::scenarios::run_all(vm_pmap_x86_64::X86Pmap::new);
}

#[test]
fn scenarios_on_five_level_tables() {
    vm_testkit::scenarios::run_all(vm_pmap_x86_64::X86Pmap::new_la57);
}

/// A fault that needs new page tables when the machine has no free frame
/// at all (a balloon holds them): the pmap's shortage reaches the caller
/// as an out-of-memory error, nothing is left behind, and the same fault
/// works once the frames are back.
#[test]
fn a_fault_needing_page_tables_without_memory_reports_it_and_works_afterwards() {
    use vm_core::{BusCode, FaultFlags, Prot, Signal, Vm};
    let vm = Vm::new(vm_pmap_x86_64::X86Pmap::new(), vm_testkit::test_config(64)).unwrap();
    let space = vm.new_space().unwrap();
    // Far from anything mapped: needs a PDPT, a PD and a PT.
    let va = 0x7f00_0000_0000;
    space.map_anon(va, 0x1000, Prot::RW).unwrap();
    let free = vm.free_pages();
    // Leave exactly one frame: the data page, but no table.
    let balloon = vm.inflate_balloon(free - 1);
    let e = space.fault(va, Prot::WRITE, FaultFlags::DIRTY).unwrap_err();
    assert_eq!(e.signal(), Signal::Bus(BusCode::OomErr), "{e}");
    // The zeroed data page stays in the object for the next try (it is the
    // object's content, not a leak); no table page is kept half-built.
    let (object, _) = space.object_at(va).unwrap();
    assert_eq!((vm.free_pages(), object.resident_count()), (0, 1));
    assert_eq!(space.extract(va), None);
    vm.check_consistency().unwrap();
    drop(balloon);
    space.write(va, b"t").unwrap();
    assert_eq!(space.read_u8(va).unwrap(), b't');
    vm.check_consistency().unwrap();
}

/// A copy-on-write fault whose copy is made but whose mapping cannot be
/// entered (no frame for the page tables) drops the copy: the private
/// mapping then still sees the shared page change, as if the failed write
/// had never started.
#[test]
fn a_copy_on_write_fault_that_cannot_map_keeps_no_copy() {
    use vm_core::{FaultError, MapRequest, Prot, Vm};
    let vm = Vm::new(vm_pmap_x86_64::X86Pmap::new(), vm_testkit::test_config(64)).unwrap();
    let space = vm.new_space().unwrap();
    let object = vm.new_anon_object(1);
    let (shared, private) = (0x1000_0000, 0x7f00_0000_0000);
    space
        .map(MapRequest::object(
            shared,
            0x1000,
            object.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    space
        .map(MapRequest::object(private, 0x1000, object, 0, Prot::RW).private())
        .unwrap();
    space.write(shared, b"1").unwrap();
    // Wired, so that direct reclaim cannot unmap it and free its tables.
    space.wire(shared, 0x1000, true).unwrap();
    // One frame: enough for the copy, not for the tables at `private`.
    let balloon = vm.inflate_balloon(vm.free_pages() - 1);
    let r = space.write(private, b"p");
    let e = r.unwrap_err();
    assert!(matches!(e, FaultError::ResourceShortage { .. }), "{e}");
    let (shadow, _) = space.object_at(private).unwrap();
    assert_eq!(shadow.resident_count(), 0, "no copy kept");
    assert_eq!(vm.free_pages(), 1);
    vm.check_consistency().unwrap();
    drop(balloon);
    space.write(shared, b"2").unwrap();
    assert_eq!(space.read_u8(private).unwrap(), b'2');
    vm.check_consistency().unwrap();
}

/// A new space whose root table finds no free frame waits for memory as a
/// fault does: it is made once another thread gives frames back, and
/// reports the shortage only when none come.
#[test]
fn a_new_space_waits_for_memory_for_its_root_table() {
    use vm_core::{PmapError, Vm, VmConfig};
    let vm = Vm::new(
        vm_pmap_x86_64::X86Pmap::new(),
        VmConfig {
            memory_wait_ms: 50,
            memory_retries: 40,
            ..vm_testkit::test_config(64)
        },
    )
    .unwrap();
    let balloon = vm.inflate_balloon(vm.free_pages());
    assert_eq!(vm.free_pages(), 0);
    let giver = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        drop(balloon);
    });
    let space = vm.new_space().expect("made once memory came back");
    giver.join().unwrap();
    drop(space);
    // Nothing coming back: the shortage is reported, after the waits.
    let vm = Vm::new(
        vm_pmap_x86_64::X86Pmap::new(),
        VmConfig {
            memory_wait_ms: 1,
            memory_retries: 2,
            ..vm_testkit::test_config(64)
        },
    )
    .unwrap();
    let _balloon = vm.inflate_balloon(vm.free_pages());
    assert_eq!(vm.new_space().unwrap_err(), PmapError::NoMemory);
}

/// Protecting and unmapping a range whose tables are sparse: entries at a
/// table's first, middle and last slots, a leaf table's last slot at the
/// end of a page directory, a superpage among leaf tables. Every entry is
/// reached (protect and remove stop scanning a table once they have seen
/// as many entries as it counts), and the unmap leaves only the root.
#[test]
fn sparse_tables_are_protected_and_taken_down_whole() {
    use vm_core::{Prot, Vm};
    const PAGE: u64 = 0x1000;
    const GIB: u64 = 1 << 30;
    // Room for a reservation per sparse page and one for the superpage.
    let vm = Vm::new(
        vm_pmap_x86_64::X86Pmap::new(),
        vm_testkit::test_config(8192),
    )
    .unwrap();
    let p = vm.pmap();
    let space = vm.new_space().unwrap();
    let base = 256 * GIB;
    space.map_anon(base, 2 * GIB, Prot::RW).unwrap();
    let sparse = [
        base,
        base + 255 * PAGE,
        base + 511 * PAGE,
        base + GIB - PAGE,
        base + GIB + 511 * PAGE,
        base + 2 * GIB - PAGE,
    ];
    for va in sparse {
        space.write(va, &va.to_le_bytes()).unwrap();
    }
    // A whole 2 MiB written page by page: promoted among the leaf tables.
    let sp = base + (8 << 20);
    for i in 0..512 {
        space.write(sp + i * PAGE, &[1]).unwrap();
    }
    let is_ps = |va: u64| p.pte(space.pmap_space(), va).is_some_and(|e| e & 0x80 != 0);
    assert!(is_ps(sp), "promoted");
    let writable = |va: u64| p.pte(space.pmap_space(), va).is_some_and(|e| e & 0x2 != 0);
    assert!(sparse.iter().chain([&sp]).all(|&va| writable(va)));
    space.protect(base, 2 * GIB, Prot::READ).unwrap();
    for va in sparse.iter().chain([&sp]) {
        assert!(!writable(*va), "{va:#x} still writable");
        let mut b = [0u8; 8];
        space.read(*va, &mut b).unwrap();
    }
    assert_eq!(
        space.read_u8(base + GIB - PAGE).unwrap(),
        (base + GIB - PAGE) as u8
    );
    space.unmap(base, 2 * GIB).unwrap();
    for va in sparse.iter().chain([&sp]) {
        assert_eq!(space.extract(*va), None, "{va:#x} still mapped");
    }
    assert_eq!(
        p.table_pages(space.pmap_space()),
        1,
        "only the root is left"
    );
    vm.check_consistency().unwrap();
}

/// A fault that finds memory short reclaims. When the reclaim frees no
/// page but page tables (it unmapped a dirty page it cannot write
/// anywhere, and the tables that held only that page went), the memory
/// is there all the same: the fault retries and succeeds instead of
/// failing for want of memory.
#[test]
fn a_reclaim_that_frees_only_page_tables_lets_the_fault_retry() {
    use vm_core::page_queues::Thresholds;
    use vm_core::{Prot, Vm, VmConfig};
    const PAGE: u64 = 0x1000;
    const RESERVED: u64 = 8;
    let vm = Vm::new(
        vm_pmap_x86_64::X86Pmap::new(),
        VmConfig {
            thresholds: Some(Thresholds {
                reserved: RESERVED,
                severe: RESERVED,
                target: RESERVED,
            }),
            memory_retries: 0,
            memory_wait_ms: 1,
            ..VmConfig::with_memory(2048 * PAGE)
        },
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    // Dirty anonymous pages with no swap: page-out may unmap them, never
    // free them. `far` alone in its three tables.
    let (near, far) = (0x1000_0000, 0x7f00_0000_0000);
    s.map_anon(near, 64 * PAGE, Prot::RW).unwrap();
    s.map_anon(far, PAGE, Prot::RW).unwrap();
    s.write_u8(near, 1).unwrap();
    s.write_u8(far, 2).unwrap();
    let held = vm.inflate_balloon(vm.free_pages() - RESERVED);
    assert_eq!(vm.free_pages(), RESERVED);
    s.write_u8(near + PAGE, 3)
        .expect("the tables the reclaim freed are memory for the fault");
    drop(held);
    assert_eq!(
        [near, far, near + PAGE].map(|va| s.read_u8(va).unwrap()),
        [1, 2, 3]
    );
    vm.check_consistency().unwrap();
}
