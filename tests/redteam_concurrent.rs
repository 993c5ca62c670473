//! Red-team concurrency: combinations the project's concurrent data test
//! does not run — write_forced writers on a read-only private file mapping,
//! writers through long-lived holds, partial and nested (kernel + user)
//! wiring, mprotect of wired ranges, fork with child writes, pageout,
//! collapse, msync and a balloon squeezing memory, on both pmaps.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_core::{FaultError, MapError, MapRequest, Pmap, Prot, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const A: u64 = 0x1000_0000; // anon private, 16 pages
const B: u64 = 0x2000_0000; // file private, read-only (write_forced), 16 pages
const C: u64 = 0x3000_0000; // named object shared, 8 pages
const N: u64 = 16;

fn run<P: Pmap + 'static>(pmap: P, pages: u64, balloon: bool) {
    let run_for = Duration::from_millis(
        std::env::var("RT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );
    let (swap_path, file_path) = (TempPath::new(), TempPath::new());
    let file_bytes: Vec<u8> = (0..N * PAGE).map(|i| (i / PAGE) as u8 ^ 0x5a).collect();
    std::fs::write(&file_path.0, &file_bytes).unwrap();
    let config = VmConfig {
        memory_wait_ms: 2,
        memory_retries: 200,
        ..vm_testkit::test_config(pages)
    };
    let vm = Vm::new(pmap, config).unwrap();
    let swap = Swap::create(&swap_path.0, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = Arc::new(vm.new_space().unwrap());
    space.map_anon(A, N * PAGE, Prot::RW).unwrap();
    let file = VnodePager::open(&file_path.0, true).unwrap().object(&vm);
    space
        .map(MapRequest::object(B, N * PAGE, file, 0, Prot::READ).private())
        .unwrap();
    let named = vm.new_anon_object(8);
    space
        .map(MapRequest::object(C, 8 * PAGE, named, 0, Prot::RW))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles: Vec<std::thread::JoinHandle<()>> = Vec::new();

    // T0: plain writer on A[0..8] and C[0..4].
    {
        let (space, stop, progress) = (space.clone(), stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut last = [None::<u64>; 12];
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for i in 0..12u64 {
                    let va = if i < 8 {
                        A + i * PAGE
                    } else {
                        C + (i - 8) * PAGE
                    } + 8;
                    let mut b = [0u8; 8];
                    space.read(va, &mut b).unwrap();
                    if let Some(v) = last[i as usize] {
                        assert_eq!(u64::from_le_bytes(b), v, "T0 lost a write at {va:#x}");
                    }
                    let v = (seq << 8) | i;
                    space.write(va, &v.to_le_bytes()).unwrap();
                    last[i as usize] = Some(v);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // T1: write_forced on B[0..8] (read-only private file mapping).
    {
        let (space, stop, progress) = (space.clone(), stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut last = [None::<u64>; 8];
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for i in 0..8u64 {
                    let va = B + i * PAGE + 16;
                    let mut b = [0u8; 8];
                    space.read(va, &mut b).unwrap();
                    if let Some(v) = last[i as usize] {
                        assert_eq!(
                            u64::from_le_bytes(b),
                            v,
                            "T1 lost a forced write at {va:#x}"
                        );
                    } else {
                        assert_eq!(b, [(i as u8) ^ 0x5a; 8], "file data at {va:#x}");
                    }
                    let v = (seq << 8) | i;
                    space.write_forced(va, &v.to_le_bytes()).unwrap();
                    last[i as usize] = Some(v);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // T2: writes through long-lived holds on A[8..16] and C[4..8].
    {
        let (space, stop, progress) = (space.clone(), stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut last = [None::<u64>; 12];
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for i in 0..12u64 {
                    // A[8..16] (A[12..16] is re-protected while wired)
                    // and C[4..8].
                    let va = if i < 8 {
                        A + (8 + i) * PAGE
                    } else {
                        C + (i - 4) * PAGE
                    };
                    let held = match space.hold(va, PAGE, Prot::RW) {
                        Ok(h) => h,
                        // A[12..16] is mprotected read-only at times.
                        Err(FaultError::ProtectionFailure { .. }) => continue,
                        Err(e) => panic!("hold {va:#x}: {e:?}"),
                    };
                    let mut b = [0u8; 8];
                    held.read(24, &mut b).unwrap();
                    if let Some(v) = last[i as usize] {
                        assert_eq!(
                            u64::from_le_bytes(b),
                            v,
                            "T2 hold sees stale data at {va:#x}"
                        );
                    }
                    let v = (seq << 8) | i;
                    held.write(24, &v.to_le_bytes()).unwrap();
                    std::thread::yield_now();
                    drop(held);
                    space.read(va + 24, &mut b).unwrap();
                    assert_eq!(
                        u64::from_le_bytes(b),
                        v,
                        "T2 write through a hold lost at {va:#x}"
                    );
                    last[i as usize] = Some(v);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // T3: wiring chaos: nested kernel + user, partial ranges, mprotect of a
    // wired range (A[12..16] toggles RW <-> R), unwire of part.
    {
        let (space, stop, progress) = (space.clone(), stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (base, n) = [(A, N), (B, N), (C, 8)][(i % 3) as usize];
                let s = i % (n - 2);
                let len = 1 + (i / 3) % (n - s);
                let start = base + s * PAGE;
                space.wire(start, len * PAGE, true).unwrap();
                space.wire(base, 2 * PAGE, false).unwrap();
                if i.is_multiple_of(2) {
                    space.protect(A + 12 * PAGE, 4 * PAGE, Prot::READ).unwrap();
                } else {
                    space.protect(A + 12 * PAGE, 4 * PAGE, Prot::RW).unwrap();
                }
                // partial user unwire, then the rest
                let half = len / 2;
                if half > 0 {
                    space.unwire(start, half * PAGE, true).unwrap();
                }
                space
                    .unwire(start + half * PAGE, (len - half) * PAGE, true)
                    .unwrap();
                space.unwire(base, 2 * PAGE, false).unwrap();
                progress.fetch_add(1, Ordering::Relaxed);
            }
            space.protect(A + 12 * PAGE, 4 * PAGE, Prot::RW).unwrap();
        }));
    }
    // T4: fork + child writes + exit, pageout, collapse, msync, balloon.
    {
        let (space, vm, stop, progress) =
            (space.clone(), vm.clone(), stop.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0u64;
            let mut balloon = None;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match i % 5 {
                    0 => {
                        let child = match space.fork() {
                            Ok(c) => c,
                            Err(MapError::ResourceShortage) => continue,
                            Err(e) => panic!("fork: {e:?}"),
                        };
                        child.write(A + (i % 12) * PAGE + 8, &[0xee; 8]).unwrap();
                        child
                            .write_forced(B + (i % N) * PAGE + 16, &[0xee; 8])
                            .unwrap();
                        drop(child);
                    }
                    1 => {
                        vm.pageout(vm.total_pages());
                    }
                    2 => {
                        for base in [A, B] {
                            if let Some((o, _)) = space.object_at(base) {
                                vm.collapse(&o);
                            }
                        }
                    }
                    3 => {
                        space.msync(C, 8 * PAGE).unwrap();
                    }
                    _ => {
                        if balloon_enabled(&balloon) {
                            balloon = None;
                        } else if BALLOON.load(Ordering::Relaxed) {
                            balloon = Some(vm.inflate_balloon(vm.free_pages() / 2));
                        }
                    }
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    BALLOON.store(balloon, Ordering::Relaxed);

    let start = Instant::now();
    let (mut seen, mut quiet) = (0, Instant::now());
    while start.elapsed() < run_for && handles.iter().all(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            (seen, quiet) = (now, Instant::now());
        } else if quiet.elapsed() > Duration::from_secs(20) {
            stop.store(true, Ordering::Relaxed);
            panic!("no progress for 20 s (hang)");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (t, h) in handles.into_iter().enumerate() {
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "thread {t} stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
    // The file never saw a forced write.
    assert_eq!(
        std::fs::read(&file_path.0).unwrap(),
        file_bytes,
        "file modified"
    );
    if let Err(e) = vm.check_consistency() {
        panic!("{e}");
    }
    drop(space);
    if let Err(e) = vm.check_consistency() {
        panic!("{e}");
    }
}

static BALLOON: AtomicBool = AtomicBool::new(false);
fn balloon_enabled(b: &Option<vm_core::Balloon>) -> bool {
    b.is_some()
}

#[test]
fn concurrent_combo_ref() {
    run(RefPmap::new(), 160, false);
}

#[test]
fn concurrent_combo_x86() {
    run(vm_pmap_x86_64::X86Pmap::new(), 160, false);
}

#[test]
fn concurrent_combo_ref_small_balloon() {
    run(RefPmap::new(), 120, true);
}

#[test]
fn concurrent_combo_x86_small_balloon() {
    run(vm_pmap_x86_64::X86Pmap::new(), 120, true);
}

#[allow(unused)]
fn _m(_: Mutex<()>) {}

/// Queue counter drift (issue 12.10's class) under the combination above
/// on a small machine with a balloon: after the run, at rest,
/// `check_consistency` reports e.g. "queue counters free/active/inactive/
/// wired 91/26/4/0 but pages say 91/25/4/0" (seen with the active count
/// both one too high and one too low). Suspected cause: `Pages::enqueue`
/// (page_queues.rs) moves the page with `requeue` and only afterwards reads
/// FREE_PENDING; a `free` (dequeue + set_free_pending) that lands between
/// the two leaves the page moved but its counts unsettled (and `free`'s
/// dequeue has uncounted the queue enqueue just put it on). The unbusied
/// requeues are the pageout scan's activate/deactivate and `unwire`'s
/// activate; the frees are unmap/exit (`page_remove`), collapse and
/// eviction. `ShardedCount::get` clamps a negative count to 0, hiding
/// part of the drift. Racy: each 3 s run fails with probability ~1/15 here;
/// this test loops runs for up to `RT_DRIFT_SECS` (default 90) seconds and
/// is ignored by default (too long and too rare for CI): run it with
/// `RT_DRIFT_SECS=300 cargo test --test redteam_concurrent -- --ignored`.
#[test]
#[ignore = "racy, minutes: see doc"]
fn rt_queue_counts_drift_under_concurrency() {
    let secs = std::env::var("RT_DRIFT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        run(RefPmap::new(), 120, true);
    }
}
