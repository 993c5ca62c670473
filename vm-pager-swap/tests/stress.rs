//! Concurrency stress with real paging: more threads than cores fault,
//! write, fork, protect, unmap and page out over shared and private memory
//! for a bounded time, with a pager that sleeps in `get_pages` so faults
//! really overlap I/O. A watchdog fails the test with each thread's last
//! operation if anything deadlocks; at the end no write is lost, nothing is
//! leaked and the machine is consistent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_core::{MapRequest, PagerKind, Pmap, Prot, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_testkit::{MemPager, RefPmap};

const PAGE: u64 = 4096;
const PRIVATE: u64 = 0x1000_0000;
const FILE: u64 = 0x2000_0000;
const CHURN: u64 = 0x3000_0000;
const THREADS: usize = 6;
const PAGES_PER_THREAD: u64 = 16;

#[test]
fn threads_over_paging_and_slow_io_lose_nothing_and_never_deadlock() {
    stress("reference pmap", RefPmap::new());
}

#[test]
fn the_same_on_real_x86_64_tables() {
    stress("x86_64 pmap", vm_pmap_x86_64::X86Pmap::new());
}

fn stress<P: Pmap>(name: &str, pmap: P) {
    let path =
        std::env::temp_dir().join(format!("vm-stress-{}-{}", std::process::id(), name.len()));
    let config = VmConfig {
        memory_wait_ms: 2,
        memory_retries: 50,
        ..vm_testkit::test_config(160)
    };
    let vm = Vm::new(pmap, config).unwrap();
    let swap = Swap::create(&path, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = Arc::new(vm.new_space().unwrap());
    space
        .map_anon(PRIVATE, THREADS as u64 * PAGES_PER_THREAD * PAGE, Prot::RW)
        .unwrap();
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, 64));
    pager.set_delay(Some(Duration::from_micros(300)));
    space
        .map(MapRequest::object(
            FILE,
            64 * PAGE,
            vm.new_object(64, pager.clone()),
            0,
            Prot::READ,
        ))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let last: Arc<Vec<Mutex<String>>> =
        Arc::new((0..THREADS).map(|_| Mutex::new(String::new())).collect());
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (space, vm, stop, last, progress) = (
            space.clone(),
            vm.clone(),
            stop.clone(),
            last.clone(),
            progress.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let note = |s: String| *last[t].lock().unwrap() = s;
            let mut counter = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Each thread owns a private region: a counter per page,
                // written and read back.
                let page = PRIVATE + (t as u64 * PAGES_PER_THREAD + i % PAGES_PER_THREAD) * PAGE;
                counter += 1;
                note(format!("write {page:#x}"));
                if let Err(e) = space.write(page, &counter.to_le_bytes()) {
                    panic!(
                        "thread {t}: {e}; free {} queues {:?} objects {}",
                        vm.free_pages(),
                        vm.queue_counts(),
                        vm.live_objects().len()
                    );
                }
                let mut b = [0u8; 8];
                space.read(page, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), counter, "thread {t} lost a write");
                match (t, i % 7) {
                    (0, 0) => {
                        note("fork".into());
                        let child = space.fork().unwrap();
                        let _ = child.write_u8(PRIVATE, 0xee);
                    }
                    (1, _) => {
                        note("churn map/protect/unmap".into());
                        let _ = space.map_anon(CHURN, 8 * PAGE, Prot::RW);
                        let _ = space.write_u8(CHURN + (i % 8) * PAGE, 1);
                        let _ = space.protect(CHURN, 8 * PAGE, Prot::READ);
                        let _ = space.unmap(CHURN, 8 * PAGE);
                    }
                    (2, 0) => {
                        note("pageout".into());
                        vm.pageout(vm.total_pages());
                    }
                    _ => {
                        note(format!("file read {}", i % 64));
                        let v = space.read_u8(FILE + (i % 64) * PAGE + 5);
                        assert_eq!(v, Ok(vm_testkit::pattern_byte(i % 64, 5)));
                        let _ = space.read_u8(CHURN);
                    }
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            counter
        }));
    }
    // Run for a while, watching for progress.
    let start = Instant::now();
    let mut seen = 0;
    let mut quiet = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(20) {
            let report: Vec<String> = last.iter().map(|m| m.lock().unwrap().clone()).collect();
            panic!("no progress for 20 s; last operations: {report:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (t, h) in handles.into_iter().enumerate() {
        while !h.is_finished() {
            if Instant::now() > deadline {
                panic!("thread {t} stuck in {:?}", last[t].lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().unwrap();
    }
    println!(
        "{name}: {THREADS} threads, {} operations in {:?}, {} pager calls, {:?}",
        progress.load(Ordering::Relaxed),
        start.elapsed(),
        pager.calls().len(),
        swap.stats()
    );
    assert!(progress.load(Ordering::Relaxed) > 100);
    vm.check_consistency().unwrap();
    drop(space);
    assert_eq!(vm.free_pages(), vm.total_pages(), "nothing leaked");
    assert_eq!(swap.stats().used, 0, "swap released");
    let _ = std::fs::remove_file(&path);
}
