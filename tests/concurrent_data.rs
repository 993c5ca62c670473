//! Concurrent data integrity: writer threads each put their own signature
//! into their own pages of four kinds of memory — private anonymous, a
//! named shared anonymous object, a file mapped shared, the same file mapped
//! private — while other threads page everything out, fork and exit
//! children that write their own copies, collapse chains, wire and unwire,
//! hold pages for write and write through the hold, and msync. Every writer
//! checks its last write before the next; at the end every byte is what its
//! writer wrote last, the file on disk is what was msync'ed (and holds none
//! of the private writes), and the machine is consistent. Runs on both
//! pmaps, under a watchdog, for a bounded time (`DATA_TEST_MS`, default
//! 1500 ms each).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_core::{MapRequest, Pmap, Prot, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
/// Pages of each region.
const PAGES: u64 = 16;
const WRITERS: u64 = 4;
/// Region bases: private anonymous, shared object, file shared, file
/// private.
const REGIONS: [u64; 4] = [0x1000_0000, 0x2000_0000, 0x3000_0000, 0x4000_0000];
/// Where each writer's record lives in a page, and how long it is.
const AT: usize = 100;
const LEN: usize = 16;

/// A writer's record for a page: who, which page, which write.
fn record(writer: u64, region: usize, page: u64, seq: u64) -> [u8; LEN] {
    let mut r = [0u8; LEN];
    r[0] = writer as u8 + 1;
    r[1] = region as u8;
    r[2] = page as u8;
    r[8..].copy_from_slice(&seq.to_le_bytes());
    r
}

#[test]
fn every_byte_is_what_its_writer_wrote_reference_pmap() {
    run(RefPmap::new());
}

#[test]
fn every_byte_is_what_its_writer_wrote_x86_64_pmap() {
    run(vm_pmap_x86_64::X86Pmap::new());
}

