//! Issue 13 item 2 end to end: superpage reservations in vm-core and
//! promotion in the x86_64 pmap, under what programs do to memory.
//!
//! A zero-fill of an aligned 2 MiB of anonymous memory gets the frames of
//! one aligned run in order, and the pmap maps them with one 2 MiB entry.
//! Everything that later needs a 4 KiB page inside — unmap, mprotect,
//! mlock, fork's copy-on-write, pageout with its dirty-bit harvest —
//! demotes it, and no byte may be lost or shown to the wrong space on the
//! way. Each scenario also runs on the reference pmap (no superpages, the
//! same reservations), whose results must be the same.

mod common;

use common::{
    Rng, config, consistent, rdpage, rdpage_forked_mid_write, ref_vm, squeeze, wrpage, x86_vm,
};
use std::sync::Arc;
use vm_core::{Pmap, Prot, SuperpageAdvice, SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::{PteFlags, X86Pmap};
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const BASE: u64 = 0x4000_0000;
const PAGES: u64 = SUPER / PAGE;

/// A round whose pages were never written: they read as zeros.
const ZEROS: u64 = u64::MAX;

fn tag(va: u64, round: u64) -> u64 {
    if round == ZEROS {
        return 0;
    }
    (va << 8) | (round & 0xff) | 1
}

fn write_all<P: Pmap>(s: &VmSpace<P>, base: u64, pages: u64, round: u64) {
    for i in 0..pages {
        let va = base + i * PAGE;
        wrpage(s, va, tag(va, round)).unwrap();
    }
}

/// Every page of `base..` holds its tag of `round(i)`.
fn check_all<P: Pmap>(
    s: &VmSpace<P>,
    base: u64,
    pages: u64,
    round: impl Fn(u64) -> u64,
    what: &str,
) {
    for i in 0..pages {
        let va = base + i * PAGE;
        let want = tag(va, round(i));
        let got = rdpage(s, va).unwrap_or_else(|e| panic!("{what}: page {i}: {e}"));
        assert_eq!(got, want, "{what}: page {i} at {va:#x}");
    }
}

fn is_super(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> bool {
    vm.pmap()
        .pte(s.pmap_space(), va)
        .is_some_and(|e| e & 1 != 0 && e & PteFlags::HUGE.bits() != 0)
}

/// [`x86_vm`] with superpage policy `policy`.
fn policy_vm(policy: SuperpagePolicy) -> Arc<Vm<X86Pmap>> {
    Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: policy,
            ..config(4096)
        },
    )
    .unwrap()
}

fn with_swap<P: Pmap>(vm: &Vm<P>) -> (Swap, TempPath) {
    let t = TempPath::new();
    let s = Swap::create(&t.0, 16 << 20).unwrap();
    vm.set_swap(s.provider());
    (s, t)
}

#[test]
fn a_zero_filled_aligned_2mib_is_one_superpage_of_frames_in_order() {
    let vm = x86_vm(4096);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
    write_all(&s, BASE, 2 * PAGES, 0);
    for sp in [BASE, BASE + SUPER] {
        assert!(
            is_super(&vm, &s, sp),
            "{sp:#x}: {:#x?}",
            vm.pmap().pte(s.pmap_space(), sp)
        );
        let first = s.extract(sp).unwrap().0;
        assert_eq!(first % PAGES, 0, "aligned run");
        for i in 0..PAGES {
            assert_eq!(s.extract(sp + i * PAGE).unwrap().0, first + i);
        }
    }
    assert_eq!(vm.pmap().superpage_stats().get().0, 2);
    check_all(&s, BASE, 2 * PAGES, |_| 0, "promoted");
    consistent(&vm, "promoted");
    drop(s);
    assert_eq!(vm.free_pages(), vm.total_pages(), "frames leaked");
}

