//! Issue 13 item 2, the pmap's part: 2 MiB superpages.
//!
//! A leaf table that `enter` fills with 512 frames in physical order from
//! a 2 MiB-aligned frame, with equal flags, becomes one page-directory
//! entry with PS; anything that needs a 4 KiB entry inside demotes it
//! first. These tests check each way in and out, that no A or M bit, pv
//! entry, count or frame is lost on the way, and that walkers racing the
//! changes always see one of the two equivalent forms.

use std::sync::atomic::{AtomicBool, Ordering};
use vm_core::pmap::{PageInfo, Pmap, RefMod};
use vm_core::{Mapping, MemAttr, Pfn, Prot, VirtAddr, Vm};
use vm_pmap_x86_64::mmu::Access;
use vm_pmap_x86_64::{PteFlags, TlbHook, X86Pmap, X86Space};
use vm_testkit::test_config;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = 512;
/// A 2 MiB-aligned run of frames high in a 4096-frame machine, away from
/// the low frames the pmap takes for its tables.
const BASE_PFN: u64 = 3072;
const VA: u64 = 0x40_0000_0000;

fn page(pfn: u64, attr: MemAttr) -> PageInfo {
    PageInfo {
        pfn: Pfn(pfn),
        managed: true,
        attr,
    }
}

fn machine() -> std::sync::Arc<Vm<X86Pmap>> {
    Vm::new(X86Pmap::new(), test_config(4096)).unwrap()
}

/// Enters frame `BASE_PFN + i` at `VA + i * PAGE` for each `i`, as a write
/// fault (so the entries are writable and dirty) unless `access` says
/// otherwise.
fn fill(p: &X86Pmap, space: &X86Space, prot: Prot, access: Prot, attr: MemAttr) {
    for i in 0..PAGES {
        let m = Mapping::new(page(BASE_PFN + i, attr), prot).access(access);
        p.enter(space, VirtAddr(VA + i * PAGE), m).unwrap();
    }
}

/// The same run mapped whole by one 2 MiB entry (`enter_superpage`,
/// FreeBSD `pmap_enter_pde`), as a whole-superpage fault maps it.
fn fill_whole(p: &X86Pmap, space: &X86Space, prot: Prot, access: Prot, attr: MemAttr) {
    let m = Mapping::new(page(BASE_PFN, attr), prot).access(access);
    assert_eq!(p.enter_superpage(space, VirtAddr(VA), m), Ok(true));
}

type Fill = fn(&X86Pmap, &X86Space, Prot, Prot, MemAttr);

/// The two ways a superpage comes to be: a full table promoted, or one
/// entry entered whole. Every test that runs over both must see the same.
const WAYS_IN: [(&str, Fill); 2] = [("promoted", fill), ("entered whole", fill_whole)];

fn is_super<T: TlbHook + 'static>(p: &X86Pmap<T>, space: &X86Space, va: u64) -> bool {
    p.pte(space, va)
        .is_some_and(|e| e & PteFlags::HUGE.bits() != 0 && e & 1 != 0)
}

/// Every page of the run still maps its own frame, for the pmap and for
/// the software MMU.
fn assert_maps_run<T: TlbHook + 'static>(p: &X86Pmap<T>, space: &X86Space, what: &str) {
    for i in 0..PAGES {
        let va = VA + i * PAGE;
        assert_eq!(
            p.extract(space, VirtAddr(va)),
            Some(Pfn(BASE_PFN + i)),
            "{what}: page {i}"
        );
        let t = p
            .translate_access(space, va + 8, Access::USER_READ)
            .unwrap_or_else(|e| panic!("{what}: page {i}: {e:?}"));
        assert_eq!(t.pa.as_u64(), (BASE_PFN + i) * PAGE + 8, "{what}: page {i}");
    }
}

