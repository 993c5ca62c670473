//! Red team of 27cbcd5 (the fault walk reads the backing link and the
//! first object's pager/kind/"written" facts in its one hold; `finish`
//! trusts them) and 634b756 (the x86 pmap frees an emptied page table into
//! the known-zero pool on its entry count alone, without re-reading it).
//!
//! Change 1 is attacked through its observable consequences: a clean page
//! with a swap copy must be mapped read-only by a read fault so the first
//! write frees the stale block (`page_unswapped`), data must survive any
//! interleaving of faults, pageout (which gives an anonymous object swap
//! mid-fault), fork/COW and collapse, and the object's written marks must
//! be set after any writable mapping.
//!
//! Change 2 is attacked by churning page tables every way the pmap can
//! empty one (unmap, protect to none, per-page removal by pageout and COW,
//! fork and exit, racing enters, direct pmap calls with wired / cache
//! attribute / A-D harvesting), and then checking in release builds too
//! that every frame in the known-zero pool is zero and that freshly
//! zero-filled user pages read as zeros.
#![allow(clippy::unwrap_used, dead_code)]

mod common;
use common::{config, consistent, ref_vm, squeeze, x86_vm};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_core::object::ObjectFlags;
use vm_core::{
    MapRequest, Mapping, MemAttr, PageFlags, PageId, PageInfo, PageQueue, Pmap, Prot, VirtAddr, Vm,
    VmSpace,
};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::support::{TempPath, bounded};

const PAGE: u64 = 4096;
const TWO_MB: u64 = 2 << 20;
const ONE_GB: u64 = 1 << 30;
const BASE: u64 = 0x1000_0000;

fn x86_la57_vm(pages: u64) -> Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new_la57(), config(pages)).unwrap()
}

fn with_swap<P: Pmap>(vm: &Vm<P>) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, 8 << 20).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

fn all_free<P: Pmap>(vm: &Vm<P>, swap: Option<&Swap>, what: &str) {
    consistent(vm, what);
    if let Some(s) = swap {
        assert_eq!(
            s.stats().used,
            0,
            "{what}: swap blocks leaked ({})",
            s.stats()
        );
    }
    assert_eq!(
        vm.free_pages(),
        vm.total_pages(),
        "{what}: frames leaked (queues {:?})",
        vm.queue_counts()
    );
}

/// A whole page of words derived from `tag`, never zero.
fn pattern(tag: u64) -> Vec<u8> {
    (0..PAGE / 8)
        .flat_map(|w| ((tag << 16) ^ (w * 0x9E37_79B9) ^ 0xA5A5_0000_0000_0001).to_le_bytes())
        .collect()
}

fn fill<P: Pmap>(s: &VmSpace<P>, va: u64, tag: u64) {
    s.write(va, &pattern(tag)).unwrap();
}

fn check<P: Pmap>(s: &VmSpace<P>, va: u64, tag: u64, what: &str) {
    let mut b = vec![0u8; PAGE as usize];
    s.read(va, &mut b).unwrap();
    if b != pattern(tag) {
        let want = pattern(tag);
        let at = b.iter().zip(&want).position(|(x, y)| x != y).unwrap();
        let got_word = u64::from_le_bytes(b[at & !7..(at & !7) + 8].try_into().unwrap());
        let want_word = u64::from_le_bytes(want[at & !7..(at & !7) + 8].try_into().unwrap());
        panic!(
            "{what}: page {va:#x} differs at byte {at}: got word {got_word:#x}, want {want_word:#x} (tag {tag})"
        );
    }
}

