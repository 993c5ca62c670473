//! Red-team tests for 2 MiB superpage promotion/demotion (commit 5e4dddf).
//!
//! A seeded reference-model fuzz (one or two spaces, 4- and 5-level paging,
//! with and without memory pressure), a concurrent lost-dirty-bit check
//! with exact bounds, concurrent fills racing per-page operations,
//! `destroy_space` racing promotions, a tiny machine, `enter_quick_run`
//! over superpages and pruning around PS entries.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::cast_possible_truncation
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst, fence};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vm_core::pmap::{Displaced, PageInfo, Pmap, PmapError};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::{Access, Fault};
use vm_pmap_x86_64::{PfErrorCode, PteFlags, X86Pmap, X86Space};
use vm_testkit::support::Rng;
use vm_testkit::support::bounded;
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const N: u64 = 512;
/// Two 2 MiB-aligned runs of frames: 3072..3584 and 3584..4096.
const BASE_PFN: u64 = 3072;
/// Frames mapped "out of line" (another frame at an address).
const OTHER_PFN: u64 = 2048;
const OTHERS: u64 = 64;
/// Frames for the pages just outside the two regions.
const EDGE_PFN: u64 = 1900;
/// Frame the memory hogs map (outside every checked set).
const HOG_PFN: u64 = 2200;
const VA4: u64 = 0x40_0000_0000;
/// Above 2^47: only reachable with 5-level paging.
const VA5: u64 = 0x00ab_0000_0000_0000;
const HOG_VA: u64 = 0x60_0000_0000;
const HOG_VA5: u64 = 0x00ac_0000_0000_0000;

fn page(pfn: u64) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr: MemAttr::WriteBack,
    }
}

fn machine() -> Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new(), test_config(4096)).unwrap()
}

fn is_super(p: &X86Pmap, space: &X86Space, va: u64) -> bool {
    p.pte(space, va)
        .is_some_and(|e| e & PteFlags::HUGE.bits() != 0 && e & 1 != 0)
}

fn has(e: u64, f: PteFlags) -> bool {
    e & f.bits() == f.bits()
}

// ---------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct M {
    pfn: u64,
    /// The protection the pmap was last given (upper bound of the entry).
    prot: Prot,
    wired: bool,
    /// A write through the MMU succeeded and has not been reported since.
    dirty: bool,
}

/// Window pages: 8 before region 0, the two regions, 8 after.
const NW: u64 = 2 * N + 16;

struct World<'a> {
    p: &'a X86Pmap,
    seed: u64,
    va0: u64,
    hog_va: u64,
    spaces: Vec<X86Space>,
    model: Vec<HashMap<u64, M>>,
    hogs: Vec<Vec<u64>>,
    log: Vec<String>,
    step: usize,
    /// Free frames before any space existed, and the machine's count now.
    free0: u64,
    free_now: &'a dyn Fn() -> u64,
}

fn ident(j: u64) -> u64 {
    if j < 8 {
        EDGE_PFN + j
    } else if j < 8 + 2 * N {
        BASE_PFN + j - 8
    } else {
        EDGE_PFN + 8 + (j - 8 - 2 * N)
    }
}

fn universe() -> impl Iterator<Item = u64> {
    (BASE_PFN..BASE_PFN + 2 * N)
        .chain(EDGE_PFN..EDGE_PFN + 16)
        .chain(OTHER_PFN..OTHER_PFN + OTHERS)
}

