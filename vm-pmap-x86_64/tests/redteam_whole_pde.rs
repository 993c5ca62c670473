//! Red team: a `remove` or `protect` that covers a whole 2 MiB superpage
//! changes its one page-directory entry (commit baeee03, FreeBSD
//! `pmap_remove_pde` / `pmap_protect_pde`) instead of demoting it first.
//!
//! A model TLB (a [`TlbHook`] keeping what a simulated CPU cached, with
//! its write, execute and cache-type rights, dropped as `invlpg` would)
//! checks after every step that no cached translation outlives its entry;
//! a dirty-bit model checks that every page written through a mapping is
//! reported modified (by a sink, `remove_all`, `page_protect`, an `enter`
//! that displaces it) or still `is_modified`; the books (resident, wired,
//! pv entries, table frames) balance; races of whole removes and protects
//! against the software MMU, per-page operations, enters and
//! `destroy_space` keep all of that.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vm_core::pmap::{PageInfo, Pmap};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::{Access, CpuMode};
use vm_pmap_x86_64::paging::Level;
use vm_pmap_x86_64::{PagingMode, PteFlags, TlbHook, X86Pmap, X86Space};
use vm_testkit::support::Rng;
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const N: u64 = 512;
/// Four 2 MiB slots straddling the 1 GiB boundary: 1 GiB - 4 MiB ..
/// 1 GiB + 4 MiB (two page directories, two PDPT entries).
const VA0: u64 = (1 << 30) - 2 * SUPER;
const SLOTS: u64 = 4;
/// Pages mapped with other frames just outside the slots, each side.
const EDGE: u64 = 8;
/// Frame run of slot k: RUN0 + k * 512 (2 MiB aligned), high in an
/// 8192-frame machine, away from the table frames.
const RUN0: u64 = 4096;
/// Frames mapped one by one.
const OTHER: u64 = 6144;
const OTHERS: u64 = 64;
const MEM: u64 = 8192;

const P: u64 = PteFlags::PRESENT.bits();
const RW: u64 = PteFlags::WRITABLE.bits();
const D: u64 = PteFlags::DIRTY.bits();
const A: u64 = PteFlags::ACCESSED.bits();
const NX: u64 = PteFlags::NO_EXECUTE.bits();
const W: u64 = PteFlags::WIRED.bits();
const PS_FRAME: u64 = 0x000f_ffff_ffe0_0000;
const FRAME: u64 = 0x000f_ffff_ffff_f000;

// ------------------------------------------------------------------ TLB

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cached {
    /// Physical address of the first byte the entry maps.
    pa: u64,
    writable: bool,
    dirty: bool,
    exec: bool,
    /// PAT index (PWT | PCD << 1 | PAT << 2).
    cache: u64,
}

/// (root, page or 2 MiB base, huge) -> cached. `invalidate_page(va)`
/// drops `va`'s 4 KiB entry and any 2 MiB entry containing `va`, no more.
#[derive(Default)]
struct ModelTlb {
    entries: Mutex<HashMap<(u64, u64, bool), Cached>>,
}

impl TlbHook for ModelTlb {
    fn invalidate_page(&self, root: u64, va: u64) {
        let mut e = self.entries.lock().unwrap();
        e.remove(&(root, va & !(PAGE - 1), false));
        e.remove(&(root, va & !(SUPER - 1), true));
    }
    fn invalidate_all(&self, root: u64) {
        self.entries.lock().unwrap().retain(|k, _| k.0 != root);
    }
}

type TPmap = X86Pmap<ModelTlb>;

fn cache_index(leaf: u64, level: Level) -> u64 {
    let pat = if level == Level::PD { 0x1000 } else { 0x80 };
    u64::from(leaf & 0x8 != 0) | u64::from(leaf & 0x10 != 0) << 1 | u64::from(leaf & pat != 0) << 2
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acc {
    Read,
    Write,
    Exec,
}

/// A CPU access through the model TLB: a hit uses the cached translation
/// (a write hit needs writable and dirty, an exec hit executable); a miss
/// walks (software MMU, which sets A/D) and caches. The physical address.
fn cpu(p: &TPmap, s: &X86Space, va: u64, acc: Acc) -> Option<u64> {
    let tlb = p.tlb();
    {
        let e = tlb.entries.lock().unwrap();
        for (key, off) in [
            ((s.root(), va & !(PAGE - 1), false), va & (PAGE - 1)),
            ((s.root(), va & !(SUPER - 1), true), va & (SUPER - 1)),
        ] {
            if let Some(c) = e.get(&key) {
                let ok = match acc {
                    Acc::Read => true,
                    Acc::Write => c.writable && c.dirty,
                    Acc::Exec => c.exec,
                };
                if ok {
                    return Some(c.pa + off);
                }
            }
        }
    }
    let access = match acc {
        Acc::Read => Access::USER_READ,
        Acc::Write => Access::USER_WRITE,
        Acc::Exec => Access::USER_EXEC,
    };
    let t = p.translate_access(s, va, access).ok()?;
    let huge = t.level == Level::PD;
    let span = if huge { SUPER } else { PAGE };
    let c = Cached {
        pa: t.pa.as_u64() & !(span - 1),
        writable: t.leaf & RW != 0,
        dirty: t.leaf & D != 0,
        exec: t.leaf & NX == 0,
        cache: cache_index(t.leaf, t.level),
    };
    tlb.entries
        .lock()
        .unwrap()
        .insert((s.root(), va & !(span - 1), huge), c);
    Some(t.pa.as_u64())
}

/// Every cached translation of `s` is still what the tables say, with no
/// more rights and the same cache type; a cached dirty writable one is
/// dirty in the tables.
fn coherent(p: &TPmap, s: &X86Space, what: &str) {
    let e = p.tlb().entries.lock().unwrap().clone();
    for ((root, va, huge), c) in e {
        if root != s.root() {
            continue;
        }
        let step = if huge { SUPER } else { PAGE };
        for off in (0..step).step_by(PAGE as usize) {
            let at = va + off;
            let Some((leaf, level)) = p.leaf_entry(s, at) else {
                panic!("{what}: the TLB still maps {at:#x} ({c:?}); the tables do not");
            };
            let frame = if level == Level::PD {
                (leaf & PS_FRAME) + (at & (SUPER - 1))
            } else {
                leaf & FRAME
            };
            assert!(
                leaf & P != 0 && frame == c.pa + off,
                "{what}: the TLB maps {at:#x} to {:#x} ({c:?}), the tables {leaf:#x}",
                c.pa + off
            );
            if c.writable {
                assert!(
                    leaf & RW != 0,
                    "{what}: TLB still writes {at:#x}: {leaf:#x}"
                );
            }
            if c.writable && c.dirty {
                assert!(leaf & D != 0, "{what}: a TLB write at {at:#x} leaves no M");
            }
            if c.exec {
                assert!(
                    leaf & NX == 0,
                    "{what}: TLB still executes {at:#x}: {leaf:#x}"
                );
            }
            assert_eq!(
                c.cache,
                cache_index(leaf, level),
                "{what}: TLB cache type of {at:#x} is stale: {leaf:#x}"
            );
        }
    }
}

// -------------------------------------------------------------- helpers

fn page(pfn: u64, attr: MemAttr) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr,
    }
}

