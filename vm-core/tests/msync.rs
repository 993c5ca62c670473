//! Write-back of dirty pages through the pager (`msync`).

mod common;
use common::*;
use vm_core::clean::CleanError;
use vm_core::{PagerKind, Prot};
use vm_testkit::{Injected, MemPager};

#[test]
fn msync_writes_dirty_pages_in_contiguous_runs_and_cleans_them() {
    let (vm, space) = machine(64);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 8, Prot::RW, false);
    for p in [1u64, 2, 3, 6] {
        space
            .write(BASE + p * PAGE + 5, &[p as u8 + 0x40; 3])
            .unwrap();
    }
    space.read_u8(BASE + 4 * PAGE).unwrap(); // resident but clean
    assert_eq!(space.msync(BASE, 8 * PAGE).unwrap(), 4);
    assert_eq!(pager.puts(), vec![vec![1, 2, 3], vec![6]]);
    assert_eq!(pager.stored(2).unwrap()[5..8], [0x42; 3]);
    // Clean now: nothing to write.
    assert_eq!(space.msync(BASE, 8 * PAGE).unwrap(), 0);
    // Written pages were write-protected: a new write dirties again.
    space.write(BASE + 2 * PAGE, b"again").unwrap();
    assert_eq!(space.msync(BASE, 8 * PAGE).unwrap(), 1);
    assert_eq!(&pager.stored(2).unwrap()[..5], b"again");
    consistent(&vm);
}

#[test]
fn a_failed_write_back_keeps_the_pages_dirty() {
    let (vm, space) = machine(64);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::RW, false);
    space.write(BASE, b"precious").unwrap();
    pager.inject(Injected::Fail(MemPager::io_error()));
    let e = space.msync(BASE, 4 * PAGE).unwrap_err();
    assert!(matches!(e, CleanError::Pager { pindex: 0, .. }), "{e}");
    assert_ne!(&pager.stored(0).unwrap()[..8], b"precious");
    assert_eq!(
        space.msync(BASE, 4 * PAGE).unwrap(),
        1,
        "still dirty, written on retry"
    );
    assert_eq!(&pager.stored(0).unwrap()[..8], b"precious");
    consistent(&vm);
}

#[test]
fn private_mappings_do_not_write_to_the_file() {
    let (vm, space) = machine(64);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 4, Prot::RW, true);
    space.write(BASE, b"mine").unwrap();
    assert_eq!(space.msync(BASE, 4 * PAGE).unwrap(), 0);
    assert!(pager.puts().is_empty());
}

#[test]
fn pageout_writes_a_dirty_run_in_one_call_whichever_page_the_scan_meets_first() {
    // 24 dirty pages of a file, all inactive; the scan goes in frame order
    // and meets them in some order: one call writes them all, gathered
    // behind and ahead of the page it met (FreeBSD `vm_pageout_cluster`).
    let (vm, space) = machine(64);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 24, Prot::RW, false);
    // Written from the top down, so the frames run against the indexes.
    for p in (0..24u64).rev() {
        space.write_u8(BASE + p * PAGE, p as u8 + 1).unwrap();
    }
    vm.pageout(vm.total_pages()); // deactivates
    vm.pageout(vm.total_pages()); // launders and frees
    assert_eq!(pager.puts(), vec![(0..24).collect::<Vec<u64>>()]);
    for p in 0..24u64 {
        assert_eq!(pager.stored(p).unwrap()[0], p as u8 + 1);
    }
    consistent(&vm);
}

#[test]
fn a_run_the_pager_refuses_whole_is_written_page_by_page() {
    let (vm, space) = machine(64);
    let (pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 8, Prot::RW, false);
    for p in 0..8u64 {
        space.write_u8(BASE + p * PAGE, 0x30 + p as u8).unwrap();
    }
    // The cluster fails, and then the first page alone; the rest go.
    pager.inject(Injected::Fail(MemPager::io_error()));
    pager.inject(Injected::Fail(MemPager::io_error()));
    let mut report = vm.pageout(vm.total_pages());
    let again = vm.pageout(vm.total_pages());
    report.laundered += again.laundered;
    report.failed += again.failed;
    // One page failed alone and went back dirty; a later pass wrote it.
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(report.laundered, 8, "{report:?}");
    let puts = pager.puts();
    // The cluster first, refused; then its pages one at a time.
    let cluster = puts[0].len();
    assert!(cluster > 1, "{puts:?}");
    assert!(puts[1..=cluster].iter().all(|r| r.len() == 1), "{puts:?}");
    assert_eq!(obj.resident_count(), 0);
    for p in 0..8u64 {
        assert_eq!(pager.stored(p).unwrap()[0], 0x30 + p as u8);
        assert_eq!(space.read_u8(BASE + p * PAGE).unwrap(), 0x30 + p as u8);
    }
    consistent(&vm);
}