/// Every free frame the allocator believes zero (`PageFlags::ZERO`) must
/// be zero: a zero-fill fault or a new page table takes it without
/// looking. Run only when nothing else runs.
fn zero_pool_is_zero<P: Pmap>(vm: &Vm<P>, what: &str) -> u64 {
    let mut bad = Vec::new();
    let mut pool = 0;
    for i in 0..vm.total_pages() {
        let id = PageId(i as u32);
        let p = vm.page(id);
        if p.queue() == PageQueue::Free && p.flags().contains(PageFlags::ZERO) {
            pool += 1;
            let pfn = vm.page_pfn(id);
            if !vm.phys().is_zero(pfn) {
                let mut b = vec![0u8; PAGE as usize];
                vm.phys().read(pfn, 0, &mut b);
                let words: Vec<(usize, u64)> = b
                    .chunks(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .enumerate()
                    .filter(|&(_, w)| w != 0)
                    .take(4)
                    .collect();
                bad.push((i, pfn, words));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {pool} frames in the known-zero pool are not zero; first: {:x?}",
        bad.len(),
        &bad[..bad.len().min(4)]
    );
    pool
}

/// Maps `n` fresh anonymous pages at `base`, reads every byte (read
/// faults: zero fill, preferring known-zero frames), checks zeros, unmaps.
fn fresh_pages_are_zero<P: Pmap>(s: &VmSpace<P>, base: u64, n: u64, what: &str) {
    s.map_anon(base, n * PAGE, Prot::RW).unwrap();
    let mut b = vec![0u8; PAGE as usize];
    for i in 0..n {
        s.read(base + i * PAGE, &mut b).unwrap();
        if let Some(at) = b.iter().position(|&x| x != 0) {
            let w = u64::from_le_bytes(b[at & !7..(at & !7) + 8].try_into().unwrap());
            panic!(
                "{what}: fresh zero-fill page {i} at {:#x} has byte {at} non-zero (word {w:#x})",
                base + i * PAGE
            );
        }
    }
    // And written ones too (write faults zero-fill as well).
    for i in 0..n {
        let va = base + i * PAGE;
        s.write(va, &[1]).unwrap();
        s.read(va, &mut b).unwrap();
        assert_eq!(b[0], 1);
        assert!(
            b[1..].iter().all(|&x| x == 0),
            "{what}: written zero-fill page {i} shows stale bytes"
        );
    }
    s.unmap(base, n * PAGE).unwrap();
}

/// `fill`, retried while a racing protector has the range at NONE.
fn fill_retry<P: Pmap>(s: &VmSpace<P>, va: u64, tag: u64) {
    loop {
        match s.write(va, &pattern(tag)) {
            Ok(()) => return,
            Err(vm_core::FaultError::ProtectionFailure { .. }) => std::thread::yield_now(),
            Err(e) => panic!("write {va:#x}: {e}"),
        }
    }
}

/// `check`, retried while a racing protector has the range at NONE.
fn check_retry<P: Pmap>(s: &VmSpace<P>, va: u64, tag: u64, what: &str) {
    let mut b = vec![0u8; PAGE as usize];
    loop {
        match s.read(va, &mut b) {
            Ok(()) => break,
            Err(vm_core::FaultError::ProtectionFailure { .. }) => std::thread::yield_now(),
            Err(e) => panic!("{what}: read {va:#x}: {e}"),
        }
    }
    if b != pattern(tag) {
        check(s, va, tag, what); // reports where (or passes if it changed meanwhile)
        panic!("{what}: page {va:#x} did not hold tag {tag}");
    }
}

fn writable<P: Pmap>(vm: &Vm<P>, s: &VmSpace<P>, va: u64) -> bool {
    vm.pmap()
        .translate(s.pmap_space(), VirtAddr(va), Prot::WRITE)
        .is_some()
}

macro_rules! both {
    ($name_ref:ident, $name_x86:ident, $f:ident, $pages:expr, $secs:expr) => {
        #[test]
        fn $name_ref() {
            bounded($secs, || $f(ref_vm($pages)));
        }
        #[test]
        fn $name_x86() {
            bounded($secs, || $f(x86_vm($pages)));
        }
    };
}

// ---------------------------------------------------------------------
// Change 1: FirstInfo
// ---------------------------------------------------------------------

/// Write, page out, read back (swap-in: clean pages with a swap copy): a
/// read fault must map such a page read-only, the first write must free
/// its block, so once every page is written again no block is left; a
/// second page-out and read-back must see the second data.
fn swapin_read_only_then_write_frees<P: Pmap>(vm: Arc<Vm<P>>) {
    let (swap, _t) = with_swap(&*vm);
    let n = 32;
    {
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            fill(&s, BASE + i * PAGE, i);
        }
        squeeze(&vm);
        assert!(swap.stats().used > 0, "nothing went to swap");
        let (obj, _) = s.object_at(BASE).unwrap();
        assert!(obj.has_pager(), "the object got no swap pager");
        for i in 0..n {
            check(&s, BASE + i * PAGE, i, "first read-back");
        }
        // Every clean page (it has a swap copy) must not be writable.
        let mut clean = 0;
        for i in 0..n {
            let id = obj.resident_page(i).expect("resident after reading");
            if vm.page(id).dirty() == 0 {
                clean += 1;
                assert!(
                    !writable(&vm, &s, BASE + i * PAGE),
                    "clean swapped-in page {i} is mapped writable: a write would not free its swap copy"
                );
            }
        }
        assert!(clean > 0, "no page came back clean from swap");
        assert!(
            obj.flags()
                .contains(ObjectFlags::WRITEABLE | ObjectFlags::MIGHTBEDIRTY),
            "written object lacks its marks"
        );
        for i in 0..n {
            fill(&s, BASE + i * PAGE, 1000 + i);
        }
        assert_eq!(
            swap.stats().used,
            0,
            "every page was dirtied while resident, yet stale swap copies remain ({})",
            swap.stats()
        );
        squeeze(&vm);
        for i in 0..n {
            check(&s, BASE + i * PAGE, 1000 + i, "second read-back");
        }
        consistent(&vm, "end of rounds");
    }
    all_free(&vm, Some(&swap), "after exit");
}
both!(
    swapin_read_only_then_write_frees_ref,
    swapin_read_only_then_write_frees_x86,
    swapin_read_only_then_write_frees,
    96,
    30
);

/// Faults (read and write) on one object from several threads while a
/// pageout thread gives it swap and evicts it and a protector takes its
/// mappings away (so reads fault again). Odd pages are only read (fixed
/// data), even pages are rewritten by one writer. At the end: data right,
/// and after every page is written again while resident, no swap left.
fn faults_race_pageout<P: Pmap>(vm: Arc<Vm<P>>) {
    let (swap, _t) = with_swap(&*vm);
    let n = 48u64;
    let rounds = 20;
    {
        let s = Arc::new(vm.new_space().unwrap());
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            fill(&s, BASE + i * PAGE, i);
        }
        let versions: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(AtomicU64::new).collect());
        for round in 0..rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let mut hs = Vec::new();
            // Pageout.
            {
                let (vm, stop) = (vm.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        vm.pageout(vm.total_pages());
                        std::thread::yield_now();
                    }
                }));
            }
            // Protector: NONE then RW, so mappings go and reads refault.
            {
                let (s, stop) = (s.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let at = BASE + (k % 6) * 8 * PAGE;
                        s.protect(at, 8 * PAGE, Prot::NONE).unwrap();
                        s.protect(at, 8 * PAGE, Prot::RW).unwrap();
                        k += 1;
                        std::thread::yield_now();
                    }
                }));
            }
            // Reader of odd pages.
            let reader = {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..4 {
                        for i in (1..n).step_by(2) {
                            check_retry(&s, BASE + i * PAGE, i, "reader (odd pages)");
                        }
                    }
                })
            };
            // Writer of even pages.
            let writer = {
                let (s, versions) = (s.clone(), versions.clone());
                std::thread::spawn(move || {
                    for k in 0..3u64 {
                        for i in (0..n).step_by(2) {
                            let tag = 10_000 * (round * 3 + k + 1) + i;
                            fill_retry(&s, BASE + i * PAGE, tag);
                            versions[i as usize].store(tag, Ordering::Relaxed);
                            // Read it back at once, through whatever mapping.
                            check_retry(&s, BASE + i * PAGE, tag, "writer read-back");
                        }
                    }
                })
            };
            let r1 = reader.join();
            let r2 = writer.join();
            stop.store(true, Ordering::Relaxed);
            for h in hs {
                h.join().unwrap();
            }
            if let Err(e) = r1 {
                std::panic::resume_unwind(e);
            }
            if let Err(e) = r2 {
                std::panic::resume_unwind(e);
            }
            consistent(&vm, "after a round");
        }
        for i in 0..n {
            check(
                &s,
                BASE + i * PAGE,
                versions[i as usize].load(Ordering::Relaxed),
                "final read",
            );
        }
        let (obj, _) = s.object_at(BASE).unwrap();
        assert!(obj.has_pager(), "pageout never gave the object swap");
        drop(obj);
        for i in 0..n {
            fill(&s, BASE + i * PAGE, 77_000 + i);
        }
        assert_eq!(
            swap.stats().used,
            0,
            "all pages rewritten while resident, stale swap copies remain ({})",
            swap.stats()
        );
        squeeze(&vm);
        for i in 0..n {
            check(&s, BASE + i * PAGE, 77_000 + i, "after last squeeze");
        }
    }
    all_free(&vm, Some(&swap), "after exit");
}
both!(
    faults_race_pageout_ref,
    faults_race_pageout_x86,
    faults_race_pageout,
    160,
    40
);