fn mode(la57: bool) -> CpuMode {
    CpuMode {
        paging: if la57 {
            PagingMode::FiveLevel
        } else {
            PagingMode::FourLevel
        },
        ..CpuMode::default()
    }
}

fn machine(la57: bool) -> Arc<Vm<TPmap>> {
    let pmap = X86Pmap::with_hook(mode(la57), ModelTlb::default());
    Vm::new(pmap, test_config(MEM)).unwrap()
}

fn slot_va(k: u64) -> u64 {
    VA0 + k * SUPER
}

fn run(k: u64) -> u64 {
    RUN0 + k * N
}

fn is_super<T: TlbHook + 'static>(p: &X86Pmap<T>, s: &X86Space, va: u64) -> bool {
    matches!(p.leaf_entry(s, va), Some((e, Level::PD)) if e & P != 0)
}

/// The 4 KiB entry `va` has (or a demotion would give it).
fn leaf4k<T: TlbHook + 'static>(p: &X86Pmap<T>, s: &X86Space, va: u64) -> Option<u64> {
    let (e, level) = p.leaf_entry(s, va)?;
    if e & P == 0 {
        return None;
    }
    Some(if level == Level::PD {
        let mut flags = e & !PS_FRAME & !(0x80 | 0x1000);
        if e & 0x1000 != 0 {
            flags |= 0x80;
        }
        ((e & PS_FRAME) + (va & (SUPER - 1))) | (flags & !0x1f_f000)
    } else {
        e
    })
}

/// All pages the tests map: the slots and the edges.
fn all_pages() -> impl Iterator<Item = u64> {
    (VA0 - EDGE * PAGE..VA0 + SLOTS * SUPER + EDGE * PAGE).step_by(PAGE as usize)
}

/// Resident and wired counts match the entries; every frame's pv count is
/// the number of pages mapping it; the software MMU agrees with
/// `extract`.
fn books<T: TlbHook + 'static>(p: &X86Pmap<T>, s: &X86Space, what: &str) {
    let (mut mapped, mut wired) = (0, 0);
    let mut maps: HashMap<u64, usize> = HashMap::new();
    for va in all_pages() {
        let Some(e) = leaf4k(p, s, va) else { continue };
        mapped += 1;
        wired += u64::from(e & W != 0);
        let pfn = (e & FRAME) / PAGE;
        *maps.entry(pfn).or_default() += 1;
        assert_eq!(
            p.extract(s, VirtAddr(va)),
            Some(Pfn(pfn)),
            "{what}: extract {va:#x}"
        );
    }
    for pfn in (RUN0..RUN0 + SLOTS * N).chain(OTHER..OTHER + OTHERS) {
        assert_eq!(
            p.mapping_count(Pfn(pfn)),
            maps.get(&pfn).copied().unwrap_or(0),
            "{what}: pv entries of frame {pfn}"
        );
    }
    assert_eq!(s.resident_count(), mapped, "{what}: resident");
    assert_eq!(s.wired_count(), wired, "{what}: wired");
}

const ATTRS: [MemAttr; 4] = [
    MemAttr::WriteBack,
    MemAttr::Uncacheable,
    MemAttr::WriteCombining,
    MemAttr::WriteThrough,
];
const PROTS: [Prot; 4] = [
    Prot::READ,
    Prot::READ.union(Prot::EXECUTE),
    Prot::RW,
    Prot::RW.union(Prot::EXECUTE),
];

fn mapping(pfn: u64, prot: Prot, attr: MemAttr, wired: bool) -> Mapping {
    Mapping::new(page(pfn, attr), prot)
        .access(prot & Prot::WRITE)
        .wired(wired)
}

/// Maps slot `k` with its run: whole (`enter_superpage`) or page by page
/// (promoted when the table is full).
fn fill<T: TlbHook + 'static>(p: &X86Pmap<T>, s: &X86Space, k: u64, whole: bool, m: Mapping) {
    let va0 = slot_va(k);
    let pfn0 = run(k);
    if whole {
        let mut m = m;
        m.page.pfn = Pfn(pfn0);
        assert_eq!(p.enter_superpage(s, VirtAddr(va0), m), Ok(true), "slot {k}");
    } else {
        for i in 0..N {
            let mut m = m;
            m.page.pfn = Pfn(pfn0 + i);
            p.enter(s, VirtAddr(va0 + i * PAGE), m).unwrap();
        }
    }
}

