//! Red team, core level: whole-2 MiB `remove` / `protect` of superpages
//! (commit baeee03) under what programs do — fork then writes on both
//! sides, mprotect of whole 2 MiB regions then writes, munmap of aligned
//! 2 MiB regions and mapping again, pageout to swap, mlock — with
//! superpages made whole (`Always`) or promoted (`Reserve`), on the
//! x86_64 pmap (4- and 5-level). Every byte is checked against a model
//! after every step, and the machine's books after each.

mod common;

use common::{Rng, config, consistent, rdpage, squeeze, wrpage};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use vm_core::{Prot, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::{PteFlags, X86Pmap};
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
/// Three aligned 2 MiB slots straddling 1 GiB.
const SLOTS: [u64; 3] = [(1 << 30) - SUPER, 1 << 30, (1 << 30) + SUPER];

fn tag(va: u64, round: u64) -> u64 {
    (va << 8) | (round & 0xff) | 1
}

fn vm_with(policy: SuperpagePolicy, la57: bool) -> Arc<Vm<X86Pmap>> {
    let pmap = if la57 {
        X86Pmap::new_la57()
    } else {
        X86Pmap::new()
    };
    Vm::new(
        pmap,
        VmConfig {
            superpages: policy,
            ..config(8192)
        },
    )
    .unwrap()
}

fn is_super(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> bool {
    vm.pmap()
        .pte(s.pmap_space(), va)
        .is_some_and(|e| e & 1 != 0 && e & PteFlags::HUGE.bits() != 0)
}

#[derive(Clone, Default)]
struct Model {
    /// Written pages' tags (absent: zeros).
    tags: HashMap<u64, u64>,
    read_only: HashSet<u64>,
}

fn check(s: &VmSpace<X86Pmap>, m: &Model, slot: u64, what: &str) {
    for i in 0..PAGES {
        let va = slot + i * PAGE;
        let want = m.tags.get(&va).copied().unwrap_or(0);
        let got = rdpage(s, va).unwrap_or_else(|e| panic!("{what}: read {va:#x}: {e}"));
        assert_eq!(got, want, "{what}: page {i} of {slot:#x}");
    }
}

fn fill(s: &VmSpace<X86Pmap>, m: &mut Model, slot: u64, round: u64, what: &str) {
    for i in 0..PAGES {
        let va = slot + i * PAGE;
        let ok = wrpage(s, va, tag(va, round)).is_ok();
        assert_eq!(ok, !m.read_only.contains(&va), "{what}: write {va:#x}");
        if ok {
            m.tags.insert(va, tag(va, round));
        }
    }
}

/// Random whole-2 MiB operations over three slots per space, forks
/// included; every page reads what the model says after every step; a
/// write to a read-only page fails; the books balance; at the end every
/// frame is back.
fn scenario(policy: SuperpagePolicy, la57: bool, seed: u64) -> (u64, u64) {
    let vm = vm_with(policy, la57);
    let t = TempPath::new();
    let swap = Swap::create(&t.0, 32 << 20).unwrap();
    vm.set_swap(swap.provider());
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut spaces = vec![vm.new_space().unwrap()];
    let mut models = vec![Model::default()];
    for &b in &SLOTS {
        spaces[0].map_anon(b, SUPER, Prot::RW).unwrap();
    }
    let mut supers_seen = 0;
    for step in 0..40u64 {
        let si = rng.below(spaces.len() as u64) as usize;
        let slot = SLOTS[rng.below(3) as usize];
        // Whole slots, or two neighbours at once (the range then spans
        // the 1 GiB line).
        let two = rng.pct(30) && slot != SLOTS[2];
        let len = if two { 2 * SUPER } else { SUPER };
        let what = format!("{policy:?} la57 {la57} seed {seed} step {step}");
        let s = &spaces[si];
        let op = rng.below(11);
        match op {
            0..=2 => {
                fill(s, &mut models[si], slot, step, &what);
                if two {
                    fill(s, &mut models[si], slot + SUPER, step, &what);
                }
            }
            3 => {
                // A few pages.
                for _ in 0..8 {
                    let va = slot + rng.below(PAGES) * PAGE;
                    let ok = wrpage(s, va, tag(va, step)).is_ok();
                    assert_eq!(
                        ok,
                        !models[si].read_only.contains(&va),
                        "{what}: write {va:#x}"
                    );
                    if ok {
                        models[si].tags.insert(va, tag(va, step));
                    }
                }
            }
            4 => {
                let ro = rng.pct(60);
                s.protect(slot, len, if ro { Prot::READ } else { Prot::RW })
                    .unwrap();
                for va in (slot..slot + len).step_by(PAGE as usize) {
                    if ro {
                        models[si].read_only.insert(va);
                    } else {
                        models[si].read_only.remove(&va);
                    }
                }
            }
            5 => {
                s.unmap(slot, len).unwrap();
                s.map_anon(slot, len, Prot::RW).unwrap();
                for va in (slot..slot + len).step_by(PAGE as usize) {
                    models[si].tags.remove(&va);
                    models[si].read_only.remove(&va);
                }
            }
            6 => {
                if spaces.len() < 3 {
                    let c = s.fork().unwrap();
                    let m = models[si].clone();
                    spaces.push(c);
                    models.push(m);
                }
            }
            7 => {
                if spaces.len() > 1 && rng.pct(50) {
                    // Exit.
                    let gone = spaces.remove(si);
                    models.remove(si);
                    drop(gone);
                } else {
                    squeeze(&vm);
                }
            }
            8 => {
                s.wire(slot, len, true).unwrap();
                s.unwire(slot, len, true).unwrap();
            }
            9 => squeeze(&vm),
            _ => {
                // mprotect RO, write fails, RW again, write the whole.
                s.protect(slot, SUPER, Prot::READ).unwrap();
                assert!(s.write_u8(slot + 77 * PAGE, 1).is_err(), "{what}");
                s.protect(slot, SUPER, Prot::RW).unwrap();
                for i in 0..PAGES {
                    models[si].read_only.remove(&(slot + i * PAGE));
                }
                fill(s, &mut models[si], slot, step, &what);
            }
        }
        for (k, (s, m)) in spaces.iter().zip(&models).enumerate() {
            for &b in &SLOTS {
                if is_super(&vm, s, b) {
                    supers_seen += 1;
                }
                check(s, m, b, &format!("{what} op {op} space {k}"));
            }
        }
        consistent(&vm, &what);
    }
    let removals = vm
        .pmap()
        .superpage_stats()
        .removals
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(spaces);
    consistent(&vm, "end");
    assert_eq!(
        vm.free_pages(),
        vm.total_pages(),
        "{policy:?} seed {seed}: frames leaked"
    );
    let st = vm.pmap().superpage_stats();
    assert_eq!(
        st.made(),
        st.demotions.load(std::sync::atomic::Ordering::Relaxed)
            + st.removals.load(std::sync::atomic::Ordering::Relaxed),
        "{policy:?} seed {seed}: made = demotions + removals"
    );
    (supers_seen, removals)
}

#[test]
fn c01_whole_2mib_operations_keep_every_byte_always() {
    let (mut sup, mut rem) = (0, 0);
    for seed in 1..=3 {
        let (a, b) = scenario(SuperpagePolicy::Always, seed == 2, seed);
        sup += a;
        rem += b;
    }
    eprintln!("c01: superpages seen {sup}, whole removals {rem}");
    assert!(sup > 0 && rem > 0);
}

#[test]
fn c02_whole_2mib_operations_keep_every_byte_reserve() {
    let (mut sup, mut rem) = (0, 0);
    for seed in 11..=13 {
        let (a, b) = scenario(SuperpagePolicy::Reserve, seed == 12, seed);
        sup += a;
        rem += b;
    }
    eprintln!("c02: superpages seen {sup}, whole removals {rem}");
    assert!(sup > 0);
}

/// fork of a space with superpages (the parent's 2 MiB entries are
/// write-protected whole), then writes on both sides to every page: each
/// side sees only its own; munmap of the parent's aligned 2 MiB then
/// leaves the child's intact; pageout in between loses nothing.
#[test]
fn c03_fork_whole_write_protect_then_writes_both_sides_and_munmap() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let vm = vm_with(policy, false);
        let t = TempPath::new();
        let swap = Swap::create(&t.0, 32 << 20).unwrap();
        vm.set_swap(swap.provider());
        let p = vm.new_space().unwrap();
        p.map_anon(SLOTS[0], 2 * SUPER, Prot::RW).unwrap();
        let mut pm = Model::default();
        fill(&p, &mut pm, SLOTS[0], 1, "parent");
        fill(&p, &mut pm, SLOTS[1], 1, "parent");
        assert!(
            is_super(&vm, &p, SLOTS[0]) && is_super(&vm, &p, SLOTS[1]),
            "{policy:?}"
        );
        let c = p.fork().unwrap();
        let mut cm = pm.clone();
        // Parent's entries write-protected whole: still superpages.
        assert!(
            is_super(&vm, &p, SLOTS[0]),
            "{policy:?}: fork kept the superpage"
        );
        assert_eq!(
            vm.pmap().pte(p.pmap_space(), SLOTS[0]).unwrap() & PteFlags::WRITABLE.bits(),
            0,
            "{policy:?}: parent write-protected"
        );
        // Half the pages written by the parent, half by the child.
        for i in 0..2 * PAGES {
            let va = SLOTS[0] + i * PAGE;
            if i % 2 == 0 {
                wrpage(&p, va, tag(va, 2)).unwrap();
                pm.tags.insert(va, tag(va, 2));
            } else {
                wrpage(&c, va, tag(va, 3)).unwrap();
                cm.tags.insert(va, tag(va, 3));
            }
            if i == PAGES {
                squeeze(&vm);
            }
        }
        for b in [SLOTS[0], SLOTS[1]] {
            check(&p, &pm, b, "parent");
            check(&c, &cm, b, "child");
        }
        consistent(&vm, "after writes");
        p.unmap(SLOTS[0], 2 * SUPER).unwrap();
        squeeze(&vm);
        for b in [SLOTS[0], SLOTS[1]] {
            check(&c, &cm, b, "child after the parent's munmap");
        }
        assert!(p.read_u8(SLOTS[0]).is_err(), "unmapped");
        consistent(&vm, "after munmap");
        drop(p);
        drop(c);
        assert_eq!(vm.free_pages(), vm.total_pages(), "{policy:?}: leaked");
    }
}

