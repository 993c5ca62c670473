//! Regression tests for issue 11 ("Data integrity: no write lost, no byte
//! leaked, no wrong page mapped"), one or more per "Must hold" item. Each
//! test asserts the behaviour the issue requires and failed on main at
//! the time it was written; the failure seen is quoted in its doc comment.
//!
//! Items 7 and 8 (the x86_64 pmap's lost dirty bit and its software MMU /
//! table freeing) are in `vm-pmap-x86_64/tests/regress.rs`: they
//! need that pmap, which vm-core does not depend on.

mod common;
mod regress_support;

use common::*;
use regress_support::*;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vm_core::{FaultFlags, Inheritance, MapRequest, PagerKind, Prot};
use vm_testkit::{Injected, MemPager, pattern_byte};

/// A page of `b`.
fn page_of(b: u8) -> Vec<u8> {
    vec![b; PAGE as usize]
}

// ---------------------------------------------------------------- item 1

/// Issue 11 item 1: `wire()` racing `munmap` + `mmap` of a file.
///
/// `wire()` marks the entry wired, drops the map lock and faults. Its first
/// fault is held inside the old file's `get_pages`; meanwhile another
/// thread unmaps the range and maps a different file there. On the current
/// code the wiring fault retries on the new, unwired entry, skips the pager
/// (`trypager = pager && (!wiring || wired)`) and zero-fills the new file's
/// pages, which every mapper of that file then sees. With entries in
/// transition, the unmap waits for the wiring and the new file keeps its
/// contents.
///
/// Fails on main with: `the new file's page 0 byte 0 reads 0x0, its
/// contents are 0xab (a wiring fault zero-filled a page the pager holds)`.
#[test]
fn i11_1_wire_racing_munmap_mmap_never_zero_fills_the_new_file() {
    watchdog(20, "wire racing munmap+mmap", || {
        let (vm, space) = machine(64);
        let old = Arc::new(MemPager::with_pattern(PagerKind::FILE, 2));
        let old_obj = vm.new_object(2, old.clone());
        space
            .map(MapRequest::object(BASE, 2 * PAGE, old_obj, 0, Prot::RW))
            .unwrap();
        let new = Arc::new(MemPager::new(PagerKind::FILE));
        new.put(0, &page_of(0xab));
        new.put(1, &page_of(0xab));
        let new_obj = vm.new_object(2, new.clone());
        let pause = old.pause_next();
        std::thread::scope(|s| {
            let wiring = s.spawn(|| space.wire(BASE, 2 * PAGE, true));
            pause.wait_started();
            let (tx, rx) = mpsc::channel();
            let space = &space;
            let new_obj = &new_obj;
            let remap = s.spawn(move || {
                space.unmap(BASE, 2 * PAGE).unwrap();
                space
                    .map(MapRequest::object(
                        BASE,
                        2 * PAGE,
                        new_obj.clone(),
                        0,
                        Prot::RW,
                    ))
                    .unwrap();
                let _ = tx.send(());
            });
            // Today the remap is done at once; once it waits for the
            // wiring, let the wiring go on after a while.
            let _ = rx.recv_timeout(Duration::from_millis(300));
            pause.resume();
            let _ = wiring.join().unwrap();
            remap.join().unwrap();
        });
        for p in 0..2 {
            let got = byte(&space, BASE + p * PAGE);
            assert_eq!(
                got, 0xab,
                "the new file's page {p} byte 0 reads {got:#x}, its contents are 0xab \
                 (a wiring fault zero-filled a page the pager holds)"
            );
        }
    });
}

/// Issue 11 item 1: a forced copy-on-write of a non-resident file page —
/// by `wire()` of a writable private mapping (the seed's L247-270 case) and
/// by a forced write into a read-only one.
///
/// On main the wiring fault walked to the file object with a wiring flag on
/// an entry not yet wired, skipped the pager and zero-filled the private
/// copy instead of copying the file's page (the hand-made user-wire fault
/// failed with: `the forced copy of file page 0 reads 0x0 at byte 0, the
/// file has 0x1`).
#[test]
fn i11_1_forced_cow_of_a_non_resident_file_page_copies_the_file() {
    let (vm, space) = machine(64);
    let (_pager, obj) = map_pager(&vm, &space, PagerKind::FILE, 2, Prot::RW, true);
    space.wire(BASE, PAGE, true).unwrap();
    let got = byte(&space, BASE);
    assert_eq!(
        got,
        pattern_byte(0, 0),
        "the wired copy of file page 0 reads {got:#x} at byte 0, the file has {:#x}",
        pattern_byte(0, 0)
    );
    assert_ne!(
        space.extract(BASE),
        obj.resident_page(0).map(|id| vm.page_pfn(id))
    );
    let ro = vm.new_space().unwrap();
    ro.map(MapRequest::object(BASE, 2 * PAGE, obj, 0, Prot::READ).private())
        .unwrap();
    ro.write_forced(BASE + PAGE + 1, b"!").unwrap();
    assert_eq!(ro.read_u8(BASE + PAGE).unwrap(), pattern_byte(1, 0));
    assert_eq!(ro.read_u8(BASE + PAGE + 1).unwrap(), b'!');
    space.unwire(BASE, PAGE, true).unwrap();
    drop(ro);
    consistent(&vm);
}

