//! A reference model of address spaces and an operation language, for
//! property tests and fuzzing of a whole machine.
//!
//! Each space maps *slots* (fixed 8-page regions) to *cells* (vectors of
//! page values). Fork copies or shares cells exactly as inheritance says,
//! shared objects are cells mapped by several spaces. [`Harness`] runs the
//! same operations on a real [`Vm`] and on the model and checks, after
//! every step, that they agree: allowed accesses see the model's bytes,
//! forbidden ones fail with the right error, the machine is consistent,
//! and no frame that one space can write is mapped for other memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use vm_core::{FaultError, Inheritance, MapError, MapRequest, Pmap, Prot, Vm, VmObject, VmSpace};

/// Bytes in a page.
const PAGE: u64 = vm_core::PAGE_SIZE;
/// Slots per space.
pub const SLOTS: usize = 4;
/// Pages per slot.
pub const SLOT_PAGES: u64 = 8;
/// Spaces alive at most.
pub const SPACES: usize = 3;
/// Shared objects.
pub const OBJECTS: usize = 2;

/// The address of `page` of `slot`.
#[must_use]
pub fn slot_va(slot: usize, page: u64) -> u64 {
    0x1000_0000 + slot as u64 * 0x10_0000 + page * PAGE
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    /// Map anonymous memory, inherited shared or copied.
    MapAnon {
        space: usize,
        slot: usize,
        share: bool,
    },
    /// Map one of the shared objects.
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
    /// Run the pageout scan over everything.
    Pageout,
}

impl Op {
    /// Decodes operations from raw bytes (for fuzzers): three bytes each.
    #[must_use]
    pub fn decode(data: &[u8]) -> Vec<Op> {
        data.chunks_exact(3)
            .map(|c| {
                let (space, slot, page) = (
                    c[1] as usize % SPACES,
                    (c[1] >> 2) as usize % SLOTS,
                    u64::from(c[1] >> 4) % SLOT_PAGES,
                );
                match c[0] % 16 {
                    0 | 1 => Op::MapAnon {
                        space,
                        slot,
                        share: c[2] & 1 != 0,
                    },
                    2 => Op::MapShared {
                        space,
                        slot,
                        object: c[2] as usize % OBJECTS,
                    },
                    3 => Op::Unmap { space, slot },
                    4 => Op::Protect {
                        space,
                        slot,
                        write: c[2] & 1 != 0,
                    },
                    5 => Op::Fork { space },
                    6 => Op::Exit { space },
                    7..=10 => Op::Write {
                        space,
                        slot,
                        page,
                        value: c[2],
                    },
                    11..=12 => Op::Read { space, slot, page },
                    13 => Op::Wire { space, slot },
                    14 => Op::Unwire { space, slot },
                    _ => Op::Pageout,
                }
            })
            .collect()
    }
}

/// A slot as the model sees it.
#[derive(Clone, Debug)]
struct Region {
    cell: usize,
    write: bool,
    share: bool,
    wired: bool,
}

/// Reads a mapping the way the hardware holds it: the frame and whether
/// it is writable, or `None` when `va` is not mapped.
pub type Probe<P> = fn(&Vm<P>, &VmSpace<P>, u64) -> Option<(u64, bool)>;

/// The machine and the model side by side. See the [module docs](self).
pub struct Harness<P: Pmap> {
    vm: Arc<Vm<P>>,
    spaces: Vec<Option<VmSpace<P>>>,
    objects: Vec<Arc<VmObject>>,
    cells: Vec<Vec<u8>>,
    model: Vec<Option<BTreeMap<usize, Region>>>,
    object_cells: Vec<usize>,
    probe: Probe<P>,
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

impl<P: Pmap> Harness<P> {
    /// A harness on `vm` (install swap on it first to exercise paging),
    /// with one empty space.
    ///
    /// # Panics
    ///
    /// If the pmap cannot make a space.
    pub fn new(vm: Arc<Vm<P>>, probe: Probe<P>) -> Harness<P> {
        let objects = (0..OBJECTS)
            .map(|_| vm.new_anon_object(SLOT_PAGES))
            .collect();
        let first = vm.new_space().expect("first space");
        let mut h = Harness {
            vm,
            spaces: vec![Some(first), None, None],
            objects,
            cells: Vec::new(),
            model: vec![Some(BTreeMap::new()), None, None],
            object_cells: Vec::new(),
            probe,
        };
        h.object_cells = (0..OBJECTS).map(|_| h.new_cell(None)).collect();
        h
    }

