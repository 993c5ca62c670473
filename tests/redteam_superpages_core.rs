//! Red team: superpage reservations and whole-superpage faults in vm-core
//! (commits f8d1fca, ea12ae6), attacked through the public API only.
//!
//! Data loss, data shown to the wrong space, leaked or twice-handed
//! frames, panics, hangs and books that do not add up, under fork,
//! munmap / mprotect / mlock of parts, pageout and swap-in, holds, shared
//! objects at offsets, msync, stacks, unaligned mappings, 5-level paging,
//! memory pressure and many threads; and a plain model of the bytes.
//!
//! Some races are made deterministic with [`GatePmap`], a pmap that wraps
//! a real one and can stop one `enter` (at an armed address) until the
//! test lets it go. It leaves `enter_superpage` to the trait's default
//! (no superpage at once), so a whole-superpage fault maps its pages one
//! by one: first (`map_populated`) the 511 it zeroed, then its own page,
//! where the gate holds it. (When these tests were written the fault
//! entered its own page first, and the gate held it between taking its
//! frames and inserting them; that window now has no pmap call in it,
//! and `t02` and `redteam_whole_superpage.rs` race it without a gate.)

mod common;

use common::{Rng, config, consistent, rdpage, rdpage_forked_mid_write, squeeze, wrpage};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_core::pmap::{DisplacedSink, RefMod};
use vm_core::{
    Displaced, MapRequest, Mapping, PageInfo, Pfn, Pmap, PmapError, Prot, SuperpageAdvice,
    SuperpagePolicy, VirtAddr, Vm, VmConfig, VmSpace,
};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::{PteFlags, X86Pmap};
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn vm_with<P: Pmap>(pmap: P, policy: SuperpagePolicy, pages: u64) -> Arc<Vm<P>> {
    Vm::new(
        pmap,
        VmConfig {
            superpages: policy,
            ..config(pages)
        },
    )
    .unwrap()
}

fn with_swap<P: Pmap>(vm: &Vm<P>, mib: u64) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, mib << 20).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

fn is_super(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> bool {
    vm.pmap()
        .pte(s.pmap_space(), va)
        .is_some_and(|e| e & 1 != 0 && e & PteFlags::HUGE.bits() != 0)
}

fn resident<P: Pmap>(s: &VmSpace<P>, base: u64) -> usize {
    (0..PAGES)
        .filter(|i| s.extract(base + i * PAGE).is_some())
        .count()
}

fn no_leak<P: Pmap>(vm: &Vm<P>, what: &str) {
    assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
}

/// The free lists are whole: every frame can be taken once, none twice
/// (a frame handed out twice, or lost off the lists, shows here).
fn lists_whole<P: Pmap>(vm: &Vm<P>, what: &str) {
    let b = vm.inflate_balloon(u64::MAX);
    let frames: HashSet<u64> = b.frames().map(|p| p.0).collect();
    assert_eq!(
        (b.len(), frames.len() as u64),
        (vm.total_pages(), vm.total_pages()),
        "{what}: the free lists do not hand out every frame exactly once"
    );
    drop(b);
    no_leak(vm, what);
}

// ---------------------------------------------------------------------
// A pmap that can stop one enter.

#[derive(Default)]
struct Gate {
    /// (armed address, arrived, released)
    st: Mutex<(Option<u64>, bool, bool)>,
    cv: Condvar,
}

impl Gate {
    fn arm(&self, va: u64) {
        *self.st.lock().unwrap() = (Some(va), false, false);
    }
    fn wait_arrived(&self) {
        let mut g = self.st.lock().unwrap();
        let t0 = Instant::now();
        while !g.1 {
            let (ng, _) = self.cv.wait_timeout(g, Duration::from_millis(50)).unwrap();
            g = ng;
            assert!(t0.elapsed() < Duration::from_secs(20), "gate never reached");
        }
    }
    fn release(&self) {
        let mut g = self.st.lock().unwrap();
        g.0 = None;
        g.2 = true;
        self.cv.notify_all();
    }
    fn pass(&self, va: u64) {
        let mut g = self.st.lock().unwrap();
        if g.0 != Some(va) || g.1 {
            return;
        }
        g.1 = true;
        self.cv.notify_all();
        while !g.2 {
            g = self.cv.wait(g).unwrap();
        }
    }
}

struct GatePmap<P: Pmap> {
    inner: P,
    gate: Arc<Gate>,
}

impl<P: Pmap> Pmap for GatePmap<P> {
    type Space = P::Space;
    fn attach(&mut self, frames: vm_core::pmap::PhysFrames) {
        self.inner.attach(frames);
    }
    fn create_space(&self) -> Result<Self::Space, PmapError> {
        self.inner.create_space()
    }
    fn destroy_space(&self, space: &Self::Space) {
        self.inner.destroy_space(space);
    }
    fn enter(
        &self,
        space: &Self::Space,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<Option<Displaced>, PmapError> {
        self.gate.pass(va.as_u64());
        self.inner.enter(space, va, m)
    }
    fn enter_quick(&self, space: &Self::Space, va: VirtAddr, page: PageInfo, prot: Prot) -> bool {
        self.inner.enter_quick(space, va, page, prot)
    }
    fn enter_quick_run(
        &self,
        space: &Self::Space,
        start: VirtAddr,
        pages: &[Option<PageInfo>],
        prot: Prot,
    ) -> usize {
        self.inner.enter_quick_run(space, start, pages, prot)
    }
    fn remove<'s>(
        &self,
        space: &Self::Space,
        range: Range<VirtAddr>,
        sink: &mut DisplacedSink<'s>,
    ) {
        self.inner.remove(space, range, sink);
    }
    fn protect<'s>(
        &self,
        space: &Self::Space,
        range: Range<VirtAddr>,
        prot: Prot,
        sink: &mut DisplacedSink<'s>,
    ) {
        self.inner.protect(space, range, prot, sink);
    }
    fn extract(&self, space: &Self::Space, va: VirtAddr) -> Option<Pfn> {
        self.inner.extract(space, va)
    }
    fn is_prefaultable(&self, space: &Self::Space, va: VirtAddr) -> bool {
        self.inner.is_prefaultable(space, va)
    }
    fn change_wiring(&self, space: &Self::Space, va: VirtAddr, wired: bool) {
        self.inner.change_wiring(space, va, wired);
    }
    fn translate(&self, space: &Self::Space, va: VirtAddr, access: Prot) -> Option<Pfn> {
        self.inner.translate(space, va, access)
    }
    fn remove_all(&self, pfn: Pfn) -> RefMod {
        self.inner.remove_all(pfn)
    }
    fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod {
        self.inner.page_protect(pfn, prot)
    }
    fn is_modified(&self, pfn: Pfn) -> bool {
        self.inner.is_modified(pfn)
    }
    fn clear_modify(&self, pfn: Pfn) {
        self.inner.clear_modify(pfn);
    }
    fn ts_referenced(&self, pfn: Pfn) -> u32 {
        self.inner.ts_referenced(pfn)
    }
    fn mapping_count(&self, pfn: Pfn) -> usize {
        self.inner.mapping_count(pfn)
    }
}

fn gate_vm<P: Pmap>(
    inner: P,
    policy: SuperpagePolicy,
    pages: u64,
) -> (Arc<Vm<GatePmap<P>>>, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let vm = vm_with(
        GatePmap {
            inner,
            gate: gate.clone(),
        },
        policy,
        pages,
    );
    (vm, gate)
}

// ---------------------------------------------------------------------
// 1. The whole-superpage fault against pageout, made deterministic.

/// A writes page 0 of a fresh 2 MiB under `Always`: it claims the run,
/// takes and zeroes the other 511 frames, inserts and maps them, and is
/// stopped at the enter of its own page. Meanwhile B writes page J of the
/// same 2 MiB (one of A's zeroed pages) and the pageout daemon pages it
/// out to swap. Then A goes on: J must come back with B's data, not as
/// A's zeros, and A's own write must be there.
fn populate_vs_pageout<P: Pmap>(inner: P, what: &str) {
    const J: u64 = 300;
    let (vm, gate) = gate_vm(inner, SuperpagePolicy::Always, 4096);
    let (swap, _t) = with_swap(&vm, 16);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    gate.arm(BASE);
    std::thread::scope(|sc| {
        let a = sc.spawn(|| wrpage(&s, BASE, tag(BASE, 1)));
        gate.wait_arrived();
        let vj = BASE + J * PAGE;
        wrpage(&s, vj, tag(vj, 2)).unwrap();
        assert_eq!(rdpage(&s, vj), Ok(tag(vj, 2)));
        squeeze(&vm);
        let paged_out = s.extract(vj).is_none();
        gate.release();
        a.join().unwrap().unwrap();
        eprintln!(
            "{what}: page {J} paged out while the fault was held: {paged_out}, swap {}",
            swap.stats()
        );
    });
    let vj = BASE + J * PAGE;
    assert_eq!(
        rdpage(&s, BASE),
        Ok(tag(BASE, 1)),
        "{what}: the faulting write"
    );
    assert_eq!(
        rdpage(&s, vj),
        Ok(tag(vj, 2)),
        "{what}: page {J}, written and paged out during the whole-superpage fault, \
         came back as the fault's zeros"
    );
    consistent(&vm, what);
    drop(s);
    no_leak(&vm, what);
}

