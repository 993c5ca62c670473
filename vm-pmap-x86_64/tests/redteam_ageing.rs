//! Red team: `ts_referenced` ageing a 2 MiB superpage without splitting it
//! (commit e683961).
//!
//! A model TLB (a [`TlbHook`] that keeps what a simulated CPU cached and
//! drops it as x86 `invlpg` would) checks that no translation a CPU could
//! still use outlives a change of its entry; other tests check the
//! hash picks exactly one page of the 512, that A/M and pv counts survive,
//! and that the ageing racing demotion, promotion and writers loses no
//! dirty bit.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_core::pmap::{PageInfo, Pmap};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::{Access, CpuMode};
use vm_pmap_x86_64::paging::Level;
use vm_pmap_x86_64::{PteFlags, TlbHook, X86Pmap, X86Space};
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = 512;
const BASE_PFN: u64 = 3072;
const VA: u64 = 0x40_0000_0000;
const A: u64 = PteFlags::ACCESSED.bits();
const D: u64 = PteFlags::DIRTY.bits();
const RW: u64 = PteFlags::WRITABLE.bits();

/// What the simulated CPU cached for one translation.
#[derive(Clone, Copy, Debug)]
struct Cached {
    /// Physical address of the first byte the entry maps.
    pa: u64,
    writable: bool,
    dirty: bool,
}

/// A TLB model: (root, page or 2 MiB base, huge) -> what was cached.
/// `invalidate_page(va)` drops the 4 KiB entry of `va`'s page and any
/// 2 MiB entry containing `va` (no more: x86 does not promise that
/// `invlpg` of one address drops 4 KiB entries of other addresses).
#[derive(Default)]
struct ModelTlb {
    entries: Mutex<HashMap<(u64, u64, bool), Cached>>,
    pages: Mutex<Vec<(u64, u64)>>,
    fulls: Mutex<Vec<u64>>,
}

impl TlbHook for ModelTlb {
    fn invalidate_page(&self, root: u64, va: u64) {
        let mut e = self.entries.lock().unwrap();
        e.remove(&(root, va & !(PAGE - 1), false));
        e.remove(&(root, va & !(SUPER - 1), true));
        self.pages.lock().unwrap().push((root, va));
    }
    fn invalidate_all(&self, root: u64) {
        self.entries.lock().unwrap().retain(|k, _| k.0 != root);
        self.fulls.lock().unwrap().push(root);
    }
}

type TPmap = X86Pmap<ModelTlb>;

fn machine() -> Arc<Vm<TPmap>> {
    let pmap = X86Pmap::with_hook(CpuMode::default(), ModelTlb::default());
    Vm::new(pmap, test_config(4096)).unwrap()
}

fn page(pfn: u64) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr: MemAttr::WriteBack,
    }
}

fn enter(p: &TPmap, s: &X86Space, i: u64) {
    let m = Mapping::new(page(BASE_PFN + i), Prot::RW).access(Prot::WRITE);
    p.enter(s, VirtAddr(VA + i * PAGE), m).unwrap();
}

fn is_super(p: &TPmap, s: &X86Space) -> bool {
    p.leaf_entry(s, VA).is_some_and(|(_, l)| l == Level::PD)
}

/// A CPU access through the model TLB: a hit uses the cached
/// translation (a write hit needs a writable, dirty entry, as the CPU
/// walks to set D otherwise); a miss walks (software MMU) and caches.
fn cpu(p: &TPmap, s: &X86Space, va: u64, write: bool) -> Option<u64> {
    let tlb = p.tlb();
    {
        let e = tlb.entries.lock().unwrap();
        for (key, off) in [
            ((s.root(), va & !(PAGE - 1), false), va & (PAGE - 1)),
            ((s.root(), va & !(SUPER - 1), true), va & (SUPER - 1)),
        ] {
            if let Some(c) = e.get(&key)
                && (!write || (c.writable && c.dirty))
            {
                return Some(c.pa + off);
            }
        }
    }
    let access = if write {
        Access::USER_WRITE
    } else {
        Access::USER_READ
    };
    let t = p.translate_access(s, va, access).ok()?;
    let huge = t.level == Level::PD;
    let span = if huge { SUPER } else { PAGE };
    let c = Cached {
        pa: t.pa.as_u64() & !(span - 1),
        writable: t.leaf & RW != 0,
        dirty: t.leaf & D != 0,
    };
    tlb.entries
        .lock()
        .unwrap()
        .insert((s.root(), va & !(span - 1), huge), c);
    Some(t.pa.as_u64())
}

