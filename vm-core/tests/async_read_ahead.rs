//! Asynchronous read-ahead: a sequential window marks its first page read
//! ahead; the fault that reaches it starts the next window's read on the
//! machine's I/O executor and goes on. A fault on a page still being read
//! waits for it as for any busy page; a failed background read leaves
//! nothing behind and the fault that needs the page reads it itself.

mod common;
use common::*;
use std::sync::Arc;
use std::time::Duration;
use vm_core::io_executor::IoJob;
use vm_core::{
    Contiguity, IoExecutor, MapRequest, PagerKind, Prot, Signal, Vm, VmConfig, VmObject, VmSpace,
};
use vm_testkit::support::ManualExecutor as Manual;
use vm_testkit::{Injected, MemPager, RefPmap};

/// A machine and a `pages`-page file mapped at `BASE`, its pager able to
/// read 255 pages at once.
fn file(
    pages: u64,
) -> (
    Arc<Vm<RefPmap>>,
    VmSpace<RefPmap>,
    Arc<MemPager>,
    Arc<VmObject>,
) {
    let vm = Vm::new(RefPmap::new(), background(4096)).unwrap();
    let space = vm.new_space().unwrap();
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, pages));
    pager.set_contiguity(Contiguity {
        behind: 255,
        ahead: 255,
    });
    let obj = vm.new_object(pages, pager.clone());
    space
        .map(MapRequest::object(
            BASE,
            pages * PAGE,
            obj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    (vm, space, pager, obj)
}

fn byte_ok(space: &VmSpace<RefPmap>, p: u64) {
    assert_eq!(
        space.read_u8(BASE + p * PAGE + 3).unwrap(),
        vm_testkit::pattern_byte(p, 3),
        "page {p}"
    );
}

/// A machine of `pages` pages with asynchronous read-ahead on.
fn background(pages: u64) -> VmConfig {
    VmConfig {
        async_read_ahead: true,
        ..vm_testkit::test_config(pages)
    }
}

#[test]
fn a_sequential_scan_reads_every_window_after_the_first_in_the_background() {
    let (vm, space, pager, _obj) = file(2048);
    pager.set_delay(Some(Duration::from_micros(500)));
    for p in 0..2048 {
        byte_ok(&space, p);
    }
    vm.wait_for_background_io();
    let c = vm.counters().snapshot();
    // Only the first window is read by a fault; every later one was
    // started by the marker of the one before.
    assert_eq!(c.v_io_faults, 1, "{c:?}");
    // Windows double to 256 pages (the default `read_ahead_max`, 255).
    assert!(c.v_async_reads >= 2048 / 256, "{c:?}");
    assert_eq!(c.v_pager_calls, c.v_async_reads + 1);
    let calls = pager.calls();
    let total: usize = calls.iter().map(|c| c.pindexes.len()).sum();
    assert_eq!(total, 2048, "each page read once");
    consistent(&vm);
}

#[test]
fn a_fault_on_a_page_being_read_waits_for_the_read() {
    let (vm, space, pager, obj) = file(256);
    let manual = Arc::new(Manual::default());
    vm.set_io_executor(Some(manual.clone()));
    byte_ok(&space, 0); // reads 0..=15, marks page 1
    assert_eq!(manual.run_all(), 0);
    byte_ok(&space, 1); // the marker: 16..=47 go to the executor
    assert_eq!(pager.calls().len(), 1, "nothing read yet");
    let id = obj.resident_page(20).expect("allocated for the read");
    assert!(vm.page(id).is_busy(), "and busy while in flight");
    assert_eq!(vm.counters().snapshot().v_async_reads, 0);
    // A reader of page 20 sleeps until the read is done.
    let reader = {
        let space = Arc::new(space);
        let s = space.clone();
        (std::thread::spawn(move || byte_ok(&s, 20)), space)
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!reader.0.is_finished(), "the reader waits for the read");
    assert_eq!(manual.run_all(), 1);
    reader.0.join().unwrap();
    let c = vm.counters().snapshot();
    assert_eq!(c.v_async_reads, 1);
    assert_eq!(c.v_io_faults, 1, "the reader did no I/O of its own");
    assert!(c.v_intrans >= 1, "it waited on a busy page");
    assert_eq!(pager.calls()[1].pindexes, (16..48).collect::<Vec<_>>());
    consistent(&vm);
}

#[test]
fn a_failed_background_read_leaves_nothing_and_the_fault_reads_the_page() {
    let (vm, space, pager, obj) = file(256);
    let manual = Arc::new(Manual::default());
    vm.set_io_executor(Some(manual.clone()));
    byte_ok(&space, 0);
    byte_ok(&space, 1);
    pager.inject(Injected::Fail(MemPager::io_error()));
    assert_eq!(manual.run_all(), 1);
    assert!((16..48).all(|p| obj.resident_page(p).is_none()), "freed");
    consistent(&vm);
    // The fault that needs a page reads it; if that read fails too, the
    // error reaches it as SIGBUS, and nothing is left busy.
    pager.inject(Injected::Fail(MemPager::io_error()));
    let err = space.read_u8(BASE + 20 * PAGE).unwrap_err();
    assert!(matches!(err.signal(), Signal::Bus(_)), "{err}");
    consistent(&vm);
    byte_ok(&space, 20);
    consistent(&vm);
}

#[test]
fn a_background_read_in_flight_while_the_reader_faults_on_a_real_pool() {
    // The default pool: a pager paused inside the background read; a
    // fault on that page waits, then sees the data.
    let (vm, space, pager, _obj) = file(256);
    byte_ok(&space, 0);
    let pause = pager.pause_next();
    byte_ok(&space, 1);
    assert_eq!(pause.wait_started(), 16, "the background read started");
    let space = Arc::new(space);
    let s = space.clone();
    let reader = std::thread::spawn(move || byte_ok(&s, 30));
    std::thread::sleep(Duration::from_millis(30));
    assert!(!reader.is_finished());
    pause.resume();
    reader.join().unwrap();
    vm.wait_for_background_io();
    assert_eq!(vm.counters().snapshot().v_io_faults, 1);
    consistent(&vm);
}

#[test]
fn off_or_without_an_executor_every_read_is_the_faults_own() {
    for how in ["config", "executor"] {
        let config = VmConfig {
            async_read_ahead: how != "config",
            ..vm_testkit::test_config(4096)
        };
        assert!(!VmConfig::default().async_read_ahead, "off by default");
        let vm = Vm::new(RefPmap::new(), config).unwrap();
        if how == "executor" {
            vm.set_io_executor(None);
        }
        let space = vm.new_space().unwrap();
        let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, 512));
        pager.set_contiguity(Contiguity {
            behind: 255,
            ahead: 255,
        });
        let obj = vm.new_object(512, pager.clone());
        space
            .map(MapRequest::object(BASE, 512 * PAGE, obj, 0, Prot::READ))
            .unwrap();
        for p in 0..512 {
            byte_ok(&space, p);
        }
        let c = vm.counters().snapshot();
        assert_eq!(c.v_async_reads, 0, "{how}");
        assert_eq!(c.v_io_faults, c.v_pager_calls, "{how}");
        consistent(&vm);
    }
}