#[test]
fn t01_whole_superpage_fault_vs_pageout_of_a_neighbour_x86() {
    populate_vs_pageout(X86Pmap::new(), "x86");
}

#[test]
fn t01_whole_superpage_fault_vs_pageout_of_a_neighbour_ref() {
    populate_vs_pageout(RefPmap::new(), "ref");
}

/// The same race with no gate: writers of one fresh 2 MiB under `Always`
/// (whoever comes first fills it) while the pageout daemon runs without a
/// break and more threads than cores compete. Every write must survive.
#[test]
fn t02_racing_writers_and_continuous_pageout_keep_every_write() {
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 3072);
        let (_swap, _t) = with_swap(&vm, 32);
        let s = vm.new_space().unwrap();
        // Frames that are not known zeros: the filler must zero them.
        s.map_anon(BASE + 8 * SUPER, 4 * SUPER, Prot::RW).unwrap();
        for i in 0..4 * PAGES {
            s.write_u8(BASE + 8 * SUPER + i * PAGE, 0xaa).unwrap();
        }
        s.unmap(BASE + 8 * SUPER, 4 * SUPER).unwrap();
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        let stop = AtomicBool::new(false);
        let written: HashSet<u64> = std::thread::scope(|sc| {
            let pager = sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                }
            });
            let writers: Vec<_> = (0..3u64)
                .map(|t| {
                    let s = &s;
                    sc.spawn(move || {
                        let mut rng = Rng(rounds * 131 + t + 7);
                        let mut mine = Vec::new();
                        for _ in 0..96 {
                            let i = rng.below(2 * PAGES / 3) * 3 + t;
                            let va = BASE + i * PAGE;
                            wrpage(s, va, tag(va, 1)).unwrap();
                            mine.push(i);
                        }
                        mine
                    })
                })
                .collect();
            let w = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            stop.store(true, Ordering::Relaxed);
            pager.join().unwrap();
            w
        });
        for i in 0..2 * PAGES {
            let va = BASE + i * PAGE;
            let want = if written.contains(&i) { tag(va, 1) } else { 0 };
            assert_eq!(rdpage(&s, va), Ok(want), "round {rounds}: page {i} lost");
        }
        consistent(&vm, "t02");
        drop(s);
        no_leak(&vm, "t02");
    }
    eprintln!("t02: {rounds} rounds");
}

// ---------------------------------------------------------------------
// 2. Held between populate and insert: a dead object, a shrunk object.

/// `terminate_object` on a shared anonymous object while a whole-superpage
/// fault on it is held after taking its 511 frames: the fault must free
/// them (DEAD), the object's pages go, later accesses fail, nothing leaks.
#[test]
fn t03_terminate_object_during_a_whole_superpage_fault() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (vm, gate) = gate_vm(X86Pmap::new(), policy, 4096);
        let o = vm.new_anon_object(PAGES);
        let s = vm.new_space().unwrap();
        s.map(MapRequest::object(BASE, SUPER, o.clone(), 0, Prot::RW))
            .unwrap();
        if policy == SuperpagePolicy::Reserve {
            s.advise_superpages(BASE, SUPER, SuperpageAdvice::Huge)
                .unwrap();
        }
        let va = BASE + 5 * PAGE;
        gate.arm(va);
        std::thread::scope(|sc| {
            let a = sc.spawn(|| s.write_u8(va, 7));
            gate.wait_arrived();
            let free_held = vm.free_pages();
            assert!(
                free_held + 512 <= vm.total_pages(),
                "the fault took its 511 frames"
            );
            let t = sc.spawn(|| vm.terminate_object(&o));
            std::thread::sleep(Duration::from_millis(50));
            gate.release();
            let r = a.join().unwrap();
            t.join().unwrap();
            eprintln!("t03 {policy:?}: the held write returned {r:?}");
        });
        assert!(s.read_u8(BASE + 100 * PAGE).is_err(), "a dead object reads");
        assert!(s.extract(BASE + 100 * PAGE).is_none());
        consistent(&vm, "t03");
        drop(s);
        drop(o);
        no_leak(&vm, "t03");
    }
}

/// The object shrinks (to 256 pages) while the fault is held: the
/// populated pages past the end are freed, not inserted; after growing it
/// again they read zeros.
#[test]
fn t04_shrink_object_during_a_whole_superpage_fault() {
    let (vm, gate) = gate_vm(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let o = vm.new_anon_object(2 * PAGES);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(BASE, 2 * SUPER, o.clone(), 0, Prot::RW))
        .unwrap();
    gate.arm(BASE);
    std::thread::scope(|sc| {
        let a = sc.spawn(|| wrpage(&s, BASE, tag(BASE, 1)));
        gate.wait_arrived();
        vm.resize_object(&o, 256);
        gate.release();
        a.join().unwrap().unwrap();
    });
    assert_eq!(rdpage(&s, BASE), Ok(tag(BASE, 1)));
    assert_eq!(rdpage(&s, BASE + 255 * PAGE), Ok(0));
    assert!(s.read_u8(BASE + 256 * PAGE).is_err(), "past the end");
    assert!(
        s.extract(BASE + 300 * PAGE).is_none(),
        "mapped past the end"
    );
    consistent(&vm, "t04 shrunk");
    vm.resize_object(&o, 2 * PAGES);
    for i in (0..2 * PAGES).step_by(7) {
        let va = BASE + i * PAGE;
        let want = if i == 0 { tag(va, 1) } else { 0 };
        assert_eq!(rdpage(&s, va), Ok(want), "t04 grown: page {i}");
    }
    consistent(&vm, "t04 grown");
    drop(s);
    drop(o);
    no_leak(&vm, "t04");
}

// ---------------------------------------------------------------------
// 3. Combinations.

fn fill<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, round: u64) {
    for i in 0..pages {
        let va = base + i * PAGE;
        wrpage(s, va, tag(va, round)).unwrap();
    }
}

fn check<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, want: impl Fn(u64) -> u64, what: &str) {
    for i in 0..pages {
        let va = base + i * PAGE;
        assert_eq!(rdpage(s, va), Ok(want(i)), "{what}: page {i} at {va:#x}");
    }
}

/// Fork of whole superpages (filled by one fault), both sides writing
/// interleaved pages, pageout and swap-in between, the child exiting,
/// the parent forking again; Always and Reserve + Huge; both pmaps.
fn fork_cow<P: Pmap>(vm: Arc<Vm<P>>, advise: bool, what: &str) {
    let (_swap, _t) = with_swap(&vm, 32);
    let p = vm.new_space().unwrap();
    p.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    if advise {
        p.advise_superpages(BASE, 2 * SUPER, SuperpageAdvice::Huge)
            .unwrap();
    }
    p.write_u8(BASE + 3 * PAGE, 1).unwrap();
    p.write_u8(BASE + SUPER + 500 * PAGE, 1).unwrap();
    fill(&p, BASE, 2 * PAGES, 1);
    let c = p.fork().unwrap();
    // Parent writes even pages, child odd pages.
    for i in 0..2 * PAGES {
        let va = BASE + i * PAGE;
        if i % 2 == 0 {
            wrpage(&p, va, tag(va, 2)).unwrap();
        } else {
            wrpage(&c, va, tag(va, 3)).unwrap();
        }
    }
    let pw = |i: u64| tag(BASE + i * PAGE, if i.is_multiple_of(2) { 2 } else { 1 });
    let cw = |i: u64| tag(BASE + i * PAGE, if i % 2 == 1 { 3 } else { 1 });
    check(&p, BASE, 2 * PAGES, pw, &format!("{what} parent"));
    check(&c, BASE, 2 * PAGES, cw, &format!("{what} child"));
    squeeze(&vm);
    check(
        &c,
        BASE,
        2 * PAGES,
        cw,
        &format!("{what} child after pageout"),
    );
    check(
        &p,
        BASE,
        2 * PAGES,
        pw,
        &format!("{what} parent after pageout"),
    );
    consistent(&vm, what);
    drop(c);
    // The parent alone again: write all (collapse), fork, unmap a middle
    // part in the child, write through both.
    fill(&p, BASE, 2 * PAGES, 4);
    let c2 = p.fork().unwrap();
    c2.unmap(BASE + 200 * PAGE, 400 * PAGE).unwrap();
    fill(&p, BASE + 100 * PAGE, 200, 5);
    check(
        &c2,
        BASE,
        200,
        |i| tag(BASE + i * PAGE, 4),
        &format!("{what} second child"),
    );
    assert!(c2.read_u8(BASE + 300 * PAGE).is_err());
    check(
        &p,
        BASE,
        2 * PAGES,
        |i| tag(BASE + i * PAGE, if (100..300).contains(&i) { 5 } else { 4 }),
        &format!("{what} parent at the end"),
    );
    consistent(&vm, what);
    drop(c2);
    drop(p);
    no_leak(&vm, what);
}

