//! Red team of the 255-page read-ahead default (`VmConfig::read_ahead_max`
//! = 255, windows over 63 pages spilled to the heap) and of the early stop
//! in `cache_behind` (the look-back breaks at the first page that is
//! inactive with no mapping).
//!
//! Four of these failed on 3c407d0, whose early stop took "inactive and
//! unmapped" for "handled by an earlier pass" — but pages read ahead or
//! behind and never touched look the same: a stride-2 scan, a half-block
//! scan, a follower more than a window behind, and (async) a scan across
//! a wired stretch were left mapped behind. The stop was withdrawn (the
//! look-back walks two windows again), and the marker's cache-behind now
//! runs before `read_ahead_async`'s early returns, so the last window of
//! an entry is taken too.
//!
//! Every test checks the bytes it reads (the pager's pattern, or what it
//! wrote), ends with `check_consistency` (nothing left busy, held or
//! paging) and runs under a watchdog (`bounded`).
#![allow(clippy::unwrap_used, clippy::needless_range_loop, dead_code)]

mod common;
use common::{BASE, PAGE, consistent, wide_file};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use vm_core::io_executor::IoJob;
use vm_core::{
    Behavior, FaultAround, IoExecutor, MapRequest, PageQueue, Prot, Vm, VmConfig, VmObject, VmSpace,
};
use vm_testkit::support::bounded;
use vm_testkit::{MemPager, RefPmap, pattern_byte};

// ---------------------------------------------------------------- helpers

/// Runs each background read on the faulting thread, at once.
struct Inline;

impl IoExecutor for Inline {
    fn execute(&self, job: IoJob) {
        job();
    }
}

fn cfg(mem_pages: u64, async_ra: bool, fa: FaultAround) -> VmConfig {
    VmConfig {
        async_read_ahead: async_ra,
        fault_around: fa,
        memory_wait_ms: 1,
        memory_retries: 500,
        ..vm_testkit::test_config(mem_pages)
    }
}

/// A machine; with `async_ra` background reads run inline (deterministic).
fn vm_of(config: VmConfig) -> Arc<Vm<RefPmap>> {
    assert_eq!(config.read_ahead_max, 255, "the default under test is 255");
    let async_ra = config.async_read_ahead;
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    if async_ra {
        vm.set_io_executor(Some(Arc::new(Inline)));
    }
    vm
}

fn map(
    space: &VmSpace<RefPmap>,
    obj: &Arc<VmObject>,
    pages: u64,
    prot: Prot,
    private: bool,
    b: Behavior,
) {
    let mut req = MapRequest::object(BASE, pages * PAGE, obj.clone(), 0, prot).behavior(b);
    if private {
        req = req.private();
    }
    space.map(req).unwrap();
}

/// Reads page `p` (a few bytes of it) and checks them against the pattern.
fn read_ok(space: &VmSpace<RefPmap>, p: u64) {
    for off in [0u64, 9, 2049, PAGE - 1] {
        let got = space
            .read_u8(BASE + p * PAGE + off)
            .unwrap_or_else(|e| panic!("read of page {p} failed: {e}"));
        assert_eq!(got, pattern_byte(p, off as usize), "page {p} byte {off}");
    }
}

/// The pages of `range` still mapped in `space`.
fn mapped_in(space: &VmSpace<RefPmap>, range: std::ops::Range<u64>) -> Vec<u64> {
    range
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .collect()
}

/// Asserts none of `pages` is mapped in `space` (a cache-behind failure
/// message with the count and the first few).
fn assert_unmapped(space: &VmSpace<RefPmap>, pages: &[u64], what: &str) {
    let left: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .collect();
    assert!(
        left.is_empty(),
        "{what}: {} of {} pages behind the finished scan still mapped, e.g. {:?}",
        left.len(),
        pages.len(),
        &left[..left.len().min(10)]
    );
}

/// A page's worth of a tag byte derived from page `p` and a round.
fn tag(p: u64, round: u8) -> u8 {
    (p as u8).wrapping_mul(7).wrapping_add(round) ^ 0xA5
}

/// No pager call read a page at or past `end`, and none was larger than
/// the largest window (1 + 255 pages ahead, or 7 behind + 1 + 8 ahead).
fn calls_within(pager: &MemPager, end: u64) {
    for (i, c) in pager.calls().iter().enumerate() {
        assert!(
            c.pindexes.iter().all(|&p| p < end),
            "call {i} read past page {end}: {:?}..={:?}",
            c.pindexes.first(),
            c.pindexes.last()
        );
        assert!(
            c.pindexes.len() <= 256,
            "call {i}: {} pages",
            c.pindexes.len()
        );
        assert!(
            c.pindexes.windows(2).all(|w| w[1] == w[0] + 1),
            "call {i} not contiguous"
        );
    }
}

