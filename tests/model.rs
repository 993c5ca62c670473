//! The whole system against `vm_testkit::model`: random sequences of map
//! (anonymous, shared objects, a real file, a device; shared and private) /
//! unmap / protect / fork (copy and share) / exit / read / write / wire /
//! unwire / msync / truncate / collapse / page-out / starving the frame
//! allocator (a balloon) on the x86_64 pmap with
//! a swap file and a machine small enough that paging happens. After every step the harness checks the
//! bytes, the errors, the consistency of the machine and isolation (no
//! frame writable in one space is mapped for other memory).
//!
//! CI runs it with a fixed seed, 300 cases of 20-80 steps (about 15 000
//! steps, a few seconds); `PROPTEST_CASES` raises the count locally (30 000
//! cases, about 1.5 million steps, take 25 s in release).
//! Shrunk failures land in `tests/model.proptest-regressions` (commit them:
//! they are replayed first on every run). The same language drives the
//! fuzz target in `fuzz/`.
//!
//! The same language runs a second time on slots of 512 pages (one 2 MiB
//! superpage each) on a machine that maps aligned anonymous memory whole
//! at its first write fault: every slot of the first space starts
//! promoted, and fork, copy-on-write, protect, wire, page-out, holds,
//! forced writes and unmap then meet 2 MiB entries, which they demote or
//! keep (16 cases; `PROPTEST_CASES` / 20 where set; failures in
//! `tests/model_superpages.proptest-regressions`). Operations on part of
//! a superpage are in `tests/superpages.rs`, whose own model covers
//! partial unmap, protect and wire.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use vm_core::{SuperpagePolicy, Vm, VmConfig, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::X86Pmap;
use vm_pmap_x86_64::paging::Level;
use vm_testkit::model::{HOLDS, Harness, MAPPABLE, Op, SLOT_PAGES, SLOTS, SPACES};
use vm_testkit::support::TempPath;

/// Operations on slots of `slot_pages` pages.
fn op(slot_pages: u64) -> impl Strategy<Value = Op> {
    let (sp, sl, pg) = (0..SPACES, 0..SLOTS, 0..slot_pages);
    prop_oneof![
        2 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, share)| Op::MapAnon { space, slot, share }),
        2 => (sp.clone(), sl.clone(), 0..MAPPABLE, any::<bool>()).prop_map(|(space, slot, object, private)| Op::MapObject { space, slot, object, private }),
        2 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, private)| Op::MapFile { space, slot, private }),
        1 => (sp.clone(), sl.clone(), prop::bool::weighted(0.2)).prop_map(|(space, slot, private)| Op::MapDevice { space, slot, private }),
        1 => (sp.clone(), sl.clone()).prop_map(|(space, slot)| Op::Unmap { space, slot }),
        1 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, write)| Op::Protect { space, slot, write }),
        1 => sp.clone().prop_map(|space| Op::Fork { space }),
        1 => sp.clone().prop_map(|space| Op::Exit { space }),
        6 => (sp.clone(), sl.clone(), pg.clone(), any::<u8>()).prop_map(|(space, slot, page, value)| Op::Write { space, slot, page, value }),
        4 => (sp.clone(), sl.clone(), pg.clone()).prop_map(|(space, slot, page)| Op::Read { space, slot, page }),
        2 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, user)| Op::Wire { space, slot, user }),
        2 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, user)| Op::Unwire { space, slot, user }),
        1 => (sp.clone(), sl.clone()).prop_map(|(space, slot)| Op::Msync { space, slot }),
        1 => (0..=slot_pages).prop_map(|pages| Op::Truncate { pages }),
        1 => (sp.clone(), sl.clone()).prop_map(|(space, slot)| Op::Collapse { space, slot }),
        1 => Just(Op::Pageout),
        1 => (0..4u64).prop_map(|keep| Op::Starve { keep }),
        1 => Just(Op::Feed),
        2 => (sp.clone(), sl.clone(), pg.clone(), any::<bool>(), 0..HOLDS).prop_map(|(space, slot, page, write, hold)| Op::Hold { space, slot, page, write, hold }),
        2 => (0..HOLDS, any::<u8>()).prop_map(|(hold, value)| Op::HoldWrite { hold, value }),
        1 => (0..HOLDS).prop_map(|hold| Op::Release { hold }),
        2 => (sp, sl, pg, any::<u8>()).prop_map(|(space, slot, page, value)| Op::ForceWrite { space, slot, page, value }),
    ]
}