/// A boundary-heavy address for ranges: a slot base, maybe a page or a
/// few off, or anywhere.
fn boundary(r: &mut Rng) -> u64 {
    let base = VA0 + r.below(SLOTS + 1) * SUPER;
    match r.below(6) {
        0..=2 => base,
        3 => base + PAGE,
        4 => base - PAGE,
        _ => VA0 - EDGE * PAGE + r.below(SLOTS * N + 2 * EDGE) * PAGE,
    }
}

/// Pages written through a mapping whose M no one has reported yet, by
/// frame: each must stay `is_modified`.
#[derive(Default)]
struct DirtyModel(HashSet<u64>);

impl DirtyModel {
    fn check<T: TlbHook + 'static>(&self, p: &X86Pmap<T>, what: &str) {
        for &pfn in &self.0 {
            assert!(
                p.is_modified(Pfn(pfn)),
                "{what}: frame {pfn} was written, never reported modified, and is not is_modified"
            );
        }
    }
}

// ------------------------------------------------------------ the fuzz

/// Random operations on four slots straddling a 1 GiB boundary (whole and
/// promoted superpages, wired or not, several cache types and
/// protections), ranges biased to 2 MiB boundaries, CPU accesses through
/// the model TLB. After every step: TLB coherent, dirty model holds,
/// books balance; each `remove` reports exactly the frames the range
/// mapped, each `protect` the dirty writable ones it write-protects.
fn fuzz(la57: bool, seeds_for: Duration, steps: usize) -> u64 {
    let deadline = Instant::now() + seeds_for;
    let mut seed = 0;
    let mut whole_ops = 0u64;
    let mut removals = 0u64;
    while Instant::now() < deadline {
        seed += 1;
        let vm = machine(la57);
        let p = vm.pmap();
        let free0 = vm.free_pages();
        let s = p.create_space().unwrap();
        let mut r = Rng::new(seed + if la57 { 7777 } else { 0 });
        let mut dirty = DirtyModel::default();
        let mut log: Vec<String> = Vec::new();
        for step in 0..steps {
            let what_prefix = format!("la57 {la57} seed {seed} step {step}");
            let note = match r.below(14) {
                0 | 1 => {
                    let k = r.below(SLOTS);
                    let prot = PROTS[r.below(4) as usize];
                    let attr = ATTRS[r.below(4) as usize];
                    let wired = r.below(3) == 0;
                    let whole = r.below(2) == 0;
                    let empty = (0..N).all(|i| leaf4k(p, &s, slot_va(k) + i * PAGE).is_none());
                    if empty {
                        fill(p, &s, k, whole, mapping(0, prot, attr, wired));
                        if prot.contains(Prot::WRITE) {
                            // Entered for a write: the M bit is set, as
                            // if written (the core relies on it).
                            for i in 0..N {
                                dirty.0.insert(run(k) + i);
                            }
                        }
                        format!("fill {k} whole {whole} {prot:?} {attr:?} wired {wired}")
                    } else {
                        format!("fill {k} skipped")
                    }
                }
                2 => {
                    let va = boundary(&mut r).min(VA0 + SLOTS * SUPER + (EDGE - 1) * PAGE);
                    let pfn = if r.below(2) == 0 && (VA0..VA0 + SLOTS * SUPER).contains(&va) {
                        let k = (va - VA0) / SUPER;
                        run(k) + (va - slot_va(k)) / PAGE
                    } else {
                        OTHER + r.below(OTHERS)
                    };
                    let prot = PROTS[r.below(4) as usize];
                    let m = mapping(pfn, prot, ATTRS[r.below(2) as usize], r.below(4) == 0);
                    if let Some(d) = p.enter(&s, VirtAddr(va), m).unwrap()
                        && d.modified
                    {
                        dirty.0.remove(&d.pfn.0);
                    }
                    if prot.contains(Prot::WRITE) {
                        dirty.0.insert(pfn);
                    }
                    format!("enter {va:#x} {pfn} {prot:?}")
                }
                3 | 4 => {
                    let a = boundary(&mut r);
                    let b = boundary(&mut r);
                    let (start, end) = (a.min(b), a.max(b) + if a == b { PAGE } else { 0 });
                    let mut before: Vec<u64> = (start..end)
                        .step_by(PAGE as usize)
                        .filter_map(|va| leaf4k(p, &s, va))
                        .map(|e| (e & FRAME) / PAGE)
                        .collect();
                    let res0 = s.resident_count();
                    let mut got = Vec::new();
                    p.remove(&s, VirtAddr(start)..VirtAddr(end), &mut |d| {
                        got.push(d.pfn.0);
                        if d.modified {
                            dirty.0.remove(&d.pfn.0);
                        }
                    });
                    before.sort_unstable();
                    got.sort_unstable();
                    assert_eq!(
                        got, before,
                        "{what_prefix}: remove {start:#x}..{end:#x} reports"
                    );
                    assert_eq!(
                        res0 - s.resident_count(),
                        before.len() as u64,
                        "{what_prefix}"
                    );
                    for va in (start..end).step_by(PAGE as usize) {
                        assert!(leaf4k(p, &s, va).is_none(), "{what_prefix}: {va:#x} left");
                    }
                    if end - start >= SUPER {
                        whole_ops += 1;
                    }
                    format!("remove {start:#x}..{end:#x}")
                }
                5 | 6 => {
                    let a = boundary(&mut r);
                    let b = boundary(&mut r);
                    let (start, end) = (a.min(b), a.max(b) + if a == b { PAGE } else { 0 });
                    let prot = PROTS[r.below(4) as usize];
                    let mut want: Vec<u64> = if prot.contains(Prot::WRITE) {
                        Vec::new()
                    } else {
                        (start..end)
                            .step_by(PAGE as usize)
                            .filter_map(|va| leaf4k(p, &s, va))
                            .filter(|e| e & (RW | D) == RW | D)
                            .map(|e| (e & FRAME) / PAGE)
                            .collect()
                    };
                    let pre: Vec<Option<u64>> = (start..end)
                        .step_by(PAGE as usize)
                        .map(|va| leaf4k(p, &s, va))
                        .collect();
                    let res0 = (s.resident_count(), s.wired_count());
                    let mut got = Vec::new();
                    p.protect(&s, VirtAddr(start)..VirtAddr(end), prot, &mut |d| {
                        assert!(d.modified, "a protect reports only modified pages");
                        got.push(d.pfn.0);
                        dirty.0.remove(&d.pfn.0);
                    });
                    want.sort_unstable();
                    got.sort_unstable();
                    assert_eq!(
                        got, want,
                        "{what_prefix}: protect {start:#x}..{end:#x} {prot:?} reports"
                    );
                    assert_eq!((s.resident_count(), s.wired_count()), res0, "{what_prefix}");
                    for (va, old) in (start..end).step_by(PAGE as usize).zip(pre) {
                        let now = leaf4k(p, &s, va);
                        let Some(old) = old else {
                            assert_eq!(now, None, "{what_prefix}: protect mapped {va:#x}");
                            continue;
                        };
                        let now = now.unwrap_or_else(|| panic!("{what_prefix}: {va:#x} lost"));
                        let mut want = old;
                        if !prot.contains(Prot::WRITE) {
                            want &= !(RW | D);
                        }
                        if !prot.contains(Prot::EXECUTE) {
                            want |= NX;
                        }
                        assert_eq!(
                            now & !A,
                            want & !A,
                            "{what_prefix}: protect {prot:?} of {va:#x}: {old:#x} -> {now:#x}"
                        );
                    }
                    if end - start >= SUPER {
                        whole_ops += 1;
                    }
                    format!("protect {start:#x}..{end:#x} {prot:?}")
                }
                7 => {
                    let va = boundary(&mut r);
                    let Some(pfn) = p.extract(&s, VirtAddr(va)).map(|f| f.0) else {
                        continue;
                    };
                    match r.below(6) {
                        0 => {
                            if p.remove_all(Pfn(pfn)).modified {
                                dirty.0.remove(&pfn);
                            }
                        }
                        1 => {
                            if p.page_protect(Pfn(pfn), Prot::READ).modified {
                                dirty.0.remove(&pfn);
                            }
                        }
                        2 => {
                            // The core cleans first: it asked is_modified.
                            if dirty.0.remove(&pfn) {
                                assert!(p.is_modified(Pfn(pfn)), "{what_prefix}");
                            }
                            p.clear_modify(Pfn(pfn));
                        }
                        3 => drop(p.ts_referenced(Pfn(pfn))),
                        4 => p.change_wiring(&s, VirtAddr(va), r.below(2) == 0),
                        _ => drop(p.is_modified(Pfn(pfn))),
                    }
                    format!("per-page op on {pfn} at {va:#x}")
                }
                _ => {
                    let va = VA0 - EDGE * PAGE
                        + r.below(SLOTS * N + 2 * EDGE) * PAGE
                        + r.below(PAGE / 8) * 8;
                    let acc = [Acc::Read, Acc::Write, Acc::Exec][r.below(3) as usize];
                    let got = cpu(p, &s, va, acc);
                    if acc == Acc::Write
                        && let Some(pa) = got
                    {
                        dirty.0.insert(pa / PAGE);
                    }
                    format!("cpu {va:#x} {acc:?} -> {got:?}")
                }
            };
            log.push(note);
            if log.len() > 10 {
                log.remove(0);
            }
            let what = format!("{what_prefix}: {log:?}");
            coherent(p, &s, &what);
            dirty.check(p, &what);
            if step % 4 == 0 {
                books(p, &s, &what);
            }
        }
        books(p, &s, "end");
        p.remove(
            &s,
            VirtAddr(VA0 - SUPER)..VirtAddr(VA0 + (SLOTS + 1) * SUPER),
            &mut |_| {},
        );
        assert_eq!((s.resident_count(), s.wired_count()), (0, 0), "seed {seed}");
        assert_eq!(
            p.table_pages(&s),
            1,
            "seed {seed}: tables left after removing all"
        );
        p.destroy_space(&s);
        let st = p.superpage_stats();
        assert_eq!(
            st.made(),
            st.demotions.load(Ordering::Relaxed) + st.removals.load(Ordering::Relaxed),
            "seed {seed}: made = demotions + removals"
        );
        assert_eq!(vm.free_pages(), free0, "seed {seed}: frames leaked");
        removals += st.removals.load(Ordering::Relaxed);
    }
    eprintln!(
        "fuzz la57 {la57}: {seed} seeds, {whole_ops} ops over >= 2 MiB, {removals} whole removals"
    );
    assert!(whole_ops > 0 && removals > 0);
    seed
}