#[test]
fn a_full_table_of_frames_in_order_becomes_a_superpage() {
    let vm = machine();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    assert!(is_super(p, &space, VA), "{:#x?}", p.pte(&space, VA));
    assert_eq!(p.superpage_stats().get().0, 1);
    let pde = p.pte(&space, VA + 77 * PAGE).unwrap();
    let want = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER | PteFlags::ACCESSED;
    assert!(PteFlags::from_bits_truncate(pde).contains(want | PteFlags::DIRTY));
    assert_eq!(pde & 0x000f_ffff_ffe0_0000, BASE_PFN * PAGE);
    assert_maps_run(p, &space, "promoted");
    let t = p
        .translate_access(&space, VA + 5 * PAGE, Access::USER_WRITE)
        .unwrap();
    assert_eq!(t.level, vm_pmap_x86_64::paging::Level::PD);
    assert_eq!(space.resident_count(), PAGES);
    // Root, PDPT, PD and the leaf table kept for demotion.
    assert_eq!(p.table_pages(&space), 4);
    for i in [0, 300, 511] {
        assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 1);
    }
    assert!(!p.is_prefaultable(&space, VirtAddr(VA + PAGE)));
}

#[test]
fn frames_out_of_line_stay_4k() {
    type Case = (&'static str, fn(u64) -> (u64, Prot, MemAttr));
    let cases: [Case; 4] = [
        ("unaligned", |i| {
            (BASE_PFN + 1 + i, Prot::RW, MemAttr::WriteBack)
        }),
        ("two swapped", |i| {
            let f = match i {
                8 => 9,
                9 => 8,
                i => i,
            };
            (BASE_PFN + f, Prot::RW, MemAttr::WriteBack)
        }),
        ("one read-only", |i| {
            let prot = if i == 100 { Prot::READ } else { Prot::RW };
            (BASE_PFN + i, prot, MemAttr::WriteBack)
        }),
        ("one uncached", |i| {
            let attr = if i == 511 {
                MemAttr::Uncacheable
            } else {
                MemAttr::WriteBack
            };
            (BASE_PFN + i, Prot::RW, attr)
        }),
    ];
    for (what, frame) in cases {
        let vm = machine();
        let p = vm.pmap();
        let space = p.create_space().unwrap();
        for i in 0..PAGES {
            let (pfn, prot, attr) = frame(i);
            let m = Mapping::new(page(pfn, attr), prot).access(prot);
            p.enter(&space, VirtAddr(VA + i * PAGE), m).unwrap();
        }
        assert!(!is_super(p, &space, VA), "{what}");
        assert_eq!(p.superpage_stats().get().0, 0, "{what}");
        for i in 0..PAGES {
            let e = p.pte(&space, VA + i * PAGE).unwrap();
            assert_eq!(e & 0x000f_ffff_ffff_f000, frame(i).0 * PAGE, "{what}: {i}");
        }
    }
}

#[test]
fn promotion_can_be_turned_off() {
    let vm = Vm::new(X86Pmap::new().with_superpages(false), test_config(4096)).unwrap();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    assert!(!is_super(p, &space, VA));
    assert_eq!(p.superpage_stats().get(), (0, 0, 0));
}

#[test]
fn a_clean_writable_run_is_promoted_read_only_so_a_write_is_seen() {
    let vm = machine();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    // Writable, but entered by read faults: no M anywhere.
    fill(p, &space, Prot::RW, Prot::READ, MemAttr::WriteBack);
    assert!(is_super(p, &space, VA));
    let pde = p.pte(&space, VA).unwrap();
    assert_eq!(pde & (PteFlags::WRITABLE | PteFlags::DIRTY).bits(), 0);
    // A write must fault (and so reach the fault handler, which enters the
    // page writable again) rather than land in a clean superpage unseen.
    let f = p.translate_access(&space, VA + 3 * PAGE, Access::USER_WRITE);
    assert!(f.is_err(), "{f:?}");
    for i in [0, 3, 511] {
        assert!(!p.is_modified(Pfn(BASE_PFN + i)), "page {i}");
    }
    // The fault handler's answer: the page entered writable and dirty.
    let m = Mapping::new(page(BASE_PFN + 3, MemAttr::WriteBack), Prot::RW).access(Prot::WRITE);
    p.enter(&space, VirtAddr(VA + 3 * PAGE), m).unwrap();
    assert!(!is_super(p, &space, VA), "demoted for the write");
    assert!(p.is_modified(Pfn(BASE_PFN + 3)));
    assert!(!p.is_modified(Pfn(BASE_PFN + 4)));
    assert_maps_run(p, &space, "after the write");
}

/// Each operation that needs one 4 KiB entry inside a superpage demotes
/// it and does exactly its own part: the other 511 pages keep their
/// frames, their dirty bits and their pv entries.
#[test]
fn every_per_page_operation_demotes_and_keeps_the_other_pages() {
    type Op = (&'static str, fn(&X86Pmap, &X86Space) -> RefMod);
    const K: u64 = 200;
    const PFN_K: Pfn = Pfn(BASE_PFN + K);
    const VA_K: u64 = VA + K * PAGE;
    let ops: [Op; 7] = [
        ("remove one page", |p, s| {
            let mut out = RefMod::default();
            p.remove(s, VirtAddr(VA_K)..VirtAddr(VA_K + PAGE), &mut |d| {
                out.modified |= d.modified;
            });
            out
        }),
        ("protect one page", |p, s| {
            let mut out = RefMod::default();
            p.protect(
                s,
                VirtAddr(VA_K)..VirtAddr(VA_K + PAGE),
                Prot::READ,
                &mut |d| {
                    out.modified |= d.modified;
                },
            );
            out
        }),
        ("wire one page", |p, s| {
            p.change_wiring(s, VirtAddr(VA_K), true);
            RefMod::default()
        }),
        ("another frame at one page", |p, s| {
            let m = Mapping::new(page(100, MemAttr::WriteBack), Prot::RW).access(Prot::WRITE);
            let d = p.enter(s, VirtAddr(VA_K), m).unwrap().unwrap();
            RefMod {
                referenced: d.referenced,
                modified: d.modified,
            }
        }),
        ("remove_all", |p, _| p.remove_all(PFN_K)),
        ("page_protect", |p, _| p.page_protect(PFN_K, Prot::READ)),
        ("clear_modify", |p, _| {
            p.clear_modify(PFN_K);
            RefMod {
                referenced: false,
                modified: true,
            }
        }),
    ];
    for ((way, fill), (op_name, op)) in WAYS_IN.into_iter().flat_map(|w| ops.map(|o| (w, o))) {
        let what = &*format!("{way}, {op_name}");
        let vm = machine();
        let p = vm.pmap();
        let space = p.create_space().unwrap();
        fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
        assert!(is_super(p, &space, VA), "{what}");
        let tables = p.table_pages(&space);
        let got = op(p, &space);
        assert!(!is_super(p, &space, VA), "{what}: still a superpage");
        assert_eq!(p.superpage_stats().get().1, 1, "{what}: one demotion");
        // The page the operation was about lost no M on the way.
        if op_name != "wire one page" {
            assert!(got.modified, "{what}: page {K}'s M bit");
        }
        for i in (0..PAGES).filter(|&i| i != K) {
            let va = VA + i * PAGE;
            let e = p.pte(&space, va).unwrap();
            let f = PteFlags::from_bits_truncate(e);
            assert_eq!(
                e & 0x000f_ffff_ffff_f000,
                (BASE_PFN + i) * PAGE,
                "{what}: {i}"
            );
            assert!(
                f.contains(PteFlags::WRITABLE | PteFlags::DIRTY | PteFlags::ACCESSED),
                "{what}: page {i}: {f:?}"
            );
            assert!(!f.contains(PteFlags::HUGE), "{what}: page {i}: {f:?}");
            assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 1, "{what}: pv of {i}");
            assert!(p.is_modified(Pfn(BASE_PFN + i)), "{what}: page {i} clean");
        }
        let resident = if op_name.starts_with("remove") {
            PAGES - 1
        } else {
            PAGES
        };
        assert_eq!(space.resident_count(), resident, "{what}");
        assert_eq!(
            space.wired_count(),
            u64::from(op_name == "wire one page"),
            "{what}"
        );
        // The kept table became the leaf table again: no frame more or less.
        assert_eq!(p.table_pages(&space), tables, "{what}");
        p.destroy_space(&space);
    }
}

#[test]
fn removing_or_protecting_the_whole_superpage_keeps_count_and_frames() {
    for (way, fill) in WAYS_IN {
        removing_or_protecting_the_whole(way, fill);
    }
}

fn removing_or_protecting_the_whole(way: &str, fill: Fill) {
    let vm = machine();
    let p = vm.pmap();
    let free = vm.free_pages();
    let space = p.create_space().unwrap();
    fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    assert!(is_super(p, &space, VA), "{way}");
    let mut dirty = 0;
    p.protect(
        &space,
        VirtAddr(VA)..VirtAddr(VA + SUPER),
        Prot::READ,
        &mut |d| {
            dirty += u64::from(d.modified);
        },
    );
    assert_eq!(
        dirty, PAGES,
        "{way}: every page of a dirty superpage is dirty"
    );
    assert!(p.translate_access(&space, VA, Access::USER_WRITE).is_err());
    assert_maps_run(p, &space, "read-only");
    let mut gone = Vec::new();
    p.remove(&space, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |d| {
        gone.push(d.pfn.0)
    });
    gone.sort_unstable();
    assert_eq!(gone, (BASE_PFN..BASE_PFN + PAGES).collect::<Vec<_>>());
    assert_eq!(space.resident_count(), 0);
    assert_eq!(p.table_pages(&space), 1, "only the root left");
    for i in [0, 511] {
        assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 0);
    }
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free, "{way}: a table frame leaked");
}