/// A fresh object mapped writable in two spaces and read-only in a third;
/// first faults race from several threads. Afterwards: the marks are set
/// iff some mapping of it is writable, and never when it was only mapped
/// read-only.
fn written_marks_race<P: Pmap>(vm: Arc<Vm<P>>) {
    let marks = ObjectFlags::WRITEABLE | ObjectFlags::MIGHTBEDIRTY;
    let spaces: Arc<Vec<VmSpace<P>>> = Arc::new((0..3).map(|_| vm.new_space().unwrap()).collect());
    for it in 0..200u64 {
        let obj = vm.new_anon_object(8);
        for (k, s) in spaces.iter().enumerate() {
            let prot = if k == 2 { Prot::READ } else { Prot::RW };
            s.map(MapRequest::object(BASE, 8 * PAGE, obj.clone(), 0, prot))
                .unwrap();
        }
        let mut hs = Vec::new();
        for k in 0..3usize {
            let spaces = spaces.clone();
            hs.push(std::thread::spawn(move || {
                let s = &spaces[k];
                for p in 0..8u64 {
                    let va = BASE + ((p + k as u64 + it) % 8) * PAGE;
                    let mut b = [0u8; 8];
                    if k == 1 && p % 3 == 0 {
                        s.write(va, &[7u8; 8]).unwrap();
                    } else {
                        s.read(va, &mut b).unwrap();
                    }
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let any_writable =
            (0..2).any(|k| (0..8).any(|p| writable(&vm, &spaces[k], BASE + p * PAGE)));
        if any_writable {
            assert!(
                obj.flags().contains(marks),
                "iteration {it}: a writable mapping of the object exists, but it is not marked written ({:?})",
                obj.flags()
            );
        }
        assert!(
            any_writable,
            "iteration {it}: the writes left no writable mapping"
        );
        for s in spaces.iter() {
            s.unmap(BASE, 8 * PAGE).unwrap();
        }
        // Read-only use only: no marks.
        let ro = vm.new_anon_object(4);
        spaces[2]
            .map(MapRequest::object(
                BASE,
                4 * PAGE,
                ro.clone(),
                0,
                Prot::READ,
            ))
            .unwrap();
        for p in 0..4 {
            spaces[2].read_u8(BASE + p * PAGE).unwrap();
        }
        assert!(
            !ro.flags().intersects(marks),
            "a read-only mapped object got marks"
        );
        spaces[2].unmap(BASE, 4 * PAGE).unwrap();
    }
    consistent(&vm, "end");
}
both!(
    written_marks_race_ref,
    written_marks_race_x86,
    written_marks_race,
    128,
    30
);

/// An object with no pager is read-faulted (its clean zero-filled pages
/// mapped writable is then legitimate), then pageout gives it swap; after
/// that, pages brought back from swap must still be mapped read-only by
/// read faults. Repeated with the pageout racing the first read faults.
fn pager_gained_between_faults<P: Pmap>(vm: Arc<Vm<P>>) {
    let (swap, _t) = with_swap(&*vm);
    let n = 24u64;
    for round in 0..24u64 {
        let s = Arc::new(vm.new_space().unwrap());
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        // Half the pages written (dirty), half only read (clean zero pages).
        for i in (0..n).step_by(2) {
            fill(&s, BASE + i * PAGE, round * 100 + i);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let po = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                }
            })
        };
        for _ in 0..3 {
            for i in (1..n).step_by(2) {
                let mut b = vec![0u8; PAGE as usize];
                s.read(BASE + i * PAGE, &mut b).unwrap();
                assert!(
                    b.iter().all(|&x| x == 0),
                    "round {round}: read-only page {i} not zero"
                );
            }
            s.protect(BASE, n * PAGE, Prot::NONE).unwrap();
            s.protect(BASE, n * PAGE, Prot::RW).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        po.join().unwrap();
        for i in (0..n).step_by(2) {
            check(
                &s,
                BASE + i * PAGE,
                round * 100 + i,
                "written pages after the race",
            );
        }
        // Now write every page through whatever mapping it has (the even
        // ones may be clean swap-ins, the odd ones clean zero pages).
        for i in 0..n {
            fill(&s, BASE + i * PAGE, round * 100 + i);
        }
        for i in 0..n {
            check(&s, BASE + i * PAGE, round * 100 + i, "before squeeze");
        }
        // Every page is now dirty in memory: none may keep a swap copy.
        let (obj, _) = s.object_at(BASE).unwrap();
        let resident = (0..n).filter(|&i| obj.resident_page(i).is_some()).count();
        if resident as u64 == n {
            assert_eq!(
                swap.stats().used,
                0,
                "round {round}: every page resident and written, stale swap copies remain ({})",
                swap.stats()
            );
        }
        drop(obj);
        squeeze(&vm);
        for i in 0..n {
            check(&s, BASE + i * PAGE, round * 100 + i, "after squeeze");
        }
        drop(s);
        all_free(&vm, Some(&swap), "round end");
    }
}
both!(
    pager_gained_between_faults_ref,
    pager_gained_between_faults_x86,
    pager_gained_between_faults,
    96,
    30
);

/// fork (COW) + children writing and exiting (collapse on the parent's
/// next COW) + pageout racing all of it; each space must read its own
/// data; everything comes back at the end.
fn fork_cow_collapse_pageout<P: Pmap>(vm: Arc<Vm<P>>) {
    let (swap, _t) = with_swap(&*vm);
    let n = 24u64;
    {
        let parent = Arc::new(vm.new_space().unwrap());
        parent.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        let mut expect: Vec<u64> = (0..n).collect();
        for i in 0..n {
            fill(&parent, BASE + i * PAGE, i);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let po = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                    std::thread::yield_now();
                }
            })
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for generation in 1..=40u64 {
                let child = Arc::new(parent.fork().unwrap());
                let snapshot = expect.clone();
                let ch = {
                    let child = child.clone();
                    std::thread::spawn(move || {
                        // Child reads the parent's pages, writes a third.
                        for i in 0..n {
                            if (i + generation) % 3 == 0 {
                                fill(&child, BASE + i * PAGE, 500_000 + generation * 100 + i);
                            }
                        }
                        for i in 0..n {
                            let want = if (i + generation) % 3 == 0 {
                                500_000 + generation * 100 + i
                            } else {
                                snapshot[i as usize]
                            };
                            check(&child, BASE + i * PAGE, want, "child");
                        }
                    })
                };
                for i in 0..n {
                    if (i + generation) % 2 == 0 {
                        let tag = generation * 1000 + i;
                        fill(&parent, BASE + i * PAGE, tag);
                        expect[i as usize] = tag;
                    }
                }
                if let Err(e) = ch.join() {
                    std::panic::resume_unwind(e);
                }
                drop(child);
                for i in 0..n {
                    check(&parent, BASE + i * PAGE, expect[i as usize], "parent");
                }
            }
        }));
        stop.store(true, Ordering::Relaxed);
        po.join().unwrap();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        consistent(&vm, "after generations");
        squeeze(&vm);
        for i in 0..n {
            check(
                &parent,
                BASE + i * PAGE,
                expect[i as usize],
                "parent after squeeze",
            );
        }
    }
    all_free(&vm, Some(&swap), "after exit");
}
both!(
    fork_cow_collapse_pageout_ref,
    fork_cow_collapse_pageout_x86,
    fork_cow_collapse_pageout,
    96,
    40
);