/// Issue 11 item 1: a wiring fault (`CHANGE_WIRING`) on swapped-out
/// anonymous memory.
///
/// The page was laundered to swap and freed; a change-wiring fault on it
/// skips the swap pager and zero-fills, so the data is gone from the
/// space.
///
/// Fails on main with: `after a change-wiring fault the swapped-out page
/// reads 0x0, it held 0x5a`.
#[test]
fn i11_1_wiring_fault_on_swapped_out_anon_memory_reads_swap() {
    let (vm, space) = machine(64);
    vm.set_swap(Arc::new(MemSwap::default()));
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    space.write(BASE, &[0x5a; 64]).unwrap();
    vm.pageout(vm.total_pages());
    assert_eq!(space.extract(BASE), None, "set-up: the page was paged out");
    let _ = space.fault(BASE, Prot::READ, FaultFlags::CHANGE_WIRING);
    let got = byte(&space, BASE);
    assert_eq!(
        got, 0x5a,
        "after a change-wiring fault the swapped-out page reads {got:#x}, it held 0x5a"
    );
}

// ---------------------------------------------------------------- item 2

/// Issue 11 item 2: named anonymous objects are never robbed.
///
/// An object made by `new_anon_object` is written through a shared
/// mapping, which is then unmapped (the caller still holds the object). A
/// private mapping of it is written once. On the current code the COW
/// rename moves page 0 out of the named object and the collapse that
/// follows merges the rest into the private shadow: mapped again, the
/// object reads zeros, even at pages the private mapping never touched.
///
/// Fails on main with: `page 0 of the named object reads 0x0, it holds
/// 0x1` (and zeros at pages 1..3 likewise).
#[test]
fn i11_2_named_anon_object_is_not_robbed_by_cow_rename_or_collapse() {
    let (vm, space) = machine(64);
    let obj = vm.new_anon_object(4);
    let shared = BASE + 64 * PAGE;
    space
        .map(MapRequest::object(
            shared,
            4 * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    for p in 0..4u8 {
        space
            .write(shared + u64::from(p) * PAGE, &[p + 1; 8])
            .unwrap();
    }
    space.unmap(shared, 4 * PAGE).unwrap();
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW).private())
        .unwrap();
    space.write(BASE, b"private").unwrap();
    space
        .map(MapRequest::object(shared, 4 * PAGE, obj, 0, Prot::READ))
        .unwrap();
    for p in 0..4u8 {
        let got = byte(&space, shared + u64::from(p) * PAGE);
        assert_eq!(
            got,
            p + 1,
            "page {p} of the named object reads {got:#x}, it holds {:#x}",
            p + 1
        );
    }
    assert_eq!(byte(&space, BASE), b'p');
    consistent(&vm);
}

// ---------------------------------------------------------------- item 3

/// Builds, in `space`, a private mapping at `BASE` of the file `file` (2
/// pages) whose entry's object is a shadow S over a private anonymous
/// object B over the file: S has page 1, B has page 1, nobody has page 0
/// but the file. Returns S.
fn shadow_over_private_backing_over_file(
    space: &vm_core::VmSpace<vm_testkit::RefPmap>,
    file: &Arc<vm_core::VmObject>,
) -> Arc<vm_core::VmObject> {
    space
        .map(MapRequest::object(BASE, 2 * PAGE, file.clone(), 0, Prot::RW).private())
        .unwrap();
    space.write(BASE + PAGE, b"B").unwrap();
    let child = space.fork().unwrap();
    space.write(BASE + PAGE, b"S").unwrap();
    child.write(BASE + PAGE, b"C").unwrap();
    drop(child);
    let (s, _) = space.object_at(BASE).unwrap();
    assert_eq!(s.chain_depth(), 3, "set-up: S -> B -> file");
    s
}