/// Every translation the model TLB holds for `s` must still be what the
/// tables say, with no more rights, and a cached dirty writable entry
/// must be dirty in the tables (else a write through it is lost).
fn assert_tlb_coherent(p: &TPmap, s: &X86Space, what: &str) {
    let e = p.tlb().entries.lock().unwrap().clone();
    for ((root, va, huge), c) in e {
        if root != s.root() {
            continue;
        }
        let step = if huge { SUPER } else { PAGE };
        for off in (0..step).step_by(PAGE as usize) {
            let at = va + off;
            let Some((leaf, level)) = p.leaf_entry(s, at) else {
                panic!("{what}: the TLB still maps {at:#x} (cached {c:?}); the tables do not");
            };
            let frame = if level == Level::PD {
                (leaf & 0x000f_ffff_ffe0_0000) + (at & (SUPER - 1))
            } else {
                leaf & 0x000f_ffff_ffff_f000
            };
            assert!(
                leaf & 1 != 0 && frame == c.pa + off,
                "{what}: the TLB maps {at:#x} to {:#x} (cached {c:?}), the tables to {leaf:#x}",
                c.pa + off
            );
            if c.writable {
                assert!(
                    leaf & RW != 0,
                    "{what}: the TLB still writes {at:#x} (cached {c:?}); the entry is {leaf:#x}"
                );
            }
            if c.writable && c.dirty {
                assert!(
                    leaf & D != 0,
                    "{what}: a write through the TLB at {at:#x} would leave no M (entry {leaf:#x})"
                );
            }
        }
    }
}

/// The frame whose `ts_referenced` clears A in the 2 MiB entry: asked in
/// frame order, the last one that reports referenced.
fn clearer(p: &TPmap, s: &X86Space) -> u64 {
    let leaf = p.pte(s, VA).unwrap();
    assert_ne!(leaf & A, 0, "A set before the pass");
    let mut found = None;
    for i in 0..PAGES {
        let n = p.ts_referenced(Pfn(BASE_PFN + i));
        if p.pte(s, VA).unwrap() & A == 0 {
            assert_eq!(n, 1, "the clearing page reports referenced");
            found = Some(i);
            break;
        }
        assert_eq!(n, 1, "page {i}: referenced while A is set");
    }
    found.expect("no page of the 512 cleared A")
}

/// Fills the table with the run, the CPU touching (write) page `k`
/// before the last `enter` promotes: its 4 KiB translation is cached.
fn fill_with_cached_page(p: &TPmap, s: &X86Space, k: u64) {
    for i in 0..PAGES - 1 {
        enter(p, s, i);
    }
    assert_eq!(
        cpu(p, s, VA + k * PAGE + 8, true),
        Some((BASE_PFN + k) * PAGE + 8)
    );
    enter(p, s, PAGES - 1);
    assert!(is_super(p, s), "promoted");
    assert_tlb_coherent(p, s, "after promotion");
}

/// The 4 KiB translation cached before promotion (the pmap's promotion
/// leaves those, as FreeBSD's does) must be dropped when the page is
/// unmapped, also after `ts_referenced` took A from the 2 MiB entry.
/// FreeBSD handles this by never demoting an unaccessed 2 MiB entry (it
/// removes it and invalidates its whole range, `PG_PROMOTED`).
#[test]
fn unmap_after_ageing_drops_a_translation_cached_before_promotion() {
    let vm = machine();
    let p = vm.pmap();
    let s = p.create_space().unwrap();
    let k = 5;
    fill_with_cached_page(p, &s, k);
    let _ = clearer(p, &s);
    assert_tlb_coherent(p, &s, "after ageing");
    p.remove(
        &s,
        VirtAddr(VA + k * PAGE)..VirtAddr(VA + (k + 1) * PAGE),
        &mut |_| {},
    );
    assert!(p.extract(&s, VirtAddr(VA + k * PAGE)).is_none());
    assert_tlb_coherent(p, &s, "after unmapping the page");
    p.destroy_space(&s);
}