// ---------------------------------------------------------------------
// Change 2: emptied tables freed as zero on their count
// ---------------------------------------------------------------------

/// Regions spread so that leaf tables, page directories and PDPTs are
/// made and emptied: `r` picks a 2 MiB region, every fourth one in
/// another GiB.
fn region(r: u64) -> u64 {
    0x4000_0000 + (r % 4) * TWO_MB + (r / 4) * ONE_GB + (r % 3) * 0x1_0000
}

/// One thread: map, write, protect (RO, NONE, RW), fork and exit,
/// pageout (per-page removal emptying leaf tables), unmap; each round the
/// known-zero pool is checked, and at the end fresh zero-fill pages.
fn table_churn_single(vm: Arc<Vm<X86Pmap>>) {
    let (swap, _t) = with_swap(&*vm);
    let s = vm.new_space().unwrap();
    let regions = 12u64;
    let per = 3u64;
    for round in 0..12u64 {
        for r in 0..regions {
            let b = region(r) + (round % 5) * PAGE;
            s.map_anon(b, per * PAGE, Prot::RW).unwrap();
            for i in 0..per {
                fill(&s, b + i * PAGE, round * 1000 + r * 10 + i);
            }
        }
        match round % 4 {
            0 => {
                for r in 0..regions {
                    let b = region(r) + (round % 5) * PAGE;
                    s.protect(b, per * PAGE, Prot::READ).unwrap();
                }
            }
            1 => {
                let c = s.fork().unwrap();
                for r in (0..regions).step_by(2) {
                    let b = region(r) + (round % 5) * PAGE;
                    check(&c, b, round * 1000 + r * 10, "child");
                    fill(&c, b + PAGE, 9);
                }
                drop(c);
            }
            2 => {
                for r in (1..regions).step_by(2) {
                    let b = region(r) + (round % 5) * PAGE;
                    s.protect(b, per * PAGE, Prot::NONE).unwrap();
                    s.protect(b, per * PAGE, Prot::RW).unwrap();
                }
            }
            _ => {}
        }
        squeeze(&vm);
        for r in 0..regions {
            let b = region(r) + (round % 5) * PAGE;
            for i in 0..per {
                check(&s, b + i * PAGE, round * 1000 + r * 10 + i, "after squeeze");
            }
        }
        for r in 0..regions {
            let b = region(r) + (round % 5) * PAGE;
            s.unmap(b, per * PAGE).unwrap();
        }
        consistent(&vm, "round");
        zero_pool_is_zero(&vm, &format!("round {round}"));
    }
    let before = vm.counters().snapshot().v_ozfod;
    fresh_pages_are_zero(
        &s,
        0x7000_0000,
        vm.free_pages().saturating_sub(40).min(200),
        "end",
    );
    assert!(
        vm.counters().snapshot().v_ozfod > before,
        "no zero-fill used a known-zero frame: the check proved nothing"
    );
    drop(s);
    all_free(&vm, Some(&swap), "end");
    zero_pool_is_zero(&vm, "after exit");
}