impl World<'_> {
    fn va(&self, j: u64) -> u64 {
        self.va0 - 8 * PAGE + j * PAGE
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(12).collect();
        panic!(
            "seed {} step {}: {msg}\nlast ops (newest first):\n  {}",
            self.seed,
            self.step,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }

    fn note(&mut self, s: String) {
        self.log.push(s);
        if self.log.len() > 64 {
            self.log.remove(0);
        }
    }

    fn dirty_of(&self, pfn: u64) -> usize {
        self.model
            .iter()
            .map(|m| m.values().filter(|e| e.pfn == pfn && e.dirty).count())
            .sum()
    }

    fn maps_of(&self, pfn: u64) -> usize {
        self.model
            .iter()
            .map(|m| m.values().filter(|e| e.pfn == pfn).count())
            .sum()
    }

    /// `enter` checked against the model. `Ok(false)` if it failed with
    /// NoMemory (allowed only where tables were missing).
    fn enter(
        &mut self,
        s: usize,
        va: u64,
        pfn: u64,
        prot: Prot,
        access: Prot,
        wired: bool,
    ) -> bool {
        let old = self.model[s].get(&va).copied();
        let reached = self.p.pte(&self.spaces[s], va).is_some();
        let m = Mapping::new(page(pfn), prot).access(access).wired(wired);
        let r = self.p.enter(&self.spaces[s], VirtAddr(va), m);
        let d = match r {
            Ok(d) => d,
            Err(PmapError::NoMemory) if !reached && old.is_none() => return false,
            Err(e) => self.fail(format!(
                "enter s{s} {va:#x} pfn {pfn} {prot:?}: {e:?} (tables reached it: {reached}, mapped: {old:?})"
            )),
        };
        match old {
            Some(o) if o.pfn != pfn => match d {
                Some(d) if d.pfn.0 == o.pfn && (d.modified || !o.dirty) => {}
                _ => self.fail(format!(
                    "enter s{s} {va:#x}: replaced {o:?} by pfn {pfn}, displaced {d:?}"
                )),
            },
            Some(o) if o.dirty && !prot.contains(Prot::WRITE) => match d {
                Some(d) if d.pfn.0 == o.pfn && d.modified => {}
                _ => self.fail(format!(
                    "enter s{s} {va:#x}: same frame lost write of dirty {o:?}, displaced {d:?} (M lost)"
                )),
            },
            None if d.is_some() => {
                self.fail(format!("enter s{s} {va:#x}: nothing was mapped, displaced {d:?}"))
            }
            _ => {}
        }
        let dirty = matches!(old, Some(o) if o.pfn == pfn && o.dirty && prot.contains(Prot::WRITE));
        self.model[s].insert(
            va,
            M {
                pfn,
                prot,
                wired,
                dirty,
            },
        );
        true
    }

    fn check_sink(&self, what: &str, removed: &[M], sink: &[Displaced], all_reported: bool) {
        let mut need: HashMap<u64, usize> = HashMap::new();
        for m in removed.iter().filter(|m| m.dirty) {
            *need.entry(m.pfn).or_default() += 1;
        }
        for (pfn, n) in need {
            let got = sink.iter().filter(|d| d.pfn.0 == pfn && d.modified).count();
            if got < n {
                self.fail(format!(
                    "{what}: {n} dirty mapping(s) of pfn {pfn} went, sink reported {got} modified (M lost); sink {sink:?}"
                ));
            }
        }
        if all_reported {
            let mut a: Vec<u64> = removed.iter().map(|m| m.pfn).collect();
            let mut b: Vec<u64> = sink.iter().map(|d| d.pfn.0).collect();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                self.fail(format!("{what}: removed frames {a:?}, sink got {b:?}"));
            }
        }
    }

    fn remove(&mut self, s: usize, a: u64, b: u64) {
        let mut sink = Vec::new();
        self.p
            .remove(&self.spaces[s], VirtAddr(a)..VirtAddr(b), &mut |d| {
                sink.push(d)
            });
        let gone: Vec<u64> = self.model[s]
            .keys()
            .copied()
            .filter(|&v| v >= a && v < b)
            .collect();
        let removed: Vec<M> = gone
            .iter()
            .map(|v| self.model[s].remove(v).unwrap())
            .collect();
        self.check_sink(
            &format!("remove s{s} {a:#x}..{b:#x}"),
            &removed,
            &sink,
            true,
        );
    }

    fn protect(&mut self, s: usize, a: u64, b: u64, prot: Prot) {
        if !prot.contains(Prot::READ) {
            return self.remove(s, a, b);
        }
        let mut sink = Vec::new();
        self.p
            .protect(&self.spaces[s], VirtAddr(a)..VirtAddr(b), prot, &mut |d| {
                sink.push(d)
            });
        let mut hit = Vec::new();
        for (v, m) in &mut self.model[s] {
            if *v >= a && *v < b {
                hit.push(*m);
                m.prot &= prot;
                if !prot.contains(Prot::WRITE) {
                    m.dirty = false;
                }
            }
        }
        if !prot.contains(Prot::WRITE) {
            self.check_sink(&format!("protect s{s} {a:#x}..{b:#x}"), &hit, &sink, false);
        }
    }

    fn page_protect(&mut self, pfn: u64) {
        let want = self.dirty_of(pfn) > 0;
        let rm = self.p.page_protect(Pfn(pfn), Prot::READ);
        if want && !rm.modified {
            self.fail(format!(
                "page_protect({pfn}): a dirty mapping, RefMod {rm:?} (M lost)"
            ));
        }
        for m in &mut self.model {
            for e in m.values_mut().filter(|e| e.pfn == pfn) {
                e.prot.remove(Prot::WRITE);
                e.dirty = false;
            }
        }
    }

    fn remove_all(&mut self, pfn: u64) {
        let want = self.dirty_of(pfn) > 0;
        let rm = self.p.remove_all(Pfn(pfn));
        if want && !rm.modified {
            self.fail(format!(
                "remove_all({pfn}): a dirty mapping, RefMod {rm:?} (M lost)"
            ));
        }
        for m in &mut self.model {
            m.retain(|_, e| e.pfn != pfn);
        }
    }

    fn clear_modify(&mut self, pfn: u64) {
        let want = self.dirty_of(pfn) > 0;
        let m = self.p.is_modified(Pfn(pfn));
        if want && !m {
            self.fail(format!(
                "is_modified({pfn}) = false with a dirty mapping (M lost)"
            ));
        }
        self.p.clear_modify(Pfn(pfn));
        if self.p.is_modified(Pfn(pfn)) {
            self.fail(format!("is_modified({pfn}) still true after clear_modify"));
        }
        for m in &mut self.model {
            for e in m.values_mut().filter(|e| e.pfn == pfn) {
                e.dirty = false;
            }
        }
    }

    fn mmu(&mut self, s: usize, va: u64, write: bool) {
        let a = if write {
            Access::USER_WRITE
        } else {
            Access::USER_READ
        };
        let m = self.model[s].get(&va).copied();
        let r = self.p.translate_access(&self.spaces[s], va + 8, a);
        match (m, r) {
            (None, Err(Fault::PageFault(c))) if !c.contains(PfErrorCode::PRESENT) => {}
            (None, r) => self.fail(format!("mmu s{s} {va:#x} unmapped: {r:?}")),
            (Some(m), Ok(t)) => {
                if t.pa.as_u64() != m.pfn * PAGE + 8 {
                    self.fail(format!(
                        "mmu s{s} {va:#x}: pa {:#x}, model {m:?}",
                        t.pa.as_u64()
                    ));
                }
                if write {
                    if !m.prot.contains(Prot::WRITE) {
                        self.fail(format!("mmu write s{s} {va:#x} succeeded on {m:?}"));
                    }
                    self.model[s].get_mut(&va).unwrap().dirty = true;
                }
            }
            (Some(m), Err(Fault::PageFault(c)))
                if write && c.contains(PfErrorCode::PRESENT | PfErrorCode::WRITE) =>
            {
                if m.prot.contains(Prot::WRITE) {
                    // The fault handler: enter the page writable again.
                    if !self.enter(s, va, m.pfn, m.prot, Prot::WRITE, m.wired) {
                        self.fail(format!("fault handler's enter at mapped {va:#x} failed"));
                    }
                    match self.p.translate_access(&self.spaces[s], va, a) {
                        Ok(t) if t.pa.as_u64() == m.pfn * PAGE => {
                            self.model[s].get_mut(&va).unwrap().dirty = true;
                        }
                        r => self.fail(format!("write after re-enter s{s} {va:#x}: {r:?}")),
                    }
                }
            }
            (Some(m), r) => self.fail(format!("mmu s{s} {va:#x} write={write} on {m:?}: {r:?}")),
        }
    }

    fn check_va(&self, s: usize, va: u64) {
        let m = self.model[s].get(&va).copied();
        let got = self.p.extract(&self.spaces[s], VirtAddr(va));
        let pte = self.p.pte(&self.spaces[s], va);
        if got.map(|p| p.0) != m.map(|m| m.pfn) {
            self.fail(format!(
                "s{s} {va:#x}: extract {got:?}, model {m:?}, pte {pte:#x?}"
            ));
        }
        let Some(m) = m else { return };
        let e = pte.unwrap();
        let w = has(e, PteFlags::WRITABLE);
        if w && !m.prot.contains(Prot::WRITE) {
            self.fail(format!("s{s} {va:#x}: entry {e:#x} writable, model {m:?}"));
        }
        if m.dirty && !(w && has(e, PteFlags::DIRTY)) {
            self.fail(format!(
                "s{s} {va:#x}: written page's entry {e:#x} lost RW|M, model {m:?}"
            ));
        }
        if has(e, PteFlags::WIRED) != m.wired {
            self.fail(format!("s{s} {va:#x}: entry {e:#x} wired bit, model {m:?}"));
        }
    }

    fn check_counts(&self, what: &str) {
        // Every frame the pmap holds is a table page of some space (the
        // kept tables of superpages included).
        let tables: usize = self.spaces.iter().map(|sp| self.p.table_pages(sp)).sum();
        let used = self.free0 - (self.free_now)();
        if tables as u64 != used {
            self.fail(format!(
                "{what}: table_pages sum to {tables}, the pmap holds {used} frames"
            ));
        }
        for (s, sp) in self.spaces.iter().enumerate() {
            let res = self.model[s].len() as u64 + self.hogs[s].len() as u64;
            let wired = self.model[s].values().filter(|m| m.wired).count() as u64;
            if sp.resident_count() != res || sp.wired_count() != wired {
                self.fail(format!(
                    "{what}: s{s} resident {} wired {}, model {res} {wired}",
                    sp.resident_count(),
                    sp.wired_count()
                ));
            }
        }
    }

    fn check_pfn(&self, pfn: u64) {
        let n = self.p.mapping_count(Pfn(pfn));
        if n != self.maps_of(pfn) {
            self.fail(format!(
                "pfn {pfn}: {n} pv entries, model {}",
                self.maps_of(pfn)
            ));
        }
    }

    fn check_sample(&self, rng: &mut Rng) {
        self.check_counts("sample");
        for _ in 0..24 {
            let s = rng.below(self.spaces.len() as u64) as usize;
            self.check_va(s, self.va(rng.below(NW)));
        }
        for _ in 0..8 {
            let pfn = universe()
                .nth(rng.below(2 * N + 16 + OTHERS) as usize)
                .unwrap();
            self.check_pfn(pfn);
        }
    }

    fn check_all(&self) {
        self.check_counts("full");
        for s in 0..self.spaces.len() {
            for j in 0..NW {
                self.check_va(s, self.va(j));
            }
        }
        for pfn in universe() {
            self.check_pfn(pfn);
        }
    }

    fn some_pfn(&self, rng: &mut Rng) -> u64 {
        if rng.pct(75) {
            let s = rng.below(self.spaces.len() as u64) as usize;
            if let Some(m) = self.model[s]
                .values()
                .nth(rng.below(self.model[s].len() as u64) as usize)
            {
                return m.pfn;
            }
        }
        universe()
            .nth(rng.below(2 * N + 16 + OTHERS) as usize)
            .unwrap()
    }

    fn hog(&mut self, s: usize) {
        // One leaf table per page: takes every free frame.
        for _ in 0..6000 {
            let va = self.hog_va + self.hogs[s].len() as u64 * SUPER;
            let m = Mapping::new(page(HOG_PFN), Prot::READ);
            match self.p.enter(&self.spaces[s], VirtAddr(va), m) {
                Ok(_) => self.hogs[s].push(va),
                Err(PmapError::NoMemory) => return,
                Err(e) => self.fail(format!("hog: {e:?}")),
            }
        }
        self.fail("hog: memory never ran out".into());
    }

    fn unhog(&mut self, s: usize, n: usize) {
        for _ in 0..n {
            let Some(va) = self.hogs[s].pop() else { return };
            self.p.remove(
                &self.spaces[s],
                VirtAddr(va)..VirtAddr(va + PAGE),
                &mut |_| {},
            );
        }
    }
}