/// The same through `page_protect` (read-only, as page-out and fork
/// do): a stale writable translation would let the CPU write a page the
/// VM believes clean and write-protected.
#[test]
fn write_protect_after_ageing_drops_a_writable_translation_cached_before_promotion() {
    let vm = machine();
    let p = vm.pmap();
    let s = p.create_space().unwrap();
    let k = 77;
    fill_with_cached_page(p, &s, k);
    let _ = clearer(p, &s);
    let rm = p.page_protect(Pfn(BASE_PFN + k), Prot::READ);
    assert!(rm.modified, "the page was written");
    assert_tlb_coherent(p, &s, "after page_protect(READ)");
    p.destroy_space(&s);
}

/// And through `protect` of a range and `clear_modify`.
#[test]
fn range_protect_and_clear_modify_after_ageing_drop_cached_translations() {
    for op in 0..2 {
        let vm = machine();
        let p = vm.pmap();
        let s = p.create_space().unwrap();
        let k = 300;
        fill_with_cached_page(p, &s, k);
        let _ = clearer(p, &s);
        if op == 0 {
            p.protect(
                &s,
                VirtAddr(VA)..VirtAddr(VA + SUPER),
                Prot::READ,
                &mut |_| {},
            );
        } else {
            p.clear_modify(Pfn(BASE_PFN + k));
        }
        assert_tlb_coherent(p, &s, if op == 0 { "protect" } else { "clear_modify" });
        p.destroy_space(&s);
    }
}

/// Without any translation cached before promotion: ageing, demotion and
/// removal keep the model TLB coherent, and the clearing of A owes (and
/// issues) an invalidation of the superpage.
#[test]
fn ageing_invalidates_the_superpage_and_a_cached_2m_translation_goes() {
    let vm = machine();
    let p = vm.pmap();
    let s = p.create_space().unwrap();
    for i in 0..PAGES {
        enter(p, &s, i);
    }
    assert!(is_super(p, &s));
    // The CPU caches the 2 MiB translation.
    assert_eq!(cpu(p, &s, VA + 9 * PAGE, true), Some((BASE_PFN + 9) * PAGE));
    assert!(
        p.tlb()
            .entries
            .lock()
            .unwrap()
            .contains_key(&(s.root(), VA, true))
    );
    let _ = clearer(p, &s);
    assert!(
        !p.tlb()
            .entries
            .lock()
            .unwrap()
            .contains_key(&(s.root(), VA, true)),
        "clearing A in the 2 MiB entry left its translation cached"
    );
    // A cached hit does not set A: only a walk does.
    assert_eq!(
        cpu(p, &s, VA + 10 * PAGE, false),
        Some((BASE_PFN + 10) * PAGE)
    );
    assert_ne!(p.pte(&s, VA).unwrap() & A, 0, "the walk set A again");
    p.change_wiring(&s, VirtAddr(VA + 3 * PAGE), true);
    assert!(!is_super(p, &s));
    assert_tlb_coherent(p, &s, "after demotion");
    for i in 0..PAGES {
        let e = p.pte(&s, VA + i * PAGE).unwrap();
        assert_eq!(e & (A | D | RW), A | D | RW, "page {i}: {e:#x}");
    }
    p.change_wiring(&s, VirtAddr(VA + 3 * PAGE), false);
    p.remove(&s, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |_| {});
    assert_tlb_coherent(p, &s, "after remove");
    p.destroy_space(&s);
}