#[test]
fn x86_table_churn_single() {
    bounded(40, || table_churn_single(x86_vm(384)));
}

#[test]
fn x86_la57_table_churn_single() {
    bounded(40, || table_churn_single(x86_la57_vm(384)));
}

/// Several threads churn tables in one space (different 2 MiB regions
/// sharing page directories, and the same leaf tables), forking and
/// exiting, while pageout removes mappings per page. Afterwards the pool
/// and fresh pages are checked.
fn table_churn_threads(vm: Arc<Vm<X86Pmap>>) {
    let (swap, _t) = with_swap(&*vm);
    let s = Arc::new(vm.new_space().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let po = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vm.pageout(vm.total_pages());
                std::thread::yield_now();
            }
        })
    };
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let s = s.clone();
        hs.push(std::thread::spawn(move || {
            for round in 0..200u64 {
                // Thread t works in regions t, t+3, ...; thread 2 also maps
                // pages into thread 0's leaf tables (same 2 MiB region,
                // other pages).
                for k in 0..4u64 {
                    let r = t + 3 * k;
                    let b = region(r) + (t * 64 + (round % 7)) * PAGE;
                    s.map_anon(b, 2 * PAGE, Prot::RW).unwrap();
                    fill(&s, b, round * 100 + r);
                    s.read_u8(b + PAGE).unwrap();
                    if round % 3 == t % 3 {
                        s.protect(b, 2 * PAGE, Prot::READ).unwrap();
                    }
                    check(&s, b, round * 100 + r, "thread");
                    if round % 5 == 0 {
                        s.protect(b, 2 * PAGE, Prot::NONE).unwrap();
                    }
                    s.unmap(b, 2 * PAGE).unwrap();
                }
                if t == 1 && round % 8 == 0 {
                    drop(s.fork().unwrap());
                }
            }
        }));
    }
    let mut err = None;
    for h in hs {
        if let Err(e) = h.join() {
            err = Some(e);
        }
    }
    stop.store(true, Ordering::Relaxed);
    po.join().unwrap();
    if let Some(e) = err {
        std::panic::resume_unwind(e);
    }
    consistent(&vm, "after threads");
    zero_pool_is_zero(&vm, "after threads");
    fresh_pages_are_zero(
        &s,
        0x7000_0000,
        vm.free_pages().saturating_sub(40).min(200),
        "end",
    );
    drop(s);
    all_free(&vm, Some(&swap), "end");
    zero_pool_is_zero(&vm, "after exit");
}