fn prot_of(rng: &mut Rng) -> Prot {
    match rng.below(4) {
        0 => Prot::READ,
        1 => Prot::READ | Prot::EXECUTE,
        _ => Prot::RW,
    }
}

/// One seed of the model fuzz: `spaces` spaces over the same frames,
/// `steps` operations; `pressure` runs part of it with no free frame.
fn run_model(seed: u64, la57: bool, spaces: usize, steps: usize, pressure: bool) -> (u64, u64) {
    let pm = if la57 {
        X86Pmap::new_la57()
    } else {
        X86Pmap::new()
    };
    let vm = Vm::new(pm, test_config(4096)).unwrap();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let free_now = || vm.free_pages();
    let mut rng = Rng::new(seed);
    let mut w = World {
        free0,
        free_now: &free_now,
        p,
        seed,
        va0: if la57 { VA5 } else { VA4 },
        hog_va: if la57 { HOG_VA5 } else { HOG_VA },
        spaces: (0..spaces).map(|_| p.create_space().unwrap()).collect(),
        model: vec![HashMap::new(); spaces],
        hogs: vec![Vec::new(); spaces],
        log: Vec::new(),
        step: 0,
    };
    for step in 0..steps {
        w.step = step;
        let s = rng.below(spaces as u64) as usize;
        let r = rng.below(100);
        match r {
            0..=7 => {
                // Fill a region with its run of frames: promotes.
                let region = rng.below(2);
                let prot = prot_of(&mut rng);
                let access = if rng.pct(60) { Prot::WRITE } else { Prot::READ };
                let wired = rng.pct(12);
                let mut order: Vec<u64> = (0..N).collect();
                if rng.pct(30) {
                    for i in (1..order.len()).rev() {
                        let k = rng.below(i as u64 + 1) as usize;
                        order.swap(i, k);
                    }
                }
                w.note(format!(
                    "fill s{s} region {region} {prot:?} access {access:?} wired {wired}"
                ));
                for i in order {
                    let j = 8 + region * N + i;
                    let va = w.va(j);
                    w.enter(s, va, ident(j), prot, access, wired);
                }
            }
            8..=19 => {
                let j = rng.below(NW);
                let va = w.va(j);
                let pfn = if rng.pct(70) {
                    ident(j)
                } else {
                    OTHER_PFN + rng.below(OTHERS)
                };
                let prot = prot_of(&mut rng);
                let access = if rng.pct(50) { Prot::WRITE } else { Prot::READ };
                let wired = rng.pct(15);
                w.note(format!(
                    "enter s{s} {va:#x} pfn {pfn} {prot:?} {access:?} wired {wired}"
                ));
                w.enter(s, va, pfn, prot, access, wired);
            }
            20..=25 => {
                let j0 = rng.below(NW);
                let len = if rng.pct(50) {
                    1 + rng.below(16)
                } else {
                    1 + rng.below(700)
                };
                let prot = prot_of(&mut rng);
                let holes = rng.pct(30);
                let mut pages = Vec::new();
                let mut want = Vec::new();
                for k in 0..len {
                    let j = j0 + k;
                    if j >= NW {
                        break;
                    }
                    if holes && rng.pct(20) {
                        pages.push(None);
                        continue;
                    }
                    pages.push(Some(page(ident(j))));
                    if !w.model[s].contains_key(&w.va(j)) {
                        want.push(j);
                    }
                }
                let start = w.va(j0);
                w.note(format!(
                    "enter_quick_run s{s} {start:#x} +{} {prot:?}",
                    pages.len()
                ));
                let n = p.enter_quick_run(&w.spaces[s], VirtAddr(start), &pages, prot);
                if n != want.len() && !pressure {
                    w.fail(format!("enter_quick_run mapped {n}, model {}", want.len()));
                }
                // Under pressure a missing table stops the run: find out.
                let mut found = 0;
                for j in want {
                    let va = w.va(j);
                    if p.extract(&w.spaces[s], VirtAddr(va)).is_some() {
                        found += 1;
                        w.model[s].insert(
                            va,
                            M {
                                pfn: ident(j),
                                prot,
                                wired: false,
                                dirty: false,
                            },
                        );
                    }
                }
                if found != n {
                    w.fail(format!(
                        "enter_quick_run returned {n}, {found} pages got mapped"
                    ));
                }
            }
            26..=32 => {
                let a = match rng.below(3) {
                    0 => rng.below(NW),
                    1 => 8 + N - 4 + rng.below(8), // around the region boundary
                    _ => 8 + rng.below(2) * N,     // a region's start
                };
                let len = match rng.below(3) {
                    0 => 1 + rng.below(8),
                    1 => N,
                    _ => 1 + rng.below(NW),
                };
                let (va, vb) = (w.va(a), w.va(a) + len * PAGE);
                w.note(format!("remove s{s} {va:#x}..{vb:#x}"));
                w.remove(s, va, vb);
            }
            33..=38 => {
                let a = rng.below(NW);
                let len = if rng.pct(50) {
                    1 + rng.below(8)
                } else {
                    1 + rng.below(NW)
                };
                let prot = match rng.below(5) {
                    0 => Prot::RW,
                    1 => Prot::READ | Prot::EXECUTE,
                    2 => Prot::NONE,
                    _ => Prot::READ,
                };
                let (va, vb) = (w.va(a), w.va(a) + len * PAGE);
                w.note(format!("protect s{s} {va:#x}..{vb:#x} {prot:?}"));
                w.protect(s, va, vb, prot);
            }
            39..=44 => {
                let va = w.va(rng.below(NW));
                let wired = rng.pct(50);
                w.note(format!("change_wiring s{s} {va:#x} {wired}"));
                p.change_wiring(&w.spaces[s], VirtAddr(va), wired);
                if let Some(m) = w.model[s].get_mut(&va) {
                    m.wired = wired;
                }
            }
            45..=49 => {
                let pfn = w.some_pfn(&mut rng);
                w.note(format!("page_protect({pfn}, READ)"));
                w.page_protect(pfn);
            }
            50..=53 => {
                let pfn = w.some_pfn(&mut rng);
                w.note(format!("remove_all({pfn})"));
                w.remove_all(pfn);
            }
            54..=59 => {
                let pfn = w.some_pfn(&mut rng);
                w.note(format!("is_modified+clear_modify({pfn})"));
                w.clear_modify(pfn);
            }
            60..=63 => {
                let pfn = w.some_pfn(&mut rng);
                w.note(format!("ts_referenced({pfn})"));
                let n = p.ts_referenced(Pfn(pfn));
                if n as usize > w.maps_of(pfn) {
                    w.fail(format!(
                        "ts_referenced({pfn}) = {n} > {} mappings",
                        w.maps_of(pfn)
                    ));
                }
            }
            64..=83 => {
                let va = w.va(rng.below(NW));
                w.note(format!("mmu write s{s} {va:#x}"));
                w.mmu(s, va, true);
            }
            84..=93 => {
                let va = w.va(rng.below(NW));
                w.note(format!("mmu read s{s} {va:#x}"));
                w.mmu(s, va, false);
            }
            94..=96 => {
                // Touch a whole region (A everywhere, as a CPU would), then
                // re-enter one mapped page as it is: promotes whatever
                // table is in line (enter_quick_run's read-only ones too).
                let region = rng.below(2);
                w.note(format!(
                    "touch region {region} of s{s} and re-enter one page"
                ));
                for i in 0..N {
                    let va = w.va(8 + region * N + i);
                    w.mmu(s, va, false);
                }
                let i = rng.below(N);
                let va = w.va(8 + region * N + i);
                if let Some(m) = w.model[s].get(&va).copied() {
                    w.enter(s, va, m.pfn, m.prot, Prot::READ, m.wired);
                }
            }
            _ => {
                if pressure && w.hogs[s].is_empty() {
                    w.note(format!("hog s{s}"));
                    w.hog(s);
                } else if pressure {
                    let n = 1 + rng.below(3) as usize;
                    w.note(format!("unhog s{s} {n}"));
                    w.unhog(s, n);
                } else if rng.pct(50) {
                    // The space dies (exit) and a new one takes its place.
                    w.note(format!("destroy s{s}"));
                    p.destroy_space(&w.spaces[s]);
                    w.model[s].clear();
                    w.spaces[s] = p.create_space().unwrap();
                }
            }
        }
        w.check_sample(&mut rng);
        if step % 40 == 39 {
            w.check_all();
        }
    }
    w.step = steps;
    w.check_all();
    for s in 0..spaces {
        w.unhog(s, usize::MAX);
        let end = w.va(NW);
        let start = w.va(0);
        w.remove(s, start, end);
        w.check_counts("emptied");
        if p.table_pages(&w.spaces[s]) != 1 {
            w.fail(format!(
                "s{s}: {} table pages left after removing everything",
                p.table_pages(&w.spaces[s])
            ));
        }
    }
    for pfn in universe() {
        w.check_pfn(pfn);
    }
    for sp in &w.spaces {
        p.destroy_space(sp);
    }
    if vm.free_pages() != free0 {
        w.fail(format!(
            "frames: {} free at the start, {} at the end",
            free0,
            vm.free_pages()
        ));
    }
    let (pr, de, _) = p.superpage_stats().get();
    let removed = p.superpage_stats().removals.load(SeqCst);
    if pr != de + removed {
        w.fail(format!(
            "nothing is mapped, yet {pr} promotions against {de} demotions and {removed} removals"
        ));
    }
    (pr, de + removed)
}

