//! Red-team attack tests. Each `rt_*` test asserts the correct behaviour and
//! fails on the code it was written against; see each test's doc comment for
//! the symptom and the suspected cause.
#![allow(clippy::unwrap_used, dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use vm_core::{
    Contiguity, FaultError, Inheritance, MapError, MapRequest, PageOut, PageSlot, Pager,
    PagerError, PagerKind, Pmap, Prot, Vm, VmSpace,
};
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::support::{TempPath, bounded};
use vm_testkit::{MemPager, RefPmap};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn ref_vm(pages: u64) -> Arc<Vm<RefPmap>> {
    Vm::new(RefPmap::new(), vm_testkit::test_config(pages)).unwrap()
}
fn x86_vm(pages: u64) -> Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new(), vm_testkit::test_config(pages)).unwrap()
}

fn consistent<P: Pmap>(vm: &Vm<P>) {
    if let Err(e) = vm.check_consistency() {
        panic!("{e}");
    }
}

fn fill<P: Pmap>(space: &VmSpace<P>, va: u64, pages: u64, tag: u8) {
    for i in 0..pages {
        space
            .write(va + i * PAGE, &[tag.wrapping_add(i as u8); 16])
            .unwrap();
    }
}

fn read16<P: Pmap>(space: &VmSpace<P>, va: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    space.read(va, &mut b).unwrap();
    b
}

/// A vnode-typed pager over memory whose `put_pages` blocks, while armed,
/// until released: a write-back that stays in flight.
struct GatePager {
    mem: MemPager,
    armed: AtomicBool,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
}

