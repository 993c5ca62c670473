//! Dirty bookkeeping of write faults: seed L843-871.

mod common;
use common::*;
use vm_core::{EntryFlags, FaultFlags, MapRequest, PageFlags, PagerKind, Prot};

fn page_at(
    vm: &vm_core::Vm<vm_testkit::RefPmap>,
    space: &vm_core::VmSpace<vm_testkit::RefPmap>,
    va: u64,
) -> vm_core::PageId {
    vm.page_of(space.extract(va).unwrap()).unwrap()
}

#[test]
fn write_faults_dirty_the_page_and_reads_do_not() {
    let (vm, space) = machine(32);
    let (_pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::RW, false);
    space.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(vm.page(page_at(&vm, &space, BASE)).dirty(), 0);
    space
        .fault(BASE + PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert_eq!(vm.page(page_at(&vm, &space, BASE + PAGE)).dirty(), 0xff);
    let pte = vm.pmap().pte(space.pmap_space(), BASE + PAGE).unwrap();
    assert!(pte.modified && pte.prot.contains(Prot::WRITE));
    consistent(&vm);
}

#[test]
fn dirtied_pages_are_reported_unswapped_to_their_pager() {
    let (vm, space) = machine(32);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::ANONYMOUS, 4, Prot::RW, false);
    space.write(BASE + 2 * PAGE, b"dirty").unwrap();
    assert_eq!(pager.unswapped(), vec![2]);
    space.read_u8(BASE + 3 * PAGE).unwrap();
    assert_eq!(pager.unswapped(), vec![2], "reads leave swap alone");
}

#[test]
fn nosync_entries_mark_clean_pages_nosync() {
    let (vm, space) = machine(32);
    let obj = vm.new_anon_object(2);
    space
        .map(MapRequest::object(BASE, 2 * PAGE, obj.clone(), 0, Prot::RW).flags(EntryFlags::NOSYNC))
        .unwrap();
    space.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert!(
        vm.page(page_at(&vm, &space, BASE))
            .flags()
            .contains(PageFlags::NOSYNC)
    );
    // The same page written through an ordinary mapping loses NOSYNC.
    let other = vm.new_space().unwrap();
    other
        .map(MapRequest::object(BASE, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    other.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert!(
        !vm.page(page_at(&vm, &other, BASE))
            .flags()
            .contains(PageFlags::NOSYNC)
    );
    // A page already dirty does not become NOSYNC (seed L861-863).
    space.unmap(BASE, 2 * PAGE).unwrap();
    space
        .map(MapRequest::object(BASE, 2 * PAGE, obj, 0, Prot::RW).flags(EntryFlags::NOSYNC))
        .unwrap();
    space.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert!(
        !vm.page(page_at(&vm, &space, BASE))
            .flags()
            .contains(PageFlags::NOSYNC)
    );
    consistent(&vm);
}

/// The first object's "written" marks (`OBJ_WRITEABLE`, `OBJ_MIGHTBEDIRTY`)
/// come with the first writable mapping of one of its pages, and only
/// then: the fault reads them in its walk and locks the object again only
/// to set them.
#[test]
fn written_marks_come_with_the_first_writable_mapping() {
    use vm_core::object::ObjectFlags;
    let marks = ObjectFlags::WRITEABLE | ObjectFlags::MIGHTBEDIRTY;
    let (vm, space) = machine(32);
    let obj = vm.new_anon_object(4);
    let req = MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::READ);
    space.map(req).unwrap();
    space.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert!(!obj.flags().intersects(marks), "a read-only mapping");
    let other = vm.new_space().unwrap();
    let req = MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW);
    other.map(req).unwrap();
    // A read through a writable mapping of a resident anonymous page maps
    // it writable: marked.
    other.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    let pte = vm.pmap().pte(other.pmap_space(), BASE).unwrap();
    assert!(pte.prot.contains(Prot::WRITE));
    assert!(obj.flags().contains(marks));
    // Later faults find the marks set and keep them.
    other
        .fault(BASE + PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert!(obj.flags().contains(marks));
    consistent(&vm);
}