#[test]
fn t05_fork_cow_of_whole_superpages() {
    fork_cow(
        vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192),
        false,
        "x86 always",
    );
    fork_cow(
        vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 8192),
        true,
        "x86 advised",
    );
    fork_cow(
        vm_with(RefPmap::new(), SuperpagePolicy::Always, 8192),
        false,
        "ref always",
    );
    fork_cow(
        vm_with(X86Pmap::new_la57(), SuperpagePolicy::Always, 8192),
        false,
        "la57 always",
    );
}

/// munmap / mprotect / mlock of ranges crossing 2 MiB boundaries of whole
/// superpages, one after another, then writes everywhere and a pageout.
fn partial_ops<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (_swap, _t) = with_swap(&vm, 32);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    for k in 0..3 {
        s.write_u8(BASE + k * SUPER + 17 * PAGE, 9).unwrap();
    }
    fill(&s, BASE, 3 * PAGES, 1);
    // Across the first boundary.
    s.protect(BASE + 500 * PAGE, 30 * PAGE, Prot::READ).unwrap();
    assert!(s.write_u8(BASE + 511 * PAGE, 1).is_err());
    assert!(s.write_u8(BASE + 512 * PAGE, 1).is_err());
    s.wire(BASE + 1000 * PAGE, 40 * PAGE, true).unwrap();
    s.unmap(BASE + 1020 * PAGE, 8 * PAGE).unwrap();
    s.unmap(BASE + 1535 * PAGE, 2 * PAGE).unwrap();
    let gone = |i: u64| (1020..1028).contains(&i) || (1535..1537).contains(&i);
    for i in 0..3 * PAGES {
        let va = BASE + i * PAGE;
        if gone(i) {
            assert!(s.read_u8(va).is_err(), "{what}: unmapped page {i} reads");
        } else {
            assert_eq!(
                rdpage(&s, va),
                Ok(tag(va, 1)),
                "{what} after changes: page {i}"
            );
        }
    }
    squeeze(&vm);
    s.protect(BASE + 500 * PAGE, 30 * PAGE, Prot::RW).unwrap();
    s.unwire(BASE + 1000 * PAGE, 20 * PAGE, true).unwrap();
    s.map_anon(BASE + 1020 * PAGE, 8 * PAGE, Prot::RW).unwrap();
    s.map_anon(BASE + 1535 * PAGE, 2 * PAGE, Prot::RW).unwrap();
    fill(&s, BASE + 400 * PAGE, 800, 2);
    let want = |i: u64| {
        if (400..1200).contains(&i) {
            tag(BASE + i * PAGE, 2)
        } else if gone(i) {
            0
        } else {
            tag(BASE + i * PAGE, 1)
        }
    };
    check(&s, BASE, 3 * PAGES, want, &format!("{what} at the end"));
    squeeze(&vm);
    check(&s, BASE, 3 * PAGES, want, &format!("{what} after pageout"));
    consistent(&vm, what);
    drop(s);
    no_leak(&vm, what);
}

#[test]
fn t06_partial_munmap_mprotect_mlock_across_boundaries() {
    partial_ops(
        vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192),
        "x86 always",
    );
    partial_ops(
        vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 8192),
        "x86 reserve",
    );
    partial_ops(
        vm_with(RefPmap::new(), SuperpagePolicy::Always, 8192),
        "ref always",
    );
}

/// Holds (pins for I/O) across the boundary of two whole superpages:
/// written through the hold, kept through pageout, unmapped while held,
/// freed at the last release; a read hold in a forked child.
#[test]
fn t07_holds_across_whole_superpages() {
    for (vm, what) in [
        (
            vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096),
            "x86",
        ),
        (
            vm_with(X86Pmap::new_la57(), SuperpagePolicy::Always, 4096),
            "la57",
        ),
    ] {
        let (_swap, _t) = with_swap(&vm, 32);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        let held = s.hold(BASE + 510 * PAGE, 4 * PAGE, Prot::WRITE).unwrap();
        assert_eq!(
            (0..2 * PAGES)
                .filter(|i| s.extract(BASE + i * PAGE).is_some())
                .count() as u64,
            2 * PAGES,
            "{what}: a write hold fills both 2 MiB"
        );
        for k in 0..4u64 {
            let va = BASE + (510 + k) * PAGE;
            held.write((k * PAGE) as usize, &tag(va, 7).to_le_bytes())
                .unwrap();
            held.write(((k + 1) * PAGE - 8) as usize, &tag(va, 7).to_le_bytes())
                .unwrap();
        }
        fill(&s, BASE, 500, 1);
        let c = s.fork().unwrap();
        let rheld = c.hold(BASE + 100 * PAGE, 2 * PAGE, Prot::READ).unwrap();
        squeeze(&vm);
        let want = |i: u64| {
            let va = BASE + i * PAGE;
            if i < 500 {
                tag(va, 1)
            } else if (510..514).contains(&i) {
                tag(va, 7)
            } else {
                0
            }
        };
        check(&s, BASE, 2 * PAGES, want, &format!("{what} parent"));
        check(&c, BASE, 2 * PAGES, want, &format!("{what} child"));
        let mut b = [0u8; 8];
        rheld.read(0, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), tag(BASE + 100 * PAGE, 1));
        // Unmapped while held: the held frames stay until released.
        s.unmap(BASE, 2 * SUPER).unwrap();
        held.read(PAGE as usize, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), tag(BASE + 511 * PAGE, 7), "{what}");
        drop(held);
        drop(rheld);
        consistent(&vm, what);
        drop(c);
        drop(s);
        no_leak(&vm, what);
    }
}