    fn new_cell(&mut self, from: Option<usize>) -> usize {
        let v = from.map_or_else(|| vec![0; SLOT_PAGES as usize], |c| self.cells[c].clone());
        self.cells.push(v);
        self.cells.len() - 1
    }

    /// Runs `op` on both sides.
    ///
    /// # Errors
    ///
    /// What disagreed.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::MapAnon { space, slot, share } => self.map(space, slot, None, share),
            Op::MapShared {
                space,
                slot,
                object,
            } => self.map(space, slot, Some(object), true),
            Op::Unmap { space, slot } => {
                if let (Some(m), Some(s)) =
                    (self.model[space].as_mut(), self.spaces[space].as_ref())
                {
                    s.unmap(slot_va(slot, 0), SLOT_PAGES * PAGE)
                        .map_err(|e| format!("{op:?}: {e}"))?;
                    m.remove(&slot);
                }
                Ok(())
            }
            Op::Protect { space, slot, write } => {
                let (Some(m), Some(s)) = (self.model[space].as_mut(), self.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let Some(reg) = m.get_mut(&slot) else {
                    return Ok(());
                };
                let prot = if write { Prot::RW } else { Prot::READ };
                s.protect(slot_va(slot, 0), SLOT_PAGES * PAGE, prot)
                    .map_err(|e| format!("{op:?}: {e}"))?;
                reg.write = write;
                Ok(())
            }
            Op::Fork { space } => self.fork(space),
            Op::Exit { space } => {
                if space != 0 {
                    self.model[space] = None;
                    self.spaces[space] = None;
                }
                Ok(())
            }
            Op::Write {
                space,
                slot,
                page,
                value,
            } => self.write(space, slot, page, value),
            Op::Read { space, slot, page } => {
                let (Some(m), Some(s)) = (self.model[space].as_ref(), self.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                let got = s.read_u8(slot_va(slot, page) + 11);
                match m.get(&slot) {
                    None => ensure!(
                        matches!(got, Err(FaultError::InvalidAddress { .. })),
                        "{op:?}: {got:?}"
                    ),
                    Some(reg) => {
                        let want = self.cells[reg.cell][page as usize];
                        ensure!(got == Ok(want), "{op:?}: got {got:?}, model {want}");
                    }
                }
                Ok(())
            }
            Op::Wire { space, slot } => self.wire(space, slot),
            Op::Unwire { space, slot } => {
                let (Some(m), Some(s)) = (self.model[space].as_mut(), self.spaces[space].as_ref())
                else {
                    return Ok(());
                };
                if let Some(reg) = m.get_mut(&slot).filter(|r| r.wired) {
                    s.unwire(slot_va(slot, 0), SLOT_PAGES * PAGE, true)
                        .map_err(|e| format!("{op:?}: {e}"))?;
                    reg.wired = false;
                }
                Ok(())
            }
            Op::Pageout => {
                self.vm.pageout(self.vm.total_pages());
                Ok(())
            }
        }
    }

    fn map(
        &mut self,
        space: usize,
        slot: usize,
        object: Option<usize>,
        share: bool,
    ) -> Result<(), String> {
        let (Some(m), Some(s)) = (self.model[space].as_ref(), self.spaces[space].as_ref()) else {
            return Ok(());
        };
        if m.contains_key(&slot) {
            return Ok(());
        }
        let (va, len) = (slot_va(slot, 0), SLOT_PAGES * PAGE);
        let inh = if share {
            Inheritance::Share
        } else {
            Inheritance::Copy
        };
        let req = match object {
            None => MapRequest::anon(va, len, Prot::RW),
            Some(o) => MapRequest::object(va, len, self.objects[o].clone(), 0, Prot::RW),
        };
        s.map(req.inheritance(inh))
            .map_err(|e| format!("map: {e}"))?;
        let cell = match object {
            Some(o) => self.object_cells[o],
            None => self.new_cell(None),
        };
        let m = self.model[space].as_mut().expect("checked");
        m.insert(
            slot,
            Region {
                cell,
                write: true,
                share,
                wired: false,
            },
        );
        Ok(())
    }