/// Exactly one page of the 512 clears A, whatever order pages are asked
/// in, in each of several spaces mapping the same frames; a wired 2 MiB
/// entry never loses A; nothing is demoted, pv counts and M stay.
#[test]
fn one_page_per_superpage_and_space_clears_a_in_any_order() {
    let vm = machine();
    let p = vm.pmap();
    let spaces: Vec<X86Space> = (0..3).map(|_| p.create_space().unwrap()).collect();
    for s in &spaces {
        for i in 0..PAGES {
            enter(p, s, i);
        }
        assert!(is_super(p, s));
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..6 {
        // Set A everywhere through the MMU (read).
        for s in &spaces {
            p.translate_access(s, VA + round * PAGE, Access::USER_READ)
                .unwrap();
        }
        let mut order: Vec<u64> = (0..PAGES).collect();
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let mut cleared_by = vec![None; spaces.len()];
        for &i in &order {
            let before: Vec<bool> = spaces
                .iter()
                .map(|s| p.pte(s, VA).unwrap() & A != 0)
                .collect();
            let n = p.ts_referenced(Pfn(BASE_PFN + i));
            let with_a = before.iter().filter(|&&b| b).count() as u32;
            assert_eq!(n, with_a, "round {round} page {i}: {before:?}");
            for (j, s) in spaces.iter().enumerate() {
                let now = p.pte(s, VA).unwrap() & A != 0;
                if before[j] && !now {
                    assert!(
                        cleared_by[j].is_none(),
                        "round {round}: space {j}: A cleared twice"
                    );
                    cleared_by[j] = Some(i);
                }
                assert!(!now || before[j], "A appeared");
            }
        }
        assert!(
            cleared_by.iter().all(Option::is_some),
            "round {round}: some space never aged: {cleared_by:?}"
        );
    }
    assert_eq!(p.superpage_stats().get().1, 0, "ageing demoted");
    for i in 0..PAGES {
        assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), spaces.len());
        assert!(p.is_modified(Pfn(BASE_PFN + i)), "page {i} lost M");
    }
    for s in &spaces {
        assert_eq!(s.resident_count(), PAGES);
        p.destroy_space(s);
    }
    // A wired superpage (every page entered wired, then promoted).
    let s = p.create_space().unwrap();
    for i in 0..PAGES {
        let m = Mapping::new(page(BASE_PFN + i), Prot::RW)
            .access(Prot::WRITE)
            .wired(true);
        p.enter(&s, VirtAddr(VA + i * PAGE), m).unwrap();
    }
    if is_super(p, &s) {
        for _ in 0..2 {
            for i in 0..PAGES {
                assert_eq!(p.ts_referenced(Pfn(BASE_PFN + i)), 1, "wired page {i}");
            }
        }
        assert_ne!(p.pte(&s, VA).unwrap() & A, 0, "a wired superpage lost A");
        assert_eq!(s.wired_count(), PAGES);
    }
    p.destroy_space(&s);
    assert_eq!(vm.free_pages(), vm.total_pages(), "frames leaked");
}

/// Ageing racing demotions (wiring changes), re-promotions (the page
/// entered again), writers through the software MMU and `is_modified`
/// readers: the M of a written page is never lost, every page keeps its
/// frame and one pv entry, and the books balance at the end.
#[test]
fn ageing_races_demotion_promotion_and_writers_without_losing_m() {
    let vm = machine();
    let p = vm.pmap();
    let s = p.create_space().unwrap();
    for i in 0..PAGES {
        enter(p, &s, i);
    }
    assert!(is_super(p, &s));
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(4);
    std::thread::scope(|sc| {
        // Ageing.
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for i in 0..PAGES {
                    p.ts_referenced(Pfn(BASE_PFN + i));
                }
            }
        });
        // Demote by wiring one page, unwire, enter it again to promote.
        sc.spawn(|| {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 37) % PAGES;
                p.change_wiring(&s, VirtAddr(VA + k * PAGE), true);
                p.change_wiring(&s, VirtAddr(VA + k * PAGE), false);
                enter(p, &s, k);
            }
        });
        // Writers and readers through the MMU; M checked after each write.
        sc.spawn(|| {
            let mut k = 0;
            while Instant::now() < deadline {
                k = (k + 101) % PAGES;
                let va = VA + k * PAGE;
                let t = p.translate_access(&s, va, Access::USER_WRITE).unwrap();
                assert_eq!(t.pa.as_u64(), (BASE_PFN + k) * PAGE);
                assert!(p.is_modified(Pfn(BASE_PFN + k)), "page {k} written, clean");
                p.translate_access(&s, va + 8, Access::USER_READ).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    for i in 0..PAGES {
        let pfn = Pfn(BASE_PFN + i);
        assert!(p.is_modified(pfn), "page {i} lost M");
        assert_eq!(p.mapping_count(pfn), 1, "page {i}");
        assert_eq!(p.extract(&s, VirtAddr(VA + i * PAGE)), Some(pfn));
    }
    assert_eq!(s.resident_count(), PAGES);
    assert_eq!(s.wired_count(), 0);
    let (promotions, demotions, _) = p.superpage_stats().get();
    assert!(demotions > 0 && promotions > 1, "{promotions} {demotions}");
    p.destroy_space(&s);
    assert_eq!(vm.free_pages(), vm.total_pages(), "frames leaked");
}