/// Issue 11 item 3: collapse never races a fault in the shadow.
///
/// A read fault of page 0 walks S -> B -> file while another thread
/// collapses S (`Vm::collapse`, as a copy-on-write fault or a fork of
/// another thread does). `collapse_once` checks only B's paging in
/// progress, not S's, which the running fault holds: when it merges B
/// between the fault reading S's backing object and taking B's
/// paging-in-progress, the fault walks a gutted B (no pages, no pager, no
/// backing) and zero-fills page 0 although the file has it. The helper
/// waits for the fault's busy placeholder in S (the fault is then about to
/// read S's backing) and tries the collapse from then on.
///
/// The window is a few instructions in `walk()` (between
/// `obj.lock().backing.clone()` and `Pip::new(b.object)`) and nothing in it
/// can be hooked, so the race is repeated for 5 s and every round checked.
/// Probabilistic: on the 2-core test machine it failed in 10 runs of 10
/// (7 of 10 with a 3 s bound, 3 of 10 while another build loaded the
/// machine); with S's paging in progress honoured it cannot fail.
///
/// Fails on main (in some runs) with: `round N: page 0 reads 0x0 after a
/// collapse raced its fault, the file has 0x1`.
#[test]
fn i11_3_collapse_racing_a_fault_in_the_shadow_never_zero_fills() {
    use std::sync::atomic::{AtomicU64, Ordering::*};
    watchdog(30, "collapse racing a fault", || {
        let (vm, space) = machine(256);
        // The round being played (0: none), and the shadow to collapse.
        let go = AtomicU64::new(0);
        let stop = AtomicU64::new(0);
        let target: std::sync::Mutex<Option<Arc<vm_core::VmObject>>> = std::sync::Mutex::new(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut seen = 0;
                while stop.load(Acquire) == 0 {
                    let round = go.load(Acquire);
                    if round == 0 || round == seen {
                        std::hint::spin_loop();
                        continue;
                    }
                    seen = round;
                    let Some(shadow) = target.lock().unwrap().clone() else {
                        continue;
                    };
                    // Wait for the fault's busy placeholder in S at page 0:
                    // the fault is about to read S's backing object, and
                    // the collapse is tried from then on.
                    let placeholder = loop {
                        if go.load(Acquire) != round {
                            break false;
                        }
                        if let Some(id) = shadow.resident_page(0) {
                            if vm.page(id).is_busy() {
                                break true;
                            }
                        }
                    };
                    if !placeholder {
                        continue;
                    }
                    while go.load(Acquire) == round && vm.collapse(&shadow) == 0 {
                        std::hint::spin_loop();
                    }
                }
            });
            // Stops the helper however this thread leaves (an assertion
            // failing included).
            struct Stop<'a>(&'a AtomicU64);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(1, Release);
                }
            }
            let _stop = Stop(&stop);
            let (mut round, mut fault_ns, mut merged_late) = (0u64, 0u128, 0u64);
            while Instant::now() < deadline {
                round += 1;
                let file = vm.new_object(2, Arc::new(MemPager::with_pattern(PagerKind::FILE, 2)));
                let shadow = shadow_over_private_backing_over_file(&space, &file);
                let collapses_before = vm.counters().snapshot().v_collapses;
                *target.lock().unwrap() = Some(shadow);
                go.store(round, Release);
                let t = Instant::now();
                let got = byte(&space, BASE);
                fault_ns += t.elapsed().as_nanos();
                go.store(0, Release);
                merged_late += u64::from(vm.counters().snapshot().v_collapses > collapses_before);
                *target.lock().unwrap() = None;
                assert_eq!(
                    got,
                    pattern_byte(0, 0),
                    "round {round}: page 0 reads {got:#x} after a collapse raced its fault, \
                     the file has {:#x}",
                    pattern_byte(0, 0)
                );
                space.unmap(BASE, 2 * PAGE).unwrap();
            }
            eprintln!(
                "i11_3: {round} rounds, mean fault {} ns, collapse by the helper in {merged_late}",
                fault_ns / u128::from(round.max(1))
            );
        });
    });
}

// ---------------------------------------------------------------- item 4