impl GatePager {
    fn new(pages: u64) -> (Arc<GatePager>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (etx, erx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel();
        (
            Arc::new(GatePager {
                mem: MemPager::with_pattern(PagerKind::FILE, pages),
                armed: AtomicBool::new(true),
                entered: Mutex::new(Some(etx)),
                release: Mutex::new(Some(rrx)),
            }),
            erx,
            rtx,
        )
    }
}

impl Pager for GatePager {
    fn kind(&self) -> PagerKind {
        PagerKind::FILE
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.mem.has_page(pindex)
    }
    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        self.mem.get_pages(pages, reqpage)
    }
    fn put_pages(&self, pages: &[PageOut<'_>]) -> Result<(), PagerError> {
        if self.armed.swap(false, Ordering::AcqRel) {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            if let Some(rx) = self.release.lock().unwrap().take() {
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
        }
        self.mem.put_pages(pages)
    }
}

// ---------------------------------------------------------------------------
// terminate_object racing a write-back
// ---------------------------------------------------------------------------

/// `Vm::terminate_object` frees the object's pages without waiting for the
/// ones that are busy: an `msync` (or a pageout laundering) that has the
/// page busy inside `put_pages` does not hold paging-in-progress, so
/// `pip_wait` does not wait for it. Debug builds panic in `free_pages`
/// ("freeing busy page"); release builds free the frame while the pager
/// still reads it, then the write-back's guard unbusies (and the pageout's
/// frees) a frame that may already belong to someone else.
#[test]
fn rt_terminate_object_frees_page_busy_in_writeback() {
    bounded(30, || {
        let vm = ref_vm(64);
        let space = Arc::new(vm.new_space().unwrap());
        let (pager, entered, release) = GatePager::new(4);
        let obj = vm.new_object(4, pager.clone());
        space
            .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        space.write(BASE, b"dirty").unwrap();
        let s2 = space.clone();
        let t = std::thread::spawn(move || {
            let _ = s2.msync(BASE, 4 * PAGE);
        });
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        // The page is busy inside put_pages now.
        let vm2 = vm.clone();
        let obj2 = obj.clone();
        let term = std::thread::spawn(move || {
            catch_unwind(AssertUnwindSafe(|| vm2.terminate_object(&obj2)))
        });
        std::thread::sleep(Duration::from_millis(200));
        release.send(()).unwrap();
        let r = term.join().unwrap();
        t.join().unwrap();
        assert!(
            r.is_ok(),
            "terminate_object panicked while a write-back had the page busy"
        );
        drop(space);
        consistent(&vm);
    });
}

// ---------------------------------------------------------------------------
// fork of a wired PROT_NONE range (x86 pmap)
// ---------------------------------------------------------------------------

/// Fork copies a wired entry page by page (`copy_entry`) and enters each
/// copy in the child with the entry's protection. For an entry that was
/// mlocked and then `mprotect(PROT_NONE)`, that is `pmap.enter(.., NONE ..)`;
/// the x86 pmap's `new_pte` always sets V (present = readable), so the
/// child can read memory its map says it cannot. RefPmap refuses the read.
#[test]
fn rt_fork_wired_prot_none_readable_in_child_x86() {
    let vm = x86_vm(128);
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    fill(&space, BASE, 2, 0x40);
    space.wire(BASE, 2 * PAGE, true).unwrap();
    space.protect(BASE, 2 * PAGE, Prot::NONE).unwrap();
    assert!(space.read_u8(BASE).is_err(), "parent cannot read PROT_NONE");
    let child = space.fork().unwrap();
    let r = child.read_u8(BASE);
    assert!(
        matches!(r, Err(FaultError::ProtectionFailure { .. })),
        "the child read a PROT_NONE page: {r:?}"
    );
    drop(child);
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    consistent(&vm);
}

/// The same on the reference pmap (holds up there: it checks the prot).
#[test]
fn fork_wired_prot_none_ref_pmap() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    fill(&space, BASE, 2, 0x40);
    space.wire(BASE, 2 * PAGE, true).unwrap();
    space.protect(BASE, 2 * PAGE, Prot::NONE).unwrap();
    let child = space.fork().unwrap();
    assert!(child.read_u8(BASE).is_err());
    drop(child);
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// fork of a wired file range after truncation
// ---------------------------------------------------------------------------

/// A wired private file mapping (read-only: wired in place, the pages are
/// the file object's) whose file is then truncated: `page_remove` frees the
/// wired pages (FREE_PENDING, the wire record keeps them). `fork` then
/// copies the wired entry with `copy_entry`, whose `source_page` finds no
/// resident page and the whole fork fails with `MissingPage`. FreeBSD keeps
/// wired pages in the object on truncation (`vm_object_page_remove` skips
/// them), so `vm_fault_copy_entry` finds them; fork never fails here.
#[test]
fn rt_fork_fails_after_wired_file_truncated() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x5au8; 4 * PAGE as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    space.wire(BASE, 4 * PAGE, true).unwrap();
    pager.set_len(&vm, &obj, PAGE).unwrap();
    let child = space.fork();
    assert!(
        child.is_ok(),
        "fork failed after the wired file shrank: {:?}",
        child.err()
    );
    drop(child);
    space.unwire(BASE, 4 * PAGE, true).unwrap();
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// holds across fork when the entry was clipped
// ---------------------------------------------------------------------------

/// Fork's Linux rule for held pages (`split_held`) only applies while the
/// object is ONEMAPPING (`held_pages`). Two entries made by clipping one
/// entry share the object; fork processes the first, `copy_on_write`
/// clears ONEMAPPING, and the held page in the second entry is then shared
/// copy-on-write with the child. The parent's next write copies the page
/// away from the hold: the holder (a device doing DMA) no longer sees what
/// its owner writes (CVE-2020-29374 class).
#[test]
fn rt_hold_in_clipped_entry_loses_owner_writes_after_fork() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    fill(&space, BASE, 4, 1);
    let held = space.hold(BASE + 3 * PAGE, PAGE, Prot::RW).unwrap();
    // Clip the entry in two (madvise on the lower half).
    space
        .set_behavior(BASE, 2 * PAGE, vm_core::Behavior::Random)
        .unwrap();
    let child = space.fork().unwrap();
    space.write(BASE + 3 * PAGE, b"parent-after-fk!").unwrap();
    let mut got = [0u8; 16];
    held.read(0, &mut got).unwrap();
    assert_eq!(
        &got, b"parent-after-fk!",
        "the hold no longer sees its owner's writes"
    );
    assert_eq!(read16(&child, BASE + 3 * PAGE), [4u8; 16]);
    drop(held);
    drop(child);
    consistent(&vm);
}

/// Control: the same without the clip holds up.
#[test]
fn hold_unclipped_entry_follows_owner_after_fork() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    fill(&space, BASE, 4, 1);
    let held = space.hold(BASE + 3 * PAGE, PAGE, Prot::RW).unwrap();
    let child = space.fork().unwrap();
    space.write(BASE + 3 * PAGE, b"parent-after-fk!").unwrap();
    let mut got = [0u8; 16];
    held.read(0, &mut got).unwrap();
    assert_eq!(&got, b"parent-after-fk!");
    assert_eq!(read16(&child, BASE + 3 * PAGE), [4u8; 16]);
    drop(held);
    drop(child);
    consistent(&vm);
}