fn seeds(range: std::ops::Range<u64>, la57: bool, spaces: usize, steps: usize, pressure: bool) {
    let (mut pr, mut de) = (0, 0);
    for seed in range {
        let (a, b) = run_model(seed, la57, spaces, steps, pressure);
        pr += a;
        de += b;
    }
    eprintln!("promotions {pr} demotions {de}");
    assert!(
        pr > 20 && de > 20,
        "the fuzz barely exercised superpages: {pr} / {de}"
    );
}

/// The model fuzz: one space, 4-level paging.
#[test]
fn model_fuzz_one_space() {
    seeds(1..41, false, 1, 260, false);
}

/// Two spaces mapping the same frames (pv lists of two), both promoted.
#[test]
fn model_fuzz_two_spaces_sharing_frames() {
    seeds(100..125, false, 2, 300, false);
}

/// 5-level paging, two spaces.
#[test]
fn model_fuzz_la57() {
    seeds(200..215, true, 2, 260, false);
}

/// Memory pressure: every free frame taken by one-page leaf tables
/// ("hogs") at times; enters that need a table fail with NoMemory,
/// everything else (demotion included) must still work.
#[test]
fn model_fuzz_under_memory_pressure() {
    seeds(300..325, false, 2, 260, true);
}

// ---------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------