#[test]
fn w01_fuzz_four_level_tlb_dirty_books() {
    fuzz(false, Duration::from_secs(6), 120);
}

#[test]
fn w02_fuzz_five_level_tlb_dirty_books() {
    fuzz(true, Duration::from_secs(4), 120);
}

// ------------------------------------------------------ targeted tests

/// The two ways in, as `fill`'s `whole` flag.
const WAYS: [(&str, bool); 2] = [("promoted", false), ("entered whole", true)];

/// 4 KiB translations a CPU cached before a promotion (the promotion
/// invalidates only the 2 MiB base) must go with a whole remove or a
/// write-protect; so must the 2 MiB translation; ranges exactly on the
/// 2 MiB boundaries of two superpages across the 1 GiB line.
#[test]
fn w03_tlb_entries_from_before_promotion_die_with_a_whole_remove_or_protect() {
    for la57 in [false, true] {
        for protect in [false, true] {
            let vm = machine(la57);
            let p = vm.pmap();
            let free0 = vm.free_pages();
            let s = p.create_space().unwrap();
            // Slots 1 and 2 straddle 1 GiB; page by page so every page's
            // 4 KiB translation is cached before the promotion.
            for k in [1, 2] {
                for i in 0..N {
                    let va = slot_va(k) + i * PAGE;
                    p.enter(
                        &s,
                        VirtAddr(va),
                        mapping(run(k) + i, Prot::RW, MemAttr::WriteBack, false),
                    )
                    .unwrap();
                    if i < N - 1 {
                        assert_eq!(cpu(p, &s, va, Acc::Write), Some((run(k) + i) * PAGE));
                    }
                }
                assert!(
                    is_super(p, &s, slot_va(k)),
                    "la57 {la57}: slot {k} promoted"
                );
                // And the 2 MiB translation.
                cpu(p, &s, slot_va(k) + (N - 1) * PAGE + 5, Acc::Write).unwrap();
            }
            let cached = p.tlb().entries.lock().unwrap().len();
            assert!(
                cached >= 2 * (N as usize - 1),
                "the CPU holds old 4 KiB entries: {cached}"
            );
            let what = format!("la57 {la57} protect {protect}");
            let range = VirtAddr(slot_va(1))..VirtAddr(slot_va(3));
            let mut reports = Vec::new();
            if protect {
                p.protect(&s, range, Prot::READ, &mut |d| {
                    reports.push((d.pfn.0, d.modified))
                });
                assert!(
                    is_super(p, &s, slot_va(1)) && is_super(p, &s, slot_va(2)),
                    "{what}"
                );
            } else {
                p.remove(&s, range, &mut |d| reports.push((d.pfn.0, d.modified)));
            }
            reports.sort_unstable();
            let want: Vec<(u64, bool)> = (run(1)..run(1) + 2 * N).map(|f| (f, true)).collect();
            assert_eq!(reports, want, "{what}: every page reported modified once");
            coherent(p, &s, &what);
            for k in [1, 2] {
                for i in [0, 1, 300, 511] {
                    let va = slot_va(k) + i * PAGE;
                    assert_eq!(
                        cpu(p, &s, va, Acc::Write),
                        None,
                        "{what}: a CPU still writes {va:#x}"
                    );
                    assert_eq!(cpu(p, &s, va, Acc::Read).is_some(), protect, "{what}");
                }
            }
            coherent(p, &s, &what);
            assert_eq!(
                p.superpage_stats().demotions.load(Ordering::Relaxed),
                0,
                "{what}"
            );
            books(p, &s, &what);
            p.destroy_space(&s);
            assert_eq!(vm.free_pages(), free0, "{what}: leaked");
        }
    }
}

