//! Memory and swap both full: a fault that cannot be served fails after a
//! bounded amount of work (the pageout pass stops offering swap pages it
//! has no room for), while dirty pages that already own a swap block are
//! still written there and freed, and nothing written is lost.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_core::{
    Contiguity, FaultError, IoError, PAGE_SIZE, PageOut, PageSlot, Pager, PagerError, PagerKind,
    Prot, SwapProvider,
};

/// A swap device of `blocks` blocks, shared by the pagers it hands out.
/// Dirtying a page does not free its block (the trait allows either), so
/// a dirty page may own a block that a write can reuse.
struct TinySwap {
    blocks: usize,
    /// (object serial, pindex) -> contents.
    store: Mutex<BTreeMap<(u64, u64), Vec<u8>>>,
    serial: AtomicU64,
    refused: AtomicU64,
    written: AtomicU64,
}

struct TinyPager {
    swap: Arc<TinySwap>,
    serial: u64,
}

struct Provider(Arc<TinySwap>);

impl SwapProvider for Provider {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        let serial = self.0.serial.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(TinyPager {
            swap: self.0.clone(),
            serial,
        }))
    }
}

impl TinySwap {
    fn new(blocks: usize) -> Arc<TinySwap> {
        Arc::new(TinySwap {
            blocks,
            store: Mutex::new(BTreeMap::new()),
            serial: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }
    fn used(&self) -> usize {
        self.store.lock().unwrap().len()
    }
}

impl Pager for TinyPager {
    fn kind(&self) -> PagerKind {
        PagerKind::ANONYMOUS
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        let store = self.swap.store.lock().unwrap();
        store
            .contains_key(&(self.serial, pindex))
            .then_some(Contiguity::default())
    }
    fn get_pages<'a>(&self, pages: &mut [PageSlot<'a>], reqpage: usize) -> Result<(), PagerError> {
        let store = self.swap.store.lock().unwrap();
        let slot = &mut pages[reqpage];
        let data = store
            .get(&(self.serial, slot.pindex()))
            .ok_or(PagerError::Fail)?;
        slot.write(0, data);
        slot.set_all_valid();
        Ok(())
    }
    fn put_pages<'a>(&self, pages: &[PageOut<'a>]) -> Result<(), PagerError> {
        let mut store = self.swap.store.lock().unwrap();
        let new = pages
            .iter()
            .filter(|p| !store.contains_key(&(self.serial, p.pindex())))
            .count();
        if store.len() + new > self.swap.blocks {
            self.swap.refused.fetch_add(1, Ordering::Relaxed);
            return Err(PagerError::Error(IoError {
                code: IoError::ENOSPC,
                context: "tiny swap full",
            }));
        }
        for p in pages {
            let mut buf = vec![0; PAGE_SIZE as usize];
            p.read(0, &mut buf);
            store.insert((self.serial, p.pindex()), buf);
        }
        self.swap
            .written
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, start: u64, end: u64) {
        let mut store = self.swap.store.lock().unwrap();
        store.retain(|&(s, p), _| s != self.serial || !(start..end).contains(&p));
    }
    fn dealloc(&self) {
        let mut store = self.swap.store.lock().unwrap();
        store.retain(|&(s, _), _| s != self.serial);
    }
}

fn value(page: u64) -> u8 {
    (page as u8).wrapping_mul(7) | 1
}

#[test]
fn a_fault_at_full_memory_and_full_swap_gives_up_after_few_refusals() {
    let (vm, space) = machine(64);
    let swap = TinySwap::new(16);
    vm.set_swap(Arc::new(Provider(swap.clone())));
    space.map_anon(BASE, 1024 * PAGE, Prot::RW).unwrap();
    let mut written = 0;
    let e = loop {
        match space.write_u8(BASE + written * PAGE, value(written)) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1024, "64 pages and 16 blocks held 1024 pages");
    };
    assert!(matches!(e, FaultError::ResourceShortage { .. }), "{e}");
    assert_eq!(swap.used(), 16, "swap filled before giving up");
    // Each pageout pass asks a full swap once for a run and once for a
    // page, then stops asking: a few passes per fault, not one refusal per
    // dirty page per pass (thousands).
    let refused = swap.refused.load(Ordering::Relaxed);
    assert!(
        refused <= 40,
        "{refused} page-outs refused to fill 64 pages and 16 blocks"
    );
    // Nothing written is lost: check the resident pages, unmap 24 of them
    // to make room, and read the swapped ones back.
    let (obj, _) = space.object_at(BASE).unwrap();
    let (resident, swapped): (Vec<u64>, Vec<u64>) =
        (0..written).partition(|&p| obj.resident_page(p).is_some());
    assert_eq!(swapped.len(), 16);
    drop(obj);
    for &p in &resident {
        assert_eq!(byte(&space, BASE + p * PAGE), value(p), "resident page {p}");
    }
    for &p in &resident[..24] {
        space.unmap(BASE + p * PAGE, PAGE).unwrap();
    }
    for &p in &swapped {
        assert_eq!(byte(&space, BASE + p * PAGE), value(p), "swapped page {p}");
    }
    consistent(&vm);
}

