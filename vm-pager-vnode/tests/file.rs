//! The vnode pager on real temporary files.

use std::fs::OpenOptions;
use vm_core::{BusCode, FaultError, FaultFlags, MapRequest, Prot, Signal};
use vm_pager_vnode::VnodePager;
use vm_testkit::support::TempPath as TempFile;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

#[test]
fn reads_match_the_file_and_the_eof_page_is_zero_past_eof() {
    let data = content(10 * PAGE as usize + 100);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(256);
    let pager = VnodePager::open(&f.0, false).unwrap();
    let obj = pager.object(&vm);
    assert_eq!(obj.size(), 11);
    space
        .map(MapRequest::object(BASE, 11 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    let mut buf = vec![0u8; 11 * PAGE as usize];
    space.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf[..data.len()], &data[..]);
    assert!(buf[data.len()..].iter().all(|&b| b == 0), "zero past EOF");
    // Clustered: fewer read calls than pages.
    let st = pager.stats();
    // Pages 0..=10 in one call (a fault at 0 is sequential: 15 ahead,
    // clipped to the mapping); the EOF page came in as a neighbour,
    // partially valid, so its own fault reads it again (seed L422-424) and
    // then zero-fills past EOF for good (L882-885).
    assert_eq!(st.pages_in, 12, "{st:?}");
    assert_eq!(st.read_calls, 2, "one system call per contiguous run");
    assert_eq!(vm.counters().snapshot().v_pager_calls, st.read_calls);
    vm.check_consistency().unwrap();
}

#[test]
fn a_page_wholly_past_eof_is_a_sigbus() {
    let f = TempFile::with(&content(PAGE as usize + 1));
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, false).unwrap();
    let obj = pager.object(&vm);
    // Mapped past the end of the file, as mmap(2) allows: page 2 has no
    // byte of the file and is SIGBUS.
    space
        .map(MapRequest::object(
            BASE,
            3 * PAGE,
            obj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    assert!(matches!(
        space.read_u8(BASE + 2 * PAGE),
        Err(FaultError::OutOfBounds { pindex: 2, .. })
    ));
    assert_eq!(
        space.read_u8(BASE + PAGE).unwrap(),
        content(PAGE as usize + 1)[PAGE as usize]
    );
    assert_eq!(space.read_u8(BASE + PAGE + 1).unwrap(), 0);
    // Shrink the file behind the pager's back: the next read of page 1 is
    // past EOF and must be a SIGBUS, not zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.0)
        .unwrap()
        .set_len(10)
        .unwrap();
    // Evict page 1, keeping the object's (now stale) size of two pages.
    vm.resize_object(&obj, 1);
    vm.resize_object(&obj, 2);
    let e = space.read_u8(BASE + PAGE).unwrap_err();
    assert!(
        matches!(e, FaultError::OutOfBounds { pindex: 1, .. }),
        "{e}"
    );
    assert_eq!(e.signal(), Signal::Bus(BusCode::ObjErr));
    vm.check_consistency().unwrap();
}

#[test]
fn shared_writes_reach_the_file_after_msync_without_growing_it() {
    let data = content(3 * PAGE as usize + 10);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, true).unwrap();
    space
        .map(MapRequest::object(
            BASE,
            4 * PAGE,
            pager.object(&vm),
            0,
            Prot::RW,
        ))
        .unwrap();
    space.write(BASE + 5, b"hello").unwrap();
    space.write(BASE + 2 * PAGE, &[9; 4096]).unwrap();
    space.write(BASE + 3 * PAGE, &[7; 64]).unwrap(); // straddles EOF
    assert_eq!(space.msync(BASE, 4 * PAGE).unwrap(), 3);
    let mut want = data.clone();
    want[5..10].copy_from_slice(b"hello");
    want[2 * PAGE as usize..3 * PAGE as usize].fill(9);
    want[3 * PAGE as usize..].fill(7);
    assert_eq!(std::fs::read(&f.0).unwrap(), want);
    assert_eq!(pager.stats().pages_out, 3);
    vm.check_consistency().unwrap();
}

#[test]
fn private_mappings_never_write_the_file() {
    let data = content(2 * PAGE as usize);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, true).unwrap();
    space
        .map(MapRequest::object(BASE, 2 * PAGE, pager.object(&vm), 0, Prot::RW).private())
        .unwrap();
    space.write(BASE, b"private").unwrap();
    space.msync(BASE, 2 * PAGE).unwrap();
    assert_eq!(std::fs::read(&f.0).unwrap(), data);
    assert_eq!(space.read_u8(BASE).unwrap(), b'p');
}