    fn fork(&mut self, space: usize) -> Result<(), String> {
        let Some(free) = (0..SPACES).find(|&i| self.model[i].is_none()) else {
            return Ok(());
        };
        let (Some(m), Some(s)) = (self.model[space].as_ref(), self.spaces[space].as_ref()) else {
            return Ok(());
        };
        let child = s.fork().map_err(|e| format!("fork: {e}"))?;
        let regions: Vec<(usize, Region)> = m.iter().map(|(&k, r)| (k, r.clone())).collect();
        let mut cm = BTreeMap::new();
        for (slot, reg) in regions {
            let cell = if reg.share {
                reg.cell
            } else {
                self.new_cell(Some(reg.cell))
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
        self.model[free] = Some(cm);
        self.spaces[free] = Some(child);
        Ok(())
    }

    fn write(&mut self, space: usize, slot: usize, page: u64, value: u8) -> Result<(), String> {
        let (Some(m), Some(s)) = (self.model[space].as_ref(), self.spaces[space].as_ref()) else {
            return Ok(());
        };
        let got = s.write(slot_va(slot, page) + 11, &[value]);
        match m.get(&slot) {
            None => ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "write to unmapped: {got:?}"
            ),
            Some(reg) if !reg.write => {
                ensure!(
                    matches!(got, Err(FaultError::ProtectionFailure { .. })),
                    "write to read-only: {got:?}"
                )
            }
            Some(reg) => {
                ensure!(got.is_ok(), "write {space}/{slot}/{page}: {got:?}");
                let cell = reg.cell;
                self.cells[cell][page as usize] = value;
            }
        }
        Ok(())
    }

    fn wire(&mut self, space: usize, slot: usize) -> Result<(), String> {
        let (Some(m), Some(s)) = (self.model[space].as_mut(), self.spaces[space].as_ref()) else {
            return Ok(());
        };
        let Some(reg) = m.get_mut(&slot).filter(|r| !r.wired) else {
            return Ok(());
        };
        match s.wire(slot_va(slot, 0), SLOT_PAGES * PAGE, true) {
            Ok(()) => reg.wired = true,
            // A small machine may lack the memory; then nothing stays wired.
            Err(MapError::Fault(FaultError::ResourceShortage { .. })) => {}
            Err(e) => return Err(format!("wire: {e}")),
        }
        Ok(())
    }

    /// The invariants that must hold after every step.
    ///
    /// # Errors
    ///
    /// The first one broken.
    pub fn check(&self) -> Result<(), String> {
        self.vm.check_consistency().map_err(|e| e.to_string())?;
        let mut by_frame: BTreeMap<u64, Vec<(usize, u64, bool)>> = BTreeMap::new();
        for (i, s) in self.spaces.iter().enumerate() {
            let (Some(s), Some(m)) = (s, &self.model[i]) else {
                continue;
            };
            for (&slot, reg) in m {
                for page in 0..SLOT_PAGES {
                    if let Some((frame, writable)) = (self.probe)(&self.vm, s, slot_va(slot, page))
                    {
                        by_frame
                            .entry(frame)
                            .or_default()
                            .push((reg.cell, page, writable));
                    }
                }
            }
        }
        for (frame, maps) in by_frame {
            if maps.iter().any(|m| m.2) {
                let (c, p, _) = maps[0];
                ensure!(
                    maps.iter().all(|m| m.0 == c && m.1 == p),
                    "frame {frame:#x} writable in one space is also mapped for other memory: {maps:?}"
                );
            }
        }
        Ok(())
    }

    /// Every byte every live space can read equals the model's.
    ///
    /// # Errors
    ///
    /// The first byte that differs.
    pub fn check_all_reads(&self) -> Result<(), String> {
        for (i, s) in self.spaces.iter().enumerate() {
            let (Some(s), Some(m)) = (s, &self.model[i]) else {
                continue;
            };
            for (&slot, reg) in m {
                for page in 0..SLOT_PAGES {
                    let got = s.read_u8(slot_va(slot, page) + 11);
                    let want = self.cells[reg.cell][page as usize];
                    ensure!(
                        got == Ok(want),
                        "space {i} slot {slot} page {page}: {got:?}, model {want}"
                    );
                }
            }
        }
        Ok(())
    }
}