/// Runs `vm.pageout` until nothing of `obj` is resident (or 40 rounds).
fn drain(vm: &Vm<RefPmap>, obj: &VmObject) {
    for _ in 0..40 {
        if obj.resident_count() == 0 {
            break;
        }
        vm.pageout(vm.total_pages());
    }
}

/// A read-only 2048-page file mapped whole with `behavior` on a 4096-page
/// machine, read (and checked) at `pages` in order; returns once the
/// background reads are done.
fn scanned(
    async_ra: bool,
    fa: FaultAround,
    behavior: Behavior,
    pages: impl IntoIterator<Item = u64>,
) -> (
    Arc<Vm<RefPmap>>,
    VmSpace<RefPmap>,
    Arc<MemPager>,
    Arc<VmObject>,
) {
    let vm = vm_of(cfg(4096, async_ra, fa));
    let space = vm.new_space().unwrap();
    let (pager, obj) = wide_file(&vm, 2048);
    map(&space, &obj, 2048, Prot::READ, false, behavior);
    for p in pages {
        read_ok(&space, p);
    }
    vm.wait_for_background_io();
    (vm, space, pager, obj)
}

// ------------------------------------------------- purely sequential scans

/// Control: a purely sequential read of a 2048-page file with the default
/// 256-page windows, every fault-around policy, synchronous and
/// asynchronous read-ahead: nothing behind the last three windows stays
/// mapped.
#[test]
fn purely_sequential_scan_at_255_unmaps_everything_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            for fa in [
                FaultAround::Off,
                FaultAround::Outward(4),
                FaultAround::Window(16),
                FaultAround::Window(64),
            ] {
                let (vm, space, pager, _obj) = scanned(async_ra, fa, Behavior::Normal, 0..2048);
                assert_eq!(space.entries()[0].read_ahead, 255, "window grew to 255");
                let behind: Vec<u64> = (0..2048 - 3 * 256).collect();
                assert_unmapped(
                    &space,
                    &behind,
                    &format!("async {async_ra}, fault-around {fa:?}"),
                );
                calls_within(&pager, 2048);
                consistent(&vm);
            }
        }
    });
}

/// Same with `MADV_SEQUENTIAL` (the largest window at once).
#[test]
fn madv_sequential_scan_unmaps_everything_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            let (vm, space, pager, _obj) = scanned(
                async_ra,
                FaultAround::default(),
                Behavior::Sequential,
                0..2048,
            );
            let behind: Vec<u64> = (0..2048 - 3 * 256).collect();
            assert_unmapped(
                &space,
                &behind,
                &format!("MADV_SEQUENTIAL async {async_ra}"),
            );
            calls_within(&pager, 2048);
            consistent(&vm);
        }
    });
}

// ------------------------------------------------------ scans with gaps

/// A scan reading every other page (a record reader skipping alternate
/// blocks). The VM itself takes it as sequential: each hard fault lands
/// in the `lastr` window, the window doubles to 255 and cache-behind
/// runs. But the pages the scan skipped were read ahead and never mapped,
/// so they are inactive and unmapped, like pages an earlier pass took:
/// the look-back must walk over them and unmap the pages the scan did
/// read (3c407d0's early stop broke at the first and left every read
/// page mapped and active).
#[test]
fn stride_two_scan_unmaps_the_pages_it_read_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            let (vm, space, pager, obj) = scanned(
                async_ra,
                FaultAround::Off,
                Behavior::Normal,
                (0..2048).step_by(2),
            );
            assert_eq!(
                space.entries()[0].read_ahead,
                255,
                "the VM took the strided scan as sequential"
            );
            assert!(
                pager.calls().len() <= 16,
                "read in large windows: {} calls",
                pager.calls().len()
            );
            calls_within(&pager, 2048);
            consistent(&vm);
            let read_behind: Vec<u64> = (0..2048 - 3 * 256).step_by(2).collect();
            let active = read_behind
                .iter()
                .filter(|&&p| {
                    obj.resident_page(p)
                        .is_some_and(|id| vm.page(id).queue() == PageQueue::Active)
                })
                .count();
            assert_unmapped(
                &space,
                &read_behind,
                &format!("stride 2, async {async_ra} ({active} of them active)"),
            );
        }
    });
}