/// Writers write through the software MMU (re-entering the page writable
/// and dirty when the write faults, as the fault handler would) while a
/// cleaner write-protects (`page_protect`), removes (`remove_all`) or
/// reads-and-clears M (`is_modified` + `clear_modify`, under a per-page
/// busy lock the writers also hold, as vm-core's busy), a promoter keeps
/// re-entering the whole table so it is promoted again and again, and a
/// third thread wires/unwires, clears A and walks.
///
/// Exact bound: each cleaner step bumps page k's generation first. A write
/// that succeeded between reading generation g0 (before) and g1 (after)
/// must be reported by a cleaner step of generation in g0..=g1+1.
#[test]
fn concurrent_writes_are_reported_across_promotion_and_demotion() {
    bounded(60, || {
        let vm = machine();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        let pfn = |k: u64| BASE_PFN + k;
        let va = |k: u64| VA4 + k * PAGE;
        for k in 0..N {
            let m = Mapping::new(page(pfn(k)), Prot::RW).access(Prot::WRITE);
            p.enter(&space, VirtAddr(va(k)), m).unwrap();
        }
        assert!(is_super(p, &space, VA4));
        let gens: Vec<AtomicU64> = (0..N).map(|_| AtomicU64::new(0)).collect();
        let busy: Vec<Mutex<()>> = (0..N).map(|_| Mutex::new(())).collect();
        let writes: Vec<Mutex<Vec<(u64, u64)>>> = (0..N).map(|_| Mutex::new(Vec::new())).collect();
        let reports: Vec<Mutex<Vec<u64>>> = (0..N).map(|_| Mutex::new(Vec::new())).collect();
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_millis(1500);
        let (gens, busy, writes, reports, stop, space_r) =
            (&gens, &busy, &writes, &reports, &stop, &space);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                s.spawn(move || {
                    let mut rng = Rng::new(17 + t);
                    while !stop.load(SeqCst) {
                        // Writers favour a few pages so writes and cleans meet.
                        let k = if rng.pct(50) {
                            rng.below(8)
                        } else {
                            rng.below(N)
                        };
                        let _b = busy[k as usize].lock().unwrap();
                        let g0 = gens[k as usize].load(SeqCst);
                        fence(SeqCst);
                        let mut tries = 0;
                        loop {
                            match p.translate_access(space_r, va(k), Access::USER_WRITE) {
                                Ok(t) => {
                                    assert_eq!(t.pa.as_u64(), pfn(k) * PAGE, "page {k}");
                                    break;
                                }
                                Err(_) => {
                                    let m =
                                        Mapping::new(page(pfn(k)), Prot::RW).access(Prot::WRITE);
                                    p.enter(space_r, VirtAddr(va(k)), m).unwrap();
                                }
                            }
                            tries += 1;
                            assert!(tries < 10_000, "page {k}: write never succeeds");
                        }
                        fence(SeqCst);
                        let g1 = gens[k as usize].load(SeqCst);
                        writes[k as usize].lock().unwrap().push((g0, g1));
                    }
                });
            }
            // The cleaner.
            s.spawn(move || {
                let mut rng = Rng::new(99);
                while Instant::now() < deadline {
                    let k = if rng.pct(50) {
                        rng.below(8)
                    } else {
                        rng.below(N)
                    };
                    let ku = k as usize;
                    match rng.below(7) {
                        5 | 6 => {
                            // A range write-protection or removal (exclusive
                            // lock, demotes), reported through the sink.
                            let span = if rng.pct(50) { 4 } else { N };
                            let len = 1 + rng.below(span);
                            let end = (k + len).min(N);
                            let g: Vec<u64> = (k..end)
                                .map(|i| gens[i as usize].fetch_add(1, SeqCst) + 1)
                                .collect();
                            fence(SeqCst);
                            let mut sink = Vec::new();
                            let range = VirtAddr(va(k))..VirtAddr(va(end));
                            if rng.pct(50) {
                                p.protect(space_r, range, Prot::READ, &mut |d| sink.push(d));
                            } else {
                                p.remove(space_r, range, &mut |d| sink.push(d));
                            }
                            for d in sink.into_iter().filter(|d| d.modified) {
                                let i = d.pfn.0 - BASE_PFN;
                                assert!(i >= k && i < end, "sink reported {d:?} outside the range");
                                reports[i as usize]
                                    .lock()
                                    .unwrap()
                                    .push(g[(i - k) as usize]);
                            }
                        }
                        0 | 1 => {
                            let g = gens[ku].fetch_add(1, SeqCst) + 1;
                            fence(SeqCst);
                            if p.page_protect(Pfn(pfn(k)), Prot::READ).modified {
                                reports[ku].lock().unwrap().push(g);
                            }
                        }
                        2 => {
                            let g = gens[ku].fetch_add(1, SeqCst) + 1;
                            fence(SeqCst);
                            if p.remove_all(Pfn(pfn(k))).modified {
                                reports[ku].lock().unwrap().push(g);
                            }
                        }
                        _ => {
                            let _b = busy[ku].lock().unwrap();
                            let g = gens[ku].fetch_add(1, SeqCst) + 1;
                            fence(SeqCst);
                            if p.is_modified(Pfn(pfn(k))) {
                                reports[ku].lock().unwrap().push(g);
                            }
                            p.clear_modify(Pfn(pfn(k)));
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                stop.store(true, SeqCst);
            });
            // The promoter: re-enter the whole table, writable and dirty.
            s.spawn(move || {
                while !stop.load(SeqCst) {
                    for k in 0..N {
                        let m = Mapping::new(page(pfn(k)), Prot::RW).access(Prot::WRITE);
                        p.enter(space_r, VirtAddr(va(k)), m).unwrap();
                    }
                    // A walk sets A where ts_referenced cleared it.
                    for k in 0..N {
                        let _ = p.translate_access(space_r, va(k), Access::USER_READ);
                    }
                }
            });
            // Wiring, A clearing, walkers.
            s.spawn(move || {
                let mut rng = Rng::new(5);
                while !stop.load(SeqCst) {
                    let k = rng.below(N);
                    match rng.below(4) {
                        0 => p.change_wiring(space_r, VirtAddr(va(k)), rng.pct(50)),
                        1 => {
                            p.ts_referenced(Pfn(pfn(k)));
                        }
                        _ => {
                            if let Ok(t) = p.translate_access(space_r, va(k) + 8, Access::USER_READ)
                            {
                                assert_eq!(t.pa.as_u64(), pfn(k) * PAGE + 8, "walker: page {k}");
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
        });
        // Final cleaning step for every page.
        for k in 0..N as usize {
            let g = gens[k].fetch_add(1, SeqCst) + 1;
            if p.page_protect(Pfn(pfn(k as u64)), Prot::READ).modified {
                reports[k].lock().unwrap().push(g);
            }
        }
        let mut checked = 0;
        for k in 0..N as usize {
            let r = reports[k].lock().unwrap();
            for &(g0, g1) in writes[k].lock().unwrap().iter() {
                checked += 1;
                assert!(
                    r.iter().any(|&g| g >= g0 && g <= g1 + 1),
                    "page {k}: a write seen between generations {g0} and {g1} was never reported \
                     (reports at {:?}): M lost",
                    &r[r.len().saturating_sub(8)..]
                );
            }
        }
        let (pr, de, _) = p.superpage_stats().get();
        eprintln!("{checked} writes checked, {pr} promotions, {de} demotions");
        assert!(
            pr >= 2 && de >= 2,
            "no promotion/demotion churn: {pr} / {de}"
        );
        // Counts agree with the entries.
        let (mut present, mut wired) = (0, 0);
        for k in 0..N {
            let e = p.pte(&space, va(k)).unwrap_or(0);
            if e & 1 != 0 {
                present += 1;
                wired += u64::from(has(e, PteFlags::WIRED));
                assert_eq!(p.extract(&space, VirtAddr(va(k))), Some(Pfn(pfn(k))));
            }
            assert_eq!(
                p.mapping_count(Pfn(pfn(k))),
                usize::from(e & 1 != 0),
                "pv of page {k}"
            );
        }
        if is_super(p, &space, VA4) {
            wired = if has(p.pte(&space, VA4).unwrap(), PteFlags::WIRED) {
                N
            } else {
                0
            };
        }
        assert_eq!(space.resident_count(), present, "resident count");
        assert_eq!(space.wired_count(), wired, "wired count");
        p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
        assert_eq!(space.resident_count(), 0);
        assert_eq!(space.wired_count(), 0);
        assert_eq!(p.table_pages(&space), 1);
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "frames leaked");
    });
}

/// Four threads fill one leaf table in interleaved order (so the enter
/// that completes it, and promotes, is any of them) while a fifth wires,
/// clears A, write-protects, removes and walks pages of it. Each round the
/// table must agree with the counts and pv lists, and once restored, be
/// promoted.
#[test]
fn concurrent_fill_promotes_while_per_page_ops_run() {
    bounded(60, || {
        let vm = machine();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        let pfn = |k: u64| BASE_PFN + k;
        let va = |k: u64| VA4 + k * PAGE;
        for round in 0..40u64 {
            let go = Barrier::new(5);
            let space_r = &space;
            let go = &go;
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    s.spawn(move || {
                        go.wait();
                        let mut k = t;
                        while k < N {
                            let m = Mapping::new(page(pfn(k)), Prot::RW).access(Prot::WRITE);
                            p.enter(space_r, VirtAddr(va(k)), m).unwrap();
                            k += 4;
                        }
                    });
                }
                s.spawn(move || {
                    let mut rng = Rng::new(round + 1);
                    go.wait();
                    for _ in 0..300 {
                        let k = if rng.pct(50) {
                            N - 1 - rng.below(16)
                        } else {
                            rng.below(N)
                        };
                        match rng.below(7) {
                            0 => p.change_wiring(space_r, VirtAddr(va(k)), rng.pct(50)),
                            1 => {
                                p.ts_referenced(Pfn(pfn(k)));
                            }
                            2 => {
                                p.page_protect(Pfn(pfn(k)), Prot::READ);
                            }
                            3 => {
                                p.remove_all(Pfn(pfn(k)));
                            }
                            4 => {
                                p.is_modified(Pfn(pfn(k)));
                            }
                            _ => {
                                let a = if rng.pct(50) {
                                    Access::USER_READ
                                } else {
                                    Access::USER_WRITE
                                };
                                if let Ok(t) = p.translate_access(space_r, va(k), a) {
                                    assert_eq!(
                                        t.pa.as_u64(),
                                        pfn(k) * PAGE,
                                        "round {round} page {k}"
                                    );
                                }
                            }
                        }
                    }
                });
            });
            let (mut present, mut wired) = (0, 0);
            for k in 0..N {
                let got = p.extract(&space, VirtAddr(va(k)));
                assert!(
                    got.is_none() || got == Some(Pfn(pfn(k))),
                    "round {round}: page {k} maps {got:?}"
                );
                present += u64::from(got.is_some());
                let e = p.pte(&space, va(k)).unwrap_or(0);
                wired += u64::from(got.is_some() && has(e, PteFlags::WIRED));
                assert_eq!(
                    p.mapping_count(Pfn(pfn(k))),
                    usize::from(got.is_some()),
                    "round {round}: pv of {k}"
                );
            }
            if is_super(p, &space, VA4) {
                wired = if has(p.pte(&space, VA4).unwrap(), PteFlags::WIRED) {
                    N
                } else {
                    0
                };
            }
            assert_eq!(
                space.resident_count(),
                present,
                "round {round}: resident count"
            );
            assert_eq!(space.wired_count(), wired, "round {round}: wired count");
            // Restore: every page writable, dirty, unwired, accessed; one
            // more enter must then promote.
            for k in 0..N {
                let m = Mapping::new(page(pfn(k)), Prot::RW).access(Prot::WRITE);
                p.enter(&space, VirtAddr(va(k)), m).unwrap();
                let _ = p.translate_access(&space, va(k), Access::USER_READ);
            }
            let m = Mapping::new(page(pfn(0)), Prot::RW).access(Prot::WRITE);
            p.enter(&space, VirtAddr(va(0)), m).unwrap();
            assert!(
                is_super(p, &space, VA4),
                "round {round}: restored table not promoted: {:#x?}",
                p.pte(&space, VA4)
            );
            assert_eq!(space.resident_count(), N);
            assert_eq!(space.wired_count(), 0);
            p.remove(&space, VirtAddr(VA4)..VirtAddr(VA4 + SUPER), &mut |_| {});
            assert_eq!(space.resident_count(), 0, "round {round}");
            assert_eq!(p.table_pages(&space), 1, "round {round}: tables left");
        }
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "frames leaked");
    });
}

/// `destroy_space` while another thread keeps entering (and so
/// promoting) the last pages of a table in the same space, until its
/// enters fail with `SpaceDestroyed`. No enter may succeed after
/// `destroy_space` returned; at the end no pv entry, no count and no
/// frame may be left. (With debug assertions the pmap's own
/// `destroy_space` checks fire first.)
fn destroy_races_enter(superpages: bool) {
    bounded(60, move || {
        let vm = Vm::new(
            X86Pmap::new().with_superpages(superpages),
            test_config(4096),
        )
        .unwrap();
        let p = vm.pmap();
        let free = vm.free_pages();
        for round in 0..600u64 {
            let space = p.create_space().unwrap();
            // Pre-fill most of the table so the race is around the promoting enter.
            for k in 0..N - 8 {
                let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
                p.enter(&space, VirtAddr(VA4 + k * PAGE), m).unwrap();
            }
            let go = Barrier::new(2);
            let (space_r, go) = (&space, &go);
            let after_destroy = AtomicU64::new(0);
            let after = &after_destroy;
            let destroyed = AtomicBool::new(false);
            let destroyed = &destroyed;
            std::thread::scope(|s| {
                s.spawn(move || {
                    go.wait();
                    let mut k = N - 8;
                    loop {
                        let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
                        let was = destroyed.load(SeqCst);
                        match p.enter(space_r, VirtAddr(VA4 + k * PAGE), m) {
                            Ok(_) if was => {
                                after.fetch_add(1, SeqCst);
                            }
                            Ok(_) => {}
                            Err(PmapError::SpaceDestroyed) => break,
                            Err(e) => panic!("round {round}: {e:?}"),
                        }
                        k = if k + 1 == N { N - 8 } else { k + 1 };
                    }
                });
                s.spawn(move || {
                    go.wait();
                    for _ in 0..(round % 10) * 50 {
                        std::hint::spin_loop();
                    }
                    p.destroy_space(space_r);
                    destroyed.store(true, SeqCst);
                });
            });
            assert_eq!(
                after.load(SeqCst),
                0,
                "round {round}: an enter succeeded after destroy_space returned"
            );
            let left: Vec<u64> = (0..N)
                .filter(|&k| p.mapping_count(Pfn(BASE_PFN + k)) != 0)
                .collect();
            assert!(
                left.is_empty(),
                "round {round}: pv entries of pages {left:?} left behind in the destroyed space \
                 (resident_count {})",
                space.resident_count()
            );
            assert_eq!(vm.free_pages(), free, "round {round}: frames leaked");
        }
    });
}

#[test]
fn destroy_space_races_promotion_in_the_same_space() {
    destroy_races_enter(true);
}

/// The same race with promotion turned off: whether the hole predates
/// superpages.
#[test]
fn destroy_space_races_enter_control_without_superpages() {
    destroy_races_enter(false);
}

/// Spaces that map a survivor's frames are filled (promoted), written and
/// destroyed while another thread runs per-page operations on the frames
/// (visiting the dying spaces' superpages through the pv lists) and the
/// survivor keeps its own superpage. At the end each frame's pv list holds
/// just the survivor's mapping and every table frame is back.
#[test]
fn destroy_space_races_per_page_ops_on_shared_superpages() {
    bounded(60, || {
        let vm = machine();
        let p = vm.pmap();
        let free = vm.free_pages();
        let keep = p.create_space().unwrap();
        let fill = |sp: &X86Space, base: u64| {
            for k in 0..N {
                let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
                p.enter(sp, VirtAddr(base + k * PAGE), m).unwrap();
            }
        };
        fill(&keep, VA4);
        let deadline = Instant::now() + Duration::from_millis(1500);
        let stop = AtomicBool::new(false);
        let (stop, keep_r, fill) = (&stop, &keep, &fill);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut round = 0u64;
                while Instant::now() < deadline {
                    let sp = p.create_space().unwrap();
                    let base = VA4 + (1 + round % 3) * SUPER;
                    fill(&sp, base);
                    let _ = p.translate_access(&sp, base + (round % N) * PAGE, Access::USER_WRITE);
                    p.destroy_space(&sp);
                    round += 1;
                }
                stop.store(true, SeqCst);
            });
            s.spawn(move || {
                let mut rng = Rng::new(3);
                while !stop.load(SeqCst) {
                    let k = rng.below(N);
                    match rng.below(5) {
                        0 => {
                            p.remove_all(Pfn(BASE_PFN + k));
                        }
                        1 => {
                            p.page_protect(Pfn(BASE_PFN + k), Prot::READ);
                        }
                        2 => p.clear_modify(Pfn(BASE_PFN + k)),
                        3 => {
                            p.ts_referenced(Pfn(BASE_PFN + k));
                        }
                        _ => {
                            let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
                            p.enter(keep_r, VirtAddr(VA4 + k * PAGE), m).unwrap();
                        }
                    }
                }
            });
        });
        fill(&keep, VA4);
        for _ in 0..2 {
            for k in 0..N {
                let _ = p.translate_access(&keep, VA4 + k * PAGE, Access::USER_READ);
            }
            fill(&keep, VA4);
        }
        for k in 0..N {
            assert_eq!(
                p.mapping_count(Pfn(BASE_PFN + k)),
                1,
                "page {k}: pv entries of destroyed spaces left"
            );
        }
        assert_eq!(keep.resident_count(), N);
        let mut n = 0;
        p.remove(&keep, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| n += 1);
        assert_eq!(n, N);
        assert_eq!(p.table_pages(&keep), 1);
        p.destroy_space(&keep);
        assert_eq!(vm.free_pages(), free, "frames leaked");
    });
}

