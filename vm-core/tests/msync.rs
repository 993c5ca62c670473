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