/// Wired superpages (entered whole wired, or promoted from wired
/// entries): a whole protect keeps every page wired; a whole remove
/// takes 512 wired from the count per superpage; destroy frees all.
#[test]
fn w04_wired_superpages_removed_and_protected_whole_keep_the_wired_count() {
    for (way, whole) in WAYS {
        let vm = machine(false);
        let p = vm.pmap();
        let free0 = vm.free_pages();
        let s = p.create_space().unwrap();
        for k in 0..SLOTS {
            fill(
                p,
                &s,
                k,
                whole,
                mapping(0, Prot::RW, MemAttr::WriteBack, k % 2 == 0),
            );
            assert!(is_super(p, &s, slot_va(k)), "{way}: slot {k}");
        }
        assert_eq!(s.wired_count(), 2 * N, "{way}");
        assert_eq!(s.resident_count(), SLOTS * N, "{way}");
        p.protect(
            &s,
            VirtAddr(VA0)..VirtAddr(VA0 + SLOTS * SUPER),
            Prot::READ,
            &mut |_| {},
        );
        assert_eq!(s.wired_count(), 2 * N, "{way}: after protect");
        for k in 0..SLOTS {
            let e = leaf4k(p, &s, slot_va(k) + 7 * PAGE).unwrap();
            assert_eq!(
                e & W != 0,
                k % 2 == 0,
                "{way}: slot {k} wired bit after protect"
            );
            assert!(is_super(p, &s, slot_va(k)), "{way}");
        }
        books(p, &s, way);
        // Slot 0 (wired) and slot 1 (not) removed whole.
        p.remove(&s, VirtAddr(slot_va(0))..VirtAddr(slot_va(2)), &mut |_| {});
        assert_eq!(s.wired_count(), N, "{way}: after removing slots 0, 1");
        assert_eq!(s.resident_count(), 2 * N, "{way}");
        books(p, &s, way);
        // Unwire one page of slot 2 (demotes), then remove all of it.
        p.change_wiring(&s, VirtAddr(slot_va(2) + 3 * PAGE), false);
        assert_eq!(s.wired_count(), N - 1, "{way}");
        p.remove(&s, VirtAddr(slot_va(2))..VirtAddr(slot_va(4)), &mut |_| {});
        assert_eq!((s.wired_count(), s.resident_count()), (0, 0), "{way}");
        assert_eq!(p.table_pages(&s), 1, "{way}");
        let st = p.superpage_stats();
        assert_eq!(
            st.removals.load(Ordering::Relaxed),
            3,
            "{way}: three removed whole"
        );
        p.destroy_space(&s);
        assert_eq!(vm.free_pages(), free0, "{way}: leaked");
    }
}

