//! Red team of asynchronous read-ahead (commit 0499376) on real files:
//! truncation of the file while a background window is in flight (held
//! by a manual executor), and shared writable mappings written and
//! msync'ed while background reads run on the default pool.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_core::{BusCode, MapRequest, Prot, Signal, Vm, VmConfig};
use vm_pager_vnode::VnodePager;
use vm_testkit::RefPmap;
use vm_testkit::support::ManualExecutor as Manual;
use vm_testkit::support::{TempPath as TempFile, bounded, scaled_secs};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 7) % 253) as u8 + 1).collect()
}

fn vm(pages: u64) -> Arc<Vm<RefPmap>> {
    Vm::new(
        RefPmap::new(),
        VmConfig {
            async_read_ahead: true,
            memory_wait_ms: 1,
            memory_retries: 500,
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

/// The file is truncated to the middle of a page inside the window in
/// flight, then extended again: the bytes before the cut are the file's,
/// the rest of that page and everything after read zero after the regrow,
/// and past the end before the regrow is SIGBUS.
#[test]
fn truncate_a_real_file_inside_a_window_in_flight_and_extend() {
    bounded(19, || {
        let pages = 256u64;
        let data = content((pages * PAGE) as usize);
        let f = TempFile::with(&data);
        let vm = vm(4096);
        let manual = Arc::new(Manual::default());
        vm.set_io_executor(Some(manual.clone()));
        let pager = VnodePager::open(&f.0, true).unwrap();
        let obj = pager.object(&vm);
        let space = Arc::new(vm.new_space().unwrap());
        space
            .map(MapRequest::object(
                BASE,
                pages * PAGE,
                obj.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        space.read_u8(BASE).unwrap();
        let mut n = 0;
        let mut p = 1;
        while manual.pending() == 0 && p < 64 {
            assert_eq!(
                space.read_u8(BASE + p * PAGE + 5).unwrap(),
                data[(p * PAGE + 5) as usize]
            );
            p += 1;
            n += 1;
        }
        assert_eq!(manual.pending(), 1, "a background window after {n} reads");
        let busy: Vec<u64> = (0..pages)
            .filter(|&q| obj.resident_page(q).is_some_and(|id| vm.page(id).is_busy()))
            .collect();
        assert!(busy.len() >= 4, "{busy:?}");
        let cut_page = busy[busy.len() / 2 - 1];
        let cut = cut_page * PAGE + 100;
        let (vm2, obj2, pager2) = (vm.clone(), obj.clone(), pager.clone());
        let t = std::thread::spawn(move || pager2.set_len(&vm2, &obj2, cut).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        manual.run_all();
        let t0 = Instant::now();
        while !t.is_finished() {
            assert!(t0.elapsed() < scaled_secs(5), "set_len stuck");
            manual.run_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        space.read(BASE + cut_page * PAGE, &mut buf).unwrap();
        let off = (cut_page * PAGE) as usize;
        assert_eq!(buf[..100], data[off..off + 100], "bytes before the cut");
        assert!(buf[100..].iter().all(|&b| b == 0), "junk past EOF");
        let e = space.read_u8(BASE + (cut_page + 1) * PAGE).unwrap_err();
        assert_eq!(e.signal(), Signal::Bus(BusCode::ObjErr), "{e}");
        assert!(obj.resident_between(cut_page + 1, u64::MAX).is_empty());
        // Extend again (zeros), and read everything.
        pager.set_len(&vm, &obj, pages * PAGE).unwrap();
        for q in 0..pages {
            space.read(BASE + q * PAGE, &mut buf).unwrap();
            let o = (q * PAGE) as usize;
            for (i, &b) in buf.iter().enumerate() {
                let want = if (o + i) < cut as usize {
                    data[o + i]
                } else {
                    0
                };
                assert_eq!(b, want, "page {q} byte {i} after regrow");
            }
            manual.run_all();
        }
        manual.run_all();
        consistent(&vm);
    });
}

/// A shared writable mapping of a real file: one thread writes every
/// fifth page while two scan it (background reads on the default pool);
/// msync; the file holds exactly the writes and the original elsewhere.
#[test]
fn shared_writes_and_msync_while_background_reads_run() {
    bounded(19, || {
        let pages = 1024u64;
        let data = content((pages * PAGE) as usize);
        let f = TempFile::with(&data);
        let vm = vm(3000);
        let pager = VnodePager::open(&f.0, true).unwrap();
        let obj = pager.object(&vm);
        let space = Arc::new(vm.new_space().unwrap());
        space
            .map(MapRequest::object(
                BASE,
                pages * PAGE,
                obj.clone(),
                0,
                Prot::RW,
            ))
            .unwrap();
        let written = |q: u64| q % 5 == 0;
        let mut hs = Vec::new();
        for t in 0..3u64 {
            let (space, data) = (space.clone(), data.clone());
            hs.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE as usize];
                for q in 0..pages {
                    if t == 0 {
                        if written(q) {
                            space
                                .write(BASE + q * PAGE, &vec![0xA5; PAGE as usize])
                                .unwrap();
                        }
                        continue;
                    }
                    space.read(BASE + q * PAGE, &mut buf).unwrap();
                    let o = (q * PAGE) as usize;
                    if written(q) {
                        // Either the write has landed or not yet: whole page
                        // one or the other, byte by byte.
                        for (i, &b) in buf.iter().enumerate() {
                            assert!(b == 0xA5 || b == data[o + i], "t{t} page {q} byte {i}");
                        }
                    } else {
                        assert!(buf[..] == data[o..o + PAGE as usize], "t{t} page {q}");
                    }
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        space.msync(BASE, pages * PAGE).unwrap();
        let on_disk = std::fs::read(&f.0).unwrap();
        assert_eq!(on_disk.len(), data.len());
        for q in 0..pages {
            let o = (q * PAGE) as usize;
            let page = &on_disk[o..o + PAGE as usize];
            if written(q) {
                assert!(page.iter().all(|&b| b == 0xA5), "file page {q}");
            } else {
                assert!(page == &data[o..o + PAGE as usize], "file page {q} changed");
            }
        }
        assert!(vm.counters().snapshot().v_async_reads > 0);
        consistent(&vm);
    });
}