// ---------------------------------------------------------------------
// Deterministic corners
// ---------------------------------------------------------------------

/// A tiny machine (64 frames): a superpage of device-like frames (outside
/// memory, so no pv), every free frame then taken by leaf tables. Every
/// operation on the superpage must work without memory (demotion uses the
/// kept table); enters that need a table fail cleanly; nothing leaks.
#[test]
fn tiny_machine_superpage_needs_no_memory() {
    let vm = Vm::new(X86Pmap::new(), test_config(64)).unwrap();
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let space = p.create_space().unwrap();
    let base_pfn = 8 * N; // 2 MiB aligned, beyond the machine's 64 frames
    for k in 0..N {
        let m = Mapping::new(page(base_pfn + k), Prot::RW).access(Prot::WRITE);
        p.enter(&space, VirtAddr(VA4 + k * PAGE), m).unwrap();
    }
    assert!(is_super(p, &space, VA4));
    // Take every frame.
    let mut hogs = 0u64;
    loop {
        let m = Mapping::new(page(base_pfn), Prot::READ);
        match p.enter(&space, VirtAddr(HOG_VA + hogs * SUPER), m) {
            Ok(_) => hogs += 1,
            Err(PmapError::NoMemory) => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(hogs < 200);
    }
    assert_eq!(vm.free_pages(), 0, "hogs left frames free");
    let k = 37;
    p.change_wiring(&space, VirtAddr(VA4 + k * PAGE), true);
    assert!(!is_super(p, &space, VA4), "wiring one page demotes");
    assert_eq!(space.wired_count(), 1);
    assert!(has(p.pte(&space, VA4 + k * PAGE).unwrap(), PteFlags::WIRED));
    p.change_wiring(&space, VirtAddr(VA4 + k * PAGE), false);
    let m = Mapping::new(page(base_pfn + k), Prot::RW).access(Prot::WRITE);
    p.enter(&space, VirtAddr(VA4 + k * PAGE), m).unwrap();
    assert!(is_super(p, &space, VA4), "promoted again");
    // Another frame inside: demote, replace.
    let m = Mapping::new(page(base_pfn + 600), Prot::RW);
    let d = p.enter(&space, VirtAddr(VA4 + 9 * PAGE), m).unwrap();
    assert_eq!(d.map(|d| (d.pfn.0, d.modified)), Some((base_pfn + 9, true)));
    // Range ops across the superpage's end.
    let mut dirty = 0;
    p.protect(
        &space,
        VirtAddr(VA4 + (N - 4) * PAGE)..VirtAddr(VA4 + (N + 4) * PAGE),
        Prot::READ,
        &mut |d| dirty += u64::from(d.modified),
    );
    assert_eq!(dirty, 4);
    // A new leaf table cannot be had.
    let m = Mapping::new(page(base_pfn), Prot::READ);
    assert_eq!(
        p.enter(&space, VirtAddr(VA4 + SUPER), m),
        Err(PmapError::NoMemory)
    );
    let run: Vec<_> = (0..8).map(|i| Some(page(base_pfn + N - 4 + i))).collect();
    let n = p.enter_quick_run(&space, VirtAddr(VA4 + (N - 4) * PAGE), &run, Prot::READ);
    assert_eq!(n, 0, "the first 4 are mapped, the last 4 need a table");
    assert_eq!(vm.free_pages(), 0);
    assert_eq!(space.resident_count(), N + hogs);
    // Free one hog: the next region gets its table, fills and promotes.
    p.remove(
        &space,
        VirtAddr(HOG_VA)..VirtAddr(HOG_VA + PAGE),
        &mut |_| {},
    );
    for k in 0..N {
        let m = Mapping::new(page(base_pfn + N + k), Prot::RW).access(Prot::WRITE);
        p.enter(&space, VirtAddr(VA4 + SUPER + k * PAGE), m)
            .unwrap();
    }
    assert!(is_super(p, &space, VA4 + SUPER));
    assert_eq!(vm.free_pages(), 0);
    // Both superpages demoted by one range removal, no memory needed.
    p.remove(
        &space,
        VirtAddr(VA4 + 100 * PAGE)..VirtAddr(VA4 + SUPER + 100 * PAGE),
        &mut |_| {},
    );
    assert_eq!(space.resident_count(), 100 + (N - 100) + hogs - 1);
    for k in [0, 99, N + 100, 2 * N - 1] {
        assert!(
            p.extract(&space, VirtAddr(VA4 + k * PAGE)).is_some(),
            "page {k}"
        );
    }
    for k in [100, N - 1, N, N + 99] {
        assert!(
            p.extract(&space, VirtAddr(VA4 + k * PAGE)).is_none(),
            "page {k}"
        );
    }
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free0, "frames leaked");
}