/// A shared anonymous object mapped in two spaces at offsets whose 2 MiB
/// alignments differ (A at offset 0, B at offset 256 pages, both at
/// aligned addresses) and privately in a third; writes through A and B
/// under `Always` (each fills its own 2 MiB, overlapping the other's)
/// must be seen by both, the private one sees the object until it writes.
#[test]
fn t08_shared_object_at_offsets_in_three_spaces() {
    fn run<P: Pmap>(vm: Arc<Vm<P>>, seed: u64, what: &str) {
        let (_swap, _t) = with_swap(&vm, 32);
        let size = 3 * PAGES;
        let o = vm.new_anon_object(size);
        let a = vm.new_space().unwrap();
        let b = vm.new_space().unwrap();
        let c = vm.new_space().unwrap();
        a.map(MapRequest::object(BASE, 3 * SUPER, o.clone(), 0, Prot::RW))
            .unwrap();
        b.map(MapRequest::object(
            BASE,
            2 * SUPER,
            o.clone(),
            256 * PAGE,
            Prot::RW,
        ))
        .unwrap();
        c.map(MapRequest::object(BASE + SUPER, SUPER, o.clone(), 0, Prot::RW).private())
            .unwrap();
        // Expected bytes by object page index, and C's own pages.
        let mut obj: HashMap<u64, u64> = HashMap::new();
        let mut mine: HashMap<u64, u64> = HashMap::new();
        let mut rng = Rng(seed);
        for step in 1..400u64 {
            let p = rng.below(size);
            match rng.below(10) {
                0..=3 => {
                    let va = BASE + p * PAGE;
                    wrpage(&a, va, tag(p, step)).unwrap();
                    obj.insert(p, tag(p, step));
                }
                4..=6 if (256..256 + 2 * PAGES).contains(&p) => {
                    let va = BASE + (p - 256) * PAGE;
                    wrpage(&b, va, tag(p, step)).unwrap();
                    obj.insert(p, tag(p, step));
                }
                7 if p < PAGES => {
                    let va = BASE + SUPER + p * PAGE;
                    wrpage(&c, va, tag(p, step) ^ 0xc0).unwrap();
                    mine.insert(p, tag(p, step) ^ 0xc0);
                }
                8 if step % 50 == 0 => squeeze(&vm),
                9 if step % 30 == 0 => {
                    a.msync(BASE, 3 * SUPER).unwrap();
                }
                _ => {
                    // Reads through all three.
                    let want = obj.get(&p).copied().unwrap_or(0);
                    assert_eq!(
                        rdpage(&a, BASE + p * PAGE),
                        Ok(want),
                        "{what} step {step}: A {p}"
                    );
                    if (256..256 + 2 * PAGES).contains(&p) {
                        assert_eq!(
                            rdpage(&b, BASE + (p - 256) * PAGE),
                            Ok(want),
                            "{what} step {step}: B {p}"
                        );
                    }
                    if p < PAGES {
                        let w = mine.get(&p).copied().unwrap_or(want);
                        assert_eq!(
                            rdpage(&c, BASE + SUPER + p * PAGE),
                            Ok(w),
                            "{what} step {step}: C {p}"
                        );
                    }
                }
            }
        }
        for p in 0..size {
            let want = obj.get(&p).copied().unwrap_or(0);
            assert_eq!(rdpage(&a, BASE + p * PAGE), Ok(want), "{what} end: A {p}");
            if (256..256 + 2 * PAGES).contains(&p) {
                assert_eq!(
                    rdpage(&b, BASE + (p - 256) * PAGE),
                    Ok(want),
                    "{what} end: B {p}"
                );
            }
            if p < PAGES {
                let w = mine.get(&p).copied().unwrap_or(want);
                assert_eq!(
                    rdpage(&c, BASE + SUPER + p * PAGE),
                    Ok(w),
                    "{what} end: C {p}"
                );
            }
        }
        consistent(&vm, what);
        drop((a, b, c));
        vm.terminate_object(&o);
        drop(o);
        consistent(&vm, what);
        no_leak(&vm, what);
    }
    for seed in 1..=3 {
        run(
            vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192),
            seed * 97,
            "x86",
        );
        run(
            vm_with(RefPmap::new(), SuperpagePolicy::Always, 8192),
            seed * 97,
            "ref",
        );
    }
}

/// Stacks that grow by 4 MiB at a time (each grown part its own entry,
/// covering whole aligned 2 MiBs) filled top-down under `Always`, forked,
/// paged out.
#[test]
fn t09_growing_stack_with_whole_superpages() {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: SuperpagePolicy::Always,
            stack_growth: 4 << 20,
            ..config(8192)
        },
    )
    .unwrap();
    let (_swap, _t) = with_swap(&vm, 32);
    let s = vm.new_space().unwrap();
    let top = BASE + 16 * SUPER;
    s.map_stack(top, 16 * PAGE, 12 << 20).unwrap();
    let n = (10 << 20) / PAGE;
    for i in 1..=n {
        let va = top - i * PAGE;
        wrpage(&s, va, tag(va, 1)).unwrap();
    }
    let (promoted, _, _) = vm.pmap().superpage_stats().get();
    eprintln!(
        "t09: {promoted} superpages in the stack; entries {}",
        s.entries().len()
    );
    let c = s.fork().unwrap();
    for i in (1..=n).step_by(3) {
        let va = top - i * PAGE;
        wrpage(&c, va, tag(va, 2)).unwrap();
    }
    squeeze(&vm);
    for i in 1..=n {
        let va = top - i * PAGE;
        assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "parent stack page {i}");
        let cw = if (i - 1) % 3 == 0 { 2 } else { 1 };
        assert_eq!(rdpage(&c, va), Ok(tag(va, cw)), "child stack page {i}");
    }
    consistent(&vm, "t09");
    drop(c);
    drop(s);
    no_leak(&vm, "t09");
}

/// An object mapped at an offset whose 2 MiB alignment differs from the
/// address's, and an anonymous mapping that starts off a boundary but
/// holds a whole aligned 2 MiB: reservations line up with the address,
/// the aligned part promotes, the rest does not; bytes all right.
#[test]
fn t10_offsets_and_unaligned_mappings() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 8192);
    let o = vm.new_anon_object(3 * PAGES);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(
        BASE,
        2 * SUPER,
        o.clone(),
        300 * PAGE,
        Prot::RW,
    ))
    .unwrap();
    fill(&s, BASE, 2 * PAGES, 1);
    assert!(
        is_super(&vm, &s, BASE),
        "object at an odd offset: no superpage"
    );
    assert!(is_super(&vm, &s, BASE + SUPER));
    // The same pages seen at offset 0 of another mapping.
    let t = vm.new_space().unwrap();
    t.map(MapRequest::object(BASE, 3 * SUPER, o.clone(), 0, Prot::RW))
        .unwrap();
    check(
        &t,
        BASE,
        3 * PAGES,
        |p| {
            if (300..300 + 2 * PAGES).contains(&p) {
                tag(BASE + (p - 300) * PAGE, 1)
            } else {
                0
            }
        },
        "second view",
    );
    // Unaligned anonymous mapping holding one aligned 2 MiB (Always).
    let vm2 = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192);
    let u = vm2.new_space().unwrap();
    let start = BASE + 100 * PAGE;
    u.map_anon(start, 2 * SUPER, Prot::RW).unwrap();
    u.write_u8(start, 1).unwrap();
    assert!(u.extract(start + PAGE).is_none(), "unaligned head filled");
    u.write_u8(BASE + SUPER + 7 * PAGE, 1).unwrap();
    assert!(is_super(&vm2, &u, BASE + SUPER), "aligned middle not whole");
    fill(&u, start, 2 * PAGES, 3);
    check(
        &u,
        start,
        2 * PAGES,
        |i| tag(start + i * PAGE, 3),
        "unaligned",
    );
    consistent(&vm, "t10");
    consistent(&vm2, "t10 unaligned");
    drop((s, t, o, u));
    no_leak(&vm, "t10");
    no_leak(&vm2, "t10 unaligned");
}

// ---------------------------------------------------------------------
// 4. Threads.

/// Threads fault the same and neighbouring fresh 2 MiBs under `Always`
/// while one unmaps and maps its own 2 MiB again, one forks and writes
/// through the child, one pages out. Every writer's bytes survive; the
/// child sees only values some writer wrote (or zeros).
fn threads_mix<P: Pmap>(vm: Arc<Vm<P>>, seed: u64, what: &str) {
    let (_swap, _t) = with_swap(&vm, 64);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 3 * SUPER, Prot::RW).unwrap();
    let own = BASE + 4 * SUPER;
    s.map_anon(own, SUPER, Prot::RW).unwrap();
    let stop = AtomicBool::new(false);
    let (written, child, own_last) = std::thread::scope(|sc| {
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let s = &s;
                sc.spawn(move || {
                    let mut rng = Rng(seed * 7 + t + 1);
                    let mut mine = Vec::new();
                    for _ in 0..300 {
                        let i = rng.below(3 * PAGES / 3) * 3 + t;
                        let va = BASE + i * PAGE;
                        wrpage(s, va, tag(va, 1)).unwrap();
                        mine.push(i);
                    }
                    mine
                })
            })
            .collect();
        let remapper = sc.spawn(|| {
            let mut last = HashMap::new();
            let mut rng = Rng(seed + 99);
            for round in 0..12u64 {
                s.unmap(own, SUPER).unwrap();
                s.map_anon(own, SUPER, Prot::RW).unwrap();
                last.clear();
                for _ in 0..40 {
                    let i = rng.below(PAGES);
                    let va = own + i * PAGE;
                    wrpage(&s, va, tag(va, round)).unwrap();
                    last.insert(i, round);
                }
            }
            last
        });
        let forker = sc.spawn(|| {
            let mut child = None;
            let mut rng = Rng(seed + 5);
            while !stop.load(Ordering::Relaxed) {
                match rng.below(3) {
                    0 => squeeze(&vm),
                    1 => child = Some(s.fork().unwrap()),
                    _ => {
                        if let Some(c) = &child {
                            let va = BASE + rng.below(3 * PAGES) * PAGE;
                            wrpage(c, va, tag(va, 9)).unwrap();
                        }
                    }
                }
            }
            child
        });
        let written: HashSet<u64> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let own_last = remapper.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (written, forker.join().unwrap(), own_last)
    });
    for i in 0..3 * PAGES {
        let va = BASE + i * PAGE;
        let want = if written.contains(&i) { tag(va, 1) } else { 0 };
        assert_eq!(
            rdpage(&s, va),
            Ok(want),
            "{what} seed {seed}: parent page {i}"
        );
        if let Some(c) = &child {
            // The fork may have fallen between a writer's two stores.
            let got = rdpage_forked_mid_write(c, va, 0, tag(va, 1)).unwrap();
            assert!(
                got == 0 || got == tag(va, 1) || got == tag(va, 9),
                "{what} seed {seed}: child page {i}: {got:#x}"
            );
        }
    }
    for i in 0..PAGES {
        let va = own + i * PAGE;
        let want = own_last.get(&i).map_or(0, |&r| tag(va, r));
        assert_eq!(
            rdpage(&s, va),
            Ok(want),
            "{what} seed {seed}: remapped page {i}"
        );
    }
    consistent(&vm, what);
    drop(child);
    drop(s);
    no_leak(&vm, what);
}