/// mprotect read-only of a whole dirty superpage, then a write fault
/// enters one page again (same frame, write access): that page is
/// writable and dirty, the others read-only and clean; a whole remove
/// then reports that one modified. The M of the first protect was
/// reported for every page.
#[test]
fn w05_protect_read_only_then_write_fault_same_frame_then_remove_whole() {
    for (way, whole) in WAYS {
        let vm = machine(false);
        let p = vm.pmap();
        let s = p.create_space().unwrap();
        fill(
            p,
            &s,
            0,
            whole,
            mapping(0, Prot::RW, MemAttr::WriteBack, false),
        );
        let mut first = Vec::new();
        p.protect(
            &s,
            VirtAddr(slot_va(0))..VirtAddr(slot_va(1)),
            Prot::READ,
            &mut |d| {
                first.push(d.pfn.0);
            },
        );
        assert_eq!(first.len() as u64, N, "{way}");
        for i in [0u64, 100, 511] {
            assert!(
                !p.is_modified(Pfn(run(0) + i)),
                "{way}: clean after protect"
            );
        }
        assert!(cpu(p, &s, slot_va(0) + 9 * PAGE, Acc::Write).is_none());
        // The fault: same frame, RW, for a write.
        let va = slot_va(0) + 9 * PAGE;
        let d = p
            .enter(
                &s,
                VirtAddr(va),
                mapping(run(0) + 9, Prot::RW, MemAttr::WriteBack, false),
            )
            .unwrap();
        assert_eq!(d, None, "{way}: same frame displaces nothing");
        assert_eq!(
            cpu(p, &s, va + 8, Acc::Write),
            Some((run(0) + 9) * PAGE + 8),
            "{way}"
        );
        coherent(p, &s, way);
        assert!(p.is_modified(Pfn(run(0) + 9)), "{way}");
        assert!(!p.is_modified(Pfn(run(0) + 10)), "{way}");
        assert!(
            cpu(p, &s, va + PAGE, Acc::Write).is_none(),
            "{way}: neighbour writable"
        );
        let mut gone = Vec::new();
        p.remove(&s, VirtAddr(slot_va(0))..VirtAddr(slot_va(1)), &mut |d| {
            if d.modified {
                gone.push(d.pfn.0);
            }
        });
        assert_eq!(
            gone,
            vec![run(0) + 9],
            "{way}: only the rewritten page is modified"
        );
        coherent(p, &s, way);
        books(p, &s, way);
    }
}

/// protect(READ) without EXECUTE under NXE sets NX in the 2 MiB entry:
/// no page executes afterwards, from the tables or from a translation a
/// CPU cached to execute before; protect(READ | EXECUTE) does not take
/// execute away from an executable superpage.
#[test]
fn w06_protect_without_execute_sets_nx_and_drops_cached_exec_translations() {
    for (way, whole) in WAYS {
        let vm = machine(false);
        let p = vm.pmap();
        let s = p.create_space().unwrap();
        let rwx = Prot::RW | Prot::EXECUTE;
        fill(p, &s, 1, whole, mapping(0, rwx, MemAttr::WriteBack, false));
        assert!(is_super(p, &s, slot_va(1)), "{way}");
        for i in [0u64, 5, 511] {
            assert!(
                cpu(p, &s, slot_va(1) + i * PAGE, Acc::Exec).is_some(),
                "{way}"
            );
        }
        p.protect(
            &s,
            VirtAddr(slot_va(1))..VirtAddr(slot_va(2)),
            Prot::READ | Prot::EXECUTE,
            &mut |_| {},
        );
        assert!(
            cpu(p, &s, slot_va(1) + 5 * PAGE, Acc::Exec).is_some(),
            "{way}: still executes"
        );
        coherent(p, &s, way);
        p.protect(
            &s,
            VirtAddr(slot_va(1))..VirtAddr(slot_va(2)),
            Prot::READ,
            &mut |_| {},
        );
        coherent(p, &s, way);
        assert!(is_super(p, &s, slot_va(1)), "{way}: kept whole");
        for i in [0u64, 5, 200, 511] {
            let va = slot_va(1) + i * PAGE;
            assert!(
                cpu(p, &s, va, Acc::Exec).is_none(),
                "{way}: executes {va:#x}"
            );
            assert!(
                p.translate_access(&s, va, Access::USER_EXEC).is_err(),
                "{way}"
            );
            assert!(cpu(p, &s, va, Acc::Read).is_some(), "{way}");
        }
        // Demoted afterwards, each page keeps NX.
        p.change_wiring(&s, VirtAddr(slot_va(1)), true);
        assert!(!is_super(p, &s, slot_va(1)), "{way}");
        for i in [0u64, 5, 511] {
            assert!(
                leaf4k(p, &s, slot_va(1) + i * PAGE).unwrap() & NX != 0,
                "{way}"
            );
        }
        books(p, &s, way);
    }
}

/// Cache types other than write-back: a whole protect keeps the PAT,
/// PCD and PWT bits of the 2 MiB entry (PAT at bit 12), a demotion after
/// it moves PAT back to bit 7 in every page, and the CPU's cached type
/// stays right.
#[test]
fn w07_pat_bits_survive_a_whole_protect_and_the_demotion_after() {
    for attr in [
        MemAttr::Uncacheable,
        MemAttr::WriteCombining,
        MemAttr::WriteProtected,
        MemAttr::WriteThrough,
    ] {
        for (way, whole) in WAYS {
            let what = format!("{attr:?} {way}");
            let vm = machine(false);
            let p = vm.pmap();
            let s = p.create_space().unwrap();
            fill(p, &s, 2, whole, mapping(0, Prot::RW, attr, false));
            assert!(is_super(p, &s, slot_va(2)), "{what}");
            let (pde0, _) = p.leaf_entry(&s, slot_va(2)).unwrap();
            let idx = u64::from(attr.index());
            assert_eq!(cache_index(pde0, Level::PD), idx, "{what}");
            cpu(p, &s, slot_va(2) + 3, Acc::Read).unwrap();
            p.protect(
                &s,
                VirtAddr(slot_va(2))..VirtAddr(slot_va(3)),
                Prot::READ,
                &mut |_| {},
            );
            let (pde, level) = p.leaf_entry(&s, slot_va(2)).unwrap();
            assert_eq!(level, Level::PD, "{what}");
            assert_eq!(
                cache_index(pde, Level::PD),
                idx,
                "{what}: {pde0:#x} -> {pde:#x}"
            );
            assert_eq!(
                pde & !(RW | D | NX | A),
                pde0 & !(RW | D | NX | A),
                "{what}"
            );
            cpu(p, &s, slot_va(2) + 3, Acc::Read).unwrap();
            coherent(p, &s, &what);
            // A page entered again for a write demotes it.
            p.enter(
                &s,
                VirtAddr(slot_va(2) + 4 * PAGE),
                mapping(run(2) + 4, Prot::RW, attr, false),
            )
            .unwrap();
            assert!(!is_super(p, &s, slot_va(2)), "{what}");
            for i in 0..N {
                let (e, level) = p.leaf_entry(&s, slot_va(2) + i * PAGE).unwrap();
                assert_eq!(level, Level::PT);
                assert_eq!(cache_index(e, Level::PT), idx, "{what}: page {i}: {e:#x}");
                assert_eq!(e & FRAME, (run(2) + i) * PAGE, "{what}: page {i}");
            }
            coherent(p, &s, &what);
            books(p, &s, &what);
        }
    }
}