#[allow(unused)]
fn _unused(_: Inheritance, _: MapError) {}

// ---------------------------------------------------------------------------
// mprotect upgrade of a user-wired copy-on-write entry vs holds
// ---------------------------------------------------------------------------

/// A user-wired, read-only private mapping (wired in place). A pin taken on
/// it (`hold`) first gives the space its own copy (hold.rs: "a pin never
/// shares a page copy-on-write"), so the pin is on the space's own page.
/// `mprotect(RW)` then runs `upgrade_wired_entry` (copy_entry.rs), which
/// copies *every* page into a brand-new object — including the pinned page,
/// which already was the entry's own — and drops the old object. The pin is
/// left on a page no mapping shows: the owner's writes never reach the pin,
/// and what a device writes through the pin is lost.
#[test]
fn rt_wired_cow_upgrade_strands_hold() {
    for pmap in ["ref", "x86"] {
        match pmap {
            "ref" => wired_cow_upgrade_strands_hold(&ref_vm(128)),
            _ => wired_cow_upgrade_strands_hold(&x86_vm(128)),
        }
    }
}

fn wired_cow_upgrade_strands_hold<P: Pmap>(vm: &Arc<Vm<P>>) {
    let space = vm.new_space().unwrap();
    let named = vm.new_anon_object(2);
    // Put data in the named object through a shared mapping.
    space
        .map(MapRequest::object(
            BASE + 0x10_0000,
            2 * PAGE,
            named.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    fill(&space, BASE + 0x10_0000, 2, 0x30);
    space
        .map(MapRequest::object(BASE, 2 * PAGE, named, 0, Prot::READ).private())
        .unwrap();
    space.wire(BASE, 2 * PAGE, true).unwrap();
    let held = space.hold(BASE, PAGE, Prot::READ).unwrap();
    space.protect(BASE, 2 * PAGE, Prot::RW).unwrap();
    space.write(BASE, b"owner-wrote-this").unwrap();
    let mut got = [0u8; 16];
    held.read(0, &mut got).unwrap();
    assert_eq!(
        &got, b"owner-wrote-this",
        "the pin does not see its owner's write after mprotect(RW) of mlocked memory"
    );
    drop(held);
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    consistent(vm);
}

/// Same with a write pin: RW private wired mapping, mprotect R then RW;
/// a write through the pin (DMA into the buffer) is lost to the owner.
#[test]
fn rt_wired_cow_reprotect_loses_write_through_hold() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    let named = vm.new_anon_object(2);
    space
        .map(MapRequest::object(BASE, 2 * PAGE, named, 0, Prot::RW).private())
        .unwrap();
    fill(&space, BASE, 2, 0x30);
    space.wire(BASE, 2 * PAGE, true).unwrap();
    let held = space.hold(BASE, PAGE, Prot::RW).unwrap();
    space.protect(BASE, 2 * PAGE, Prot::READ).unwrap();
    space.protect(BASE, 2 * PAGE, Prot::RW).unwrap();
    held.write(0, b"dma-wrote-this!!").unwrap();
    drop(held);
    assert_eq!(
        &read16(&space, BASE),
        b"dma-wrote-this!!",
        "a write through a pin of mlocked memory was lost after mprotect R/RW"
    );
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// write_forced on private anonymous memory
// ---------------------------------------------------------------------------

/// `write_forced` (the ptrace / FOLL_FORCE write) writes a read-only
/// *private* mapping. Anonymous memory is private (`MAP_ANON`, inherited
/// by copy), but `map_anon` makes an entry without the COW flag, and
/// `poke` (access.rs) treats every non-COW entry as shared: a debugger
/// cannot write a read-only anonymous region (a breakpoint in JIT code)
/// — until the space has forked once, which sets COW on the entry, after
/// which the same call succeeds. FreeBSD marks private anonymous entries
/// copy-on-write (`MAP_COPY_ON_WRITE` for every non-shared mapping), and
/// Linux's FOLL_FORCE writes any private mapping whose VM_MAYWRITE is set.
#[test]
fn rt_write_forced_refuses_private_anon_until_fork() {
    let vm = ref_vm(64);
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, PAGE, Prot::READ).unwrap();
    let before = space.write_forced(BASE, b"bp");
    let child = space.fork().unwrap();
    let after = space.write_forced(BASE, b"bp");
    assert!(after.is_ok(), "after a fork: {after:?}");
    assert!(
        before.is_ok(),
        "write_forced on a read-only private anonymous mapping: {before:?} (succeeds after a fork)"
    );
    drop(child);
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// vnode pager: truncation racing write-back
// ---------------------------------------------------------------------------

/// `VnodePager::set_len` truncates the file, then publishes the new size,
/// then removes the object's pages (waiting for busy ones). A write-back
/// already in `put_pages` read the old size and writes the busy pages at
/// their old offsets *after* the truncation: the file grows back to its old
/// length with the pre-truncation data (truncate lost, stale data
/// resurrected). FreeBSD serialises truncation and putpages with the vnode
/// lock. Racy: bounded to a few seconds, fails within ~0.1-1 s here.
#[test]
fn rt_truncate_racing_msync_regrows_file() {
    bounded(60, || {
        let vm = ref_vm(256);
        let space = Arc::new(vm.new_space().unwrap());
        let f = TempPath::new();
        const N: u64 = 16;
        std::fs::write(&f.0, vec![0u8; (N * PAGE) as usize]).unwrap();
        let pager = VnodePager::open(&f.0, true).unwrap();
        let obj = pager.object(&vm);
        space
            .map(MapRequest::object(BASE, N * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        let start = std::time::Instant::now();
        let mut tries = 0u64;
        while start.elapsed() < Duration::from_secs(4) {
            tries += 1;
            pager.set_len(&vm, &obj, N * PAGE).unwrap();
            for i in 0..N {
                space.write(BASE + i * PAGE, &[0xaa; 8]).unwrap();
            }
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (s2, b2) = (space.clone(), barrier.clone());
            let t = std::thread::spawn(move || {
                b2.wait();
                let _ = s2.msync(BASE, N * PAGE);
            });
            barrier.wait();
            pager.set_len(&vm, &obj, 0).unwrap();
            t.join().unwrap();
            let len = std::fs::metadata(&f.0).unwrap().len();
            assert_eq!(
                len, 0,
                "after {tries} tries: the file was truncated to 0 but a racing msync wrote it back to {len} bytes"
            );
        }
        eprintln!("{tries} tries without the race");
        drop(space);
        consistent(&vm);
    });
}

/// The same root cause through fork: a child's copy of a wired private
/// entry (`copy_entry` strips COW) is private memory of the child, yet
/// `write_forced` refuses it when read-only: a debugger cannot write into
/// the child of a process that had mlock'ed a read-only private file
/// mapping (its text).
#[test]
fn rt_write_forced_refuses_child_copy_of_wired_private_file() {
    let vm = ref_vm(64);
    let space = vm.new_space().unwrap();
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x11u8; 2 * PAGE as usize]).unwrap();
    let obj = VnodePager::open(&f.0, true).unwrap().object(&vm);
    space
        .map(MapRequest::object(BASE, 2 * PAGE, obj, 0, Prot::READ).private())
        .unwrap();
    assert!(space.write_forced(BASE, b"ok").is_ok(), "parent");
    space.wire(BASE, 2 * PAGE, true).unwrap();
    let child = space.fork().unwrap();
    let r = child.write_forced(BASE + PAGE, b"bp");
    assert!(r.is_ok(), "write_forced in the child: {r:?}");
    assert_eq!(
        std::fs::read(&f.0).unwrap(),
        vec![0x11u8; 2 * PAGE as usize]
    );
    drop(child);
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    consistent(&vm);
}

// ---------------------------------------------------------------------------
// shadow chains and swap grow without bound under fork + pageout
// ---------------------------------------------------------------------------

/// Fork, the parent writes while the child lives, page-out, the child
/// exits — repeated. Each fork puts a new shadow in front
/// of the parent's object; once that shadow has been paged out it has a
/// swap pager of its own, and `collapse_once` (collapse.rs) refuses a
/// backing object with a pager unless the shadow has none ("adopt"). So
/// the chain never collapses again and every level keeps its own swap
/// copies: with N fork/write/page-out rounds the chain is N+1 deep and swap
/// holds N copies of every page. In a long-running system swap fills up
/// ("swap device full"), and faults walk ever longer chains. FreeBSD's
/// collapse moves the backing object's swap blocks into the shadow
/// (`swap_pager_copy`). Found by tests/redteam_concurrent.rs, which hits
/// "swap device full" within seconds.
#[test]
fn rt_swap_and_chain_grow_without_bound_under_fork_pageout() {
    let vm = ref_vm(128);
    let f = TempPath::new();
    let swap = vm_pager_swap::Swap::create(&f.0, 4 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    for round in 0..20u8 {
        fill(&space, BASE, 4, round);
        let child = space.fork().unwrap();
        // The parent writes while the child lives, and it all pages out.
        fill(&space, BASE, 4, round.wrapping_add(100));
        vm.pageout(vm.total_pages());
        drop(child);
        let (o, _) = space.object_at(BASE).unwrap();
        vm.collapse(&o);
    }
    let (o, _) = space.object_at(BASE).unwrap();
    let depth = o.chain_depth();
    let used = swap.stats().used;
    assert_eq!(read16(&space, BASE + 3 * PAGE), [100 + 19 + 3; 16]);
    assert!(
        depth <= 2 && used <= 8,
        "after 20 fork/exit/page-out rounds of 4 pages: chain depth {depth}, {used} swap blocks in use"
    );
    drop(space);
    consistent(&vm);
}

fn secs() -> u64 {
    std::env::var("RT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

// ---------------------------------------------------------------------------
// caller input: object offsets that overflow the page index
// ---------------------------------------------------------------------------

/// `map` accepts a file mapping at any page-aligned offset ("a file may be
/// mapped past its end"), checking only `offset / PAGE + pages` for
/// overflow. The byte offset of a later page, `va - start + offset`
/// (`MapEntry::pindex`, map.rs), then overflows u64: a fault on the second
/// page panics with "attempt to add with overflow" in debug builds, and in
/// release wraps to page index 0 — the file's first page is mapped where
/// the caller asked for its last (wrong page mapped). A library must not
/// panic on caller input; `map` should refuse the range.
#[test]
fn rt_map_offset_overflow_panics_or_maps_wrong_page() {
    let vm = ref_vm(64);
    let space = vm.new_space().unwrap();
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x77u8; PAGE as usize]).unwrap();
    let obj = VnodePager::open(&f.0, true).unwrap().object(&vm);
    let offset = !(PAGE - 1);
    let mapped = space.map(MapRequest::object(BASE, 2 * PAGE, obj, offset, Prot::READ));
    if mapped.is_err() {
        return; // refused: fine
    }
    let r = catch_unwind(AssertUnwindSafe(|| space.read_u8(BASE + PAGE)));
    match r {
        Err(_) => panic!("a fault on a mapping at offset {offset:#x} panicked"),
        Ok(Ok(b)) => panic!(
            "page at byte offset {offset:#x} + 4096 of a one-page file read as {b:#x} (wrapped to page 0)"
        ),
        Ok(Err(_)) => {}
    }
    drop(space);
    consistent(&vm);
}

/// The same with an anonymous object of the largest size.
#[test]
fn rt_map_offset_overflow_anon_object() {
    let vm = ref_vm(64);
    let space = vm.new_space().unwrap();
    let obj = vm.new_anon_object(u64::MAX);
    let offset = !(PAGE - 1);
    let mapped = space.map(MapRequest::object(BASE, 2 * PAGE, obj, offset, Prot::RW));
    if mapped.is_err() {
        return;
    }
    let r = catch_unwind(AssertUnwindSafe(|| space.write_u8(BASE + PAGE, 1)));
    assert!(
        r.is_ok(),
        "a fault on a mapping at offset {offset:#x} panicked"
    );
}

// ---------------------------------------------------------------------------
// error paths under memory pressure and pager errors (held up so far)
// ---------------------------------------------------------------------------

fn error_paths<P: Pmap>(vm: &Arc<Vm<P>>) {
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    fill(&space, BASE, 4, 9);
    space.wire(BASE, 4 * PAGE, true).unwrap();
    // Starve: nothing free, nothing reclaimable but what the space has.
    let balloon = vm.inflate_balloon(u64::MAX);
    let w = space.wire(BASE + 4 * PAGE, 12 * PAGE, false);
    assert!(w.is_err(), "wire with no memory: {w:?}");
    assert!(space.unwire(BASE + 4 * PAGE, 12 * PAGE, false).is_err());
    let f = space.fork();
    assert!(f.is_err() || f.is_ok());
    drop(f);
    let h = space.hold(BASE + 4 * PAGE, 12 * PAGE, Prot::RW);
    assert!(h.is_err());
    drop(h);
    drop(balloon);
    consistent(vm);
    // Everything works again.
    space.wire(BASE + 4 * PAGE, 12 * PAGE, false).unwrap();
    let child = space.fork().unwrap();
    assert_eq!(read16(&child, BASE + 3 * PAGE), [12; 16]);
    drop(child);
    space.unwire(BASE + 4 * PAGE, 12 * PAGE, false).unwrap();
    space.unwire(BASE, 4 * PAGE, true).unwrap();
    consistent(vm);
    // A pager error in the middle of a wire rolls it back.
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, 8));
    let obj = vm.new_object(8, pager.clone());
    space
        .map(MapRequest::object(
            BASE + 0x100_0000,
            8 * PAGE,
            obj,
            0,
            Prot::READ,
        ))
        .unwrap();
    space
        .set_behavior(BASE + 0x100_0000, 8 * PAGE, vm_core::Behavior::Random)
        .unwrap();
    pager.inject(vm_testkit::Injected::Normal);
    pager.inject(vm_testkit::Injected::Normal);
    pager.inject(vm_testkit::Injected::Fail(MemPager::io_error()));
    let w = space.wire(BASE + 0x100_0000, 8 * PAGE, true);
    assert!(w.is_err(), "{w:?}");
    assert!(space.unwire(BASE + 0x100_0000, 8 * PAGE, true).is_err());
    consistent(vm);
    drop(space);
    consistent(vm);
}

#[test]
fn error_paths_ref() {
    error_paths(&ref_vm(64));
}

#[test]
fn error_paths_x86() {
    error_paths(&x86_vm(64));
}

// ---------------------------------------------------------------------------
// hold vs fork: the window between the hold's fault and its hold
// ---------------------------------------------------------------------------

/// Swap for anonymous memory in memory, handing out MemPagers we keep.
#[derive(Default)]
struct KeepSwap {
    pagers: Mutex<Vec<Arc<MemPager>>>,
}
impl vm_core::SwapProvider for KeepSwap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        let p = Arc::new(MemPager::new(PagerKind::ANONYMOUS));
        self.pagers.lock().unwrap().push(p.clone());
        Some(p)
    }
}