#[test]
fn truncation_while_mapped_unmaps_and_zeroes_the_tail() {
    let f = TempFile::with(&content(4 * PAGE as usize));
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut buf = vec![0u8; 4 * PAGE as usize];
    space.read(BASE, &mut buf).unwrap();
    pager.set_len(&vm, &obj, PAGE + 100).unwrap();
    assert_eq!(std::fs::metadata(&f.0).unwrap().len(), PAGE + 100);
    assert_eq!(
        space.extract(BASE + 2 * PAGE),
        None,
        "pages past the end are unmapped"
    );
    assert!(matches!(
        space.read_u8(BASE + 2 * PAGE),
        Err(FaultError::OutOfBounds { .. })
    ));
    let mut tail = [1u8; 200];
    space.read(BASE + PAGE + 50, &mut tail).unwrap();
    assert!(
        tail[50..].iter().all(|&b| b == 0),
        "the tail of the new last page is zero"
    );
    assert_eq!(tail[..50], buf[PAGE as usize + 50..PAGE as usize + 100]);
    // Growing again exposes zeros, never the old bytes.
    pager.set_len(&vm, &obj, 4 * PAGE).unwrap();
    assert_eq!(space.read_u8(BASE + 3 * PAGE).unwrap(), 0);
    assert_eq!(space.read_u8(BASE + PAGE + 200).unwrap(), 0);
    vm.check_consistency().unwrap();
}

#[test]
fn write_back_to_a_read_only_file_fails_and_loses_nothing() {
    let data = content(PAGE as usize);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::new(OpenOptions::new().read(true).open(&f.0).unwrap()).unwrap();
    space
        .map(MapRequest::object(
            BASE,
            PAGE,
            pager.object(&vm),
            0,
            Prot::RW,
        ))
        .unwrap();
    space.write(BASE, b"unsaved").unwrap();
    let e = space.msync(BASE, PAGE).unwrap_err();
    assert!(e.to_string().contains("writing file pages"), "{e}");
    assert_eq!(std::fs::read(&f.0).unwrap(), data);
    let mut b = [0u8; 7];
    space.read(BASE, &mut b).unwrap();
    assert_eq!(&b, b"unsaved", "still in memory, still dirty");
    assert!(space.fault(BASE, Prot::READ, FaultFlags::NORMAL).is_ok());
    vm.check_consistency().unwrap();
}

#[test]
fn the_pageout_daemon_writes_dirty_file_pages_back() {
    let data = content(8 * PAGE as usize);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    space
        .map(MapRequest::object(BASE, 8 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    space.write(BASE + 3 * PAGE, b"laundered").unwrap();
    let r = vm.pageout(vm.total_pages());
    assert!(r.laundered >= 1, "{r:?}");
    assert_eq!(
        obj.resident_count(),
        0,
        "every page was clean or cleaned, and freed"
    );
    assert_eq!(
        &std::fs::read(&f.0).unwrap()[3 * PAGE as usize..][..9],
        b"laundered"
    );
    assert_eq!(vm.counters().snapshot().v_vnodepgsout, 1);
    // And it reads back from the file.
    let mut b = [0u8; 9];
    space.read(BASE + 3 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"laundered");
    vm.check_consistency().unwrap();
}

#[test]
fn a_file_mapped_past_its_end_faults_sigbus_there_until_it_grows() {
    let f = TempFile::with(&content(PAGE as usize));
    let (vm, space) = vm_testkit::machine(64);
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    // Four pages of a one-page file: allowed, as mmap(2) allows it.
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    assert_eq!(space.read_u8(BASE).unwrap(), content(1)[0]);
    let e = space.write(BASE + 2 * PAGE, b"x").unwrap_err();
    assert!(
        matches!(e, FaultError::OutOfBounds { pindex: 2, .. }),
        "{e}"
    );
    assert_eq!(e.signal(), Signal::Bus(BusCode::ObjErr));
    pager.set_len(&vm, &obj, 3 * PAGE).unwrap();
    space.write(BASE + 2 * PAGE, b"x").unwrap();
    assert_eq!(
        space.read_u8(BASE + 3 * PAGE).unwrap_err().signal(),
        Signal::Bus(BusCode::ObjErr)
    );
    assert_eq!(space.msync(BASE, 4 * PAGE).unwrap(), 1);
    assert_eq!(std::fs::read(&f.0).unwrap()[2 * PAGE as usize], b'x');
    vm.check_consistency().unwrap();
}

#[test]
fn a_sequential_scan_of_a_real_file_reads_in_growing_runs() {
    let pages = 1024u64;
    let data = content((pages * PAGE) as usize);
    let f = TempFile::with(&data);
    let (vm, space) = vm_testkit::machine(2048);
    let pager = VnodePager::open(&f.0, false).unwrap();
    let obj = pager.object(&vm);
    space
        .map(MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ))
        .unwrap();
    let mut buf = vec![0u8; (pages * PAGE) as usize];
    space.read(BASE, &mut buf).unwrap();
    assert!(buf == data, "the scan reads the file");
    let st = pager.stats();
    assert_eq!(st.pages_in, pages, "every page read once: {st:?}");
    // 16 + 32 + 64 + 128 + 256 pages, then 256 a call (the default
    // window, 255 ahead; the last one cut at the end of the file): 8
    // system calls where the seed's fixed cluster made 64.
    assert_eq!(st.read_calls, 8, "{st:?}");
    vm.check_consistency().unwrap();
}