#[test]
fn t12_threads_fault_neighbours_beside_unmap_fork_pageout() {
    for seed in 1..=3 {
        threads_mix(
            vm_with(X86Pmap::new(), SuperpagePolicy::Always, 8192),
            seed,
            "x86",
        );
        threads_mix(
            vm_with(RefPmap::new(), SuperpagePolicy::Always, 8192),
            seed,
            "ref",
        );
        threads_mix(
            vm_with(X86Pmap::new_la57(), SuperpagePolicy::Reserve, 8192),
            seed,
            "la57",
        );
    }
}

// ---------------------------------------------------------------------
// 5. Memory pressure.

/// Machines barely larger than one run: whole-superpage faults must fall
/// back to single pages, pageout must make room, nothing is lost or leaks.
#[test]
fn t13_barely_more_than_one_run() {
    for pages in [520u64, 600, 700, 1100] {
        for pmap_la57 in [false, true] {
            let pmap = if pmap_la57 {
                X86Pmap::new_la57()
            } else {
                X86Pmap::new()
            };
            let vm = vm_with(pmap, SuperpagePolicy::Always, pages);
            let (_swap, _t) = with_swap(&vm, 16);
            let what = format!("{pages} pages la57={pmap_la57}");
            let a = vm.new_space().unwrap();
            let b = vm.new_space().unwrap();
            a.map_anon(BASE, SUPER, Prot::RW).unwrap();
            b.map_anon(BASE, SUPER, Prot::RW).unwrap();
            a.write_u8(BASE + 3 * PAGE, 1).unwrap();
            let a_resident = (0..PAGES)
                .filter(|i| a.extract(BASE + i * PAGE).is_some())
                .count();
            // B writes every page: A's pages must go to swap.
            fill(&b, BASE, PAGES, 2);
            fill(&a, BASE, PAGES / 2, 1);
            check(&b, BASE, PAGES, |i| tag(BASE + i * PAGE, 2), &what);
            check(
                &a,
                BASE,
                PAGES,
                |i| {
                    if i < PAGES / 2 {
                        tag(BASE + i * PAGE, 1)
                    } else {
                        0
                    }
                },
                &what,
            );
            eprintln!("t13 {what}: first fault made {a_resident} pages resident");
            consistent(&vm, &what);
            drop((a, b));
            no_leak(&vm, &what);
        }
    }
}

/// A balloon that breaks every run (it takes frames of every run), then
/// deflates: faults fall back while it is up, fill whole once it is
/// down; `severe` thresholds that leave room for one whole fill only.
#[test]
fn t14_balloon_and_severe_thresholds() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let (_swap, _t) = with_swap(&vm, 32);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
    let balloon = vm.inflate_balloon(300);
    s.write_u8(BASE, 1).unwrap();
    let under_balloon = resident(&s, BASE);
    drop(balloon);
    s.write_u8(BASE + SUPER, 1).unwrap();
    let after = resident(&s, BASE + SUPER);
    fill(&s, BASE, 2 * PAGES, 1);
    let (promoted, _, _) = vm.pmap().superpage_stats().get();
    eprintln!(
        "t14: resident after one write under the balloon {under_balloon}, after it {after}; \
         promotions after filling both: {promoted}"
    );
    assert_eq!(
        after as u64, PAGES,
        "no whole fill once the balloon is gone"
    );
    check(
        &s,
        BASE,
        2 * PAGES,
        |i| tag(BASE + i * PAGE, 1),
        "t14 balloon",
    );
    consistent(&vm, "t14 balloon");
    drop(s);
    no_leak(&vm, "t14 balloon");
    lists_whole(&vm, "t14 balloon");

    // Severe thresholds: room for one whole fill, then single pages, and
    // faults below `severe` wait for pageout.
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: SuperpagePolicy::Always,
            thresholds: Some(vm_core::page_queues::Thresholds {
                reserved: 16,
                severe: 500,
                target: 700,
            }),
            ..config(1600)
        },
    )
    .unwrap();
    let (_swap, _t) = with_swap(&vm, 32);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
    let mut res = Vec::new();
    for k in 0..4 {
        s.write_u8(BASE + k * SUPER + 9 * PAGE, 1).unwrap();
        res.push(resident(&s, BASE + k * SUPER));
    }
    eprintln!("t14 severe: resident after one write per 2 MiB: {res:?}");
    fill(&s, BASE, 4 * PAGES, 2);
    check(
        &s,
        BASE,
        4 * PAGES,
        |i| tag(BASE + i * PAGE, 2),
        "t14 severe",
    );
    consistent(&vm, "t14 severe");
    drop(s);
    no_leak(&vm, "t14 severe");
    lists_whole(&vm, "t14 severe");
}

// ---------------------------------------------------------------------
// 6. The allocator: alloc_at against everything else.

/// Spaces write their own tags into pages of 2 MiBs (Reserve: every page
/// takes its frame by id), unmap and map again (runs whole again, claimed
/// again), beside `zero_free_pages` (takes and gives back free frames),
/// pageout and swap-in; a frame handed out twice would show one space's
/// tag in another. At the end the free lists give every frame once and
/// every whole run is claimed and filled in order again.
#[test]
fn t15_alloc_at_races_allocation_zeroing_and_pageout() {
    for policy in [SuperpagePolicy::Reserve, SuperpagePolicy::Always] {
        let vm = vm_with(X86Pmap::new(), policy, 6144);
        let (_swap, _t) = with_swap(&vm, 64);
        let spaces: Vec<VmSpace<X86Pmap>> = (0..3).map(|_| vm.new_space().unwrap()).collect();
        for s in &spaces {
            s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        }
        let stop = AtomicBool::new(false);
        let zeroed = AtomicU64::new(0);
        let models: Vec<HashMap<u64, u64>> = std::thread::scope(|sc| {
            let workers: Vec<_> = spaces
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    sc.spawn(move || {
                        let mut rng = Rng(k as u64 * 1_000_003 + 17);
                        let mut m: HashMap<u64, u64> = HashMap::new();
                        for step in 0..1500u64 {
                            let i = rng.below(2 * PAGES);
                            let va = BASE + i * PAGE;
                            if step % 400 == 399 {
                                let half = BASE + rng.below(2) * SUPER;
                                s.unmap(half, SUPER).unwrap();
                                s.map_anon(half, SUPER, Prot::RW).unwrap();
                                m.retain(|&p, _| {
                                    !(half..half + SUPER).contains(&(BASE + p * PAGE))
                                });
                                continue;
                            }
                            // The tag names the space.
                            let v = tag(va, step) ^ ((k as u64 + 1) << 60);
                            wrpage(s, va, v).unwrap();
                            m.insert(i, v);
                            if step % 97 == 0 {
                                for (&p, &want) in m.iter().take(64) {
                                    let got = rdpage(s, BASE + p * PAGE).unwrap();
                                    assert_eq!(got, want, "space {k} page {p} at step {step}");
                                }
                            }
                        }
                        m
                    })
                })
                .collect();
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    zeroed.fetch_add(vm.zero_free_pages(256), Ordering::Relaxed);
                }
            });
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    vm.pageout(vm.total_pages());
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let m = workers.into_iter().map(|w| w.join().unwrap()).collect();
            stop.store(true, Ordering::Relaxed);
            m
        });
        for (k, (s, m)) in spaces.iter().zip(&models).enumerate() {
            for i in 0..2 * PAGES {
                let want = m.get(&i).copied().unwrap_or(0);
                assert_eq!(
                    rdpage(s, BASE + i * PAGE),
                    Ok(want),
                    "{policy:?}: space {k} page {i}"
                );
            }
        }
        eprintln!(
            "t15 {policy:?}: {} pages zeroed meanwhile",
            zeroed.load(Ordering::Relaxed)
        );
        consistent(&vm, "t15");
        drop(spaces);
        no_leak(&vm, "t15");
        lists_whole(&vm, "t15");
        // Every whole run can be claimed and filled in order again.
        let runs_before = vm.pmap().superpage_stats().get().0;
        let s = vm.new_space().unwrap();
        let n = vm.total_pages() / PAGES - 1;
        s.map_anon(BASE, n * SUPER, Prot::RW).unwrap();
        for k in 0..n {
            fill(&s, BASE + k * SUPER, PAGES, 3);
        }
        let made = vm.pmap().superpage_stats().get().0 - runs_before;
        eprintln!("t15 {policy:?}: {made} of {n} 2 MiBs promoted after the storm (see t19)");
        drop(s);
        no_leak(&vm, "t15 refill");
    }
}