/// The same with the default fault-around (a 16-page aligned window): the
/// scan reads the first half of every 32-page block (fault-around maps
/// all of it) and skips the second half.
#[test]
fn half_block_scan_with_default_fault_around_unmaps_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            let (vm, space, pager, _obj) = scanned(
                async_ra,
                FaultAround::default(),
                Behavior::Normal,
                (0..2048).filter(|p| p % 32 < 16),
            );
            assert_eq!(space.entries()[0].read_ahead, 255, "taken as sequential");
            calls_within(&pager, 2048);
            consistent(&vm);
            // From page 64 on: the first blocks go through a read-around
            // miss (the 16-page gap after the first window is wider than
            // the sequential window), which leaves 0..15 and 41..47 mapped
            // whatever the look-back does.
            let read_behind: Vec<u64> = (64..2048 - 3 * 256).filter(|p| p % 32 < 16).collect();
            assert_unmapped(
                &space,
                &read_behind,
                &format!("half blocks, async {async_ra}"),
            );
        }
    });
}

/// A scan that reads its first pages, skips ahead inside the window once,
/// and then goes on purely sequentially: what it read after the skip must
/// not stay mapped (one skipped stretch must not stop cache-behind for the
/// rest of the scan).
#[test]
fn one_skip_then_sequential_unmaps_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            let (vm, space, pager, _obj) = scanned(
                async_ra,
                FaultAround::Off,
                Behavior::Normal,
                (0..4).chain(10..2048),
            );
            calls_within(&pager, 2048);
            consistent(&vm);
            let behind: Vec<u64> = (10..2048 - 3 * 256).collect();
            assert_unmapped(&space, &behind, &format!("one skip, async {async_ra}"));
        }
    });
}

// ------------------------------------- dirty pages the look-back skips

/// A shared writable mapping written at every other page, sequentially
/// (cache-behind stops early and leaves the written pages mapped, their
/// modified bit only in the pmap): msync must write every written page
/// and nothing else; a pageout of everything afterwards loses nothing.
#[test]
fn gapped_write_scan_msync_writes_every_written_page() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::Off));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1024);
            map(&space, &obj, 1024, Prot::RW, false, Behavior::Normal);
            for p in (0..1024).step_by(2) {
                // Read first (a read fault: the scan reads ahead), then
                // write the page through the mapping.
                read_ok(&space, p);
                space
                    .write(BASE + p * PAGE + 100, &[tag(p, 1); 64])
                    .unwrap();
            }
            vm.wait_for_background_io();
            let written = space.msync(BASE, 1024 * PAGE).unwrap();
            assert_eq!(written, 512, "async {async_ra}: every written page once");
            for p in 0..1024u64 {
                let s = pager.stored(p).unwrap();
                for o in [0usize, 99, 100, 163, 164, 4095] {
                    let want = if p % 2 == 0 && (100..164).contains(&o) {
                        tag(p, 1)
                    } else {
                        pattern_byte(p, o)
                    };
                    assert_eq!(s[o], want, "async {async_ra}: stored page {p} byte {o}");
                }
            }
            // Write again, then push everything out through pageout only.
            for p in (0..1024).step_by(2) {
                space.write(BASE + p * PAGE + 200, &[tag(p, 2); 8]).unwrap();
            }
            drain(&vm, &obj);
            assert_eq!(obj.resident_count(), 0, "pageout freed the object");
            for p in (0..1024u64).step_by(2) {
                let s = pager.stored(p).unwrap();
                assert_eq!(s[100], tag(p, 1), "page {p}: first write lost");
                assert_eq!(s[200], tag(p, 2), "page {p}: second write lost by pageout");
                assert_eq!(space.read_u8(BASE + p * PAGE + 200).unwrap(), tag(p, 2));
            }
            consistent(&vm);
        }
    });
}

/// A purely sequential write scan of a shared file mapping on a small
/// machine with a pageout daemon (cache-behind, pageout laundering and
/// a look-back that skips pages all at once): every write reaches the
/// file.
#[test]
fn write_scan_under_pressure_keeps_every_write() {
    bounded(25, || {
        for async_ra in [false, true] {
            let mut c = cfg(384, async_ra, FaultAround::default());
            c.thresholds = Some(vm_core::page_queues::Thresholds {
                reserved: 8,
                severe: 16,
                target: 96,
            });
            let vm = vm_of(c);
            let daemon = vm.spawn_pageout_daemon(Duration::from_micros(300));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1536);
            map(&space, &obj, 1536, Prot::RW, false, Behavior::Normal);
            for p in 0..1536 {
                read_ok(&space, p);
                // Every third page written, others only read.
                if p % 3 == 0 {
                    space.write(BASE + p * PAGE + 7, &[tag(p, 3); 3]).unwrap();
                }
            }
            drop(daemon);
            vm.wait_for_background_io();
            space.msync(BASE, 1536 * PAGE).unwrap();
            for p in 0..1536u64 {
                let s = pager.stored(p).unwrap();
                let want = if p % 3 == 0 {
                    tag(p, 3)
                } else {
                    pattern_byte(p, 7)
                };
                assert_eq!(s[7], want, "async {async_ra}: stored page {p} lost a write");
                assert_eq!(s[6], pattern_byte(p, 6));
                assert_eq!(s[10], pattern_byte(p, 10));
            }
            for p in (0..1536).step_by(5) {
                let want = if p % 3 == 0 {
                    tag(p, 3)
                } else {
                    pattern_byte(p, 7)
                };
                assert_eq!(space.read_u8(BASE + p * PAGE + 7).unwrap(), want);
            }
            let _ = obj;
            consistent(&vm);
        }
    });
}