/// `hold_one` (hold.rs) faults the page in and then holds whatever the
/// mapping shows, without checking that the page is still the space's own.
/// A fault that pages in drops the map lock for the I/O; a fork that runs
/// meanwhile makes the page copy-on-write shared with the child (the
/// fault's revalidation just maps it read-only). The read hold then pins
/// the page the child shares, `held_pages` never saw it, and the parent's
/// next write copies the page away from the pin: the pin keeps showing
/// the fork-time data instead of what its owner writes — the Linux rule
/// the module promises (CVE-2020-29374 class). Deterministic: the page-in
/// is paused (MemPager::pause_next) while the fork runs.
#[test]
fn rt_read_hold_racing_fork_pins_shared_page() {
    bounded(30, || {
        let vm = ref_vm(64);
        let swap = Arc::new(KeepSwap::default());
        vm.set_swap(swap.clone());
        let space = Arc::new(vm.new_space().unwrap());
        space.map_anon(BASE, PAGE, Prot::RW).unwrap();
        space.write(BASE, &[1u8; 16]).unwrap();
        vm.pageout(vm.total_pages());
        assert!(space.extract(BASE).is_none(), "paged out");
        let pager = swap.pagers.lock().unwrap()[0].clone();
        let pause = pager.pause_next();
        let s2 = space.clone();
        let holder = std::thread::spawn(move || {
            let held = s2.hold(BASE, PAGE, Prot::READ).unwrap();
            s2.write(BASE, b"parent-after-fk!").unwrap();
            let mut got = [0u8; 16];
            held.read(0, &mut got).unwrap();
            got
        });
        pause.wait_started();
        let child = space.fork().unwrap();
        pause.resume();
        let got = holder.join().unwrap();
        assert_eq!(read16(&child, BASE), [1u8; 16], "the child's copy");
        assert_eq!(
            &got, b"parent-after-fk!",
            "the read pin does not see its owner's write (it pinned the page shared with the child)"
        );
        drop(child);
        drop(space);
        consistent(&vm);
    });
}