/// Quality, not correctness: after idle-time zeroing (`zero_free_pages`)
/// puts frames of every run at the heads of the zeroed lists, the
/// allocations that prefer zeroed frames (page tables, zero-fills that
/// find their reserved frame gone) take frames of runs that reservations
/// just claimed, and most 2 MiBs of a plain fill no longer promote.
///
/// Measured, not guaranteed: allocations of any frame step over frames of
/// claimed runs, and a claim takes the run that last became whole first,
/// which took the yield from 4-6 of 11 to 9 of 11 here; keeping every
/// whole run whole needs an allocator that orders frames by run (a buddy
/// allocator), which this one is not. Run it with `--ignored` to see the
/// figure.
#[test]
#[ignore = "a quality measurement: see the doc comment"]
fn t19_superpage_yield_after_idle_zeroing() {
    let mut made = Vec::new();
    for zeroed in [0u64, 3000] {
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Reserve, 6144);
        // Every frame written once, freed (plain), then some zeroed.
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 11 * SUPER, Prot::RW).unwrap();
        for i in 0..11 * PAGES {
            s.write_u8(BASE + i * PAGE, 1).unwrap();
        }
        drop(s);
        vm.zero_free_pages(zeroed);
        let before = vm.pmap().superpage_stats().get().0;
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 11 * SUPER, Prot::RW).unwrap();
        fill(&s, BASE, 11 * PAGES, 3);
        check(&s, BASE, 11 * PAGES, |i| tag(BASE + i * PAGE, 3), "t19");
        made.push(vm.pmap().superpage_stats().get().0 - before);
        drop(s);
        no_leak(&vm, "t19");
    }
    eprintln!("t19: 2 MiBs promoted out of 11 without / with idle zeroing: {made:?}");
    assert!(
        made[1] + 2 >= made[0],
        "superpage yield collapses after zero_free_pages: {} of 11 promoted vs {} without",
        made[1],
        made[0]
    );
}

// ---------------------------------------------------------------------
// 7. A reference model.

#[derive(Clone, Default)]
struct Model {
    tags: HashMap<u64, u64>,
    read_only: HashSet<u64>,
}

fn model_run<P: Pmap>(vm: Arc<Vm<P>>, seed: u64, what: &str) {
    const SLOTS: [u64; 3] = [BASE, BASE + 2 * SUPER, BASE + 3 * SUPER];
    let (_swap, _t) = with_swap(&vm, 64);
    let mut rng = Rng(seed);
    let mut spaces = vec![vm.new_space().unwrap()];
    let mut models = vec![Model::default()];
    for &b in &SLOTS {
        spaces[0].map_anon(b, SUPER, Prot::RW).unwrap();
        if rng.pct(70) {
            let a = b + 7 * PAGE;
            wrpage(&spaces[0], a, tag(a, 0)).unwrap();
            models[0].tags.insert(a, 0);
        }
    }
    for step in 1..100u64 {
        let s = rng.below(spaces.len() as u64) as usize;
        let slot = SLOTS[rng.below(SLOTS.len() as u64) as usize];
        let k = rng.below(PAGES);
        let short = rng.pct(50);
        let n = 1 + rng.below(if short { 8 } else { PAGES - k });
        let n = n.min(PAGES - k);
        let va = slot + k * PAGE;
        let w = format!("{what} seed {seed} step {step}");
        let sp = &spaces[s];
        let m = &mut models[s];
        let op = rng.below(16);
        match op {
            0..=2 | 4 => {
                let (from, cnt) = if op == 4 { (va, n) } else { (slot, PAGES) };
                for i in 0..cnt {
                    let a = from + i * PAGE;
                    let ok = wrpage(sp, a, tag(a, step)).is_ok();
                    assert_eq!(ok, !m.read_only.contains(&a), "{w}: write {a:#x}");
                    if ok {
                        m.tags.insert(a, step);
                    }
                }
            }
            3 => {
                let ok = wrpage(sp, va, tag(va, step)).is_ok();
                assert_eq!(ok, !m.read_only.contains(&va), "{w}: write {va:#x}");
                if ok {
                    m.tags.insert(va, step);
                }
            }
            5 => {
                for i in 0..n {
                    let a = va + i * PAGE;
                    let want = m.tags.get(&a).map_or(0, |&r| tag(a, r));
                    assert_eq!(rdpage(sp, a), Ok(want), "{w}: read {a:#x}");
                }
            }
            6 => {
                sp.unmap(va, n * PAGE).unwrap();
                sp.map_anon(va, n * PAGE, Prot::RW).unwrap();
                for i in 0..n {
                    m.tags.remove(&(va + i * PAGE));
                    m.read_only.remove(&(va + i * PAGE));
                }
            }
            7 => {
                let ro = rng.pct(50);
                sp.protect(va, n * PAGE, if ro { Prot::READ } else { Prot::RW })
                    .unwrap();
                for i in 0..n {
                    if ro {
                        m.read_only.insert(va + i * PAGE);
                    } else {
                        m.read_only.remove(&(va + i * PAGE));
                    }
                }
            }
            8 => {
                sp.wire(va, n * PAGE, true).unwrap();
                if rng.pct(70) {
                    sp.unwire(va, n * PAGE, true).unwrap();
                }
            }
            9 if spaces.len() < 3 => {
                let c = sp.fork().unwrap();
                let cm = m.clone();
                spaces.push(c);
                models.push(cm);
            }
            9 if s > 0 => {
                spaces.swap_remove(s);
                models.swap_remove(s);
            }
            10 => squeeze(&vm),
            11 => {
                let a = match rng.below(3) {
                    0 => SuperpageAdvice::Huge,
                    1 => SuperpageAdvice::NoHuge,
                    _ => SuperpageAdvice::Default,
                };
                sp.advise_superpages(slot, SUPER, a).unwrap();
            }
            12 => {
                let any_ro = (0..n).any(|i| m.read_only.contains(&(va + i * PAGE)));
                match sp.hold(va, n * PAGE, Prot::WRITE) {
                    Ok(h) => {
                        assert!(!any_ro, "{w}: write hold of a read-only page");
                        for i in 0..n {
                            let a = va + i * PAGE;
                            let v = tag(a, step).to_le_bytes();
                            h.write((i * PAGE) as usize, &v).unwrap();
                            h.write(((i + 1) * PAGE - 8) as usize, &v).unwrap();
                            m.tags.insert(a, step);
                        }
                    }
                    Err(e) => assert!(any_ro, "{w}: write hold failed: {e}"),
                }
            }
            13 => {
                let v = tag(va, step).to_le_bytes();
                sp.write_forced(va, &v).unwrap();
                sp.write_forced(va + PAGE - 8, &v).unwrap();
                m.tags.insert(va, step);
            }
            _ => {
                // A read fault first (claims a reservation without filling),
                // then writes of a few pages.
                let _ = sp.read_u8(va).unwrap();
                for i in 0..n.min(4) {
                    let a = va + i * PAGE;
                    let ok = wrpage(sp, a, tag(a, step)).is_ok();
                    assert_eq!(ok, !m.read_only.contains(&a), "{w}: write {a:#x}");
                    if ok {
                        m.tags.insert(a, step);
                    }
                }
            }
        }
        let full = step % 25 == 24;
        for (sp, m) in spaces.iter().zip(&models) {
            for &b in &SLOTS {
                let stride = if full { 1 } else { 13 };
                for i in (step % stride..PAGES).step_by(stride as usize) {
                    let a = b + i * PAGE;
                    let want = m.tags.get(&a).map_or(0, |&r| tag(a, r));
                    assert_eq!(rdpage(sp, a), Ok(want), "{w} (op {op}): {a:#x}");
                }
            }
        }
        if step % 5 == 0 {
            consistent(&vm, &w);
        }
    }
    consistent(&vm, what);
    drop(spaces);
    no_leak(&vm, &format!("{what} seed {seed}"));
}

