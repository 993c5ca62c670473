//! The forced write (`VmSpace::write_forced`, the ptrace / FOLL_FORCE
//! analogue) on real files: it breaks copy-on-write into a private copy and
//! never reaches the file, even racing page-out, msync, collapse and unmap
//! and map again on other threads (the Dirty COW race, CVE-2016-5195).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_core::{FaultError, MapRequest, Prot, Vm, VmObject, VmSpace};
use vm_pager_vnode::VnodePager;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath as TempFile;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;
const PAGES: u64 = 4;

fn file_object(vm: &Arc<Vm<RefPmap>>, f: &TempFile) -> Arc<VmObject> {
    VnodePager::open(&f.0, true).unwrap().object(vm)
}

fn map_file(space: &VmSpace<RefPmap>, obj: &Arc<VmObject>, prot: Prot, private: bool) {
    let req = MapRequest::object(BASE, PAGES * PAGE, obj.clone(), 0, prot);
    space
        .map(if private { req.private() } else { req })
        .unwrap();
}

#[test]
fn a_forced_write_to_a_read_only_private_file_mapping_stays_private() {
    let f = TempFile::with(&[b'f'; (PAGES * PAGE) as usize]);
    let (vm, space) = vm_testkit::machine(64);
    let obj = file_object(&vm, &f);
    map_file(&space, &obj, Prot::READ, true);
    assert!(matches!(
        space.write(BASE, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    space.write_forced(BASE + 10, b"patched").unwrap();
    let mut b = [0u8; 7];
    space.read(BASE + 10, &mut b).unwrap();
    assert_eq!(&b, b"patched");
    // Still read-only for the program itself.
    assert!(matches!(
        space.write(BASE, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    // The file and a shared mapping of it are untouched.
    let other = vm.new_space().unwrap();
    map_file(&other, &obj, Prot::READ, false);
    assert_eq!(other.read_u8(BASE + 10).unwrap(), b'f');
    space.msync(BASE, PAGES * PAGE).unwrap();
    other.msync(BASE, PAGES * PAGE).unwrap();
    assert!(std::fs::read(&f.0).unwrap().iter().all(|&c| c == b'f'));
    vm.check_consistency().unwrap();
}

#[test]
fn a_forced_write_never_writes_a_shared_mapping_that_is_not_writable() {
    let f = TempFile::with(&[b'f'; (PAGES * PAGE) as usize]);
    let (vm, space) = vm_testkit::machine(64);
    let obj = file_object(&vm, &f);
    map_file(&space, &obj, Prot::READ, false);
    assert!(matches!(
        space.write_forced(BASE, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    assert!(matches!(
        space.write_forced(BASE + 64 * PAGE, b"x"),
        Err(FaultError::InvalidAddress { .. })
    ));
    // A writable shared mapping is written, as a plain write would.
    let rw = vm.new_space().unwrap();
    map_file(&rw, &obj, Prot::RW, false);
    rw.write_forced(BASE, b"S").unwrap();
    assert_eq!(space.read_u8(BASE).unwrap(), b'S');
    // A private mapping whose maximum protection excludes write cannot be
    // forced (Linux: FOLL_FORCE needs VM_MAYWRITE).
    let ro = vm.new_space().unwrap();
    ro.map(
        MapRequest::object(BASE, PAGES * PAGE, obj, 0, Prot::READ)
            .private()
            .max_prot(Prot::READ | Prot::EXECUTE),
    )
    .unwrap();
    assert!(matches!(
        ro.write_forced(BASE, b"x"),
        Err(FaultError::ProtectionFailure { .. })
    ));
    vm.check_consistency().unwrap();
}

#[test]
fn a_forced_write_after_fork_reaches_neither_the_other_side_nor_the_file() {
    let f = TempFile::with(&[b'f'; (PAGES * PAGE) as usize]);
    let (vm, parent) = vm_testkit::machine(64);
    let obj = file_object(&vm, &f);
    map_file(&parent, &obj, Prot::READ, true);
    parent.write_forced(BASE, b"P").unwrap();
    let child = parent.fork().unwrap();
    child.write_forced(BASE, b"C").unwrap();
    parent.write_forced(BASE + 1, b"p").unwrap();
    assert_eq!(parent.read_u8(BASE).unwrap(), b'P');
    assert_eq!(child.read_u8(BASE).unwrap(), b'C');
    assert_eq!(child.read_u8(BASE + 1).unwrap(), b'f');
    parent.msync(BASE, PAGES * PAGE).unwrap();
    assert!(std::fs::read(&f.0).unwrap().iter().all(|&c| c == b'f'));
    vm.check_consistency().unwrap();
}

/// The Dirty COW race: one thread forces writes into a read-only private
/// mapping of a file while others page everything out, msync, collapse,
/// and unmap and map the range again. The file (on disk and in memory)
/// must never see a forced byte; the private mapping must show each one
/// unless it was unmapped since.
#[test]
fn dirty_cow_race_never_writes_the_file() {
    let run_for = Duration::from_millis(
        std::env::var("DIRTY_COW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );
    let f = TempFile::with(&[b'f'; (PAGES * PAGE) as usize]);
    let (vm, space) = vm_testkit::machine(48);
    let swap_path = std::env::temp_dir().join(format!("vm-forced-swap-{}", std::process::id()));
    let swap = vm_pager_swap::Swap::create(&swap_path, 1 << 20).unwrap();
    vm.set_swap(swap.provider());
    let obj = file_object(&vm, &f);
    let space = Arc::new(space);
    map_file(&space, &obj, Prot::READ, true);
    // A second space maps the file shared, as another process would.
    let witness = vm.new_space().unwrap();
    map_file(&witness, &obj, Prot::READ, false);
    let stop = Arc::new(AtomicBool::new(false));
    let forced = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run_for;
    std::thread::scope(|s| {
        let writer = {
            let (space, stop, forced) = (space.clone(), stop.clone(), forced.clone());
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let va = BASE + (i % PAGES) * PAGE + (i % 97);
                    match space.write_forced(va, b"X") {
                        Ok(()) => {
                            forced.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(FaultError::InvalidAddress { .. }) => {}
                        Err(e) => panic!("forced write: {e}"),
                    }
                    i += 1;
                }
            })
        };
        let churn = {
            let (space, vm, obj, stop) = (space.clone(), vm.clone(), obj.clone(), stop.clone());
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match n % 4 {
                        0 => {
                            vm.pageout(vm.total_pages());
                        }
                        1 => {
                            let _ = space.msync(BASE, PAGES * PAGE);
                        }
                        2 => {
                            if let Some((o, _)) = space.object_at(BASE) {
                                vm.collapse(&o);
                            }
                        }
                        _ => {
                            space.unmap(BASE, PAGES * PAGE).unwrap();
                            map_file(&space, &obj, Prot::READ, true);
                        }
                    }
                    n += 1;
                    // Give the writer a turn where threads take turns.
                    std::thread::yield_now();
                }
            })
        };
        // The file as other mappings see it never changes.
        // Run for `run_for`, and on until the writer has landed some
        // forced writes (a slow host, valgrind's one-thread-at-a-time
        // scheduling) within a bound.
        let bound = deadline + Duration::from_secs(120);
        let mut leaked = None;
        while leaked.is_none()
            && (Instant::now() < deadline
                || (forced.load(Ordering::Relaxed) < 16 && Instant::now() < bound))
        {
            std::thread::sleep(Duration::from_millis(20));
            for p in 0..PAGES {
                let mut b = vec![0u8; PAGE as usize];
                witness.read(BASE + p * PAGE, &mut b).unwrap();
                if b.iter().any(|&c| c != b'f') {
                    leaked = Some(p);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        churn.join().unwrap();
        assert_eq!(leaked, None, "a forced write reached the file's page");
    });
    witness.msync(BASE, PAGES * PAGE).unwrap();
    assert!(
        std::fs::read(&f.0).unwrap().iter().all(|&c| c == b'f'),
        "a forced write reached the file on disk"
    );
    assert!(forced.load(Ordering::Relaxed) > 0, "the race never ran");
    // And the last forced write is where it belongs.
    space.write_forced(BASE, b"Z").unwrap();
    assert_eq!(space.read_u8(BASE).unwrap(), b'Z');
    drop(witness);
    drop(space);
    vm.check_consistency().unwrap();
    let _ = std::fs::remove_file(&swap_path);
}
