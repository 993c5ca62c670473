//! The whole system against a deliberately simple model.
//!
//! Random sequences of map / unmap / protect / fork (copy and share) /
//! exit / read / write / wire / unwire / page-out run against the real
//! crates — the x86_64 pmap, a swap file, a machine small enough that
//! paging happens — and against a model where each space maps slots to
//! *cells* (vectors of page values) that are shared or copied exactly as
//! fork and mapping say. After every step: every access the model allows
//! succeeds with the model's bytes, every access it forbids fails with
//! the right error, the machine is consistent, and no frame that one space
//! can write is mapped by a space that should not see it.
//!
//! CI runs it with a fixed seed; `PROPTEST_CASES` raises the count locally.
//! Shrunk failures land in `tests/model.proptest-regressions` (commit
//! them: they are replayed first on every run).

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use vm_core::{FaultError, Inheritance, MapRequest, Prot, Vm, VmConfig, VmObject, VmSpace};
use vm_pager_swap::Swap;
use vm_pmap_x86_64::X86Pmap;

const PAGE: u64 = 4096;
const SLOTS: usize = 4;
const SLOT_PAGES: u64 = 8;
const SPACES: usize = 3;
const BASE: u64 = 0x1000_0000;

fn slot_va(slot: usize, page: u64) -> u64 {
    BASE + slot as u64 * 0x10_0000 + page * PAGE
}

#[derive(Clone, Debug)]
enum Op {
    MapAnon {
        space: usize,
        slot: usize,
        share: bool,
    },
    MapShared {
        space: usize,
        slot: usize,
        object: usize,
    },
    Unmap {
        space: usize,
        slot: usize,
    },
    Protect {
        space: usize,
        slot: usize,
        write: bool,
    },
    Fork {
        space: usize,
    },
    Exit {
        space: usize,
    },
    Write {
        space: usize,
        slot: usize,
        page: u64,
        value: u8,
    },
    Read {
        space: usize,
        slot: usize,
        page: u64,
    },
    Wire {
        space: usize,
        slot: usize,
    },
    Unwire {
        space: usize,
        slot: usize,
    },
    Pageout,
}

fn op() -> impl Strategy<Value = Op> {
    let sp = 0..SPACES;
    let sl = 0..SLOTS;
    let pg = 0..SLOT_PAGES;
    prop_oneof![
        2 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, share)| Op::MapAnon { space, slot, share }),
        1 => (sp.clone(), sl.clone(), 0..2usize).prop_map(|(space, slot, object)| Op::MapShared { space, slot, object }),
        1 => (sp.clone(), sl.clone()).prop_map(|(space, slot)| Op::Unmap { space, slot }),
        1 => (sp.clone(), sl.clone(), any::<bool>()).prop_map(|(space, slot, write)| Op::Protect { space, slot, write }),
        1 => sp.clone().prop_map(|space| Op::Fork { space }),
        1 => sp.clone().prop_map(|space| Op::Exit { space }),
        6 => (sp.clone(), sl.clone(), pg.clone(), any::<u8>()).prop_map(|(space, slot, page, value)| Op::Write { space, slot, page, value }),
        4 => (sp.clone(), sl.clone(), pg).prop_map(|(space, slot, page)| Op::Read { space, slot, page }),
        1 => (sp.clone(), sl.clone()).prop_map(|(space, slot)| Op::Wire { space, slot }),
        1 => (sp, sl).prop_map(|(space, slot)| Op::Unwire { space, slot }),
        1 => Just(Op::Pageout),
    ]
}

/// A slot as the model sees it.
#[derive(Clone, Debug)]
struct Region {
    cell: usize,
    write: bool,
    share: bool,
    wired: bool,
}

#[derive(Default)]
struct Model {
    cells: Vec<Vec<u8>>,
    spaces: Vec<Option<BTreeMap<usize, Region>>>,
    /// The cells of the shared objects.
    objects: Vec<usize>,
}

impl Model {
    fn new_cell(&mut self, from: Option<usize>) -> usize {
        let v = from.map_or_else(|| vec![0; SLOT_PAGES as usize], |c| self.cells[c].clone());
        self.cells.push(v);
        self.cells.len() - 1
    }
}

struct Real {
    vm: Arc<Vm<X86Pmap>>,
    spaces: Vec<Option<VmSpace<X86Pmap>>>,
    objects: Vec<Arc<VmObject>>,
}