#[test]
fn a_full_swap_still_takes_dirty_pages_that_own_a_block() {
    let (vm, space) = machine(64);
    let swap = TinySwap::new(8);
    vm.set_swap(Arc::new(Provider(swap.clone())));
    // A: 8 pages that go to swap, come back and are dirtied again: each
    // owns a block of the (then full) swap.
    const A: u64 = BASE;
    const B: u64 = BASE + 0x100_0000;
    space.map_anon(A, 8 * PAGE, Prot::RW).unwrap();
    for p in 0..8 {
        space.write_u8(A + p * PAGE, 0xa0 + p as u8).unwrap();
    }
    vm.pageout(vm.total_pages());
    assert_eq!(swap.used(), 8, "A went to swap");
    let dirty_a = |round: u8| {
        // (The first write of each page reads it back from swap.)
        for p in 0..8 {
            space.write_u8(A + p * PAGE, round ^ p as u8).unwrap();
        }
    };
    // B: dirty pages swap has no room for.
    space.map_anon(B, 40 * PAGE, Prot::RW).unwrap();
    for p in 0..40 {
        space.write_u8(B + p * PAGE, value(p)).unwrap();
    }
    let (a_obj, _) = space.object_at(A).unwrap();
    let (b_obj, _) = space.object_at(B).unwrap();
    // Each round dirties A again and runs one pass: the pass meets B's and
    // A's pages in an order that depends on where the clock hand stands,
    // and must write all of A to its blocks however often swap refused B
    // before.
    for round in 1..=8u8 {
        dirty_a(round);
        let r = vm.pageout(vm.total_pages());
        assert!(r.failed >= 40, "round {round}: B stays: {r:?}");
        assert_eq!(
            a_obj.resident_count(),
            0,
            "round {round}: A written to its blocks: {r:?}"
        );
        assert_eq!(b_obj.resident_count(), 40, "round {round}: B kept");
        assert_eq!(swap.used(), 8, "A's blocks reused, none added");
        for p in 0..8 {
            assert_eq!(byte(&space, A + p * PAGE), round ^ p as u8, "round {round}");
        }
    }
    for p in 0..40 {
        assert_eq!(byte(&space, B + p * PAGE), value(p), "B page {p}");
    }
    consistent(&vm);
}

#[test]
fn without_swap_a_pass_leaves_dirty_anonymous_memory_mapped() {
    let (vm, space) = machine(64);
    space.map_anon(BASE, 32 * PAGE, Prot::RW).unwrap();
    for p in 0..32 {
        space.write_u8(BASE + p * PAGE, value(p)).unwrap();
    }
    // Three rounds: the first two age the pages to inactive, the third
    // finds them unwritable. Only the first is unmapped to learn that.
    let r = vm.pageout(vm.total_pages());
    assert_eq!(r.freed, 0, "{r:?}");
    assert!(r.failed >= 32, "{r:?}");
    let mapped = (0..32)
        .filter(|&p| space.extract(BASE + p * PAGE).is_some())
        .count();
    assert!(mapped >= 31, "{mapped} of 32 pages still mapped: {r:?}");
    for p in 0..32 {
        assert_eq!(byte(&space, BASE + p * PAGE), value(p), "page {p}");
    }
    consistent(&vm);
}

#[test]
fn a_full_swap_does_not_hold_back_other_pagers() {
    let (vm, space) = machine(64);
    let swap = TinySwap::new(0);
    vm.set_swap(Arc::new(Provider(swap.clone())));
    // S: anonymous memory for a swap without a single block.
    const S: u64 = BASE;
    const M: u64 = BASE + 0x100_0000;
    space.map_anon(S, 40 * PAGE, Prot::RW).unwrap();
    for p in 0..40 {
        space.write_u8(S + p * PAGE, value(p)).unwrap();
    }
    // M: a named object whose own (anonymous-kind) pager has room.
    let pager = Arc::new(vm_testkit::MemPager::new(PagerKind::ANONYMOUS));
    let m = vm.new_object(8, pager.clone());
    space
        .map(vm_core::MapRequest::object(
            M,
            8 * PAGE,
            m.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    for round in 1..=8u8 {
        for p in 0..8 {
            space.write_u8(M + p * PAGE, round ^ p as u8).unwrap();
        }
        let r = vm.pageout(vm.total_pages());
        assert!(swap.refused.load(Ordering::Relaxed) > 0, "swap was asked");
        assert_eq!(m.resident_count(), 0, "round {round}: M written out: {r:?}");
        for p in 0..8 {
            assert_eq!(byte(&space, M + p * PAGE), round ^ p as u8, "round {round}");
        }
    }
    for p in 0..40 {
        assert_eq!(byte(&space, S + p * PAGE), value(p), "S page {p}");
    }
    consistent(&vm);
}