/// `enter_quick_run` over a promoted superpage: the pages inside are
/// skipped (they are all mapped), those before and after are entered and
/// counted, nothing inside changes.
#[test]
fn enter_quick_run_across_a_superpage() {
    let vm = machine();
    let p = vm.pmap();
    let free = vm.free_pages();
    let space = p.create_space().unwrap();
    let va = |k: u64| VA4 + SUPER + k * PAGE; // region 1
    for k in 0..N {
        let m = Mapping::new(page(BASE_PFN + N + k), Prot::RW).access(Prot::WRITE);
        p.enter(&space, VirtAddr(va(k)), m).unwrap();
    }
    assert!(is_super(p, &space, va(0)));
    let pde = p.pte(&space, va(0)).unwrap();
    // From 10 pages before to 10 pages after, other frames everywhere.
    let run: Vec<_> = (0..N + 20)
        .map(|i| Some(page(OTHER_PFN + i % OTHERS)))
        .collect();
    let n = p.enter_quick_run(&space, VirtAddr(va(0) - 10 * PAGE), &run, Prot::READ);
    assert_eq!(n, 20);
    assert_eq!(p.pte(&space, va(0)), Some(pde), "the superpage changed");
    assert_eq!(space.resident_count(), N + 20);
    for i in 0..10 {
        assert_eq!(
            p.extract(&space, VirtAddr(va(0) - (10 - i) * PAGE)),
            Some(Pfn(OTHER_PFN + i % OTHERS))
        );
        assert_eq!(
            p.extract(&space, VirtAddr(va(N + i))),
            Some(Pfn(OTHER_PFN + (N + 10 + i) % OTHERS))
        );
    }
    for k in [0, 1, 255, 511] {
        assert_eq!(
            p.extract(&space, VirtAddr(va(k))),
            Some(Pfn(BASE_PFN + N + k))
        );
    }
    // Starting inside the superpage.
    let run: Vec<_> = (0..20).map(|i| Some(page(OTHER_PFN + i))).collect();
    let n = p.enter_quick_run(&space, VirtAddr(va(N - 5)), &run, Prot::READ);
    assert_eq!(n, 5, "pages 10.. after the superpage beyond the first run");
    assert_eq!(space.resident_count(), N + 25);
    p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
    assert_eq!(space.resident_count(), 0);
    assert_eq!(p.table_pages(&space), 1);
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free);
}

/// The superpage is the only entry of its page directory. Removing its
/// pages one at a time through the pv lists (`remove_all`) demotes it, and
/// the last removal prunes the leaf table, the PD and the PDPT; counts,
/// table_pages and frames must follow at each step.
#[test]
fn per_page_removal_of_a_whole_superpage_prunes_everything() {
    for la57 in [false, true] {
        let vm = Vm::new(
            if la57 {
                X86Pmap::new_la57()
            } else {
                X86Pmap::new()
            },
            test_config(4096),
        )
        .unwrap();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        let base = if la57 { VA5 } else { VA4 };
        for k in 0..N {
            let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
            p.enter(&space, VirtAddr(base + k * PAGE), m).unwrap();
        }
        assert!(is_super(p, &space, base));
        let levels = if la57 { 5 } else { 4 };
        assert_eq!(
            p.table_pages(&space),
            levels,
            "la57 {la57}: root..PD + kept table"
        );
        assert_eq!(vm.free_pages(), free - levels as u64);
        for k in (0..N).rev() {
            let rm = p.remove_all(Pfn(BASE_PFN + k));
            assert!(rm.modified, "la57 {la57}: page {k}");
            assert_eq!(space.resident_count(), k, "la57 {la57}");
            if k > 0 {
                assert_eq!(p.table_pages(&space), levels, "la57 {la57}: after {k}");
            }
        }
        assert_eq!(p.table_pages(&space), 1, "la57 {la57}: pruned");
        assert_eq!(
            vm.free_pages(),
            free - 1,
            "la57 {la57}: only the root is used"
        );
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "la57 {la57}");
    }
}