/// Writes through one mapping, then a sequential *read* scan through a
/// second shared mapping of the same file: cache-behind (from the reader)
/// unmaps the writer's dirty mappings and must harvest their modified
/// bits; pages it stops short of keep theirs in the pmap. msync of the
/// writer's range afterwards finds every write.
#[test]
fn reader_scan_behind_a_writer_keeps_the_writes() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::Off));
            let writer = vm.new_space().unwrap();
            let reader = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1024);
            map(&writer, &obj, 1024, Prot::RW, false, Behavior::Random);
            map(&reader, &obj, 1024, Prot::READ, false, Behavior::Normal);
            // The writer dirties pages scattered over the file (random
            // behaviour: no read-around, so pages read one by one).
            for p in (0..1024).filter(|p| p % 5 == 1 || p % 7 == 3) {
                writer.write(BASE + p * PAGE + 1, &[tag(p, 4)]).unwrap();
            }
            // The reader scans sequentially, skipping every 4th page.
            for p in (0..1024).filter(|p| p % 4 != 3) {
                let want = if p % 5 == 1 || p % 7 == 3 {
                    tag(p, 4)
                } else {
                    pattern_byte(p, 1)
                };
                assert_eq!(
                    reader.read_u8(BASE + p * PAGE + 1).unwrap(),
                    want,
                    "page {p}"
                );
            }
            vm.wait_for_background_io();
            // Write-back through the reader's (read-only) range: the
            // object's dirty pages, whichever pmap holds the bit.
            writer.msync(BASE, 1024 * PAGE).unwrap();
            for p in 0..1024u64 {
                let want = if p % 5 == 1 || p % 7 == 3 {
                    tag(p, 4)
                } else {
                    pattern_byte(p, 1)
                };
                assert_eq!(
                    pager.stored(p).unwrap()[1],
                    want,
                    "async {async_ra}: page {p}"
                );
            }
            let _ = obj;
            consistent(&vm);
        }
    });
}

// ---------------------------------------------------------------- fork

/// A fork in the middle of a sequential read scan of a shared mapping:
/// the child's copies of the parent's mappings count for the look-back;
/// after the parent's scan nothing behind is mapped in either space, and
/// the child reads everything right.
#[test]
fn fork_during_a_shared_read_scan() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let parent = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 2048);
            map(&parent, &obj, 2048, Prot::READ, false, Behavior::Normal);
            for p in 0..700 {
                read_ok(&parent, p);
            }
            let child = parent.fork().unwrap();
            for p in 700..2048 {
                read_ok(&parent, p);
            }
            vm.wait_for_background_io();
            let behind: Vec<u64> = (0..2048 - 3 * 256).collect();
            assert_unmapped(&parent, &behind, &format!("parent, async {async_ra}"));
            assert_unmapped(&child, &behind, &format!("child, async {async_ra}"));
            for p in (0..2048).step_by(3) {
                read_ok(&child, p);
            }
            calls_within(&pager, 2048);
            consistent(&vm);
        }
    });
}