#[test]
fn reservations_need_the_whole_2mib_inside_one_mapping_and_can_be_turned_off() {
    // Off: frames in allocation order, no superpage.
    let off = Vm::new(
        X86Pmap::new(),
        VmConfig {
            superpages: vm_core::SuperpagePolicy::Never,
            ..config(4096)
        },
    )
    .unwrap();
    // On, but the mapping starts 4 KiB past the boundary: no aligned 2 MiB
    // lies inside it except none.
    let on = x86_vm(4096);
    for (vm, start, what) in [
        (&off, BASE, "reservations off"),
        (&on, BASE + PAGE, "unaligned mapping"),
    ] {
        let s = vm.new_space().unwrap();
        s.map_anon(start, SUPER, Prot::RW).unwrap();
        write_all(&s, start, PAGES, 0);
        assert_eq!(vm.pmap().superpage_stats().get().0, 0, "{what}");
        check_all(&s, start, PAGES, |_| 0, what);
        consistent(vm, what);
    }
}

#[test]
fn read_faults_promote_read_only_and_writes_bring_it_back_writable() {
    let vm = x86_vm(4096);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    for i in 0..PAGES {
        assert_eq!(s.read_u8(BASE + i * PAGE).unwrap(), 0);
    }
    assert!(is_super(&vm, &s, BASE));
    let pde = vm.pmap().pte(s.pmap_space(), BASE).unwrap();
    assert_eq!(pde & PteFlags::WRITABLE.bits(), 0, "clean: write-protected");
    write_all(&s, BASE, PAGES, 1);
    let (promoted, demoted, _) = vm.pmap().superpage_stats().get();
    assert_eq!(
        (promoted, demoted),
        (2, 1),
        "read-only, split by the first write, writable again"
    );
    assert!(is_super(&vm, &s, BASE));
    check_all(&s, BASE, PAGES, |_| 1, "written");
    // Dirty now: a pageout must write every page out, not drop it.
    let (swap, _t) = with_swap(&vm);
    squeeze(&vm);
    assert!(swap.stats().used > 0, "nothing paged out: {}", swap.stats());
    check_all(&s, BASE, PAGES, |_| 1, "after pageout");
    consistent(&vm, "after pageout");
}

type Change = (
    &'static str,
    fn(&VmSpace<X86Pmap>) -> Option<VmSpace<X86Pmap>>,
);

/// One change inside a promoted 2 MiB at a time; after it every page the
/// change left alone still holds its data, the changed ones behave as the
/// change says, and a final write and read-back of everything agrees.
#[test]
fn every_change_inside_a_superpage_keeps_every_byte() {
    const K: u64 = 77;
    let changes: [Change; 7] = [
        ("unmap one page", |s| {
            s.unmap(BASE + K * PAGE, PAGE).unwrap();
            s.map_anon(BASE + K * PAGE, PAGE, Prot::RW).unwrap();
            None
        }),
        ("mprotect one page read-only", |s| {
            s.protect(BASE + K * PAGE, PAGE, Prot::READ).unwrap();
            assert!(
                s.write_u8(BASE + K * PAGE, 1).is_err(),
                "write to read-only"
            );
            s.protect(BASE + K * PAGE, PAGE, Prot::RW).unwrap();
            None
        }),
        ("mprotect all read-only", |s| {
            s.protect(BASE, SUPER, Prot::READ).unwrap();
            assert!(s.write_u8(BASE + 300 * PAGE, 1).is_err());
            s.protect(BASE, SUPER, Prot::RW).unwrap();
            None
        }),
        ("mlock three pages", |s| {
            s.wire(BASE + K * PAGE, 3 * PAGE, true).unwrap();
            s.unwire(BASE + K * PAGE, 3 * PAGE, true).unwrap();
            None
        }),
        ("mlock all", |s| {
            s.wire(BASE, SUPER, true).unwrap();
            s.unwire(BASE, SUPER, true).unwrap();
            None
        }),
        ("fork", |s| Some(s.fork().unwrap())),
        ("pageout", |s| {
            squeeze(s.vm());
            None
        }),
    ];
    // Filled page by page (reservation, promotion at the last), and whole
    // at the first write (`Always`).
    let runs = changes
        .iter()
        .flat_map(|c| [(c, SuperpagePolicy::Reserve), (c, SuperpagePolicy::Always)]);
    for (&(what, change), policy) in runs {
        let vm = policy_vm(policy);
        let (_swap, _t) = with_swap(&vm);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, SUPER, Prot::RW).unwrap();
        if policy == SuperpagePolicy::Always {
            s.write_u8(BASE + 5 * PAGE, 1).unwrap();
            assert!(
                is_super(&vm, &s, BASE),
                "{what}: one fault maps the whole 2 MiB"
            );
        }
        write_all(&s, BASE, PAGES, 1);
        assert!(is_super(&vm, &s, BASE), "{what}");
        let child = change(&s);
        let unmapped = what == "unmap one page";
        check_all(
            &s,
            BASE,
            PAGES,
            |i| if unmapped && i == K { ZEROS } else { 1 },
            what,
        );
        if let Some(c) = &child {
            // The child sees the parent's data; writes on either side stay
            // on that side.
            check_all(c, BASE, PAGES, |_| 1, "child");
            wrpage(c, BASE + K * PAGE, tag(BASE + K * PAGE, 2)).unwrap();
            wrpage(&s, BASE + (K + 1) * PAGE, tag(BASE + (K + 1) * PAGE, 3)).unwrap();
            check_all(
                c,
                BASE,
                PAGES,
                |i| if i == K { 2 } else { 1 },
                "child after writes",
            );
            check_all(
                &s,
                BASE,
                PAGES,
                |i| if i == K + 1 { 3 } else { 1 },
                "parent after writes",
            );
        }
        // Write-protecting the whole 2 MiB changes its one entry (FreeBSD
        // `pmap_protect_pde`); everything else here needs 4 KiB entries.
        let whole = what == "mprotect all read-only";
        assert_eq!(
            is_super(&vm, &s, BASE),
            whole,
            "{what}: the change needs 4 KiB entries, or keeps the 2 MiB one"
        );
        write_all(&s, BASE, PAGES, 4);
        check_all(&s, BASE, PAGES, |_| 4, what);
        if let Some(c) = &child {
            check_all(
                c,
                BASE,
                PAGES,
                |i| if i == K { 2 } else { 1 },
                "child at the end",
            );
        }
        consistent(&vm, what);
        drop(child);
        drop(s);
        assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
    }
}