#[test]
fn truncation_and_termination_wait_for_a_read_in_flight() {
    let (vm, space, pager, obj) = file(256);
    let manual = Arc::new(Manual::default());
    vm.set_io_executor(Some(manual.clone()));
    byte_ok(&space, 0);
    byte_ok(&space, 1);
    // Truncating into the window in flight waits for its busy pages.
    let vm2 = vm.clone();
    let obj2 = obj.clone();
    let truncate = std::thread::spawn(move || vm2.resize_object(&obj2, 24));
    std::thread::sleep(Duration::from_millis(30));
    assert!(!truncate.is_finished(), "waits for the busy pages");
    manual.run_all();
    truncate.join().unwrap();
    assert!((24..48).all(|p| obj.resident_page(p).is_none()));
    byte_ok(&space, 23);
    assert!(space.read_u8(BASE + 30 * PAGE).is_err(), "past the new end");
    let _ = pager;
    consistent(&vm);
}

/// A pager that scribbles over every page it is asked for and then fails
/// (a device error after a partial DMA) once it is armed.
struct Scribbler {
    inner: MemPager,
    armed: std::sync::atomic::AtomicBool,
}

impl vm_core::Pager for Scribbler {
    fn kind(&self) -> PagerKind {
        self.inner.kind()
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.inner.has_page(pindex)
    }
    fn get_pages(
        &self,
        pages: &mut [vm_core::PageSlot<'_>],
        reqpage: usize,
    ) -> Result<(), vm_core::PagerError> {
        if !self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return self.inner.get_pages(pages, reqpage);
        }
        for s in pages.iter_mut() {
            s.frame().fill(0, PAGE as usize, 0xAA);
        }
        Err(MemPager::io_error())
    }
}

#[test]
fn frames_a_failed_background_read_wrote_are_zeroed_before_reuse() {
    // Every free frame is pre-zeroed, so the background read's pages come
    // from the zeroed pool; the pager writes them and fails. When those
    // frames serve zero-fill faults they must be zeroed again.
    let vm = Vm::new(RefPmap::new(), background(256)).unwrap();
    let manual = Arc::new(Manual::default());
    vm.set_io_executor(Some(manual.clone()));
    let space = vm.new_space().unwrap();
    let inner = MemPager::with_pattern(PagerKind::FILE, 128);
    inner.set_contiguity(Contiguity {
        behind: 255,
        ahead: 255,
    });
    let pager = Arc::new(Scribbler {
        inner,
        armed: std::sync::atomic::AtomicBool::new(false),
    });
    let obj = vm.new_object(128, pager.clone());
    space
        .map(MapRequest::object(BASE, 128 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    vm.zero_free_pages(u64::MAX);
    byte_ok(&space, 0);
    byte_ok(&space, 1); // 16..=47 handed to the executor
    pager.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(manual.run_all(), 1);
    // Zero-fill every free frame there is, and look at each.
    let anon = 0x4000_0000;
    let n = vm.free_pages();
    space.map_anon(anon, n * PAGE, Prot::RW).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    for i in 0..n {
        if space.write_u8(anon + i * PAGE, 0).is_err() {
            break;
        }
        space.read(anon + i * PAGE, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "zero-fill page {i} shows old bytes"
        );
    }
    consistent(&vm);
}

/// An executor that cannot run anything and drops the job.
struct Discard;

impl IoExecutor for Discard {
    fn execute(&self, job: IoJob) {
        drop(job);
    }
}

#[test]
fn a_job_dropped_without_running_releases_its_pages() {
    let (vm, space, pager, obj) = file(256);
    vm.set_io_executor(Some(Arc::new(Discard)));
    byte_ok(&space, 0);
    byte_ok(&space, 1); // the marker: the window's job is dropped
    assert!((16..48).all(|p| obj.resident_page(p).is_none()), "freed");
    vm.wait_for_background_io(); // and counted done
    byte_ok(&space, 20); // read by the fault itself
    assert_eq!(vm.counters().snapshot().v_async_reads, 0);
    assert_eq!(pager.calls().len(), 2);
    consistent(&vm);
}