#[test]
fn x86_table_churn_threads() {
    bounded(50, || table_churn_threads(x86_vm(384)));
}

/// Direct pmap calls on a second space: mappings of real pages entered at
/// many addresses across leaf tables, with wiring, write access (D set),
/// every cache attribute; their wiring changed, write taken by
/// `page_protect`, D cleared, A harvested, the software MMU setting A/D
/// by translating for write; then removed by `remove_all`, by `protect`
/// to NONE, by `remove` and by destroying the space. Every way leaves the
/// pool zero.
#[test]
fn x86_direct_pmap_ops_leave_zero_pool_zero() {
    bounded(40, || {
        let vm = x86_vm(256);
        let s = vm.new_space().unwrap();
        let n = 8u64;
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            fill(&s, BASE + i * PAGE, i);
        }
        let (obj, _) = s.object_at(BASE).unwrap();
        let pfns: Vec<_> = (0..n)
            .map(|i| vm.page_pfn(obj.resident_page(i).unwrap()))
            .collect();
        let attrs = [
            MemAttr::WriteBack,
            MemAttr::WriteThrough,
            MemAttr::UncachedMinus,
            MemAttr::Uncacheable,
            MemAttr::WriteProtected,
            MemAttr::WriteCombining,
        ];
        let pm = vm.pmap();
        for round in 0..60u64 {
            let other = vm.new_space().unwrap();
            let sp = other.pmap_space();
            let mut vas = Vec::new();
            for (k, &pfn) in pfns.iter().enumerate() {
                for j in 0..6u64 {
                    let va =
                        region(j * 2 + (round % 2)) + (k as u64 * 37 + j * 5 + round) % 512 * PAGE;
                    let m = Mapping::new(
                        PageInfo {
                            pfn,
                            managed: true,
                            attr: attrs[(k + j as usize + round as usize) % attrs.len()],
                        },
                        if j % 2 == 0 {
                            Prot::RW
                        } else {
                            Prot::READ | Prot::EXECUTE
                        },
                    )
                    .access(if j % 3 == 0 { Prot::RW } else { Prot::READ })
                    .wired(j % 4 == 1);
                    pm.enter(sp, VirtAddr(va), m).unwrap();
                    vas.push((va, pfn, j));
                }
            }
            // The software MMU sets A and D.
            for &(va, _, j) in &vas {
                let a = if j % 2 == 0 { Prot::WRITE } else { Prot::READ };
                pm.translate(sp, VirtAddr(va), a);
            }
            for &(va, _, j) in &vas {
                if j % 4 == 1 {
                    pm.change_wiring(sp, VirtAddr(va), false);
                } else if j % 5 == 0 {
                    pm.change_wiring(sp, VirtAddr(va), true);
                }
            }
            for &pfn in &pfns {
                pm.is_modified(pfn);
                pm.ts_referenced(pfn);
                pm.clear_modify(pfn);
                pm.page_protect(pfn, Prot::READ);
            }
            // Re-enter some over existing ones (same frame: protection
            // change; other frame: replacement).
            for (idx, &(va, pfn, _)) in vas.iter().enumerate() {
                if idx % 3 == 0 {
                    let other_pfn = pfns[(idx + 1) % pfns.len()];
                    let use_pfn = if idx % 2 == 0 { pfn } else { other_pfn };
                    let m = Mapping::new(
                        PageInfo {
                            pfn: use_pfn,
                            managed: true,
                            attr: MemAttr::WriteBack,
                        },
                        Prot::RW,
                    )
                    .access(Prot::RW);
                    let _ = pm.enter(sp, VirtAddr(va), m).unwrap();
                }
            }
            // Take them away, a different way each round.
            match round % 4 {
                0 => {
                    for &pfn in &pfns {
                        pm.remove_all(pfn);
                    }
                }
                1 => {
                    for j in 0..12 {
                        pm.protect(
                            sp,
                            VirtAddr(region(j))..VirtAddr(region(j) + TWO_MB),
                            Prot::NONE,
                            &mut |_| {},
                        );
                    }
                }
                2 => {
                    for j in 0..12 {
                        pm.protect(
                            sp,
                            VirtAddr(region(j))..VirtAddr(region(j) + TWO_MB),
                            Prot::READ,
                            &mut |_| {},
                        );
                        pm.remove(
                            sp,
                            VirtAddr(region(j))..VirtAddr(region(j) + TWO_MB),
                            &mut |_| {},
                        );
                    }
                }
                _ => {
                    // Left for destroy_space.
                    for &pfn in pfns.iter().step_by(2) {
                        pm.remove_all(pfn);
                    }
                }
            }
            drop(other);
            // The owner's mappings may have gone too (remove_all): data
            // must be intact.
            for i in 0..n {
                check(&s, BASE + i * PAGE, i, "owner after other's churn");
            }
            consistent(&vm, "round");
            zero_pool_is_zero(&vm, &format!("direct round {round}"));
        }
        fresh_pages_are_zero(
            &s,
            0x7000_0000,
            vm.free_pages().saturating_sub(40).min(150),
            "end",
        );
        drop(s);
        zero_pool_is_zero(&vm, "after exit");
    });
}