/// Threads fault interleaved pages of the same aligned 2 MiBs while
/// another forks, writes through the child and pages out; at the end every
/// byte is where its writer put it, in each space.
#[test]
fn threads_fill_superpages_beside_fork_and_pageout() {
    fn run<P: Pmap>(vm: Arc<Vm<P>>, seed: u64) {
        let (_swap, _t) = with_swap(&vm);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        let child = std::thread::scope(|sc| {
            for t in 0..2u64 {
                let s = &s;
                sc.spawn(move || {
                    for i in (t..2 * PAGES).step_by(2) {
                        let va = BASE + i * PAGE;
                        wrpage(s, va, tag(va, 1)).unwrap();
                    }
                });
            }
            let s = &s;
            let other = sc.spawn(move || {
                let mut rng = Rng(seed);
                let mut child = None;
                for _ in 0..20 {
                    match rng.below(3) {
                        0 => squeeze(s.vm()),
                        1 => child = Some(s.fork().unwrap()),
                        _ => {
                            if let Some(c) = &child {
                                let va = BASE + rng.below(2 * PAGES) * PAGE;
                                // The child's own page: its tag round 9.
                                wrpage(c, va, tag(va, 9)).unwrap();
                            }
                        }
                    }
                }
                child
            });
            other.join().unwrap()
        });
        check_all(&s, BASE, 2 * PAGES, |_| 1, "parent");
        if let Some(c) = &child {
            for i in 0..2 * PAGES {
                let va = BASE + i * PAGE;
                // Forked before, during (between the two stores) or after
                // the page's write; or the child wrote it.
                let got = rdpage_forked_mid_write(c, va, 0, tag(va, 1)).unwrap();
                assert!(
                    got == 0 || got == tag(va, 1) || got == tag(va, 9),
                    "child page {i}: {got:#x}"
                );
            }
        }
        consistent(&vm, "threads");
        drop(child);
        drop(s);
        assert_eq!(vm.free_pages(), vm.total_pages(), "frames leaked");
    }
    for seed in 1..=4 {
        run(x86_vm(4096), seed);
        run(ref_vm(4096), seed);
    }
}