#[test]
fn t16_model_fuzz_three_policies_both_pmaps() {
    let policies = [
        SuperpagePolicy::Always,
        SuperpagePolicy::Reserve,
        SuperpagePolicy::Never,
    ];
    let mut made = (0, 0);
    for seed in 1..=3u64 {
        for policy in policies {
            let what = format!("{policy:?}");
            let vm = vm_with(X86Pmap::new(), policy, 4096);
            model_run(vm.clone(), seed * 7919 + 3, &format!("x86 {what}"));
            let (p, d, _) = vm.pmap().superpage_stats().get();
            made = (made.0 + p, made.1 + d);
            model_run(
                vm_with(RefPmap::new(), policy, 4096),
                seed * 7919 + 3,
                &format!("ref {what}"),
            );
        }
        let vm = vm_with(X86Pmap::new_la57(), SuperpagePolicy::Always, 4096);
        model_run(vm, seed * 31 + 1, "la57 Always");
    }
    eprintln!("t16: superpages made and split on x86: {made:?}");
}

// ---------------------------------------------------------------------
// 8. Odd corners.

/// A debugger's forced write into a read-only private anonymous mapping
/// under `Always`: the fault is a write (it copies), so it fills the 2 MiB
/// — every page must stay read-only to the program and read zeros.
#[test]
fn t17_forced_write_into_read_only_memory() {
    let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 4096);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::READ).unwrap();
    s.write_forced(BASE + 5 * PAGE, b"poke").unwrap();
    eprintln!(
        "t17: resident after the forced write: {}",
        resident(&s, BASE)
    );
    for i in [0u64, 4, 6, 300, 511] {
        assert!(
            s.write_u8(BASE + i * PAGE, 1).is_err(),
            "page {i} writable through a read-only mapping"
        );
        assert_eq!(s.read_u8(BASE + i * PAGE), Ok(0));
    }
    let mut b = [0u8; 4];
    s.read(BASE + 5 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"poke");
    consistent(&vm, "t17");
    drop(s);
    no_leak(&vm, "t17");
}

/// Counters: a whole-superpage fault is one fault and 512 zero-fills;
/// the same under `Never` is 512 faults.
#[test]
fn t18_counters_of_a_whole_superpage_fault() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Never] {
        let vm = vm_with(X86Pmap::new(), policy, 4096);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        let c0 = vm.counters().snapshot();
        fill(&s, BASE, PAGES, 1);
        let c1 = vm.counters().snapshot();
        let (faults, zfod) = (c1.v_vm_faults - c0.v_vm_faults, c1.v_zfod - c0.v_zfod);
        eprintln!("t18 {policy:?}: {faults} faults, {zfod} zero-fills");
        assert_eq!(zfod, PAGES, "{policy:?}: zero-fills");
        if policy == SuperpagePolicy::Always {
            assert_eq!(faults, 1, "one fault");
        }
        let (minflt, _) = s.rusage();
        assert_eq!(minflt, faults, "{policy:?}: rusage minor faults");
        drop(s);
        no_leak(&vm, "t18");
    }
}

/// The race of t01 with no gate: pages 0..256 of a 2 MiB hold data, are
/// old (inactive), not yet on swap, and the object has no reservation for
/// the 2 MiB (`prepare` makes them so). A write to page 400 under `Always`
/// fills the 2 MiB while one pass of the pageout daemon writes old pages
/// out. Returns (rounds, rounds that filled, rounds that lost data, first
/// loss).
fn old_pages_race(
    secs: u64,
    prepare: fn(&VmSpace<X86Pmap>) -> Option<VmSpace<X86Pmap>>,
) -> (u64, u64, u64, Option<(u64, u64)>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut rounds, mut lost_rounds, mut filled) = (0u64, 0u64, 0u64);
    let mut first_loss = None;
    while Instant::now() < deadline && lost_rounds < 20 {
        rounds += 1;
        let vm = vm_with(X86Pmap::new(), SuperpagePolicy::Always, 2048);
        let s = vm.new_space().unwrap();
        // Frames not known to be zero: the fill has to zero them.
        s.map_anon(BASE + 8 * SUPER, 3 * SUPER, Prot::RW).unwrap();
        for i in 0..3 * PAGES {
            s.write_u8(BASE + 8 * SUPER + i * PAGE, 0xee).unwrap();
        }
        s.unmap(BASE + 8 * SUPER, 3 * SUPER).unwrap();
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        let keep = prepare(&s);
        // Old: inactive and unreferenced (no swap yet, so none goes).
        squeeze(&vm);
        let (_swap, _t) = with_swap(&vm, 16);
        let zfod = vm.counters().snapshot().v_zfod;
        let go = AtomicBool::new(false);
        let step = if cfg!(debug_assertions) { 100 } else { 10 };
        let delay = Duration::from_micros(rounds % 8 * step);
        std::thread::scope(|sc| {
            let a = sc.spawn(|| {
                go.store(true, Ordering::Release);
                wrpage(&s, BASE + 400 * PAGE, tag(BASE + 400 * PAGE, 2))
            });
            while !go.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let t0 = Instant::now();
            while t0.elapsed() < delay {
                std::hint::spin_loop();
            }
            vm.pageout(vm.total_pages());
            a.join().unwrap().unwrap();
        });
        if vm.counters().snapshot().v_zfod - zfod > 1 {
            filled += 1;
        }
        let mut lost = 0;
        for i in 0..256 {
            let va = BASE + i * PAGE;
            if rdpage(&s, va) != Ok(tag(va, 1)) {
                lost += 1;
            }
        }
        assert_eq!(rdpage(&s, BASE + 400 * PAGE), Ok(tag(BASE + 400 * PAGE, 2)));
        if lost > 0 {
            lost_rounds += 1;
            first_loss.get_or_insert((rounds, lost));
        }
        drop(keep);
        drop(s);
    }
    (rounds, filled, lost_rounds, first_loss)
}

/// t01 without a gate, the pages made under `NoHuge` advice (then the
/// advice taken back): no reservation was claimed for them.
#[test]
fn t20_whole_superpage_fault_vs_pageout_of_old_pages_no_gate() {
    let (rounds, filled, lost, first) =
        old_pages_race(if cfg!(debug_assertions) { 6 } else { 3 }, |s| {
            s.advise_superpages(BASE, SUPER, SuperpageAdvice::NoHuge)
                .unwrap();
            fill(s, BASE, 256, 1);
            s.advise_superpages(BASE, SUPER, SuperpageAdvice::Default)
                .unwrap();
            None
        });
    eprintln!(
        "t20: {rounds} rounds, {filled} filled the 2 MiB at the write, {lost} lost pages (first: {first:?})"
    );
    assert_eq!(
        lost, 0,
        "old pages written out during a whole-superpage fault read back as zeros \
         in {lost} of {rounds} rounds (first: round, pages lost = {first:?})"
    );
}

/// The same with nothing but ordinary calls: a read (claims the
/// reservation, fills nothing), writes, a fork whose child exits, a
/// copy-on-write that collapses the chain — the shadow object now holds
/// the pages and no reservation — then the fill and a pageout pass.
#[test]
fn t21_fork_exit_collapse_then_whole_superpage_fault_vs_pageout() {
    let (rounds, filled, lost, first) =
        old_pages_race(if cfg!(debug_assertions) { 6 } else { 3 }, |s| {
            assert_eq!(s.read_u8(BASE + 256 * PAGE), Ok(0));
            fill(s, BASE, 256, 1);
            drop(s.fork().unwrap());
            // Copy-on-write of page 0 (the child is gone: moved up, chain
            // collapsed).
            wrpage(s, BASE, tag(BASE, 1)).unwrap();
            None
        });
    eprintln!(
        "t21: {rounds} rounds, {filled} filled the 2 MiB at the write, {lost} lost pages (first: {first:?})"
    );
    assert_eq!(
        lost, 0,
        "old pages written out during a whole-superpage fault read back as zeros \
         in {lost} of {rounds} rounds (first: round, pages lost = {first:?})"
    );
}