struct Harness {
    model: Model,
    real: Real,
    _swap: Swap,
    _path: TempPath,
}

struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn harness() -> Harness {
    let path = TempPath(std::env::temp_dir().join(format!(
        "vm-model-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )));
    let config = VmConfig {
        memory_wait_ms: 1,
        ..vm_testkit::test_config(80)
    };
    let vm = Vm::new(X86Pmap::new(), config).unwrap();
    let swap = Swap::create(&path.0, 4 << 20).unwrap();
    vm.set_swap(swap.provider());
    let mut model = Model::default();
    let objects = (0..2).map(|_| vm.new_anon_object(SLOT_PAGES)).collect();
    model.objects = (0..2).map(|_| model.new_cell(None)).collect();
    let first = vm.new_space().unwrap();
    model.spaces = vec![Some(BTreeMap::new()), None, None];
    Harness {
        model,
        real: Real {
            vm,
            spaces: vec![Some(first), None, None],
            objects,
        },
        _swap: swap,
        _path: path,
    }
}

impl Harness {
    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (m, r) = (&mut self.model, &mut self.real);
        match *op {
            Op::MapAnon { space, slot, share } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                if ms.contains_key(&slot) {
                    return Ok(());
                }
                let inh = if share {
                    Inheritance::Share
                } else {
                    Inheritance::Copy
                };
                rs.map(
                    MapRequest::anon(slot_va(slot, 0), SLOT_PAGES * PAGE, Prot::RW)
                        .inheritance(inh),
                )
                .unwrap();
                m.cells.push(vec![0; SLOT_PAGES as usize]);
                let cell = m.cells.len() - 1;
                ms.insert(
                    slot,
                    Region {
                        cell,
                        write: true,
                        share,
                        wired: false,
                    },
                );
            }
            Op::MapShared {
                space,
                slot,
                object,
            } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                if ms.contains_key(&slot) {
                    return Ok(());
                }
                let req = MapRequest::object(
                    slot_va(slot, 0),
                    SLOT_PAGES * PAGE,
                    r.objects[object].clone(),
                    0,
                    Prot::RW,
                )
                .inheritance(Inheritance::Share);
                rs.map(req).unwrap();
                ms.insert(
                    slot,
                    Region {
                        cell: m.objects[object],
                        write: true,
                        share: true,
                        wired: false,
                    },
                );
            }
            Op::Unmap { space, slot } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                rs.unmap(slot_va(slot, 0), SLOT_PAGES * PAGE).unwrap();
                ms.remove(&slot);
            }
            Op::Protect { space, slot, write } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let Some(reg) = ms.get_mut(&slot) else {
                    return Ok(());
                };
                let prot = if write { Prot::RW } else { Prot::READ };
                rs.protect(slot_va(slot, 0), SLOT_PAGES * PAGE, prot)
                    .unwrap();
                reg.write = write;
            }
            Op::Fork { space } => {
                let Some(free) = (0..SPACES).find(|&i| m.spaces[i].is_none()) else {
                    return Ok(());
                };
                let (Some(ms), Some(rs)) = (m.spaces[space].as_ref(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let child = rs.fork().unwrap();
                let regions: Vec<(usize, Region)> =
                    ms.iter().map(|(&s, reg)| (s, reg.clone())).collect();
                let mut cm = BTreeMap::new();
                for (slot, reg) in regions {
                    let cell = if reg.share {
                        reg.cell
                    } else {
                        m.new_cell(Some(reg.cell))
                    };
                    cm.insert(
                        slot,
                        Region {
                            cell,
                            wired: false,
                            ..reg
                        },
                    );
                }
                m.spaces[free] = Some(cm);
                r.spaces[free] = Some(child);
            }
            Op::Exit { space } => {
                if space == 0 {
                    return Ok(()); // keep one space alive
                }
                m.spaces[space] = None;
                r.spaces[space] = None;
            }
            Op::Write {
                space,
                slot,
                page,
                value,
            } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_ref(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let got = rs.write(slot_va(slot, page) + 11, &[value]);
                match ms.get(&slot) {
                    None => prop_assert!(
                        matches!(got, Err(FaultError::InvalidAddress { .. })),
                        "{op:?}: {got:?}"
                    ),
                    Some(reg) if !reg.write => {
                        prop_assert!(
                            matches!(got, Err(FaultError::ProtectionFailure { .. })),
                            "{op:?}: {got:?}"
                        )
                    }
                    Some(reg) => {
                        prop_assert!(got.is_ok(), "{op:?}: {got:?}");
                        let cell = reg.cell;
                        m.cells[cell][page as usize] = value;
                    }
                }
            }
            Op::Read { space, slot, page } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_ref(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let got = rs.read_u8(slot_va(slot, page) + 11);
                match ms.get(&slot) {
                    None => prop_assert!(
                        matches!(got, Err(FaultError::InvalidAddress { .. })),
                        "{op:?}: {got:?}"
                    ),
                    Some(reg) => prop_assert_eq!(
                        got.ok(),
                        Some(m.cells[reg.cell][page as usize]),
                        "{:?}",
                        op
                    ),
                }
            }
            Op::Wire { space, slot } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let Some(reg) = ms.get_mut(&slot) else {
                    return Ok(());
                };
                if reg.wired {
                    return Ok(());
                }
                match rs.wire(slot_va(slot, 0), SLOT_PAGES * PAGE, true) {
                    Ok(()) => reg.wired = true,
                    // A small machine may not have the memory: allowed, and
                    // nothing may stay wired.
                    Err(vm_core::MapError::Fault(FaultError::ResourceShortage { .. })) => {}
                    Err(e) => prop_assert!(false, "{op:?}: {e}"),
                }
            }
            Op::Unwire { space, slot } => {
                let (Some(ms), Some(rs)) = (m.spaces[space].as_mut(), r.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let Some(reg) = ms.get_mut(&slot) else {
                    return Ok(());
                };
                if reg.wired {
                    rs.unwire(slot_va(slot, 0), SLOT_PAGES * PAGE, true)
                        .unwrap();
                    reg.wired = false;
                }
            }
            Op::Pageout => {
                r.vm.pageout(r.vm.total_pages());
            }
        }
        Ok(())
    }

    /// The invariants after every step.
    fn check(&self) -> Result<(), TestCaseError> {
        let vm = &self.real.vm;
        if let Err(e) = vm.check_consistency() {
            prop_assert!(false, "{e}");
        }
        // Isolation: a frame writable through one mapping is mapped only
        // where the model has the same cell and page.
        let mut by_frame: BTreeMap<u64, Vec<(usize, u64, bool)>> = BTreeMap::new();
        for (i, sp) in self.real.spaces.iter().enumerate() {
            let (Some(sp), Some(ms)) = (sp, &self.model.spaces[i]) else {
                continue;
            };
            for (&slot, reg) in ms {
                for page in 0..SLOT_PAGES {
                    let Some(pte) = vm.pmap().pte(sp.pmap_space(), slot_va(slot, page)) else {
                        continue;
                    };
                    if pte & 1 == 0 {
                        continue;
                    }
                    by_frame
                        .entry(pte & 0x000f_ffff_ffff_f000)
                        .or_default()
                        .push((reg.cell, page, pte & 2 != 0));
                }
            }
        }
        for (frame, maps) in by_frame {
            if maps.iter().any(|m| m.2) {
                let (c, p, _) = maps[0];
                prop_assert!(
                    maps.iter().all(|m| m.0 == c && m.1 == p),
                    "frame {frame:#x} writable in one space is also mapped for other memory: {maps:?}"
                );
            }
        }
        Ok(())
    }

    /// Every byte every live space can read equals the model's.
    fn check_all_reads(&self) -> Result<(), TestCaseError> {
        for (i, sp) in self.real.spaces.iter().enumerate() {
            let (Some(sp), Some(ms)) = (sp, &self.model.spaces[i]) else {
                continue;
            };
            for (&slot, reg) in ms {
                for page in 0..SLOT_PAGES {
                    let got = sp.read_u8(slot_va(slot, page) + 11);
                    prop_assert_eq!(
                        got.ok(),
                        Some(self.model.cells[reg.cell][page as usize]),
                        "space {} slot {} page {}",
                        i,
                        slot,
                        page
                    );
                }
            }
        }
        Ok(())
    }
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(40);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_f00d),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/model.proptest-regressions",
            ),
        )),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_system_agrees_with_the_model(ops in prop::collection::vec(op(), 20..80)) {
        let mut h = harness();
        for op in &ops {
            h.step(op)?;
            h.check()?;
        }
        h.check_all_reads()?;
    }
}