/// What one space should read: the tag of each written page (absent:
/// zeros), and which pages are read-only now.
#[derive(Clone, Default)]
struct Model {
    tags: std::collections::HashMap<u64, u64>,
    read_only: std::collections::HashSet<u64>,
}

/// Random sequences over two aligned 2 MiB mappings per space — fill
/// whole (promotes), write, unmap and map again, mprotect, mlock, fork,
/// exit, pageout — checked against a plain model after every step, on
/// both pmaps: every page reads what the model says, and a write to a
/// read-only page fails.
#[test]
fn random_changes_to_superpages_agree_with_a_model() {
    const SLOTS: [u64; 2] = [BASE, BASE + 2 * SUPER];
    fn run<P: Pmap>(vm: Arc<Vm<P>>, seed: u64) {
        let (_swap, _t) = with_swap(&vm);
        let mut rng = Rng(seed);
        let mut spaces = vec![vm.new_space().unwrap()];
        let mut models = vec![Model::default()];
        for &b in &SLOTS {
            spaces[0].map_anon(b, SUPER, Prot::RW).unwrap();
        }
        for step in 0..60u64 {
            let s = rng.below(spaces.len() as u64) as usize;
            let slot = SLOTS[rng.below(2) as usize];
            let whole = rng.pct(30);
            let k = if whole { 0 } else { rng.below(PAGES) };
            let most = if rng.pct(50) { 8 } else { PAGES - k };
            let n = if whole {
                PAGES
            } else {
                1 + rng.below(most.min(PAGES - k))
            };
            let what = format!("seed {seed} step {step}");
            match rng.below(10) {
                0..=2 => {
                    for i in 0..PAGES {
                        let va = slot + i * PAGE;
                        let ok = wrpage(&spaces[s], va, tag(va, step)).is_ok();
                        assert_eq!(
                            ok,
                            !models[s].read_only.contains(&va),
                            "{what}: fill {va:#x}"
                        );
                        if ok {
                            models[s].tags.insert(va, step);
                        }
                    }
                }
                3 => {
                    let va = slot + k * PAGE;
                    let ok = wrpage(&spaces[s], va, tag(va, step)).is_ok();
                    assert_eq!(
                        ok,
                        !models[s].read_only.contains(&va),
                        "{what}: write {va:#x}"
                    );
                    if ok {
                        models[s].tags.insert(va, step);
                    }
                }
                4 => {
                    let va = slot + k * PAGE;
                    spaces[s].unmap(va, n * PAGE).unwrap();
                    spaces[s].map_anon(va, n * PAGE, Prot::RW).unwrap();
                    for i in 0..n {
                        models[s].tags.remove(&(va + i * PAGE));
                        models[s].read_only.remove(&(va + i * PAGE));
                    }
                }
                5 => {
                    let va = slot + k * PAGE;
                    let ro = rng.pct(50);
                    let prot = if ro { Prot::READ } else { Prot::RW };
                    spaces[s].protect(va, n * PAGE, prot).unwrap();
                    for i in 0..n {
                        if ro {
                            models[s].read_only.insert(va + i * PAGE);
                        } else {
                            models[s].read_only.remove(&(va + i * PAGE));
                        }
                    }
                }
                6 => {
                    let va = slot + k * PAGE;
                    spaces[s].wire(va, n * PAGE, true).unwrap();
                    if rng.pct(70) {
                        spaces[s].unwire(va, n * PAGE, true).unwrap();
                    }
                }
                7 if spaces.len() < 3 => {
                    let child = spaces[s].fork().unwrap();
                    spaces.push(child);
                    models.push(models[s].clone());
                }
                7 if s > 0 => {
                    spaces.swap_remove(s);
                    models.swap_remove(s);
                }
                _ => squeeze(&vm),
            }
            for (sp, m) in spaces.iter().zip(&models) {
                for &b in &SLOTS {
                    for i in (step % 7..PAGES).step_by(7) {
                        let va = b + i * PAGE;
                        let want = m.tags.get(&va).map_or(0, |&r| tag(va, r));
                        assert_eq!(rdpage(sp, va), Ok(want), "{what}: {va:#x}");
                    }
                }
            }
            consistent(&vm, &what);
        }
        drop(spaces);
        assert_eq!(
            vm.free_pages(),
            vm.total_pages(),
            "seed {seed}: frames leaked"
        );
    }
    let mut seen = (0, 0);
    for seed in 1..=6u64 {
        let vm = x86_vm(4096);
        run(vm.clone(), seed * 7919);
        let (p, d, _) = vm.pmap().superpage_stats().get();
        seen = (seen.0 + p, seen.1 + d);
        run(ref_vm(4096), seed * 7919);
    }
    eprintln!("superpages made and split: {seen:?}");
    assert!(
        seen.0 > 0 && seen.1 > 0,
        "no superpage made and split: {seen:?}"
    );
}