/// Issue 11 item 4: a copy-on-write copy honours the source page's valid
/// bits.
///
/// The pager fills only the first 512-byte block of page 0 (the frame
/// holds other bytes in the rest). A write to a private mapping copies
/// the frame whole and marks the copy valid, so the invalid blocks' bytes
/// become visible instead of zeros.
///
/// Fails on main with: `byte 512 of the private copy reads 0x1, but block
/// 1 was never made valid by the pager (must read as zero)`.
#[test]
fn i11_4_cow_copy_zeroes_the_blocks_the_pager_left_invalid() {
    let (vm, space) = machine(64);
    let (pager, _obj) = map_pager(&vm, &space, PagerKind::FILE, 2, Prot::RW, true);
    pager.inject(Injected::Partial(0x01));
    space.write(BASE, b"w").unwrap();
    let mut buf = page_of(0xee);
    space.read(BASE, &mut buf).unwrap();
    assert_eq!(buf[0], b'w');
    assert_eq!(buf[1], pattern_byte(0, 1), "block 0 is the pager's");
    for (off, &b) in buf.iter().enumerate().skip(512) {
        assert_eq!(
            b,
            0,
            "byte {off} of the private copy reads {b:#x}, but block {} was never made \
             valid by the pager (must read as zero)",
            off / 512
        );
    }
}

// ---------------------------------------------------------------- item 5

/// Issue 11 item 5: a fork copies pinned pages from where they really are
/// — a read-only private file mapping.
///
/// The parent holds page 0 (a page of the file object itself: the mapping
/// is read-only, so nothing was copied). The fork takes the held-pages
/// path (`copy_object_for_child`), which gives the child an object with
/// copies of the file object's resident pages and *no backing*: the
/// child's other pages read zeros instead of the file.
///
/// Fails on main with: `the child reads 0x0 at page 1, the file has 0x1f`.
#[test]
fn i11_5_fork_with_a_pinned_read_only_file_page_keeps_the_file_for_the_child() {
    let (vm, parent) = machine(64);
    let (_pager, _obj) = map_pager(&vm, &parent, PagerKind::FILE, 4, Prot::READ, true);
    let held = parent.hold(BASE, PAGE, Prot::READ).unwrap();
    let child = parent.fork().unwrap();
    for p in 0..4 {
        let got = byte(&child, BASE + p * PAGE);
        assert_eq!(
            got,
            pattern_byte(p, 0),
            "the child reads {got:#x} at page {p}, the file has {:#x}",
            pattern_byte(p, 0)
        );
    }
    drop(held);
}

/// Issue 11 item 5: a fork copies pinned pages from where they really are
/// — an anonymous object with a page on swap.
///
/// Page 1 was paged out to swap, page 0 is held. The fork copies only the
/// resident pages into the child's object (no backing, no swap), so the
/// child reads zeros at page 1.
///
/// Fails on main with: `the child reads 0x0 at the swapped-out page 1, the
/// parent wrote 0x22`.
#[test]
fn i11_5_fork_with_a_pinned_page_copies_swapped_out_pages_too() {
    let (vm, parent) = machine(64);
    vm.set_swap(Arc::new(MemSwap::default()));
    parent.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    parent.write(BASE, &[0x11; 16]).unwrap();
    parent.write(BASE + PAGE, &[0x22; 16]).unwrap();
    let held = parent.hold(BASE, PAGE, Prot::READ).unwrap();
    vm.pageout(vm.total_pages());
    assert_eq!(
        parent.extract(BASE + PAGE),
        None,
        "set-up: page 1 was paged out"
    );
    let child = parent.fork().unwrap();
    assert_eq!(byte(&child, BASE), 0x11);
    let got = byte(&child, BASE + PAGE);
    assert_eq!(
        got, 0x22,
        "the child reads {got:#x} at the swapped-out page 1, the parent wrote 0x22"
    );
    assert_eq!(byte(&parent, BASE + PAGE), 0x22);
    drop(held);
}

// ---------------------------------------------------------------- item 6

/// Sets up item 6: on a [`HookPmap`] machine with swap, an anonymous page
/// at `BASE` holding `'A'`s and every other frame wired, so that the only
/// frame a page-in can get is the one the page-out just freed.
fn recycled_frame_machine() -> (Arc<vm_core::Vm<HookPmap>>, vm_core::VmSpace<HookPmap>) {
    let (vm, space) = hook_machine(32);
    vm.set_swap(Arc::new(MemSwap::default()));
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    space.write(BASE, &[b'A'; 8]).unwrap();
    let rest = vm.free_pages();
    let filler = BASE + 256 * PAGE;
    space.map_anon(filler, rest * PAGE, Prot::RW).unwrap();
    space.wire(filler, rest * PAGE, false).unwrap();
    assert_eq!(vm.free_pages(), 0, "set-up: memory is full");
    (vm, space)
}