/// A fork in the middle of a sequential *write* scan of a private
/// mapping: the child sees the parent's writes made before the fork and
/// the file after; the parent sees all its writes; the file is never
/// written.
#[test]
fn fork_during_a_private_write_scan() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(8192, async_ra, FaultAround::default()));
            let parent = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1024);
            map(&parent, &obj, 1024, Prot::RW, true, Behavior::Normal);
            for p in 0..1024u64 {
                read_ok(&parent, p);
                if p % 2 == 0 {
                    parent.write_u8(BASE + p * PAGE + 5, tag(p, 5)).unwrap();
                }
                if p == 400 {
                    let child = parent.fork().unwrap();
                    // The child scans everything now, in its own order.
                    for q in 0..1024u64 {
                        let want = if q % 2 == 0 && q <= 400 {
                            tag(q, 5)
                        } else {
                            pattern_byte(q, 5)
                        };
                        assert_eq!(
                            child.read_u8(BASE + q * PAGE + 5).unwrap(),
                            want,
                            "child page {q}"
                        );
                    }
                    drop(child);
                }
            }
            vm.wait_for_background_io();
            for p in 0..1024u64 {
                let want = if p % 2 == 0 {
                    tag(p, 5)
                } else {
                    pattern_byte(p, 5)
                };
                assert_eq!(
                    parent.read_u8(BASE + p * PAGE + 5).unwrap(),
                    want,
                    "parent {p}"
                );
                assert_eq!(pager.stored(p).unwrap()[5], pattern_byte(p, 5), "file {p}");
            }
            assert!(pager.puts().is_empty(), "a private mapping wrote the file");
            let _ = obj;
            consistent(&vm);
        }
    });
}

// --------------------------------------------------------------- wiring

/// A wired stretch in the middle of the scan (mlock before the scan):
/// cache-behind skips it and goes on below it; after the scan only the
/// wired pages (and the last windows) are mapped; the wired pages stay
/// resident after a full pageout; unwired they go like the rest.
#[test]
fn wired_stretch_inside_a_scan() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 2048);
            map(&space, &obj, 2048, Prot::READ, false, Behavior::Normal);
            space.wire(BASE + 300 * PAGE, 40 * PAGE, true).unwrap();
            for p in 0..2048 {
                read_ok(&space, p);
            }
            vm.wait_for_background_io();
            // mlock splits the entry in three, each with its own
            // read-ahead state: the scan of the third entry starts with a
            // small window whose look-back never reaches below the wired
            // stretch, so the last window of the first entry (240..300)
            // stays mapped. Pre-existing (the same without the early
            // stop); not counted here.
            let behind: Vec<u64> = (0..2048 - 3 * 256)
                .filter(|p| !(240..340).contains(p))
                .collect();
            assert_unmapped(&space, &behind, &format!("wired stretch, async {async_ra}"));
            for p in 300..340 {
                assert!(
                    space.extract(BASE + p * PAGE).is_some(),
                    "wired {p} unmapped"
                );
            }
            drain(&vm, &obj);
            for p in 300..340 {
                assert!(obj.resident_page(p).is_some(), "wired {p} paged out");
            }
            space.unwire(BASE + 300 * PAGE, 40 * PAGE, true).unwrap();
            for p in (0..2048).step_by(7) {
                read_ok(&space, p);
            }
            calls_within(&pager, 2048);
            consistent(&vm);
        }
    });
}

/// Wiring a range *behind* a running scan (its pages are mapped, then
/// wired), then scanning on: the wired pages are never unmapped, every
/// byte is right.
#[test]
fn wire_behind_a_running_scan() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::Off));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 2048);
            map(&space, &obj, 2048, Prot::READ, false, Behavior::Normal);
            for p in 0..600 {
                read_ok(&space, p);
            }
            space.wire(BASE + 500 * PAGE, 100 * PAGE, true).unwrap();
            for p in 600..2048 {
                read_ok(&space, p);
            }
            vm.wait_for_background_io();
            for p in 500..600 {
                assert!(
                    space.extract(BASE + p * PAGE).is_some(),
                    "wired {p} unmapped"
                );
                read_ok(&space, p);
            }
            let behind: Vec<u64> = (0..2048 - 3 * 256)
                .filter(|p| !(500..600).contains(p))
                .collect();
            assert_unmapped(&space, &behind, &format!("wired behind, async {async_ra}"));
            space.unwire(BASE + 500 * PAGE, 100 * PAGE, true).unwrap();
            calls_within(&pager, 2048);
            let _ = obj;
            consistent(&vm);
        }
    });
}

// ----------------------------------------------------------- truncation