/// Threads fill whole superpages in their own spaces on a machine with
/// room for about two at once (`reserved` / `severe` set): populate races
/// populate, faults wait for pageout and swap; nothing fails, nothing is
/// lost, nothing leaks.
#[test]
fn t22_concurrent_whole_fills_under_pressure() {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: SuperpagePolicy::Always,
            thresholds: Some(vm_core::page_queues::Thresholds {
                reserved: 16,
                severe: 48,
                target: 160,
            }),
            ..config(1300)
        },
    )
    .unwrap();
    let (_swap, _t) = with_swap(&vm, 64);
    let spaces: Vec<VmSpace<X86Pmap>> = (0..3).map(|_| vm.new_space().unwrap()).collect();
    for s in &spaces {
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    }
    std::thread::scope(|sc| {
        for (k, s) in spaces.iter().enumerate() {
            sc.spawn(move || {
                for half in [0, 1] {
                    let b = BASE + half * SUPER;
                    for i in 0..PAGES {
                        let va = b + i * PAGE;
                        wrpage(s, va, tag(va, k as u64 + 1))
                            .unwrap_or_else(|e| panic!("space {k} page {i}: {e}"));
                    }
                }
            });
        }
    });
    for (k, s) in spaces.iter().enumerate() {
        check(
            s,
            BASE,
            2 * PAGES,
            |i| tag(BASE + i * PAGE, k as u64 + 1),
            &format!("t22 space {k}"),
        );
    }
    consistent(&vm, "t22");
    drop(spaces);
    no_leak(&vm, "t22");
    lists_whole(&vm, "t22");
}

/// Frames the pool says are zero must be zero: after superpages are made
/// and taken apart every way (unmap whole, unmap part, mprotect, fork and
/// exit, pageout, space destroyed), a fault that takes pre-zeroed frames
/// (and skips zeroing them) reads nothing but zeros — no page-table entry
/// of a freed superpage table, no other space's bytes.
#[test]
fn t23_frames_from_the_zeroed_pool_are_zero() {
    for la57 in [false, true] {
        let pmap = if la57 {
            X86Pmap::new_la57()
        } else {
            X86Pmap::new()
        };
        let vm = vm_with(pmap, SuperpagePolicy::Always, 8192);
        let (_swap, _t) = with_swap(&vm, 32);
        for round in 0..3u64 {
            let s = vm.new_space().unwrap();
            s.map_anon(BASE, 6 * SUPER, Prot::RW).unwrap();
            fill(&s, BASE, 6 * PAGES, round + 1);
            let c = s.fork().unwrap();
            s.unmap(BASE, SUPER).unwrap();
            s.unmap(BASE + SUPER + 100 * PAGE, 50 * PAGE).unwrap();
            s.protect(BASE + 2 * SUPER, SUPER, Prot::READ).unwrap();
            s.wire(BASE + 3 * SUPER, SUPER, true).unwrap();
            wrpage(&c, BASE + 4 * SUPER, 5).unwrap();
            drop(c);
            squeeze(&vm);
            s.unwire(BASE + 3 * SUPER, SUPER, true).unwrap();
            drop(s);
        }
        no_leak(&vm, "t23");
        let zeroed = vm.free_zeroed_pages();
        // Take pre-zeroed frames with plain zero-fills (no reservation).
        let s = vm.new_space().unwrap();
        let n = zeroed.min(6000);
        s.map_anon(BASE, n * PAGE, Prot::RW).unwrap();
        s.advise_superpages(BASE, n * PAGE, SuperpageAdvice::NoHuge)
            .unwrap();
        let ozfod0 = vm.counters().snapshot().v_ozfod;
        let mut bad = Vec::new();
        let mut buf = vec![0u8; PAGE as usize];
        for i in 0..n {
            s.read(BASE + i * PAGE, &mut buf).unwrap();
            if buf.iter().any(|&b| b != 0) {
                bad.push(i);
            }
        }
        let ozfod = vm.counters().snapshot().v_ozfod - ozfod0;
        eprintln!("t23 la57={la57}: {zeroed} free pages marked zero, {ozfod} taken unzeroed");
        assert!(
            bad.is_empty(),
            "la57={la57}: pages not zero: {:?}",
            &bad[..bad.len().min(8)]
        );
        drop(s);
        no_leak(&vm, "t23");
    }
}

/// The whole fill leaves one free frame and the enter of the faulting
/// page needs three new tables (a fresh 512 GiB region): the enter fails
/// for want of memory after the 511 frames were taken and zeroed; the
/// fault must give them back, wait, and succeed; nothing lost or leaked.
#[test]
fn t24_whole_fill_then_no_memory_for_page_tables() {
    for la57 in [false, true] {
        let pmap = if la57 {
            X86Pmap::new_la57()
        } else {
            X86Pmap::new()
        };
        let vm = vm_with(pmap, SuperpagePolicy::Always, 4096);
        let s = vm.new_space().unwrap();
        // Whole fills take runs 7..2 (from the top); the small pages
        // after them take what is left of run 0, leaving run 1 whole.
        s.map_anon(BASE + 64 * SUPER, 6 * SUPER, Prot::RW).unwrap();
        for k in 0..6 {
            s.write_u8(BASE + 64 * SUPER + k * SUPER, 1).unwrap();
        }
        let hog = BASE;
        s.map_anon(hog, 4 * SUPER, Prot::RW).unwrap();
        s.advise_superpages(hog, 4 * SUPER, SuperpageAdvice::NoHuge)
            .unwrap();
        let far = 0x7000_0000_0000u64;
        s.map_anon(far, SUPER, Prot::RW).unwrap();
        // Fill run 0 to the last frame: a page that lands in run 1 is
        // unmapped again (its frame goes back, run 1 whole again).
        let run1 = s.extract(BASE + 64 * SUPER + 5 * SUPER).unwrap().0 - PAGES;
        let mut kept = Vec::new();
        let (mut i, mut misses) = (0u64, 0);
        while vm.free_pages() > 512 && misses < 4000 && i < 4 * PAGES {
            let va = hog + i * PAGE;
            i += 1;
            wrpage(&s, va, tag(va, 1)).unwrap();
            let pfn = s.extract(va).unwrap().0;
            if (run1..run1 + PAGES).contains(&pfn) {
                s.unmap(va, PAGE).unwrap();
                misses += 1;
            } else {
                kept.push(va);
            }
        }
        // One frame outside run 1 free: the fill passes its check.
        let last = kept.pop().unwrap();
        s.unmap(last, PAGE).unwrap();
        let free = vm.free_pages();
        let tables0 = vm.pmap().table_pages(s.pmap_space());
        let sp0 = vm.pmap().superpage_stats().get();
        let c0 = vm.counters().snapshot();
        wrpage(&s, far + 9 * PAGE, tag(far + 9 * PAGE, 2)).unwrap();
        let c1 = vm.counters().snapshot();
        eprintln!(
            "t24 la57={la57}: free before {free}, after {}; resident {}, faults {}, memory waits {}",
            vm.free_pages(),
            resident(&s, far),
            c1.v_vm_faults - c0.v_vm_faults,
            c1.v_wait_memory - c0.v_wait_memory
        );
        eprintln!(
            "t24: tables {tables0} -> {}, superpage stats {sp0:?} -> {:?}, (active, inactive, wired) {:?}",
            vm.pmap().table_pages(s.pmap_space()),
            vm.pmap().superpage_stats().get(),
            vm.queue_counts()
        );
        eprintln!(
            "t24: pageout freed {} (laundered? swap none), reactivated {}",
            c1.v_pdfreed - c0.v_pdfreed,
            c1.v_reactivated - c0.v_reactivated
        );
        for k in 0..6 {
            let b = BASE + 64 * SUPER + k * SUPER;
            assert_eq!(s.read_u8(b), Ok(1), "whole fill {k}: first byte");
        }
        assert_eq!(rdpage(&s, far + 9 * PAGE), Ok(tag(far + 9 * PAGE, 2)));
        for &va in &kept {
            assert_eq!(rdpage(&s, va), Ok(tag(va, 1)), "hog page {va:#x}");
        }
        consistent(&vm, "t24");
        drop(s);
        no_leak(&vm, "t24");
        lists_whole(&vm, "t24");
    }
}