/// While an access is paused after its translation of `BASE`: the page
/// is paged out (its frame freed) and read back by a read fault, which
/// gets the same frame and maps it read-only and clean. (If the access
/// keeps the page from being paged out, there is nothing to recycle.)
fn recycle_the_frame_under_the_access(
    vm: &vm_core::Vm<HookPmap>,
    space: &vm_core::VmSpace<HookPmap>,
) {
    let before = space.extract(BASE).unwrap();
    if vm.pageout(1).laundered == 0 {
        return;
    }
    assert_eq!(space.read_u8(BASE).unwrap(), b'A');
    assert_eq!(
        space.extract(BASE),
        Some(before),
        "set-up: the page came back in the same frame"
    );
}

/// Issue 11 item 6: a write through the byte API never lands in a
/// recycled frame.
///
/// `write()` translates `BASE` for write (frame X, mapped writable) and is
/// paused right there. Meanwhile the page is laundered to swap, X freed,
/// and a read fault brings the page back into X mapped read-only and
/// clean. `with_frame` re-checks only `extract(va) == pfn`, which passes,
/// so the write lands in the clean page; the next page-out drops it and
/// the write is lost.
///
/// Fails on main with: `the write through space.write() was lost: the page
/// reads 'A' after page-out, the write was b'B'`.
#[test]
fn i11_6_byte_api_write_never_lands_in_a_recycled_frame() {
    watchdog(20, "write racing page-out", || {
        let (vm, space) = recycled_frame_machine();
        let pause = vm.pmap().arm(HookAt::Translate {
            va: BASE,
            access: Prot::WRITE,
        });
        std::thread::scope(|s| {
            let writer = s.spawn(|| space.write(BASE, b"B"));
            pause.wait_started();
            recycle_the_frame_under_the_access(&vm, &space);
            pause.resume();
            writer.join().unwrap().unwrap();
        });
        vm.pageout(1);
        let got = space.read_u8(BASE).unwrap();
        assert_eq!(
            got, b'B',
            "the write through space.write() was lost: the page reads {:?} after page-out, \
             the write was b'B'",
            got as char
        );
    });
}

/// Issue 11 item 6: a hold for write never pins a recycled frame.
///
/// As the byte-API test, with `hold(WRITE)`: `hold_one` translates, is
/// paused, the frame is recycled under it (read back clean, mapped
/// read-only), and the hold is granted on it; a write through the hold
/// lands in a clean page that page-out drops.
///
/// Fails on main with: `the write through a hold for write was lost: the
/// page reads 'A' after page-out, the write was b'B'`.
#[test]
fn i11_6_hold_for_write_never_pins_a_recycled_frame() {
    watchdog(20, "hold racing page-out", || {
        let (vm, space) = recycled_frame_machine();
        let pause = vm.pmap().arm(HookAt::Translate {
            va: BASE,
            access: Prot::WRITE,
        });
        std::thread::scope(|s| {
            let holder = s.spawn(|| {
                let held = space.hold(BASE, PAGE, Prot::WRITE).unwrap();
                held.write(0, b"B").unwrap();
            });
            pause.wait_started();
            recycle_the_frame_under_the_access(&vm, &space);
            pause.resume();
            holder.join().unwrap();
        });
        vm.pageout(1);
        let got = space.read_u8(BASE).unwrap();
        assert_eq!(
            got, b'B',
            "the write through a hold for write was lost: the page reads {:?} after \
             page-out, the write was b'B'",
            got as char
        );
    });
}

// ---------------------------------------------------------------- item 9