/// A file truncated in the middle of a 255-page-window scan (inside the
/// window read ahead), then grown back: no pager call reads past the end
/// while it is short; faults past it fail; after regrowth every page
/// reads right (no stale page survives past the old end).
#[test]
fn truncate_inside_the_window_mid_scan_then_regrow() {
    bounded(20, || {
        for async_ra in [false, true] {
            for cut in [300u64, 511, 512, 513, 700] {
                let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
                let space = vm.new_space().unwrap();
                let (pager, obj) = wide_file(&vm, 1024);
                map(&space, &obj, 1024, Prot::READ, false, Behavior::Normal);
                for p in 0..cut - 20 {
                    read_ok(&space, p);
                }
                vm.wait_for_background_io();
                let before = pager.calls().len();
                vm.resize_object(&obj, cut);
                for p in cut..1024 {
                    pager.forget(p);
                }
                for p in cut - 20..cut {
                    read_ok(&space, p);
                }
                for p in cut..cut + 40 {
                    assert!(
                        space.read_u8(BASE + p * PAGE).is_err(),
                        "cut {cut}: page {p} readable past the end"
                    );
                }
                vm.wait_for_background_io();
                for c in &pager.calls()[before..] {
                    assert!(
                        c.pindexes.iter().all(|&p| p < cut),
                        "cut {cut}, async {async_ra}: read past the end: {:?}",
                        (c.pindexes.first(), c.pindexes.last())
                    );
                }
                assert!(
                    (cut..1024).all(|p| obj.resident_page(p).is_none()),
                    "cut {cut}: a page resident past the end"
                );
                // Grow back with new contents past the cut.
                for p in cut..1024 {
                    let data: Vec<u8> = (0..PAGE as usize).map(|o| pattern_byte(p, o)).collect();
                    pager.put(p, &data);
                }
                vm.resize_object(&obj, 1024);
                for p in cut - 30..1024 {
                    read_ok(&space, p);
                }
                vm.wait_for_background_io();
                calls_within(&pager, 1024);
                consistent(&vm);
            }
        }
    });
}

/// Truncation racing a scanner on another thread (pager slowed so that
/// the truncation lands during 255-page reads): every read either gets
/// the pattern or fails past the end; nothing is left busy; nothing
/// resident past the end.
#[test]
fn truncation_racing_a_big_window_scan() {
    bounded(25, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let space = Arc::new(vm.new_space().unwrap());
            let (pager, obj) = wide_file(&vm, 2048);
            pager.set_delay(Some(Duration::from_micros(300)));
            map(&space, &obj, 2048, Prot::READ, false, Behavior::Normal);
            let stop = Arc::new(AtomicBool::new(false));
            let scanner = {
                let (space, stop) = (space.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut round = 0;
                    while !stop.load(Ordering::Acquire) && round < 6 {
                        for p in 0..2048u64 {
                            match space.read_u8(BASE + p * PAGE + 9) {
                                Ok(b) => assert_eq!(b, pattern_byte(p, 9), "page {p}"),
                                Err(_) => break,
                            }
                        }
                        round += 1;
                    }
                })
            };
            for i in 0..12u64 {
                std::thread::sleep(Duration::from_millis(3));
                let cut = 100 + (i * 379) % 1900;
                vm.resize_object(&obj, cut);
                std::thread::sleep(Duration::from_millis(1));
                vm.resize_object(&obj, 2048);
            }
            stop.store(true, Ordering::Release);
            scanner.join().unwrap();
            vm.wait_for_background_io();
            vm.resize_object(&obj, 1000);
            assert!((1000..2048).all(|p| obj.resident_page(p).is_none()));
            for p in (0..1000).step_by(3) {
                read_ok(&space, p);
            }
            calls_within(&pager, 2048);
            consistent(&vm);
        }
    });
}

// -------------------------------------------------- memory pressure

/// A 255-page window on a machine of 160 pages, MADV_SEQUENTIAL and
/// normal, with the pageout daemon: every byte right, pager calls within
/// the file, nothing busy.
#[test]
fn big_windows_on_a_tiny_machine() {
    bounded(25, || {
        for async_ra in [false, true] {
            for b in [Behavior::Normal, Behavior::Sequential, Behavior::Random] {
                let mut c = cfg(160, async_ra, FaultAround::default());
                c.thresholds = Some(vm_core::page_queues::Thresholds {
                    reserved: 4,
                    severe: 8,
                    target: 48,
                });
                let vm = vm_of(c);
                let daemon = vm.spawn_pageout_daemon(Duration::from_micros(200));
                let space = vm.new_space().unwrap();
                let (pager, obj) = wide_file(&vm, 1536);
                map(&space, &obj, 1536, Prot::READ, false, b);
                let n = if b == Behavior::Random { 400 } else { 1536 };
                for p in 0..n {
                    read_ok(&space, p);
                }
                // And backwards over what is left.
                for p in (0..n).rev().step_by(3) {
                    read_ok(&space, p);
                }
                drop(daemon);
                vm.wait_for_background_io();
                calls_within(&pager, 1536);
                let _ = obj;
                consistent(&vm);
            }
        }
    });
}