/// Racing enters into the same fresh leaf tables (table install by CAS,
/// the loser freeing its frame as zero) and concurrent removals by
/// pageout and unmap; then the pool.
#[test]
fn x86_racing_first_faults_in_new_tables() {
    bounded(40, || {
        let vm = x86_vm(384);
        let (swap, _t) = with_swap(&*vm);
        let s = Arc::new(vm.new_space().unwrap());
        for round in 0..120u64 {
            // A fresh GiB each round: every level of table is made anew.
            let b = 0x10_0000_0000 + (round % 5) * 512 * ONE_GB + (round % 3) * ONE_GB;
            s.map_anon(b, 64 * PAGE, Prot::RW).unwrap();
            let mut hs = Vec::new();
            for t in 0..3u64 {
                let s = s.clone();
                hs.push(std::thread::spawn(move || {
                    for i in (t..64).step_by(3) {
                        if i % 2 == 0 {
                            s.write(b + i * PAGE, &(i + 1).to_le_bytes()).unwrap();
                        } else {
                            s.read_u8(b + i * PAGE).unwrap();
                        }
                    }
                }));
            }
            let vm2 = vm.clone();
            let po = std::thread::spawn(move || {
                vm2.pageout(vm2.total_pages());
            });
            for h in hs {
                h.join().unwrap();
            }
            po.join().unwrap();
            for i in (0..64).step_by(2) {
                let mut w = [0u8; 8];
                s.read(b + i * PAGE, &mut w).unwrap();
                assert_eq!(u64::from_le_bytes(w), i + 1);
            }
            s.unmap(b, 64 * PAGE).unwrap();
            if round % 5 == 4 {
                consistent(&vm, "round");
                zero_pool_is_zero(&vm, &format!("race round {round}"));
            }
        }
        zero_pool_is_zero(&vm, "end");
        fresh_pages_are_zero(
            &s,
            0x7000_0000,
            vm.free_pages().saturating_sub(40).min(200),
            "end",
        );
        drop(s);
        all_free(&vm, Some(&swap), "end");
    });
}