/// The x86_64 view of a mapping: the frame of `va` and the RW bit of the
/// leaf entry, a 4 KiB one or a superpage's 2 MiB one.
fn probe(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> Option<(u64, bool)> {
    let (e, level) = vm.pmap().leaf_entry(s.pmap_space(), va)?;
    let frame = if level == Level::PD {
        (e & 0x000f_ffff_ffe0_0000) + (va & 0x1f_f000)
    } else {
        e & 0x000f_ffff_ffff_f000
    };
    (e & 1 != 0).then_some((frame, e & 2 != 0))
}

/// `default` cases (`PROPTEST_CASES / per` where set: a case of the
/// superpage model costs some twenty of the small one), a fixed seed,
/// shrunk failures kept in `regressions`.
fn config(default: u32, per: u32, regressions: &'static str) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .map_or(default, |c| (c / per).max(1));
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_f00d),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(regressions),
        )),
        ..Config::default()
    }
}

/// Slots of one 2 MiB superpage each.
const SUPER_PAGES: u64 = 512;

/// A machine of 16 MiB (eight superpages' frames, fewer than the slots of
/// three spaces want: paging and shortages happen) mapping every aligned
/// anonymous 2 MiB whole at its first write fault, with swap.
fn superpage_machine(swap_path: &TempPath) -> (std::sync::Arc<Vm<X86Pmap>>, Swap) {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_wait_ms: 1,
            superpages: SuperpagePolicy::Always,
            ..vm_testkit::test_config(4096)
        },
    )
    .unwrap();
    let swap = Swap::create(&swap_path.0, 64 << 20).unwrap();
    vm.set_swap(swap.provider());
    (vm, swap)
}

proptest! {
    #![proptest_config(config(300, 1, "tests/model.proptest-regressions"))]

    #[test]
    fn the_system_agrees_with_the_model(ops in prop::collection::vec(op(SLOT_PAGES), 20..80)) {
        let path = TempPath::new();
        let vm = Vm::new(X86Pmap::new(), VmConfig { memory_wait_ms: 1, ..vm_testkit::test_config(80) }).unwrap();
        let swap = Swap::create(&path.0, 4 << 20).unwrap();
        vm.set_swap(swap.provider());
        let mut h = Harness::new(vm, probe);
        for op in &ops {
            h.step(op).map_err(TestCaseError::fail)?;
            h.check().map_err(TestCaseError::fail)?;
        }
        h.check_all_reads().map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(config(16, 20, "tests/model_superpages.proptest-regressions"))]

    /// The same language on slots of one superpage each: anonymous slots
    /// are promoted at their first write, and every operation then meets a
    /// 2 MiB entry — copy-on-write after fork, protect, wire, page-out,
    /// holds, forced writes, unmap — which must demote it (or keep it) with
    /// the bytes, errors and isolation the model says.
    #[test]
    fn superpages_agree_with_the_model(ops in prop::collection::vec(op(SUPER_PAGES), 16..48)) {
        let path = TempPath::new();
        let (vm, _swap) = superpage_machine(&path);
        let mut h = Harness::with_slot_pages(vm, probe, SUPER_PAGES);
        // Every slot of the first space a promoted superpage first, so the
        // random operations meet 2 MiB entries from their first step.
        let promoted = (0..SLOTS).flat_map(|slot| {
            [
                Op::MapAnon { space: 0, slot, share: slot % 2 == 1 },
                Op::Write { space: 0, slot, page: 3, value: 1 },
            ]
        });
        for op in promoted.collect::<Vec<_>>().iter().chain(&ops) {
            h.step(op).map_err(TestCaseError::fail)?;
            h.check().map_err(TestCaseError::fail)?;
        }
        h.check_all_reads().map_err(TestCaseError::fail)?;
    }
}