/// Whole superpages at the first write fault: `Always` everywhere a 2 MiB
/// fits, `Reserve` where advised `Huge`; never where advised `NoHuge`, for
/// a read, or where the mapping does not cover the 2 MiB. The one fault
/// maps every page, zeroed, writable; the faulting write is there.
#[test]
fn one_write_fault_maps_a_whole_superpage_where_asked() {
    type Case = (
        &'static str,
        SuperpagePolicy,
        Option<SuperpageAdvice>,
        u64,
        bool,
    );
    let cases: [Case; 6] = [
        ("always", SuperpagePolicy::Always, None, BASE, true),
        (
            "advised",
            SuperpagePolicy::Reserve,
            Some(SuperpageAdvice::Huge),
            BASE,
            true,
        ),
        ("not advised", SuperpagePolicy::Reserve, None, BASE, false),
        (
            "advised none",
            SuperpagePolicy::Always,
            Some(SuperpageAdvice::NoHuge),
            BASE,
            false,
        ),
        (
            "never",
            SuperpagePolicy::Never,
            Some(SuperpageAdvice::Huge),
            BASE,
            false,
        ),
        (
            "unaligned mapping",
            SuperpagePolicy::Always,
            None,
            BASE + PAGE,
            false,
        ),
    ];
    for (what, policy, advice, start, whole) in cases {
        let vm = policy_vm(policy);
        let s = vm.new_space().unwrap();
        s.map_anon(start, SUPER, Prot::RW).unwrap();
        if let Some(a) = advice {
            s.advise_superpages(start, SUPER, a).unwrap();
        }
        let faults = vm.counters().snapshot().v_vm_faults;
        wrpage(&s, start + 9 * PAGE, tag(start + 9 * PAGE, 1)).unwrap();
        // Mapped by one entry at once (`enter_superpage`), not 512 entries
        // promoted.
        let stats = vm.pmap().superpage_stats();
        let entered = stats.mappings.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((entered, stats.get().0), (u64::from(whole), 0), "{what}");
        let resident = (0..PAGES)
            .filter(|i| s.extract(start + i * PAGE).is_some())
            .count();
        assert_eq!(resident as u64, if whole { PAGES } else { 1 }, "{what}");
        assert_eq!(is_super(&vm, &s, BASE + SUPER / 2), whole, "{what}");
        // The rest reads zeros and takes writes without a fault.
        for i in (0..PAGES).filter(|&i| i != 9) {
            assert_eq!(rdpage(&s, start + i * PAGE), Ok(0), "{what}: page {i}");
        }
        assert_eq!(
            rdpage(&s, start + 9 * PAGE),
            Ok(tag(start + 9 * PAGE, 1)),
            "{what}"
        );
        write_all(&s, start, PAGES, 2);
        let taken = vm.counters().snapshot().v_vm_faults - faults;
        if whole {
            assert_eq!(taken, 1, "{what}: one fault for the whole 2 MiB");
        } else {
            assert!(taken >= PAGES - 1, "{what}: {taken} faults");
        }
        check_all(&s, start, PAGES, |_| 2, what);
        consistent(&vm, what);
        drop(s);
        assert_eq!(vm.free_pages(), vm.total_pages(), "{what}: frames leaked");
    }
    // A pmap without superpages (the reference pmap) gets the 512 pages
    // entered one by one by the same fault.
    let vm = Vm::new(
        vm_testkit::RefPmap::default(),
        VmConfig {
            superpages: SuperpagePolicy::Always,
            ..config(4096)
        },
    )
    .unwrap();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    wrpage(&s, BASE + 9 * PAGE, 7).unwrap();
    let faults = vm.counters().snapshot().v_vm_faults;
    for i in (0..PAGES).filter(|&i| i != 9) {
        assert!(s.extract(BASE + i * PAGE).is_some(), "page {i} not mapped");
        assert_eq!(rdpage(&s, BASE + i * PAGE), Ok(0), "page {i}");
    }
    assert_eq!(rdpage(&s, BASE + 9 * PAGE), Ok(7));
    assert_eq!(vm.counters().snapshot().v_vm_faults, faults, "a fault more");
    consistent(&vm, "reference pmap");
    // A read fault does not fill: it maps the zero-filled page alone.
    let vm = policy_vm(SuperpagePolicy::Always);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    assert_eq!(s.read_u8(BASE).unwrap(), 0);
    assert!(
        s.extract(BASE + PAGE).is_none(),
        "read fault filled the 2 MiB"
    );
}

