//! Many threads on one machine: faults on the same and on different pages,
//! racing map changes and forks. Each test runs under a watchdog and ends
//! with the consistency check.

mod common;
use common::*;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use vm_core::{FaultError, Prot};

/// Runs `threads` copies of `work(i)` and fails if they do not all finish
/// within a minute (a deadlock).
fn run_all(threads: usize, work: impl Fn(usize) + Send + Sync + 'static) {
    let work = Arc::new(work);
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (w, tx) = (work.clone(), tx.clone());
            std::thread::spawn(move || {
                w(i);
                drop(w);
                tx.send(()).unwrap();
            })
        })
        .collect();
    for _ in 0..threads {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a thread deadlocked or panicked");
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn threads_fault_disjoint_regions() {
    let (vm, space) = machine(1024);
    let space = Arc::new(space);
    space.map_anon(BASE, 512 * PAGE, Prot::RW).unwrap();
    let s = space.clone();
    run_all(8, move |t| {
        for p in 0..64u64 {
            let va = BASE + (t as u64 * 64 + p) * PAGE;
            s.write(va, &[t as u8 + 1; 64]).unwrap();
        }
        for p in 0..64u64 {
            let va = BASE + (t as u64 * 64 + p) * PAGE;
            assert_eq!(s.read_u8(va + 63).unwrap(), t as u8 + 1);
        }
    });
    assert_eq!(vm.counters().snapshot().v_zfod, 512);
    consistent(&vm);
}

#[test]
fn threads_fault_the_same_pages() {
    let (vm, space) = machine(64);
    let space = Arc::new(space);
    space.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    let s = space.clone();
    run_all(8, move |t| {
        for round in 0..500u64 {
            let p = (round * 7 + t as u64) % 16;
            s.write(BASE + p * PAGE + t as u64 * 8, &[t as u8 + 1; 8])
                .unwrap();
        }
    });
    for p in 0..16 {
        for t in 0..8u64 {
            let b = space.read_u8(BASE + p * PAGE + t * 8).unwrap();
            assert!(b == 0 || b == t as u8 + 1);
        }
    }
    assert_eq!(
        vm.counters().snapshot().v_zfod,
        16,
        "each page zero-filled once"
    );
    consistent(&vm);
}

#[test]
fn faults_race_with_unmap_protect_and_fork() {
    let (vm, space) = machine(512);
    let space = Arc::new(space);
    space.map_anon(BASE, 32 * PAGE, Prot::RW).unwrap();
    let s = space.clone();
    run_all(5, move |t| {
        for i in 0..3000u64 {
            let va = BASE + ((i * 13 + t as u64) % 32) * PAGE;
            match t {
                0 => {
                    // The map changer.
                    let r = match i % 4 {
                        0 => s.protect(BASE, 16 * PAGE, Prot::READ),
                        1 => s.protect(BASE, 16 * PAGE, Prot::RW),
                        2 => s.unmap(BASE + 16 * PAGE, 8 * PAGE),
                        _ => s.map_anon(BASE + 16 * PAGE, 8 * PAGE, Prot::RW),
                    };
                    // Protect may find a hole left by the unmap.
                    let _ = r;
                }
                1 => {
                    if i % 30 == 0 {
                        let child = s.fork().unwrap();
                        let _ = child.write(BASE + 31 * PAGE, b"child");
                    }
                }
                _ => match s.write(va, &[t as u8]) {
                    Ok(())
                    | Err(
                        FaultError::InvalidAddress { .. } | FaultError::ProtectionFailure { .. },
                    ) => {}
                    Err(e) => panic!("unexpected {e}"),
                },
            }
        }
    });
    consistent(&vm);
    drop(space);
    assert_eq!(vm.free_pages(), vm.total_pages(), "every page came back");
}
