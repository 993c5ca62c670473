//! Red team of the adaptive read-ahead on real files (commit a3fc515: the
//! vnode pager reports 255 pages of contiguity, windows up to 255 ahead),
//! run with asynchronous read-ahead on.
//! `set_len_during_big_window_scans` found that a background read did not
//! clear its pages' pre-zeroed flag: a failed read's frames went back to
//! the free lists marked zero, and a later zero-fill showed file bytes
//! (regression test: `vm-core/tests/async_read_ahead.rs`,
//! `frames_a_failed_background_read_wrote_are_zeroed_before_reuse`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_core::{Behavior, BusCode, FaultError, MapRequest, Prot, Signal, Vm, VmConfig};
use vm_pager_vnode::VnodePager;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath as TempFile;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 7) % 253) as u8 + 1).collect()
}

fn vm(pages: u64, read_ahead_max: u32) -> Arc<Vm<RefPmap>> {
    Vm::new(
        RefPmap::new(),
        VmConfig {
            read_ahead_max,
            async_read_ahead: true,
            memory_wait_ms: 1,
            memory_retries: 200,
            ..vm_testkit::test_config(pages)
        },
    )
    .unwrap()
}

fn consistent(vm: &Vm<RefPmap>) {
    if let Err(e) = vm.check_consistency() {
        panic!("inconsistent: {e}");
    }
}

/// A file ending mid-page inside one big window: the bytes past EOF read
/// as zero, a page wholly past EOF (but inside the mapping) is SIGBUS, and
/// every byte before EOF is the file's.
#[test]
fn eof_inside_a_255_page_window() {
    for (max, b) in [
        (255, Behavior::Sequential),
        (255, Behavior::Normal),
        (63, Behavior::Normal),
    ] {
        let len = 300 * PAGE as usize + 1234;
        let data = content(len);
        let f = TempFile::with(&data);
        let vm = vm(2048, max);
        let space = vm.new_space().unwrap();
        let pager = VnodePager::open(&f.0, false).unwrap();
        let obj = pager.object(&vm);
        assert_eq!(obj.size(), 301);
        space
            .map(MapRequest::object(BASE, 512 * PAGE, obj.clone(), 0, Prot::READ).behavior(b))
            .unwrap();
        // Start inside the last window so the EOF page comes in as a
        // neighbour.
        let start = 120u64;
        let mut buf = vec![0u8; 301 * PAGE as usize - start as usize * PAGE as usize];
        space.read(BASE + start * PAGE, &mut buf).unwrap();
        let file_part = &data[start as usize * PAGE as usize..];
        assert!(
            buf[..file_part.len()] == *file_part,
            "{max}/{b:?}: bytes before EOF differ"
        );
        assert!(
            buf[file_part.len()..].iter().all(|&x| x == 0),
            "{max}/{b:?}: junk past EOF"
        );
        let mut all = vec![0u8; 301 * PAGE as usize];
        space.read(BASE, &mut all).unwrap();
        assert!(all[..len] == data[..], "{max}/{b:?}: whole file");
        for p in [301u64, 302, 400, 511] {
            let e = space.read_u8(BASE + p * PAGE).unwrap_err();
            assert_eq!(
                e.signal(),
                Signal::Bus(BusCode::ObjErr),
                "{max}/{b:?} page {p}: {e}"
            );
        }
        assert!(obj.resident_between(301, u64::MAX).is_empty());
        consistent(&vm);
    }
}