/// Variant of rt_fork_fails_after_wired_file_truncated: the same stranded
/// wired pages make `mprotect(RW)` of a user-wired read-only private file
/// mapping fail with `MissingPage` (`upgrade_wired_entry` →
/// `source_page`), where FreeBSD would copy the still-resident wired pages.
#[test]
fn rt_mprotect_upgrade_fails_after_wired_file_truncated() {
    let vm = ref_vm(128);
    let space = vm.new_space().unwrap();
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x5au8; 4 * PAGE as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    space
        .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    space.wire(BASE, 4 * PAGE, true).unwrap();
    pager.set_len(&vm, &obj, PAGE).unwrap();
    let r = space.protect(BASE, 4 * PAGE, Prot::RW);
    assert!(r.is_ok(), "mprotect(RW) after the wired file shrank: {r:?}");
    space.unwire(BASE, 4 * PAGE, true).unwrap();
    consistent(&vm);
}

/// Wired shared file mapping, truncate, extend, refault, unwire: the
/// stranded wired pages are released and nothing leaks (held up).
#[test]
fn wired_file_truncate_extend_refault() {
    for x86 in [false, true] {
        let f = TempPath::new();
        std::fs::write(&f.0, vec![0x5au8; 4 * PAGE as usize]).unwrap();
        let pager = VnodePager::open(&f.0, true).unwrap();
        let check = |vm: &dyn Fn() -> Result<(), String>| vm().unwrap();
        let _ = check;
        macro_rules! body {
            ($vm:expr) => {{
                let vm = $vm;
                let obj = pager.object(&vm);
                let space = vm.new_space().unwrap();
                space
                    .map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
                    .unwrap();
                space.wire(BASE, 4 * PAGE, false).unwrap();
                space.wire(BASE, 4 * PAGE, true).unwrap();
                pager.set_len(&vm, &obj, PAGE / 2).unwrap();
                consistent(&vm);
                assert!(space.read_u8(BASE + 2 * PAGE).is_err());
                pager.set_len(&vm, &obj, 4 * PAGE).unwrap();
                assert_eq!(space.read_u8(BASE + 2 * PAGE).unwrap(), 0);
                assert_eq!(space.read_u8(BASE + PAGE / 2).unwrap(), 0);
                assert_eq!(space.read_u8(BASE).unwrap(), 0x5a);
                space.unwire(BASE, 4 * PAGE, true).unwrap();
                space.unwire(BASE, 4 * PAGE, false).unwrap();
                consistent(&vm);
                drop(space);
                drop(obj);
                consistent(&vm);
                assert_eq!(vm.free_pages(), vm.total_pages());
            }};
        }
        if x86 {
            body!(x86_vm(128));
        } else {
            body!(ref_vm(128));
        }
    }
}