#[test]
fn destroying_a_space_with_superpages_frees_every_table() {
    for (way, fill) in WAYS_IN {
        let vm = machine();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
        assert!(is_super(p, &space, VA), "{way}");
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "{way}");
        for i in [0, 511] {
            assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 0, "{way}");
        }
    }
}

#[test]
fn an_uncached_run_keeps_its_pat_bits_through_both_changes() {
    let attrs = [
        MemAttr::WriteCombining,
        MemAttr::Uncacheable,
        MemAttr::WriteProtected,
    ];
    for ((way, fill), attr) in WAYS_IN.into_iter().flat_map(|w| attrs.map(|a| (w, a))) {
        let what = format!("{attr:?} {way}");
        let vm = machine();
        let p = vm.pmap();
        let space = p.create_space().unwrap();
        fill(p, &space, Prot::RW, Prot::WRITE, attr);
        let small = {
            let s2 = p.create_space().unwrap();
            let m = Mapping::new(page(BASE_PFN, attr), Prot::RW).access(Prot::WRITE);
            p.enter(&s2, VirtAddr(VA), m).unwrap();
            p.pte(&s2, VA).unwrap()
        };
        assert!(is_super(p, &space, VA), "{what}");
        let t = p.translate_access(&space, VA, Access::USER_READ).unwrap();
        assert_eq!(t.pa.as_u64(), BASE_PFN * PAGE, "{what}");
        p.change_wiring(&space, VirtAddr(VA + PAGE), true);
        assert_eq!(p.pte(&space, VA).unwrap(), small, "{what}: demoted entry");
    }
}