/// Issue 11 item 9: one space's copy-on-write never undoes another space's
/// mlock.
///
/// Space A maps a named object shared and mlocks it. Space B maps it
/// private, its entry shared with a fork (so its shadow is not
/// ONEMAPPING), and writes: the copy-on-write calls `remove_all` on the
/// source page, removing A's wired mapping too. A's munlock finds pages
/// through `pmap.extract`, skips the unmapped one, and the page stays
/// wired for ever.
///
/// Fails on main with: `after munlock the page A wired still has wire
/// count 1`.
#[test]
fn i11_9_cow_in_one_space_never_undoes_another_spaces_mlock() {
    let (vm, a) = machine(64);
    let b = vm.new_space().unwrap();
    let obj = vm.new_anon_object(1);
    a.map(MapRequest::object(BASE, PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    a.write(BASE, b"A").unwrap();
    a.wire(BASE, PAGE, true).unwrap();
    let x = vm.page_of(a.extract(BASE).unwrap()).unwrap();
    assert_eq!(vm.page(x).wire_count(), 1);
    b.map(
        MapRequest::object(BASE, PAGE, obj, 0, Prot::RW)
            .private()
            .inheritance(Inheritance::Share),
    )
    .unwrap();
    let b_child = b.fork().unwrap();
    b.write(BASE, b"B").unwrap();
    a.unwire(BASE, PAGE, true).unwrap();
    assert_eq!(
        vm.page(x).wire_count(),
        0,
        "after munlock the page A wired still has wire count {}",
        vm.page(x).wire_count()
    );
    assert_eq!(vm.queue_counts().2, 0, "no page stays wired");
    assert_eq!(byte(&a, BASE), b'A');
    assert_eq!(byte(&b, BASE), b'B');
    drop(b_child);
    consistent(&vm);
}

/// Issue 11 item 9: a refault of a wired entry wires the page.
///
/// Space A mlocks a shared file mapping. The file is truncated to nothing
/// and extended again (the wired pages are freed, as `page_remove` does),
/// and A touches its mlocked range: the refault maps the new page wired in
/// the pmap but does not wire the page, so the pageout scan takes it away
/// from under the mlocked range.
///
/// Fails on main with: `the page a refault maps under A's mlocked range has
/// wire count 0`.
#[test]
fn i11_9_a_refault_under_an_mlocked_range_wires_the_page() {
    let (vm, a) = machine(64);
    let (_pager, obj) = map_pager(&vm, &a, PagerKind::FILE, 2, Prot::RW, false);
    a.wire(BASE, 2 * PAGE, true).unwrap();
    vm.resize_object(&obj, 0);
    vm.resize_object(&obj, 2);
    assert_eq!(byte(&a, BASE), pattern_byte(0, 0));
    let id = vm.page_of(a.extract(BASE).unwrap()).unwrap();
    assert_eq!(
        vm.page(id).wire_count(),
        1,
        "the page a refault maps under A's mlocked range has wire count {}",
        vm.page(id).wire_count()
    );
    vm.pageout(vm.total_pages());
    assert!(
        a.extract(BASE).is_some(),
        "the pageout scan took a page from under an mlocked range"
    );
    a.unwire(BASE, 2 * PAGE, true).unwrap();
    assert_eq!(vm.page(id).wire_count(), 0, "munlock unwires it");
}

// ---------------------------------------------------------------- item 10

/// Issue 11 item 10: fork under memory pressure reclaims before it fails.
///
/// Memory is full: 12 wired pages and 40 dirty, unwired anonymous pages
/// that swap can take. Copying the wired entry into the child needs 12
/// pages; `copy_page` → `alloc_waiting` only sleeps and never runs the
/// pageout scan.
///
/// Fails on main with: `fork under memory pressure failed: Err(
/// ResourceShortage)`.
#[test]
fn i11_10_fork_of_wired_memory_reclaims_before_it_fails() {
    let (vm, parent) = machine(52);
    vm.set_swap(Arc::new(MemSwap::default()));
    let dirty = BASE + 64 * PAGE;
    parent.map_anon(BASE, 12 * PAGE, Prot::RW).unwrap();
    for p in 0..12u8 {
        parent
            .write(BASE + u64::from(p) * PAGE, &[p + 1; 4])
            .unwrap();
    }
    parent.wire(BASE, 12 * PAGE, true).unwrap();
    parent.map_anon(dirty, 40 * PAGE, Prot::RW).unwrap();
    for p in 0..40 {
        parent.write(dirty + p * PAGE, &[0xdd; 4]).unwrap();
    }
    assert_eq!(vm.free_pages(), 0, "set-up: memory is full");
    let child = parent.fork();
    assert!(
        child.is_ok(),
        "fork under memory pressure failed: {:?}",
        child.as_ref().map(|_| ())
    );
    let child = child.unwrap();
    for p in 0..12u8 {
        assert_eq!(byte(&child, BASE + u64::from(p) * PAGE), p + 1);
    }
    assert_eq!(byte(&parent, dirty), 0xdd);
}