/// Holds across fork into grandchildren, both pmaps (held up).
#[test]
fn holds_across_grandchildren() {
    fn body<P: Pmap>(vm: &Arc<Vm<P>>) {
        let p = vm.new_space().unwrap();
        p.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
        fill(&p, BASE, 2, 1);
        let hp = p.hold(BASE, PAGE, Prot::RW).unwrap();
        let c = p.fork().unwrap();
        let hc = c.hold(BASE, PAGE, Prot::RW).unwrap();
        let g = c.fork().unwrap();
        g.write(BASE, b"grandchild-wrote").unwrap();
        c.write(BASE, b"child-wrote-this").unwrap();
        p.write(BASE, b"parent-wrote-thi").unwrap();
        let mut b = [0u8; 16];
        hp.read(0, &mut b).unwrap();
        assert_eq!(&b, b"parent-wrote-thi");
        hc.read(0, &mut b).unwrap();
        assert_eq!(&b, b"child-wrote-this");
        hc.write(0, b"dma-into-child!!").unwrap();
        assert_eq!(&read16(&c, BASE), b"dma-into-child!!");
        assert_eq!(&read16(&g, BASE), b"grandchild-wrote");
        assert_eq!(&read16(&p, BASE), b"parent-wrote-thi");
        drop(hc);
        drop(hp);
        drop(g);
        drop(c);
        consistent(vm);
    }
    body(&ref_vm(128));
    body(&x86_vm(128));
}
