//! Call sequences checked with the testkit's mockall mocks.

mod common;
use common::*;
use mockall::Sequence;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;
use vm_core::pmap::RefMod;
use vm_core::{
    Contiguity, FaultFlags, IoError, MapRequest, PagerError, PagerKind, Prot, VirtAddr, Vm, VmSpace,
};
use vm_testkit::{MockPager, MockPmap, Permissive, RefPmap, test_config};

#[test]
fn read_fault_on_a_copy_on_write_page_enters_it_without_write() {
    let mut pmap = MockPmap::permissive();
    pmap.expect_enter()
        .withf(|_, va, m| {
            *va == VirtAddr(BASE)
                && m.page.managed
                && m.prot == Prot::READ
                && m.access == Prot::READ
                && !m.wired
        })
        .times(1)
        .returning(|_, _, _| Ok(None));
    let vm = Vm::new(pmap, test_config(16)).unwrap();
    let space = vm.new_space().unwrap();
    let obj = vm.new_anon_object(1);
    space
        .map(MapRequest::object(BASE, PAGE, obj, 0, Prot::RW).private())
        .unwrap();
    let out = space.fault(BASE, Prot::READ, FaultFlags::NORMAL).unwrap();
    assert_eq!(out.prot, Prot::READ);
}

#[test]
fn zero_fill_write_enters_once_writable_and_touches_no_other_mapping() {
    let mut pmap = MockPmap::permissive();
    pmap.expect_enter()
        .withf(|_, va, m| {
            *va == VirtAddr(BASE + PAGE)
                && m.prot == Prot::RW
                && m.access == Prot::WRITE
                && !m.wired
        })
        .times(1)
        .returning(|_, _, _| Ok(None));
    // Only tearing the space down may remove mappings by page.
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    pmap.expect_remove_all().returning(move |_| {
        assert!(
            d2.load(Ordering::SeqCst),
            "a zero-fill fault removed mappings"
        );
        RefMod::default()
    });
    let vm = Vm::new(pmap, test_config(16)).unwrap();
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space
        .fault(BASE + PAGE + 7, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    vm.check_consistency().unwrap();
    done.store(true, Ordering::SeqCst);
}

#[test]
fn pmap_out_of_memory_becomes_a_resource_shortage_with_nothing_leaked() {
    let mut pmap = MockPmap::permissive();
    pmap.expect_enter()
        .returning(|_, _, _| Err(vm_core::PmapError::NoMemory));
    pmap.expect_remove_all().returning(|_| RefMod::default());
    let vm = Vm::new(pmap, test_config(16)).unwrap();
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    let e = space
        .fault(BASE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap_err();
    assert_eq!(e, vm_core::FaultError::ResourceShortage { addr: BASE });
    vm.check_consistency().unwrap();
}

#[test]
fn pager_is_asked_has_page_then_get_pages_with_the_map_unlocked() {
    let (vm, space) = machine(32);
    let space = Arc::new(space);
    let cell: Arc<OnceLock<Arc<VmSpace<RefPmap>>>> = Arc::new(OnceLock::new());
    let mut pager = MockPager::new();
    let mut seq = Sequence::new();
    pager.expect_kind().return_const(PagerKind::FILE);
    pager
        .expect_has_page()
        .withf(|&p| p == 2)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Some(Contiguity::default()));
    let c2 = cell.clone();
    pager
        .expect_get_pages()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |pages, req| {
            assert_eq!((pages.len(), req, pages[0].pindex()), (1, 0, 2));
            // Another thread changes the map: that needs the write lock,
            // which must be free while the pager runs.
            let s = c2.get().unwrap().clone();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                s.map_anon(BASE + 64 * PAGE, PAGE, Prot::RW).unwrap();
                let _ = tx.send(());
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                return Err(PagerError::Error(IoError {
                    code: 35,
                    context: "map was locked during I/O",
                }));
            }
            pages[0].fill_from(0, 0x5a);
            pages[0].set_all_valid();
            Ok(())
        });
    pager.expect_page_unswapped().never();
    pager.expect_dealloc().return_const(());
    cell.set(space.clone()).ok().unwrap();
    let obj = vm.new_object(4, Arc::new(pager));
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    assert_eq!(space.read_u8(BASE + 2 * PAGE).unwrap(), 0x5a);
    consistent(&vm);
}