/// Truncating a real file (VnodePager::set_len) while sequential scans
/// run: reads return the file's bytes or SIGBUS; at rest nothing is left
/// past the end, the tail of the last page is zero, and past it is SIGBUS.
#[test]
fn set_len_during_big_window_scans() {
    let pages = 1024u64;
    let data = content((pages * PAGE) as usize);
    let f = TempFile::with(&data);
    let vm = vm(4096, 255);
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..2 {
        let (vm, obj, stop, data) = (vm.clone(), obj.clone(), stop.clone(), data.clone());
        hs.push(std::thread::spawn(move || {
            let space = vm.new_space().unwrap();
            let b = if t == 0 {
                Behavior::Sequential
            } else {
                Behavior::Normal
            };
            space
                .map(MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ).behavior(b))
                .unwrap();
            let mut p = 0u64;
            while !stop.load(Ordering::Acquire) {
                let off = (p * PAGE + 17) as usize;
                match space.read_u8(BASE + off as u64) {
                    // A byte read is the file's, or zero (a tail cut off
                    // and then regrown reads as zeros).
                    Ok(v) => assert!(v == data[off] || v == 0, "page {p}: {v}"),
                    Err(FaultError::OutOfBounds { .. }) => {
                        p = 0;
                        continue;
                    }
                    Err(e) => panic!("page {p}: {e}"),
                }
                p = (p + 1) % pages;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    let lens = [
        700 * PAGE + 5,
        pages * PAGE,
        100 * PAGE + 3000,
        pages * PAGE,
        333 * PAGE,
    ];
    let mut i = 0;
    while Instant::now() < deadline && i < 200 {
        let len = lens[i % lens.len()];
        pager.set_len(&vm, &obj, len).unwrap();
        // Refill what a regrowth left as zeros, through the file itself.
        if len == pages * PAGE {
            use std::os::unix::fs::FileExt;
            let fh = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
            fh.write_all_at(&data, 0).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        i += 1;
    }
    let end = 50 * PAGE + 100;
    pager.set_len(&vm, &obj, end).unwrap();
    stop.store(true, Ordering::Release);
    for h in hs {
        h.join().unwrap();
    }
    let beyond = obj.resident_between(51, u64::MAX);
    assert!(
        beyond.is_empty(),
        "resident past EOF: {} pages from {:?}",
        beyond.len(),
        beyond.first()
    );
    let space = vm.new_space().unwrap();
    space
        .map(MapRequest::object(
            BASE,
            pages * PAGE,
            obj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    for b in [50 * PAGE + 100, 50 * PAGE + 4095] {
        assert_eq!(
            space.read_u8(BASE + b).unwrap(),
            0,
            "tail byte {b} past EOF"
        );
    }
    for p in [51u64, 52, 300, 1023] {
        let r = space.read_u8(BASE + p * PAGE);
        assert!(
            matches!(r, Err(FaultError::OutOfBounds { .. })),
            "page {p} past EOF reads {r:?}"
        );
    }
    consistent(&vm);
}

/// Concurrent scanners of one real file, shared and private mappings,
/// a small machine with pageout: every byte is the file's.
#[test]
fn concurrent_scans_of_a_real_file_under_pressure() {
    let pages = 1536u64;
    let data = Arc::new(content((pages * PAGE) as usize));
    let f = TempFile::with(&data);
    let vm = vm(600, 255);
    let pager = VnodePager::open(&f.0, false).unwrap();
    let obj = pager.object(&vm);
    let stop = Arc::new(AtomicBool::new(false));
    let pageout = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if vm.free_pages() < 200 {
                    vm.pageout(300);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (vm, obj, data) = (vm.clone(), obj.clone(), data.clone());
        hs.push(std::thread::spawn(move || {
            let space = vm.new_space().unwrap();
            let mut req = MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ);
            if t == 1 {
                req = req.private().behavior(Behavior::Sequential);
            }
            space.map(req).unwrap();
            let mut buf = vec![0u8; 8 * PAGE as usize];
            let mut p = t * 400;
            let mut n = 0;
            while n == 0 || (Instant::now() < deadline && n < 400) {
                let first = p % (pages - 8);
                space.read(BASE + first * PAGE, &mut buf).unwrap();
                let at = (first * PAGE) as usize;
                assert!(
                    buf[..] == data[at..at + buf.len()],
                    "thread {t} at page {first}"
                );
                p += 8;
                n += 1;
            }
            n
        }));
    }
    for h in hs {
        assert!(h.join().unwrap() > 0);
    }
    stop.store(true, Ordering::Release);
    pageout.join().unwrap();
    consistent(&vm);
}

/// A whole 256-page window is one preadv of 256 vectors (the iovec array
/// spills past its 64 inline slots): one system call per window.
#[test]
fn one_system_call_per_256_page_window() {
    let pages = 1024u64;
    let data = content((pages * PAGE) as usize);
    let f = TempFile::with(&data);
    let vm = vm(4096, 255);
    let space = vm.new_space().unwrap();
    let pager = VnodePager::open(&f.0, false).unwrap();
    let obj = pager.object(&vm);
    space
        .map(
            MapRequest::object(BASE, pages * PAGE, obj, 0, Prot::READ)
                .behavior(Behavior::Sequential),
        )
        .unwrap();
    let mut buf = vec![0u8; (pages * PAGE) as usize];
    space.read(BASE, &mut buf).unwrap();
    assert!(buf == data);
    let st = pager.stats();
    assert_eq!(st.pages_in, pages, "{st:?}");
    assert_eq!(st.read_calls, 4, "{st:?}");
    consistent(&vm);
}

/// Anonymous memory swapped out and read back in 255-page windows on a
/// machine smaller than the data, with a forked child sharing it COW and
/// writing its own bytes: every byte is what its process wrote last.
#[test]
fn swapped_anonymous_memory_read_back_in_big_windows() {
    let swap_file = TempFile::with(&[]);
    let vm = vm(300, 255);
    let swap = vm_pager_swap::Swap::create(&swap_file.0, 16 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    let n = 700u64;
    space
        .map(MapRequest::anon(BASE, n * PAGE, Prot::RW).behavior(Behavior::Normal))
        .unwrap();
    let val = |who: u64, p: u64| ((p * 7 + who * 3) % 251) as u8 + 1;
    let deadline = Instant::now() + vm_testkit::support::scaled_secs(10);
    for p in 0..n {
        space.write_u8(BASE + p * PAGE + 5, val(0, p)).unwrap();
        if vm.free_pages() < 64 {
            vm.pageout(128);
        }
    }
    let child = space.fork().unwrap();
    for p in (0..n).step_by(5) {
        child.write_u8(BASE + p * PAGE + 5, val(1, p)).unwrap();
        if vm.free_pages() < 64 {
            vm.pageout(128);
        }
    }
    for round in 0..3 {
        for p in 0..n {
            assert!(Instant::now() < deadline, "too slow");
            let got = space.read_u8(BASE + p * PAGE + 5).unwrap();
            assert_eq!(got, val(0, p), "parent round {round} page {p}");
            let c = child.read_u8(BASE + p * PAGE + 5).unwrap();
            let want = if p % 5 == 0 { val(1, p) } else { val(0, p) };
            assert_eq!(c, want, "child round {round} page {p}");
            if vm.free_pages() < 64 {
                vm.pageout(128);
            }
        }
    }
    drop(child);
    consistent(&vm);
}