/// mlock (wire) a whole superpage, mprotect it read-only and back whole,
/// munmap it whole while wired (unmap of a wired region), and the wired
/// counts come back to zero with no frame left behind.
#[test]
fn c04_mlocked_superpage_protected_and_unmapped_whole() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let vm = vm_with(policy, false);
        let s = vm.new_space().unwrap();
        s.map_anon(SLOTS[1], SUPER, Prot::RW).unwrap();
        let mut m = Model::default();
        fill(&s, &mut m, SLOTS[1], 1, "fill");
        s.wire(SLOTS[1], SUPER, true).unwrap();
        let wired = s.pmap_space().wired_count();
        assert_eq!(wired, PAGES, "{policy:?}");
        s.protect(SLOTS[1], SUPER, Prot::READ).unwrap();
        assert_eq!(
            s.pmap_space().wired_count(),
            PAGES,
            "{policy:?}: protect kept wiring"
        );
        assert!(s.write_u8(SLOTS[1], 9).is_err());
        s.protect(SLOTS[1], SUPER, Prot::RW).unwrap();
        fill(&s, &mut m, SLOTS[1], 2, "refill");
        squeeze(&vm);
        check(&s, &m, SLOTS[1], "wired after pageout");
        consistent(&vm, "wired");
        s.unmap(SLOTS[1], SUPER).unwrap();
        assert_eq!(
            (
                s.pmap_space().wired_count(),
                s.pmap_space().resident_count()
            ),
            (0, 0),
            "{policy:?}"
        );
        consistent(&vm, "unmapped wired");
        drop(s);
        assert_eq!(vm.free_pages(), vm.total_pages(), "{policy:?}: leaked");
    }
}