/// Several threads scanning one object (some through one shared space,
/// some through their own), forwards, backwards and with gaps, on a
/// machine smaller than the file, with the pageout daemon.
#[test]
fn threads_scan_one_object_under_pressure() {
    bounded(30, || {
        for async_ra in [false, true] {
            let mut c = cfg(700, async_ra, FaultAround::default());
            c.thresholds = Some(vm_core::page_queues::Thresholds {
                reserved: 8,
                severe: 16,
                target: 128,
            });
            let vm = Vm::new(RefPmap::new(), c).unwrap();
            // The real pool for the async case.
            let daemon = vm.spawn_pageout_daemon(Duration::from_micros(300));
            let (pager, obj) = wide_file(&vm, 2048);
            pager.set_delay(Some(Duration::from_micros(50)));
            let shared = Arc::new(vm.new_space().unwrap());
            map(&shared, &obj, 2048, Prot::READ, false, Behavior::Normal);
            let start = Arc::new(Barrier::new(5));
            let mut hs = Vec::new();
            for t in 0..5u64 {
                let (vm, obj, shared, start) =
                    (vm.clone(), obj.clone(), shared.clone(), start.clone());
                hs.push(std::thread::spawn(move || {
                    let own = vm.new_space().unwrap();
                    let b = if t == 4 {
                        Behavior::Sequential
                    } else {
                        Behavior::Normal
                    };
                    map(&own, &obj, 2048, Prot::READ, false, b);
                    start.wait();
                    let sp: &VmSpace<RefPmap> = if t % 2 == 0 { &shared } else { &own };
                    let order: Vec<u64> = match t {
                        0 | 1 => (0..2048).collect(),
                        2 => (0..2048).rev().collect(),
                        3 => (0..2048).step_by(3).collect(),
                        _ => (0..2048).filter(|p| p % 64 < 40).collect(),
                    };
                    for p in order {
                        assert_eq!(
                            sp.read_u8(BASE + p * PAGE + 11).unwrap(),
                            pattern_byte(p, 11),
                            "thread {t} page {p}"
                        );
                    }
                }));
            }
            for h in hs {
                h.join().unwrap();
            }
            drop(daemon);
            vm.wait_for_background_io();
            calls_within(&pager, 2048);
            consistent(&vm);
        }
    });
}

/// Two readers of the same mapping (two cursors of one program, or two
/// threads), the second 300 pages — a little more than one 256-page
/// window — behind the first. The follower's faults are soft (re-mapping
/// pages the leader's cache-behind had unmapped); only the leader's hard
/// faults run cache-behind. The follower's re-mapped trail lies below the
/// inactive, unmapped top of the window before; the two-window look-back
/// reaches it and takes most of it (176 of 0..1024 left mapped; with
/// 3c407d0's early stop at that top, all 1024).
#[test]
fn a_follower_lagging_more_than_a_window_is_still_cached_behind() {
    bounded(20, || {
        for fa in [FaultAround::Off, FaultAround::default()] {
            let vm = vm_of(cfg(4096, false, fa));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 2048);
            map(&space, &obj, 2048, Prot::READ, false, Behavior::Normal);
            let lag = 300;
            for i in 0..2048 + lag {
                if i < 2048 {
                    read_ok(&space, i);
                }
                if i >= lag {
                    read_ok(&space, i - lag);
                }
            }
            calls_within(&pager, 2048);
            consistent(&vm);
            // Both readers are more than 1000 pages past 0..1024.
            let left = mapped_in(&space, 0..1024);
            assert!(
                left.len() <= 256,
                "fault-around {fa:?}: {} of 1024 pages far behind both readers still mapped, e.g. {:?}",
                left.len(),
                &left[..left.len().min(10)]
            );
            let _ = obj;
        }
    });
}

// ---------------------------------------- backwards, re-scans, edges

/// A backward scan (never sequential: reads around, the window halves,
/// after 100 misses single pages), then a forward scan, then a re-scan:
/// every byte right, no call past the file, no pager call on the re-scan.
#[test]
fn backward_forward_and_rescan() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1536);
            map(&space, &obj, 1536, Prot::READ, false, Behavior::Normal);
            for p in (768..1536).rev() {
                read_ok(&space, p);
            }
            for p in 0..1536 {
                read_ok(&space, p);
            }
            vm.wait_for_background_io();
            let calls = pager.calls().len();
            for p in 0..1536 {
                read_ok(&space, p);
            }
            vm.wait_for_background_io();
            assert_eq!(pager.calls().len(), calls, "the re-scan read again");
            calls_within(&pager, 1536);
            let _ = obj;
            consistent(&vm);
        }
    });
}