/// A wired superpage: wired_count 512 throughout promotion; unwiring one
/// page through `enter` (wired = false) demotes, and everything adds up.
#[test]
fn a_wired_superpage_keeps_its_wired_count() {
    let vm = machine();
    let p = vm.pmap();
    let free = vm.free_pages();
    let space = p.create_space().unwrap();
    for k in 0..N {
        let m = Mapping::new(page(BASE_PFN + k), Prot::RW)
            .access(Prot::WRITE)
            .wired(true);
        p.enter(&space, VirtAddr(VA4 + k * PAGE), m).unwrap();
    }
    assert!(is_super(p, &space, VA4));
    assert_eq!(space.wired_count(), N);
    let m = Mapping::new(page(BASE_PFN + 3), Prot::RW).access(Prot::WRITE);
    p.enter(&space, VirtAddr(VA4 + 3 * PAGE), m).unwrap();
    assert_eq!(space.wired_count(), N - 1);
    assert!(!is_super(p, &space, VA4));
    p.change_wiring(&space, VirtAddr(VA4 + 3 * PAGE), true);
    assert_eq!(space.wired_count(), N);
    // One more enter with the same flags re-promotes.
    let m = Mapping::new(page(BASE_PFN + 4), Prot::RW)
        .access(Prot::WRITE)
        .wired(true);
    p.enter(&space, VirtAddr(VA4 + 4 * PAGE), m).unwrap();
    assert!(is_super(p, &space, VA4));
    let mut n = 0;
    p.remove(
        &space,
        VirtAddr(VA4 + 500 * PAGE)..VirtAddr(VA4 + SUPER + PAGE),
        &mut |_| n += 1,
    );
    assert_eq!(n, 12);
    assert_eq!(space.wired_count(), N - 12);
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free);
}

/// A superpage in the last 2 MiB of user space (4- and 5-level) and one
/// of unmanaged frames: promoted, demoted by a range that runs past the
/// end of user space, counts and frames back.
#[test]
fn superpages_at_the_top_of_user_space_and_unmanaged() {
    for la57 in [false, true] {
        let vm = Vm::new(
            if la57 {
                X86Pmap::new_la57()
            } else {
                X86Pmap::new()
            },
            test_config(4096),
        )
        .unwrap();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        let top = if la57 { 1u64 << 56 } else { 1u64 << 47 };
        let base = top - SUPER;
        for k in 0..N {
            let pg = PageInfo {
                pfn: Pfn(BASE_PFN + k),
                managed: k % 2 == 0 || !la57, // la57: mixed -> must not promote
                attr: MemAttr::WriteBack,
            };
            p.enter(
                &space,
                VirtAddr(base + k * PAGE),
                Mapping::new(pg, Prot::RW).access(Prot::WRITE),
            )
            .unwrap();
        }
        assert_eq!(is_super(p, &space, base), !la57, "la57 {la57}");
        // Unmanaged run just below.
        for k in 0..N {
            let pg = PageInfo {
                pfn: Pfn(BASE_PFN + N + k),
                managed: false,
                attr: MemAttr::WriteBack,
            };
            p.enter(
                &space,
                VirtAddr(base - SUPER + k * PAGE),
                Mapping::new(pg, Prot::READ),
            )
            .unwrap();
        }
        assert!(
            is_super(p, &space, base - SUPER),
            "la57 {la57}: unmanaged run"
        );
        assert_eq!(p.mapping_count(Pfn(BASE_PFN + N)), 0);
        let t = p
            .translate_access(&space, top - 8, Access::USER_WRITE)
            .unwrap();
        assert_eq!(t.pa.as_u64(), (BASE_PFN + N) * PAGE - 8);
        let mut sunk = 0;
        p.remove(
            &space,
            VirtAddr(base - 3 * PAGE)..VirtAddr(!0xfff),
            &mut |_| sunk += 1,
        );
        let managed = if la57 { N / 2 } else { N };
        assert_eq!(sunk, managed, "la57 {la57}: displaced managed pages only");
        assert_eq!(space.resident_count(), N - 3, "la57 {la57}");
        // The run the removal covers in part is demoted; the one at the
        // top (4-level only), covered whole, goes as one entry.
        assert_eq!(p.superpage_stats().get().1, 1, "la57 {la57}: demotions");
        assert_eq!(
            p.superpage_stats().removals.load(SeqCst),
            u64::from(!la57),
            "la57 {la57}: whole removals"
        );
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "la57 {la57}");
        for k in 0..N {
            assert_eq!(p.mapping_count(Pfn(BASE_PFN + k)), 0);
        }
    }
}

/// One thread keeps re-entering a page of a promoted table unchanged
/// (each enter demotes it and promotes it again); others ask per-page
/// questions (`is_modified`, `ts_referenced`) of other pages, which demote
/// under the exclusive lock and then retry under the shared one. They must
/// make progress (no livelock between demotion and re-promotion), and the
/// table must end up whole.
#[test]
fn per_page_queries_progress_against_repromotion() {
    bounded(60, || {
        let vm = machine();
        let p = vm.pmap();
        let space = p.create_space().unwrap();
        for k in 0..N {
            let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
            p.enter(&space, VirtAddr(VA4 + k * PAGE), m).unwrap();
        }
        assert!(is_super(p, &space, VA4));
        let stop = AtomicBool::new(false);
        let (stop, space_r) = (&stop, &space);
        let deadline = Instant::now() + Duration::from_millis(1000);
        let (ops, worst) = std::thread::scope(|s| {
            for t in 0..2u64 {
                s.spawn(move || {
                    let mut k = t;
                    while !stop.load(SeqCst) {
                        let m = Mapping::new(page(BASE_PFN + k), Prot::RW).access(Prot::WRITE);
                        p.enter(space_r, VirtAddr(VA4 + k * PAGE), m).unwrap();
                        k = (k + 2) % 16;
                    }
                });
            }
            let q = s.spawn(move || {
                let (mut ops, mut worst) = (0u64, Duration::ZERO);
                let mut k = 100;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    assert!(
                        p.is_modified(Pfn(BASE_PFN + k)),
                        "page {k}: written page clean"
                    );
                    worst = worst.max(t0.elapsed());
                    ops += 1;
                    k = 100 + (k + 1) % 300;
                }
                stop.store(true, SeqCst);
                (ops, worst)
            });
            q.join().unwrap()
        });
        let (pr, de, _) = p.superpage_stats().get();
        eprintln!("{ops} is_modified calls, worst {worst:?}; {pr} promotions, {de} demotions");
        assert!(ops >= 100, "is_modified made {ops} calls in 1 s");
        assert!(
            worst < Duration::from_millis(250),
            "one is_modified took {worst:?}"
        );
        let m = Mapping::new(page(BASE_PFN), Prot::RW).access(Prot::WRITE);
        p.enter(&space, VirtAddr(VA4), m).unwrap();
        assert!(is_super(p, &space, VA4));
        assert_eq!(space.resident_count(), N);
        p.destroy_space(&space);
    });
}