/// Threads write the same fresh 2 MiBs at once under `Always`: one fault
/// claims and fills each, the others' pages (made before the filler
/// inserts its own) win over the filler's; no write is lost, in any
/// interleaving, beside pageout.
#[test]
fn racing_writers_of_one_fresh_superpage_keep_their_writes() {
    for round in 0..20u64 {
        let vm = policy_vm(SuperpagePolicy::Always);
        let (_swap, _t) = with_swap(&vm);
        let s = vm.new_space().unwrap();
        s.map_anon(BASE, 2 * SUPER, Prot::RW).unwrap();
        let written: std::collections::HashSet<u64> = std::thread::scope(|sc| {
            let writers: Vec<_> = (0..3u64)
                .map(|t| {
                    let s = &s;
                    sc.spawn(move || {
                        let mut rng = Rng(round * 31 + t + 1);
                        let mut mine = Vec::new();
                        for _ in 0..64 {
                            // Each thread owns pages i with i % 3 == t.
                            let i = rng.below(2 * PAGES / 3) * 3 + t;
                            let va = BASE + i * PAGE;
                            wrpage(s, va, tag(va, round)).unwrap();
                            mine.push(i);
                        }
                        mine
                    })
                })
                .collect();
            if round % 4 == 0 {
                sc.spawn(|| squeeze(&vm));
            }
            writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        for i in 0..2 * PAGES {
            let va = BASE + i * PAGE;
            let want = if written.contains(&i) {
                tag(va, round)
            } else {
                0
            };
            assert_eq!(rdpage(&s, va), Ok(want), "round {round}: page {i}");
        }
        consistent(&vm, "racing writers");
        drop(s);
        assert_eq!(
            vm.free_pages(),
            vm.total_pages(),
            "round {round}: frames leaked"
        );
    }
}

/// With the page-zeroing thread on, freed frames come back zeroed and a
/// whole-superpage fault writes no byte for its 511 neighbours: every
/// page counted as pre-zeroed (`v_ozfod`), every one still reading zeros.
#[test]
fn a_whole_superpage_fault_after_idle_zeroing_zeroes_nothing() {
    let vm = policy_vm(SuperpagePolicy::Always);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * SUPER, Prot::RW).unwrap();
    write_all(&s, BASE, 4 * PAGES, 1);
    drop(s);
    let zeroer = vm.spawn_page_zeroer(std::time::Duration::from_millis(1));
    let until = std::time::Instant::now() + vm_testkit::support::scaled_secs(30);
    while vm.free_zeroed_pages() < vm.free_pages() {
        assert!(std::time::Instant::now() < until, "zeroing never finished");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(zeroer);
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, SUPER, Prot::RW).unwrap();
    let before = vm.counters().snapshot();
    wrpage(&s, BASE + 5 * PAGE, 9).unwrap();
    let d = vm.counters().snapshot().since(&before);
    assert_eq!((d.v_zfod, d.v_ozfod), (PAGES, PAGES), "a page was zeroed");
    assert!(is_super(&vm, &s, BASE));
    for i in (0..PAGES).filter(|&i| i != 5) {
        assert_eq!(rdpage(&s, BASE + i * PAGE), Ok(0), "page {i}");
    }
    assert_eq!(rdpage(&s, BASE + 5 * PAGE), Ok(9));
    consistent(&vm, "after idle zeroing");
}