/// A sequential scan of the part of the file the pages are still
/// resident from a first scan, going on into fresh pages: the look-back
/// from the first fresh window unmaps what the re-scan mapped (within its
/// reach), and the fresh part behind the end is unmapped.
#[test]
fn rescan_then_continue_unmaps_the_fresh_part_behind() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 2560);
            map(&space, &obj, 2560, Prot::READ, false, Behavior::Normal);
            for p in 0..700 {
                read_ok(&space, p);
            }
            for p in 0..2560 {
                read_ok(&space, p);
            }
            vm.wait_for_background_io();
            let behind: Vec<u64> = (1024..2560 - 3 * 256).collect();
            assert_unmapped(
                &space,
                &behind,
                &format!("continued scan, async {async_ra}"),
            );
            calls_within(&pager, 2560);
            let _ = obj;
            consistent(&vm);
        }
    });
}

/// Files of sizes around the window boundaries (1, 63, 64, 65, 255, 256,
/// 257, 300, 511, 513 pages), each behaviour, the mapping covering the
/// whole file or only its first part: no pager call reads past the file
/// or (synchronously) past the mapping; every byte right.
#[test]
fn window_edges_at_the_end_of_the_file_and_mapping() {
    bounded(25, || {
        for async_ra in [false, true] {
            for size in [1u64, 63, 64, 65, 255, 256, 257, 300, 511, 513] {
                for b in [Behavior::Normal, Behavior::Sequential, Behavior::Random] {
                    for mapped in [size, size.div_ceil(2)] {
                        let vm = vm_of(cfg(2048, async_ra, FaultAround::default()));
                        let space = vm.new_space().unwrap();
                        let (pager, obj) = wide_file(&vm, size);
                        space
                            .map(
                                MapRequest::object(BASE, mapped * PAGE, obj.clone(), 0, Prot::READ)
                                    .behavior(b),
                            )
                            .unwrap();
                        for p in 0..mapped {
                            read_ok(&space, p);
                        }
                        assert!(space.read_u8(BASE + mapped * PAGE).is_err());
                        vm.wait_for_background_io();
                        calls_within(&pager, mapped);
                        consistent(&vm);
                    }
                }
            }
        }
    });
}

/// A window of 256 pages whose pager fills only part of each page (one
/// 512-byte block valid): the junk never shows, every read goes right
/// through the heap-spilled page list.
#[test]
fn partial_pages_in_a_heap_spilled_window() {
    bounded(20, || {
        for async_ra in [false, true] {
            let vm = vm_of(cfg(4096, async_ra, FaultAround::default()));
            let space = vm.new_space().unwrap();
            let (pager, obj) = wide_file(&vm, 1024);
            map(&space, &obj, 1024, Prot::READ, false, Behavior::Sequential);
            pager.set_valid_mask(Some(0b0000_0001));
            for p in 0..1024 {
                // Block 0 is the file's; the rest was left invalid and is
                // read (the whole page) again or zeroed, never junk.
                assert_eq!(
                    space.read_u8(BASE + p * PAGE + 9).unwrap(),
                    pattern_byte(p, 9)
                );
                let tail = space.read_u8(BASE + p * PAGE + 3000).unwrap();
                assert!(
                    tail == pattern_byte(p, 3000) || tail == 0,
                    "page {p}: junk {tail:#x} in an invalid block"
                );
            }
            vm.wait_for_background_io();
            calls_within(&pager, 1024);
            let _ = obj;
            consistent(&vm);
        }
    });
}

/// An asynchronous scan to the end of its mapping: the marker of the last
/// window has no next window to read, and still takes the pages behind it
/// (cache-behind ran only after a next window was found to read, so the
/// whole window before the last one stayed mapped).
#[test]
fn the_last_marker_of_an_async_scan_still_takes_the_pages_behind() {
    bounded(20, || {
        let vm = vm_of(cfg(4096, true, FaultAround::default()));
        let space = vm.new_space().unwrap();
        let (_pager, obj) = wide_file(&vm, 1024);
        map(&space, &obj, 1024, Prot::READ, false, Behavior::Normal);
        for p in 0..1024 {
            read_ok(&space, p);
        }
        vm.wait_for_background_io();
        let mapped = mapped_in(&space, 0..1024);
        // At most the last window (up to 256 pages) may stay; nothing of
        // the window before it (272 pages from 752 stayed before the fix).
        assert!(
            mapped.len() <= 256 && mapped.first().is_none_or(|&p| p >= 1024 - 256),
            "{} pages mapped behind the last window, from {:?}",
            mapped.len(),
            mapped.first()
        );
        consistent(&vm);
    });
}