#[allow(clippy::too_many_lines)]
fn run<P: Pmap>(pmap: P) {
    let run_for = Duration::from_millis(
        std::env::var("DATA_TEST_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );
    let (swap_path, file_path) = (TempPath::new(), TempPath::new());
    std::fs::write(&file_path.0, vec![0u8; (PAGES * PAGE) as usize]).unwrap();
    let config = VmConfig {
        memory_wait_ms: 2,
        memory_retries: 100,
        ..vm_testkit::test_config(144)
    };
    let vm = Vm::new(pmap, config).unwrap();
    let swap = Swap::create(&swap_path.0, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = Arc::new(vm.new_space().unwrap());
    let len = PAGES * PAGE;
    space.map_anon(REGIONS[0], len, Prot::RW).unwrap();
    let shared = vm.new_anon_object(PAGES);
    space
        .map(MapRequest::object(REGIONS[1], len, shared, 0, Prot::RW))
        .unwrap();
    let file = VnodePager::open(&file_path.0, true).unwrap().object(&vm);
    space
        .map(MapRequest::object(
            REGIONS[2],
            len,
            file.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    space
        .map(MapRequest::object(REGIONS[3], len, file, 0, Prot::RW).private())
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let last: Arc<Vec<Mutex<String>>> =
        Arc::new((0..8).map(|_| Mutex::new(String::new())).collect());
    // What each writer wrote last to each (region, page), and what was
    // last written through a hold: the oracle.
    let wrote: Arc<Mutex<Vec<Option<[u8; LEN]>>>> =
        Arc::new(Mutex::new(vec![None; REGIONS.len() * PAGES as usize]));
    let dma: Arc<Mutex<Vec<Option<u8>>>> =
        Arc::new(Mutex::new(vec![None; REGIONS.len() * PAGES as usize]));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (space, stop, progress, last, wrote) = (
            space.clone(),
            stop.clone(),
            progress.clone(),
            last.clone(),
            wrote.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for (r, &base) in REGIONS.iter().enumerate() {
                    // Writer `w` owns pages w, w + WRITERS, ...
                    let page = (seq * WRITERS + w) % PAGES;
                    let va = base + page * PAGE + AT as u64;
                    *last[w as usize].lock().unwrap() = format!("write {va:#x}");
                    let slot = r * PAGES as usize + page as usize;
                    let before = wrote.lock().unwrap()[slot];
                    let mut got = [0u8; LEN];
                    space.read(va, &mut got).unwrap();
                    if let Some(want) = before {
                        assert_eq!(got, want, "writer {w}: region {r} page {page} lost a write");
                    }
                    let rec = record(w, r, page, seq);
                    space.write(va, &rec).unwrap();
                    wrote.lock().unwrap()[slot] = Some(rec);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The chaos: page-out, fork/exit with private writes in the child,
    // collapse, wire/unwire, write holds, msync.
    for c in 0..4usize {
        let (space, vm, stop, progress, last, dma) = (
            space.clone(),
            vm.clone(),
            stop.clone(),
            progress.clone(),
            last.clone(),
            dma.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let note = |s: &str| *last[WRITERS as usize + c].lock().unwrap() = s.to_string();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match (c, i % 3) {
                    (0, _) => {
                        note("pageout");
                        vm.pageout(vm.total_pages());
                    }
                    (1, 0) => {
                        note("fork");
                        let child = space.fork().unwrap();
                        // The child scribbles on its private copies.
                        for &base in &[REGIONS[0], REGIONS[3]] {
                            child
                                .write(base + (i % PAGES) * PAGE + AT as u64, &[0xee; LEN])
                                .unwrap();
                        }
                        drop(child);
                    }
                    (1, _) => {
                        note("collapse");
                        for &base in &[REGIONS[0], REGIONS[3]] {
                            if let Some((o, _)) = space.object_at(base) {
                                vm.collapse(&o);
                            }
                        }
                    }
                    (2, _) => {
                        note("wire/unwire");
                        let base = REGIONS[(i % 4) as usize] + (i % 4) * 4 * PAGE;
                        space.wire(base, 4 * PAGE, i.is_multiple_of(2)).unwrap();
                        std::thread::yield_now();
                        space.unwire(base, 4 * PAGE, i.is_multiple_of(2)).unwrap();
                    }
                    (3, 0) => {
                        note("msync");
                        space.msync(REGIONS[2], PAGES * PAGE).unwrap();
                    }
                    (3, _) => {
                        // Write through a hold, as a device would: the
                        // chaos thread owns byte AT + LEN of every page.
                        note("hold");
                        let r = (i % 4) as usize;
                        let page = i % PAGES;
                        let va = REGIONS[r] + page * PAGE;
                        let held = space.hold(va, PAGE, Prot::RW).unwrap();
                        held.write(AT + LEN, &[i as u8]).unwrap();
                        drop(held);
                        dma.lock().unwrap()[r * PAGES as usize + page as usize] = Some(i as u8);
                    }
                    _ => unreachable!(),
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    watch(&stop, &progress, &last, handles, run_for);

    let (wrote, dma) = (wrote.lock().unwrap(), dma.lock().unwrap());
    for (r, &base) in REGIONS.iter().enumerate() {
        for page in 0..PAGES {
            let slot = r * PAGES as usize + page as usize;
            let mut got = [0u8; LEN + 1];
            space
                .read(base + page * PAGE + AT as u64, &mut got)
                .unwrap();
            if let Some(want) = wrote[slot] {
                assert_eq!(got[..LEN], want, "region {r} page {page} at the end");
            }
            if let Some(want) = dma[slot] {
                assert_eq!(
                    got[LEN], want,
                    "region {r} page {page}: the write through a hold"
                );
            }
        }
    }
    space.msync(REGIONS[2], PAGES * PAGE).unwrap();
    check_disk(&file_path.0, &wrote);
    assert!(progress.load(Ordering::Relaxed) > 50, "too little ran");
    vm.check_consistency().unwrap();
    drop(space);
    assert_eq!(vm.free_pages(), vm.total_pages(), "nothing leaked");
    assert_eq!(swap.stats().used, 0, "swap released");
}

/// The file on disk holds the shared file region's last records, and none
/// of the private file region's.
fn check_disk(path: &std::path::Path, wrote: &[Option<[u8; LEN]>]) {
    let disk = std::fs::read(path).unwrap();
    for page in 0..PAGES as usize {
        let at = page * PAGE as usize + AT;
        let on_disk = &disk[at..at + LEN];
        if let Some(want) = wrote[2 * PAGES as usize + page] {
            assert_eq!(on_disk, want, "file page {page} on disk after msync");
        }
        if let Some(private) = wrote[3 * PAGES as usize + page] {
            assert_ne!(
                on_disk, private,
                "a private write reached the file, page {page}"
            );
        }
    }
}

/// Lets the threads run for `run_for`, failing with each thread's last
/// operation if nothing progresses for 20 s or a thread will not stop.
fn watch(
    stop: &AtomicBool,
    progress: &AtomicU64,
    last: &[Mutex<String>],
    handles: Vec<std::thread::JoinHandle<()>>,
    run_for: Duration,
) {
    let start = Instant::now();
    let (mut seen, mut quiet) = (0, Instant::now());
    while start.elapsed() < run_for && handles.iter().all(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            (seen, quiet) = (now, Instant::now());
        } else if quiet.elapsed() > Duration::from_secs(20) {
            stop.store(true, Ordering::Relaxed);
            let report: Vec<String> = last.iter().map(|m| m.lock().unwrap().clone()).collect();
            panic!("no progress for 20 s; last operations: {report:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (t, h) in handles.into_iter().enumerate() {
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "thread {t} stuck in {:?}",
                last[t].lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
}