/// Promotion and demotion race software-MMU walks and other faults in the
/// same space: a walker must never see a mapped page unmapped or mapped
/// to another frame, and no count may drift.
#[test]
fn walkers_and_faults_race_promotion_and_demotion() {
    let vm = machine();
    let p = vm.pmap();
    let free = vm.free_pages();
    let space = p.create_space().unwrap();
    let stop = AtomicBool::new(false);
    fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    std::thread::scope(|s| {
        // Demote and promote again, over and over: a wiring change splits
        // the superpage, the change back and one more `enter` restore it.
        s.spawn(|| {
            for round in 0..300u64 {
                let k = round % PAGES;
                let va = VirtAddr(VA + k * PAGE);
                p.change_wiring(&space, va, true);
                p.change_wiring(&space, va, false);
                let m = Mapping::new(page(BASE_PFN + k, MemAttr::WriteBack), Prot::RW)
                    .access(Prot::WRITE);
                p.enter(&space, va, m).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        // Walkers: every page, every time, its own frame.
        for t in 0..2u64 {
            let (space, stop) = (&space, &stop);
            s.spawn(move || {
                let mut i = t * 97;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 13) % PAGES;
                    let va = VA + i * PAGE;
                    let a = if i % 2 == 0 {
                        Access::USER_WRITE
                    } else {
                        Access::USER_READ
                    };
                    let got = p.translate_access(space, va, a).map(|t| t.pa.as_u64());
                    assert_eq!(got, Ok((BASE_PFN + i) * PAGE), "page {i}");
                    assert_eq!(p.extract(space, VirtAddr(va)), Some(Pfn(BASE_PFN + i)));
                }
            });
        }
        // Faults next door, in the same page directory.
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let va = VA + SUPER + (n % 64) * PAGE;
                let m = Mapping::new(page(100 + n % 64, MemAttr::WriteBack), Prot::RW);
                p.enter(&space, VirtAddr(va), m).unwrap();
                if n % 64 == 63 {
                    p.remove(
                        &space,
                        VirtAddr(VA + SUPER)..VirtAddr(VA + 2 * SUPER),
                        &mut |_| {},
                    );
                }
                n += 1;
            }
        });
    });
    // Promotion is best effort under contention (the walkers hold the
    // tree lock shared): the last one may have been given up. Alone, the
    // same enter promotes the full table in line.
    let m = Mapping::new(page(BASE_PFN, MemAttr::WriteBack), Prot::RW).access(Prot::WRITE);
    p.enter(&space, VirtAddr(VA), m).unwrap();
    let (promoted, demoted, _) = p.superpage_stats().get();
    assert!(promoted >= 2 && demoted >= 1, "{promoted} / {demoted}");
    assert_eq!(promoted, demoted + 1, "the last promotion stands");
    assert!(is_super(p, &space, VA));
    assert_maps_run(p, &space, "after the race");
    assert_eq!(space.wired_count(), 0);
    p.remove(&space, VirtAddr(0)..VirtAddr(1 << 47), &mut |_| {});
    assert_eq!(space.resident_count(), 0);
    p.destroy_space(&space);
    assert_eq!(vm.free_pages(), free, "frames leaked");
}