// ---------------------------------------------------------------- races

fn plain_machine(la57: bool) -> Arc<Vm<X86Pmap>> {
    let pmap = if la57 {
        X86Pmap::new_la57()
    } else {
        X86Pmap::new()
    };
    Vm::new(pmap, test_config(MEM)).unwrap()
}

/// Whole removes and protects of two superpages across the 1 GiB line
/// (made whole or promoted, in turn) race software-MMU writers and
/// readers, per-page operations on their frames (`remove_all`,
/// `page_protect`, `ts_referenced`, `is_modified`, `clear_modify` of
/// frames no writer writes) and `enter` / `enter_quick_run` of other
/// frames at the edge pages. Every write lands in a frame that is then
/// reported modified or still `is_modified`; the books balance after each
/// round; no frame leaks; made = demotions + removals.
#[test]
fn w08_whole_remove_and_protect_race_walkers_and_per_page_operations() {
    for la57 in [false, true] {
        let vm = plain_machine(la57);
        let p = vm.pmap();
        let free0 = vm.free_pages();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rounds = 0u64;
        while Instant::now() < deadline {
            rounds += 1;
            let s = p.create_space().unwrap();
            let whole = rounds % 2 == 0;
            for k in [1, 2] {
                fill(
                    p,
                    &s,
                    k,
                    whole,
                    mapping(0, Prot::RW, MemAttr::WriteBack, rounds % 3 == 0),
                );
            }
            // Frames reported modified (sinks and RefMods) and written.
            let reported = Mutex::new(HashSet::new());
            let written = Mutex::new(HashSet::new());
            let stop = AtomicBool::new(false);
            let bar = Barrier::new(4);
            std::thread::scope(|sc| {
                // Writers and readers through the software MMU.
                for t in 0..2u64 {
                    let (s, stop, bar, written) = (&s, &stop, &bar, &written);
                    sc.spawn(move || {
                        let mut r = Rng::new(rounds * 31 + t);
                        bar.wait();
                        let mut mine = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let va = slot_va(1) + r.below(2 * N) * PAGE;
                            let w = r.below(2) == 0;
                            let acc = if w {
                                Access::USER_WRITE
                            } else {
                                Access::USER_READ
                            };
                            if let Ok(tr) = p.translate_access(s, va, acc) {
                                assert_eq!(
                                    tr.pa.as_u64() / PAGE,
                                    run(1) + (va - slot_va(1)) / PAGE,
                                    "a walk found another frame at {va:#x}"
                                );
                                if w {
                                    mine.push(tr.pa.as_u64() / PAGE);
                                }
                            }
                        }
                        written.lock().unwrap().extend(mine);
                    });
                }
                // Per-page operations and enters at the edges.
                {
                    let (s, stop, bar, reported) = (&s, &stop, &bar, &reported);
                    sc.spawn(move || {
                        let mut r = Rng::new(rounds * 77);
                        bar.wait();
                        while !stop.load(Ordering::Relaxed) {
                            let pfn = Pfn(run(1) + r.below(2 * N));
                            match r.below(7) {
                                0 => {
                                    if p.remove_all(pfn).modified {
                                        reported.lock().unwrap().insert(pfn.0);
                                    }
                                }
                                1 => {
                                    if p.page_protect(pfn, Prot::READ).modified {
                                        reported.lock().unwrap().insert(pfn.0);
                                    }
                                }
                                2 => drop(p.ts_referenced(pfn)),
                                3 => drop(p.is_modified(pfn)),
                                4 => {
                                    let i = r.below(EDGE);
                                    let m = mapping(OTHER + i, Prot::RW, MemAttr::WriteBack, false);
                                    let va = if r.below(2) == 0 {
                                        slot_va(0) + (N - 1 - i) * PAGE
                                    } else {
                                        slot_va(3) + i * PAGE
                                    };
                                    p.enter(s, VirtAddr(va), m).unwrap();
                                }
                                5 => {
                                    let pages: Vec<Option<PageInfo>> = (0..EDGE)
                                        .map(|i| Some(page(OTHER + EDGE + i, MemAttr::WriteBack)))
                                        .collect();
                                    p.enter_quick_run(s, VirtAddr(slot_va(3)), &pages, Prot::READ);
                                }
                                _ => p.clear_modify(Pfn(OTHER + r.below(2 * EDGE))),
                            }
                        }
                    });
                }
                // Whole operations.
                let mut r = Rng::new(rounds);
                bar.wait();
                for _ in 0..6 {
                    let (a, b) = match r.below(3) {
                        0 => (slot_va(1), slot_va(2)),
                        1 => (slot_va(2), slot_va(3)),
                        _ => (slot_va(1), slot_va(3)),
                    };
                    let range = VirtAddr(a)..VirtAddr(b);
                    let mut sink = |d: vm_core::pmap::Displaced| {
                        if d.modified {
                            reported.lock().unwrap().insert(d.pfn.0);
                        }
                    };
                    if r.below(2) == 0 {
                        p.protect(&s, range, Prot::READ, &mut sink);
                    } else {
                        p.remove(&s, range, &mut sink);
                    }
                    // Map again what is missing (writable, as a write
                    // fault would), whole where the 2 MiB is empty.
                    for k in [1, 2] {
                        let empty = (0..N)
                            .all(|i| p.extract(&s, VirtAddr(slot_va(k) + i * PAGE)).is_none());
                        let m = mapping(run(k), Prot::RW, MemAttr::WriteBack, false);
                        if empty
                            && whole
                            && p.enter_superpage(&s, VirtAddr(slot_va(k)), m) == Ok(true)
                        {
                            continue;
                        }
                        for i in 0..N {
                            let va = slot_va(k) + i * PAGE;
                            if p.extract(&s, VirtAddr(va)).is_none() {
                                let mut m = m;
                                m.page.pfn = Pfn(run(k) + i);
                                if let Some(d) = p.enter(&s, VirtAddr(va), m).unwrap()
                                    && d.modified
                                {
                                    reported.lock().unwrap().insert(d.pfn.0);
                                }
                            }
                        }
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
            let what = format!("la57 {la57} round {rounds}");
            let reported = reported.into_inner().unwrap();
            for pfn in written.into_inner().unwrap() {
                assert!(
                    reported.contains(&pfn) || p.is_modified(Pfn(pfn)),
                    "{what}: a write to frame {pfn} is lost"
                );
            }
            books(p, &s, &what);
            p.destroy_space(&s);
            for pfn in (RUN0..RUN0 + SLOTS * N).chain(OTHER..OTHER + OTHERS) {
                assert_eq!(
                    p.mapping_count(Pfn(pfn)),
                    0,
                    "{what}: pv of {pfn} after destroy"
                );
            }
        }
        let st = p.superpage_stats();
        eprintln!(
            "w08 la57 {la57}: {rounds} rounds, made {}, demotions {}, removals {}",
            st.made(),
            st.demotions.load(Ordering::Relaxed),
            st.removals.load(Ordering::Relaxed)
        );
        assert_eq!(
            st.made(),
            st.demotions.load(Ordering::Relaxed) + st.removals.load(Ordering::Relaxed),
            "la57 {la57}"
        );
        assert!(st.removals.load(Ordering::Relaxed) > 0);
        assert_eq!(vm.free_pages(), free0, "la57 {la57}: leaked");
    }
}

/// `destroy_space` (whole removals of superpages inside) races walkers,
/// per-page operations on the superpages' frames, enters and
/// `enter_superpage`: afterwards no pv entry is left for any frame, every
/// operation on the space fails or does nothing, and every table frame
/// (spares included) is back.
#[test]
fn w09_destroy_space_races_everything_on_whole_superpages() {
    let vm = plain_machine(false);
    let p = vm.pmap();
    let free0 = vm.free_pages();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        let s = p.create_space().unwrap();
        for k in 0..3 {
            fill(
                p,
                &s,
                k,
                (rounds + k) % 2 == 0,
                mapping(0, Prot::RW, MemAttr::WriteBack, k == 1),
            );
        }
        let bar = Barrier::new(4);
        let gone = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let (s, bar, gone) = (&s, &bar, &gone);
            sc.spawn(move || {
                bar.wait();
                let mut r = Rng::new(rounds);
                for _ in 0..20_000 {
                    let va = VA0 + r.below(3 * N) * PAGE;
                    let _ = p.translate_access(s, va, Access::USER_WRITE);
                    if gone.load(Ordering::Relaxed) && r.below(64) == 0 {
                        break;
                    }
                }
            });
            sc.spawn(move || {
                bar.wait();
                let mut r = Rng::new(rounds + 5);
                for _ in 0..200 {
                    let pfn = Pfn(run(0) + r.below(3 * N));
                    match r.below(5) {
                        0 => drop(p.remove_all(pfn)),
                        1 => drop(p.page_protect(pfn, Prot::READ)),
                        2 => drop(p.ts_referenced(pfn)),
                        3 => p.clear_modify(pfn),
                        _ => drop(p.is_modified(pfn)),
                    }
                }
            });
            sc.spawn(move || {
                bar.wait();
                let m = mapping(run(3), Prot::RW, MemAttr::WriteBack, false);
                let _ = p.enter_superpage(s, VirtAddr(slot_va(3)), m);
                for i in 0..EDGE {
                    let m = mapping(OTHER + i, Prot::RW, MemAttr::WriteBack, false);
                    let _ = p.enter(s, VirtAddr(slot_va(3) + (N + i) * PAGE), m);
                }
            });
            bar.wait();
            if rounds % 2 == 0 {
                std::thread::yield_now();
            }
            p.destroy_space(s);
            gone.store(true, Ordering::Relaxed);
        });
        let what = format!("round {rounds}");
        for pfn in (RUN0..RUN0 + SLOTS * N).chain(OTHER..OTHER + OTHERS) {
            assert_eq!(
                p.mapping_count(Pfn(pfn)),
                0,
                "{what}: pv of {pfn} after destroy"
            );
        }
        assert_eq!(
            p.enter(
                &s,
                VirtAddr(VA0),
                mapping(OTHER, Prot::RW, MemAttr::WriteBack, false)
            ),
            Err(vm_core::pmap::PmapError::SpaceDestroyed),
            "{what}"
        );
        assert!(
            p.translate_access(&s, VA0, Access::USER_READ).is_err(),
            "{what}"
        );
        drop(s);
        assert_eq!(vm.free_pages(), free0, "{what}: leaked");
    }
    let st = p.superpage_stats();
    assert_eq!(
        st.made(),
        st.demotions.load(Ordering::Relaxed) + st.removals.load(Ordering::Relaxed)
    );
    eprintln!(
        "w09: {rounds} rounds, removals {}",
        st.removals.load(Ordering::Relaxed)
    );
}