/// Same leaf tables, several actors at once for ~2 s: two threads read
/// and write the same pages (faults entering, the software MMU setting A
/// and D), pageout harvesting A bits and removing mappings page by page
/// (emptying leaf tables under the shared lock, pruned afterwards), and an
/// unmapper removing and remapping a sub-range (exclusive removal). The
/// pool is checked after, and the data all along.
#[test]
fn x86_same_leaf_table_removal_races() {
    bounded(40, || {
        let vm = x86_vm(256);
        let (swap, _t) = with_swap(&*vm);
        let s = Arc::new(vm.new_space().unwrap());
        let n = 32u64;
        let b = 0x5000_0000 + TWO_MB - 8 * PAGE; // straddles two leaf tables
        s.map_anon(b, n * PAGE, Prot::RW).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(2000);
        let mut hs = Vec::new();
        for t in 0..2u64 {
            let (s, stop) = (s.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Pages 0..16 are this pair's; each thread owns every
                    // other one and checks what it wrote.
                    let i = (k * 2 + t) % 16;
                    let va = b + i * PAGE;
                    let v = (t << 32) | k;
                    s.write(va, &v.to_le_bytes()).unwrap();
                    let mut w = [0u8; 8];
                    s.read(va, &mut w).unwrap();
                    assert_eq!(u64::from_le_bytes(w), v, "page {i}");
                    k += 1;
                }
            }));
        }
        {
            let (vm, stop) = (vm.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                }
            }));
        }
        {
            let (s, stop) = (s.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Pages 16..32: unmapped, remapped, touched.
                    let at = b + (16 + (k % 4) * 4) * PAGE;
                    s.unmap(at, 4 * PAGE).unwrap();
                    s.map_anon(at, 4 * PAGE, Prot::RW).unwrap();
                    let mut z = vec![0u8; PAGE as usize];
                    s.read(at, &mut z).unwrap();
                    assert!(z.iter().all(|&x| x == 0), "remapped page not zero");
                    s.write(at + PAGE, &[k as u8 | 1]).unwrap();
                    if k.is_multiple_of(3) {
                        s.protect(at, 4 * PAGE, Prot::READ).unwrap();
                    }
                    k += 1;
                }
            }));
        }
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let mut err = None;
        for h in hs {
            if let Err(e) = h.join() {
                err = Some(e);
            }
        }
        if let Some(e) = err {
            std::panic::resume_unwind(e);
        }
        consistent(&vm, "after races");
        s.unmap(b, n * PAGE).unwrap();
        zero_pool_is_zero(&vm, "after races");
        fresh_pages_are_zero(
            &s,
            0x7000_0000,
            vm.free_pages().saturating_sub(40).min(180),
            "end",
        );
        drop(s);
        all_free(&vm, Some(&swap), "end");
    });
}

/// The first pageout of an object (which gives it swap) racing read
/// faults on its untouched pages and write faults on others, on fresh
/// objects many times: afterwards, once every page is written while
/// resident, no swap copy may remain, and data survives a squeeze.
fn first_pageout_races_faults<P: Pmap>(vm: Arc<Vm<P>>) {
    let (swap, _t) = with_swap(&*vm);
    let n = 16u64;
    for it in 0..150u64 {
        let s = Arc::new(vm.new_space().unwrap());
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        for i in (0..n).step_by(2) {
            s.write(BASE + i * PAGE, &(it * 100 + i + 1).to_le_bytes())
                .unwrap();
        }
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in (1..n).step_by(2) {
                    assert_eq!(s.read_u8(BASE + i * PAGE).unwrap(), 0);
                }
                for i in (0..n).step_by(2) {
                    let mut w = [0u8; 8];
                    s.read(BASE + i * PAGE, &mut w).unwrap();
                    assert_eq!(u64::from_le_bytes(w), it * 100 + i + 1);
                }
            })
        };
        vm.pageout(vm.total_pages());
        reader.join().unwrap();
        for i in 0..n {
            s.write(BASE + i * PAGE + 8, &(it * 100 + i + 7).to_le_bytes())
                .unwrap();
        }
        let (obj, _) = s.object_at(BASE).unwrap();
        let all_resident = (0..n).all(|i| obj.resident_page(i).is_some());
        drop(obj);
        if all_resident {
            assert_eq!(
                swap.stats().used,
                0,
                "iteration {it}: every page written while resident, stale swap copies remain ({})",
                swap.stats()
            );
        }
        squeeze(&vm);
        for i in 0..n {
            let mut w = [0u8; 16];
            s.read(BASE + i * PAGE, &mut w).unwrap();
            let first = if i % 2 == 0 { it * 100 + i + 1 } else { 0 };
            assert_eq!(
                u64::from_le_bytes(w[..8].try_into().unwrap()),
                first,
                "it {it} page {i}"
            );
            assert_eq!(
                u64::from_le_bytes(w[8..].try_into().unwrap()),
                it * 100 + i + 7,
                "it {it} page {i}"
            );
        }
        drop(s);
        all_free(&vm, Some(&swap), "iteration end");
    }
}
both!(
    first_pageout_races_faults_ref,
    first_pageout_races_faults_x86,
    first_pageout_races_faults,
    96,
    40
);