/// Questions and no-op changes leave a superpage whole: `is_modified`
/// reads its M bit (FreeBSD reads a 2 MiB mapping's the same way), and an
/// `enter` of what it already maps (two threads faulting one page) changes
/// nothing; an `enter` that does change something still demotes.
#[test]
fn queries_and_repeated_enters_do_not_split_a_superpage() {
    let vm = machine();
    let p = vm.pmap();
    let dirty = p.create_space().unwrap();
    fill(p, &dirty, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    for i in [0, 200, 511] {
        assert!(p.is_modified(Pfn(BASE_PFN + i)), "page {i}");
        let m = Mapping::new(page(BASE_PFN + i, MemAttr::WriteBack), Prot::RW).access(Prot::READ);
        assert_eq!(p.enter(&dirty, VirtAddr(VA + i * PAGE), m).unwrap(), None);
    }
    assert!(is_super(p, &dirty, VA));
    assert_eq!(p.superpage_stats().get().1, 0, "nothing demoted");
    // Wired is a change: it demotes.
    let m = Mapping::new(page(BASE_PFN + 3, MemAttr::WriteBack), Prot::RW)
        .access(Prot::READ)
        .wired(true);
    p.enter(&dirty, VirtAddr(VA + 3 * PAGE), m).unwrap();
    assert!(!is_super(p, &dirty, VA));
    assert_eq!(dirty.wired_count(), 1);
    p.destroy_space(&dirty);

    let clean = p.create_space().unwrap();
    fill(p, &clean, Prot::RW, Prot::READ, MemAttr::WriteBack);
    assert!(is_super(p, &clean, VA));
    assert!(!p.is_modified(Pfn(BASE_PFN + 9)));
    // The same read fault again: the read-only superpage already maps it.
    let m = Mapping::new(page(BASE_PFN + 9, MemAttr::WriteBack), Prot::READ).access(Prot::READ);
    assert_eq!(p.enter(&clean, VirtAddr(VA + 9 * PAGE), m).unwrap(), None);
    assert!(is_super(p, &clean, VA));
    assert_eq!(p.superpage_stats().get().1, 1, "only the wiring demoted");
    p.destroy_space(&clean);
}

/// A TLB hook that, once armed, holds the first invalidation (made inside
/// the table-tree lock, shared) until released.
#[derive(Default)]
struct Gate {
    armed: AtomicBool,
    inside: AtomicBool,
    release: AtomicBool,
}

/// [`Gate`] as the pmap's hook.
struct GateHook(std::sync::Arc<Gate>);

impl TlbHook for GateHook {
    fn invalidate_page(&self, _root: u64, _va: u64) {
        if self.0.armed.swap(false, Ordering::AcqRel) {
            self.0.inside.store(true, Ordering::Release);
            while !self.0.release.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
    fn invalidate_all(&self, _root: u64) {}
}

/// A promotion never waits for the table-tree lock (a writer queued
/// behind a fault preempted inside it would stall every fault of the
/// space): with the lock held shared elsewhere, the table that filled
/// stays 4 KiB, and the next `enter` in the space promotes it.
#[test]
fn a_promotion_that_finds_the_lock_in_use_is_done_by_a_later_enter() {
    let gate = std::sync::Arc::new(Gate::default());
    let pmap = X86Pmap::with_hook(
        vm_pmap_x86_64::mmu::CpuMode::default(),
        GateHook(gate.clone()),
    );
    let vm = Vm::new(pmap, test_config(4096)).unwrap();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    let other = VA + 8 * SUPER;
    let m = |pfn| Mapping::new(page(pfn, MemAttr::WriteBack), Prot::RW).access(Prot::WRITE);
    p.enter(&space, VirtAddr(other), m(100)).unwrap();
    std::thread::scope(|s| {
        // Replacing a frame invalidates it inside the shared lock: held.
        gate.armed.store(true, Ordering::Release);
        let held = s.spawn(|| p.enter(&space, VirtAddr(other), m(101)).unwrap());
        while !gate.inside.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        for i in 0..PAGES {
            p.enter(&space, VirtAddr(VA + i * PAGE), m(BASE_PFN + i))
                .unwrap();
        }
        assert!(!is_super(p, &space, VA), "promoted through a held lock");
        gate.release.store(true, Ordering::Release);
        held.join().unwrap();
    });
    p.enter(&space, VirtAddr(other + PAGE), m(102)).unwrap();
    assert!(
        is_super(p, &space, VA),
        "the later enter promoted the full table"
    );
    assert_maps_run(p, &space, "promoted later");
    p.destroy_space(&space);
}

/// `ts_referenced` answers from the 2 MiB entry without splitting it
/// (FreeBSD `pmap_ts_referenced`): each page counts as referenced while
/// the entry has A; the one page of the 512 a hash picks clears it; the
/// next access sets it again. Page-out can so age a superpage whole.
#[test]
fn ts_referenced_ages_a_superpage_without_splitting_it() {
    for (_, fill) in WAYS_IN {
        ts_referenced_ages(fill);
    }
}

fn ts_referenced_ages(fill: Fill) {
    let vm = machine();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    assert!(is_super(p, &space, VA));
    let pass = || -> Vec<u32> {
        (0..PAGES)
            .map(|i| p.ts_referenced(Pfn(BASE_PFN + i)))
            .collect()
    };
    // In frame order: referenced up to the page that clears A, then not.
    let first = pass();
    let clearer = first.iter().rposition(|&n| n == 1).expect("A was set");
    assert!(
        first[..=clearer].iter().all(|&n| n == 1) && first[clearer + 1..].iter().all(|&n| n == 0),
        "{first:?}"
    );
    let a = PteFlags::ACCESSED.bits();
    assert_eq!(p.pte(&space, VA).unwrap() & a, 0, "A cleared");
    assert!(pass().iter().all(|&n| n == 0), "nothing referenced since");
    // An access (the software MMU, as the CPU) sets A in the 2 MiB entry.
    p.translate_access(&space, VA + 3 * PAGE, Access::USER_READ)
        .unwrap();
    assert_ne!(p.pte(&space, VA).unwrap() & a, 0);
    assert_eq!(p.ts_referenced(Pfn(BASE_PFN + 400)), 1);
    // Never split, nothing lost: every page still dirty and in place.
    assert!(is_super(p, &space, VA));
    assert_eq!(p.superpage_stats().get().1, 0, "no demotion");
    assert!((0..PAGES).all(|i| p.is_modified(Pfn(BASE_PFN + i))));
    assert_maps_run(p, &space, "after ageing");
    // A demotion now copies the entry as it is: A and M in every page.
    p.change_wiring(&space, VirtAddr(VA + 7 * PAGE), true);
    assert!(!is_super(p, &space, VA));
    for i in 0..PAGES {
        let f = PteFlags::from_bits_truncate(p.pte(&space, VA + i * PAGE).unwrap());
        assert!(
            f.contains(PteFlags::DIRTY | PteFlags::ACCESSED),
            "page {i}: {f:?}"
        );
    }
}

/// `enter_superpage` maps only where it can map all 2 MiB with one entry
/// and nothing is there; any other case changes nothing and says so
/// (`Ok(false)`, the caller then enters page by page), or is an error
/// for an address the space cannot have or a destroyed space.
#[test]
fn entering_a_whole_superpage_refuses_what_one_entry_cannot_map() {
    let vm = machine();
    let p = vm.pmap();
    let free = vm.free_pages();
    let space = p.create_space().unwrap();
    let rw = |pfn| Mapping::new(page(pfn, MemAttr::WriteBack), Prot::RW).access(Prot::WRITE);
    let at = |va| VirtAddr(va);
    let refusals = [
        ("unaligned address", at(VA + PAGE), rw(BASE_PFN)),
        ("unaligned frame", at(VA), rw(BASE_PFN + 1)),
        (
            "writable but clean",
            at(VA),
            Mapping::new(page(BASE_PFN, MemAttr::WriteBack), Prot::RW).access(Prot::READ),
        ),
        ("frames past memory", at(VA), rw(4096)),
    ];
    for (what, va, m) in refusals {
        assert_eq!(p.enter_superpage(&space, va, m), Ok(false), "{what}");
        assert_eq!(space.resident_count(), 0, "{what}");
        assert_eq!(p.table_pages(&space), 1, "{what}: tables left");
    }
    // One page mapped in the 2 MiB: refused, that page untouched.
    p.enter(&space, VirtAddr(VA + 9 * PAGE), rw(77)).unwrap();
    assert_eq!(p.enter_superpage(&space, at(VA), rw(BASE_PFN)), Ok(false));
    assert_eq!(p.extract(&space, VirtAddr(VA + 9 * PAGE)), Some(Pfn(77)));
    assert_eq!(p.extract(&space, VirtAddr(VA)), None);
    assert_eq!(p.mapping_count(Pfn(BASE_PFN)), 0, "a pv entry left");
    // A superpage there already: refused too.
    p.remove(&space, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |_| {});
    fill_whole(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    let pfn = BASE_PFN - 512;
    assert_eq!(p.enter_superpage(&space, at(VA), rw(pfn)), Ok(false));
    assert_maps_run(p, &space, "after a refusal");
    assert_eq!(p.mapping_count(Pfn(pfn)), 0);
    // Errors: past the space's user addresses, and a destroyed space.
    assert!(
        p.enter_superpage(&space, at(1 << 47), rw(BASE_PFN))
            .is_err()
    );
    p.destroy_space(&space);
    assert_eq!(
        p.enter_superpage(&space, at(VA + SUPER), rw(BASE_PFN)),
        Err(vm_core::PmapError::SpaceDestroyed)
    );
    assert_eq!(vm.free_pages(), free, "a frame leaked");
    // A pmap with superpages turned off never makes one.
    let vm = Vm::new(X86Pmap::new().with_superpages(false), test_config(4096)).unwrap();
    let space = vm.pmap().create_space().unwrap();
    assert_eq!(
        vm.pmap().enter_superpage(&space, at(VA), rw(BASE_PFN)),
        Ok(false)
    );
}

/// A superpage entered whole is the same to every reader as a promoted
/// one: each page translates to its frame with A and M, each frame has
/// its pv entry, the space counts 512 resident pages, and the statistics
/// count a mapping, not a promotion.
#[test]
fn a_superpage_entered_whole_is_mapped_page_by_page_for_every_reader() {
    let vm = machine();
    let p = vm.pmap();
    let space = p.create_space().unwrap();
    fill_whole(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
    assert!(is_super(p, &space, VA));
    assert_maps_run(p, &space, "entered whole");
    assert_eq!(space.resident_count(), PAGES);
    for i in 0..PAGES {
        assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 1, "pv of {i}");
        assert!(p.is_modified(Pfn(BASE_PFN + i)), "page {i} clean");
    }
    let stats = p.superpage_stats();
    assert_eq!(stats.get(), (0, 0, 0));
    assert_eq!(stats.mappings.load(Ordering::Relaxed), 1);
    assert_eq!(stats.made(), 1);
    // Written through the software MMU with no fault: it is writable.
    p.translate_access(&space, VA + 5 * PAGE, Access::USER_WRITE)
        .unwrap();
    // A read-only one is clean and stays so until written through a
    // demoted entry.
    let s2 = p.create_space().unwrap();
    let ro = Mapping::new(page(BASE_PFN, MemAttr::WriteBack), Prot::READ).access(Prot::READ);
    assert_eq!(p.enter_superpage(&s2, VirtAddr(VA), ro), Ok(true));
    assert!(p.translate_access(&s2, VA, Access::USER_WRITE).is_err());
    assert!(p.translate_access(&s2, VA, Access::USER_READ).is_ok());
    assert_eq!(p.mapping_count(Pfn(BASE_PFN)), 2);
}

/// A `protect` or `remove` of a whole superpage changes its one entry
/// (FreeBSD `pmap_protect_pde`, `pmap_remove_pde`): no demotion, every
/// page's M reported, the whole space invalidated (a CPU may hold 4 KiB
/// translations of the pages from before a promotion), and on removal the
/// kept table freed with the entry.
#[test]
fn a_whole_superpage_is_protected_and_removed_as_one_entry() {
    for (way, fill) in WAYS_IN {
        let vm = machine();
        let p = vm.pmap();
        let free = vm.free_pages();
        let space = p.create_space().unwrap();
        fill(p, &space, Prot::RW, Prot::WRITE, MemAttr::WriteBack);
        let tables = p.table_pages(&space);
        let full = p.tlb_stats().full.load(Ordering::Relaxed);
        let mut dirty = Vec::new();
        p.protect(
            &space,
            VirtAddr(VA)..VirtAddr(VA + SUPER),
            Prot::READ,
            &mut |d| dirty.push(d.pfn.0),
        );
        assert!(is_super(p, &space, VA), "{way}: protect demoted it");
        assert_eq!(p.superpage_stats().get().1, 0, "{way}");
        assert_eq!(
            dirty,
            (BASE_PFN..BASE_PFN + PAGES).collect::<Vec<_>>(),
            "{way}"
        );
        let pde = PteFlags::from_bits_truncate(p.pte(&space, VA).unwrap());
        assert!(
            !pde.intersects(PteFlags::WRITABLE | PteFlags::DIRTY),
            "{way}: {pde:?}"
        );
        assert!(
            p.tlb_stats().full.load(Ordering::Relaxed) > full,
            "{way}: not invalidated"
        );
        assert!(
            p.translate_access(&space, VA + 9 * PAGE, Access::USER_WRITE)
                .is_err()
        );
        assert_maps_run(p, &space, way);
        assert_eq!(p.table_pages(&space), tables, "{way}");
        // Removed whole: each page reported with its frame, clean since
        // the protect.
        let full = p.tlb_stats().full.load(Ordering::Relaxed);
        let mut gone = Vec::new();
        p.remove(&space, VirtAddr(VA)..VirtAddr(VA + SUPER), &mut |d| {
            gone.push((d.pfn.0, d.modified))
        });
        assert_eq!(
            gone,
            (BASE_PFN..BASE_PFN + PAGES)
                .map(|f| (f, false))
                .collect::<Vec<_>>(),
            "{way}: read-only and clean since the protect"
        );
        let stats = p.superpage_stats();
        assert_eq!(
            (stats.get().1, stats.removals.load(Ordering::Relaxed)),
            (0, 1),
            "{way}"
        );
        assert!(
            p.tlb_stats().full.load(Ordering::Relaxed) > full,
            "{way}: not invalidated"
        );
        assert_eq!(space.resident_count(), 0, "{way}");
        assert_eq!(p.table_pages(&space), 1, "{way}: only the root left");
        for i in [0, 200, 511] {
            assert_eq!(p.mapping_count(Pfn(BASE_PFN + i)), 0, "{way}: pv of {i}");
            assert_eq!(p.extract(&space, VirtAddr(VA + i * PAGE)), None, "{way}");
        }
        p.destroy_space(&space);
        assert_eq!(vm.free_pages(), free, "{way}: a table frame leaked");
    }
}