/// The superpage model meets promoted mappings and demotes them: a fixed
/// sequence through each way a 2 MiB entry is split, checked as the
/// property test checks, with the pmap's counts showing the promotions and
/// demotions happened (the property test cannot assert that per case).
#[test]
fn the_superpage_model_promotes_and_demotes() {
    let path = TempPath::new();
    let (vm, _swap) = superpage_machine(&path);
    let mut h = Harness::with_slot_pages(vm.clone(), probe, SUPER_PAGES);
    let w = |space, slot, page, value| Op::Write {
        space,
        slot,
        page,
        value,
    };
    let is_super = |h: &Harness<X86Pmap>, slot| {
        vm.pmap()
            .leaf_entry(h.space(0).unwrap().pmap_space(), h.slot_va(slot, 0))
            .is_some_and(|(e, level)| e & 1 != 0 && level == Level::PD)
    };
    let run = |h: &mut Harness<X86Pmap>, ops: &[Op]| {
        for op in ops {
            h.step(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            h.check().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        }
    };
    let map = |slot| Op::MapAnon {
        space: 0,
        slot,
        share: false,
    };
    run(
        &mut h,
        &[map(0), map(1), map(2), map(3), w(0, 0, 7, 1), w(0, 1, 9, 2)],
    );
    assert!(
        is_super(&h, 0) && is_super(&h, 1),
        "promoted at the first write"
    );
    // Copy-on-write in the child and the parent, inside the superpage.
    run(
        &mut h,
        &[Op::Fork { space: 0 }, w(1, 0, 7, 3), w(0, 0, 300, 4)],
    );
    assert!(!is_super(&h, 0), "a copy-on-write inside demotes");
    // Protect, wire and unwire, page-out, a hold and a forced write.
    run(
        &mut h,
        &[
            w(0, 2, 0, 5),
            // Written through the 2 MiB entry (no fault: only its M bit
            // knows), then split by protect: the split must keep M, or
            // page-out takes the page for clean and the write is lost.
            w(0, 1, 100, 9),
            Op::Protect {
                space: 0,
                slot: 1,
                write: false,
            },
            Op::Wire {
                space: 0,
                slot: 2,
                user: true,
            },
            Op::Unwire {
                space: 0,
                slot: 2,
                user: true,
            },
            // Twice: the first takes the referenced bits, the second frees
            // what it then finds clean.
            Op::Pageout,
            Op::Pageout,
            Op::Read {
                space: 0,
                slot: 1,
                page: 100,
            },
            w(0, 3, 511, 6),
            Op::Hold {
                space: 0,
                slot: 3,
                page: 100,
                write: true,
                hold: 0,
            },
            Op::HoldWrite { hold: 0, value: 7 },
            Op::ForceWrite {
                space: 0,
                slot: 1,
                page: 1,
                value: 8,
            },
            Op::Release { hold: 0 },
            Op::Unmap { space: 0, slot: 3 },
        ],
    );
    h.check_all_reads().unwrap();
    let (promoted, demoted, _) = vm.pmap().superpage_stats().get();
    assert!(
        promoted >= 3 && demoted >= 2,
        "promoted {promoted}, demoted {demoted}"
    );
}

/// Operations naming a space, slot or page the harness does not have are
/// refused with an error (they used to index out of bounds and panic).
#[test]
fn operations_outside_the_harness_are_refused() {
    let vm = Vm::new(X86Pmap::new(), vm_testkit::test_config(80)).unwrap();
    let mut h = Harness::new(vm, probe);
    let outside = [
        Op::Write {
            space: 0,
            slot: 0,
            page: SLOT_PAGES,
            value: 1,
        },
        Op::Read {
            space: SPACES,
            slot: 0,
            page: 0,
        },
        Op::MapAnon {
            space: 0,
            slot: SLOTS,
            share: false,
        },
        Op::Exit { space: SPACES },
        Op::Truncate {
            pages: SLOT_PAGES + 1,
        },
    ];
    for op in outside {
        assert!(h.step(&op).is_err(), "{op:?} accepted");
    }
    h.step(&Op::Truncate { pages: SLOT_PAGES }).unwrap();
    h.check().unwrap();
    h.check_all_reads().unwrap();
}

#[test]
fn decoded_byte_streams_run_too() {
    // What the fuzz target does, on a fixed stream.
    let data: Vec<u8> = (0..600u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let vm = Vm::new(X86Pmap::new(), vm_testkit::test_config(80)).unwrap();
    let mut h = Harness::new(vm, probe);
    for op in Op::decode(&data) {
        h.step(&op).unwrap();
        h.check().unwrap();
    }
    h.check_all_reads().unwrap();
}

/// Runs a fixed operation sequence through the harness, checking after
/// every step and reading everything at the end.
fn replay(ops: &[Op]) {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            memory_wait_ms: 1,
            ..vm_testkit::test_config(80)
        },
    )
    .unwrap();
    let mut h = Harness::new(vm, probe);
    for op in ops {
        h.step(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        h.check().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
    }
    h.check_all_reads().unwrap();
}

/// Shrunk by the property test: writes to a user-wired private mapping
/// were refused after `mprotect` (fixed in `VmSpace::protect`).
#[test]
fn found_wired_private_mapping_refused_writes_after_protect() {
    replay(&[
        Op::MapFile {
            space: 0,
            slot: 1,
            private: true,
        },
        Op::Wire {
            space: 0,
            slot: 1,
            user: true,
        },
        Op::Protect {
            space: 0,
            slot: 1,
            write: true,
        },
        Op::Write {
            space: 0,
            slot: 1,
            page: 0,
            value: 0,
        },
        Op::Protect {
            space: 0,
            slot: 1,
            write: false,
        },
        Op::Protect {
            space: 0,
            slot: 1,
            write: true,
        },
        Op::Write {
            space: 0,
            slot: 1,
            page: 1,
            value: 7,
        },
    ]);
}

/// Shrunk by the property test: a copy-on-write fault that failed for
/// want of page tables kept its copy, so the private mapping went on
/// showing the file's old page after the file was truncated (fixed in the
/// fault's `finish`).
#[test]
fn found_failed_copy_on_write_kept_its_copy() {
    let mut ops = vec![
        Op::Starve { keep: 2 },
        Op::MapFile {
            space: 0,
            slot: 3,
            private: true,
        },
        Op::Write {
            space: 0,
            slot: 3,
            page: 3,
            value: 0,
        },
    ];
    ops.extend([Op::Truncate { pages: 0 }, Op::Feed]);
    replay(&ops);
}

/// A write hold of a page of a user-wired private mapping, then a grant
/// of write after a restriction (which gives the wired entry its own
/// copies in place): the held page must stay the mapping's page.
#[test]
fn found_upgrade_of_a_wired_private_mapping_keeps_held_pages() {
    replay(&[
        Op::MapFile {
            space: 0,
            slot: 0,
            private: true,
        },
        Op::Wire {
            space: 0,
            slot: 0,
            user: true,
        },
        Op::Hold {
            space: 0,
            slot: 0,
            page: 1,
            write: true,
            hold: 0,
        },
        Op::Protect {
            space: 0,
            slot: 0,
            write: false,
        },
        Op::Protect {
            space: 0,
            slot: 0,
            write: true,
        },
        Op::HoldWrite { hold: 0, value: 9 },
        Op::Read {
            space: 0,
            slot: 0,
            page: 1,
        },
    ]);
}
