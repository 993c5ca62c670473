//! A reference model of address spaces and an operation language, for
//! property tests and fuzzing of a whole machine.
//!
//! Each space maps *slots* (fixed 8-page regions). A slot shows a *base*
//! (a vector of page values: fresh anonymous memory, one of the shared
//! anonymous objects, or the file) and, when mapped private, a layer of
//! private pages on top: a page the space wrote (or that the kernel
//! copied for it) reads from the layer, the others read through to the
//! base, so a private mapping sees a shared writer's changes until it has
//! its own copy, as FreeBSD does. Fork copies the layer or shares the base
//! as inheritance says. Device slots map fixed device addresses.
//!
//! [`Harness`] runs the same operations on a real [`Vm`] and on the model
//! and checks, after every step, that they agree: allowed accesses see the
//! model's bytes, forbidden ones fail with the right error (and, while
//! [`Op::Starve`] holds the frames back, an operation that needs one may
//! fail with a shortage and must then change nothing), the file on
//! disk holds what write-back promised, the machine is consistent, and
//! isolation holds (every mapped frame holds what the model says that
//! address reads, a frame one space can write is mapped nowhere for other
//! memory, no free frame is mapped).
//!
//! What the model leaves out: private mappings of the shared anonymous
//! objects (whether such a mapping later sees a shared writer's page
//! depends on which object of its chain a read of a hole happened to
//! zero-fill, which is FreeBSD's timing, not a property worth fixing in a
//! model; the file has no holes, so its private mappings are in);
//! truncation while a file slot is wired (the wired pages' fate is the
//! pager's policy); partial pages (the file is truncated to whole pages).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_core::{
    Balloon, FaultError, FaultFlags, Inheritance, MapError, MapRequest, MemAttr, PageQueue, Pfn,
    Pmap, PmapError, Prot, Vm, VmObject, VmSpace,
};
use vm_pager_device::{DeviceMmap, DevicePager};
use vm_pager_vnode::VnodePager;

/// Bytes in a page.
const PAGE: u64 = vm_core::PAGE_SIZE;
/// Slots per space.
pub const SLOTS: usize = 4;
/// Pages per slot (and of each object, the file and the device).
pub const SLOT_PAGES: u64 = 8;
/// Spaces alive at most.
pub const SPACES: usize = 3;
/// Shared anonymous objects.
pub const OBJECTS: usize = 2;
/// The file's place after them.
const FILE: usize = OBJECTS;
/// Where the model device's page 0 is (outside the machine's memory).
pub const DEVICE_PA: u64 = 0xfd00_0000;
/// The byte of each page the model reads and writes.
const AT: u64 = 11;

/// The address of `page` of `slot`.
#[must_use]
pub fn slot_va(slot: usize, page: u64) -> u64 {
    0x1000_0000 + slot as u64 * 0x10_0000 + page * PAGE
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    /// Map fresh anonymous memory, inherited shared or copied.
    MapAnon {
        space: usize,
        slot: usize,
        share: bool,
    },
    /// Map shared anonymous object `object` (`0..OBJECTS`) shared.
    MapObject {
        space: usize,
        slot: usize,
        object: usize,
    },
    /// Map the file, shared or private (copy-on-write).
    MapFile {
        space: usize,
        slot: usize,
        private: bool,
    },
    /// Map the device (a private mapping must be refused).
    MapDevice {
        space: usize,
        slot: usize,
        private: bool,
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
    /// Write a slot's dirty pages back (`msync`).
    Msync {
        space: usize,
        slot: usize,
    },
    /// Truncate or extend the file to `pages` pages.
    Truncate {
        pages: u64,
    },
    /// Collapse the shadow chain under a slot.
    Collapse {
        space: usize,
        slot: usize,
    },
    /// Run the pageout scan over everything.
    Pageout,
    /// Starve the machine: a balloon takes all free frames but `keep`.
    Starve {
        keep: u64,
    },
    /// Give the balloon's frames back.
    Feed,
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
                let flag = c[2] & 1 != 0;
                match c[0] % 22 {
                    0 | 1 => Op::MapAnon {
                        space,
                        slot,
                        share: flag,
                    },
                    2 => Op::MapObject {
                        space,
                        slot,
                        object: c[2] as usize % OBJECTS,
                    },
                    3 => Op::MapFile {
                        space,
                        slot,
                        private: flag,
                    },
                    4 => Op::MapDevice {
                        space,
                        slot,
                        private: c[2] % 8 == 0,
                    },
                    5 => Op::Unmap { space, slot },
                    6 => Op::Protect {
                        space,
                        slot,
                        write: flag,
                    },
                    7 => Op::Fork { space },
                    8 => Op::Exit { space },
                    9..=11 => Op::Write {
                        space,
                        slot,
                        page,
                        value: c[2],
                    },
                    12 | 13 => Op::Read { space, slot, page },
                    14 => Op::Wire { space, slot },
                    15 => Op::Unwire { space, slot },
                    16 => Op::Msync { space, slot },
                    17 => Op::Truncate {
                        pages: u64::from(c[2]) % (SLOT_PAGES + 1),
                    },
                    18 => Op::Collapse { space, slot },
                    19 => Op::Pageout,
                    20 => Op::Starve {
                        keep: u64::from(c[2] % 4),
                    },
                    _ => Op::Feed,
                }
            })
            .collect()
    }
}

/// What a slot shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Memory of a base cell (anonymous, or a shared anonymous object).
    Memory,
    /// The file (its cell is the file's contents).
    File,
    /// The device.
    Device,
}

/// A slot as the model sees it.
#[derive(Clone, Debug)]
struct Region {
    kind: Kind,
    base: usize,
    /// The private layer (`Some` for private mappings).
    private: Option<Vec<Option<u8>>>,
    /// Unique per mapping instance (a fork's copy gets a new one).
    id: usize,
    write: bool,
    wired: bool,
}

/// What an access to a page must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Value(u8),
    /// Past the end of the file: SIGBUS.
    PastEof,
    /// Device memory (not readable through the machine's memory).
    Device,
}

/// Reads a mapping the way the hardware holds it: the frame's physical
/// address and whether it is writable, or `None` when `va` is not mapped.
pub type Probe<P> = fn(&Vm<P>, &VmSpace<P>, u64) -> Option<(u64, bool)>;

/// The model's device: page `i` at [`DEVICE_PA`] + `i` pages.
struct Device;

impl DeviceMmap for Device {
    fn mmap(&self, offset: u64, _prot: Prot) -> Option<(u64, MemAttr)> {
        (offset < SLOT_PAGES * PAGE).then_some((DEVICE_PA + offset, MemAttr::Uncacheable))
    }
}

/// The file, removed when the harness goes.
struct ModelFile {
    path: PathBuf,
    pager: Arc<VnodePager>,
    object: Arc<VmObject>,
}

impl Drop for ModelFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The machine and the model side by side. See the [module docs](self).
pub struct Harness<P: Pmap> {
    vm: Arc<Vm<P>>,
    spaces: Vec<Option<VmSpace<P>>>,
    /// The shared anonymous objects, the file's object, the device's.
    objects: Vec<Arc<VmObject>>,
    file: ModelFile,
    /// The file's length in pages.
    file_pages: u64,
    cells: Vec<Vec<u8>>,
    model: Vec<Option<BTreeMap<usize, Region>>>,
    /// The cells of `objects` (the file's is its contents).
    object_cells: Vec<usize>,
    next_id: usize,
    /// Frames held back while the machine is starved.
    balloon: Option<Balloon>,
    probe: Probe<P>,
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// A fresh file name in the temporary directory.
fn temp_file() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "vm-model-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl<P: Pmap> Harness<P> {
    /// A harness on `vm` (install swap on it first to exercise paging),
    /// with one empty space and a zeroed file of [`SLOT_PAGES`] pages in
    /// the temporary directory.
    ///
    /// # Panics
    ///
    /// If the pmap cannot make a space or the file cannot be made.
    pub fn new(vm: Arc<Vm<P>>, probe: Probe<P>) -> Harness<P> {
        let path = temp_file();
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(SLOT_PAGES * PAGE))
            .expect("model file");
        let pager = VnodePager::open(&path, true).expect("model file");
        let file = ModelFile {
            path,
            object: pager.object(&vm),
            pager,
        };
        let mut objects: Vec<_> = (0..OBJECTS)
            .map(|_| vm.new_anon_object(SLOT_PAGES))
            .collect();
        objects.push(file.object.clone());
        objects.push(DevicePager::object(&vm, Device, SLOT_PAGES));
        let first = vm.new_space().expect("first space");
        let mut h = Harness {
            vm,
            spaces: vec![Some(first), None, None],
            objects,
            file,
            file_pages: SLOT_PAGES,
            cells: Vec::new(),
            model: vec![Some(BTreeMap::new()), None, None],
            object_cells: Vec::new(),
            next_id: 0,
            balloon: None,
            probe,
        };
        h.object_cells = (0..=OBJECTS).map(|_| h.new_cell(None)).collect();
        h
    }

    fn new_cell(&mut self, from: Option<usize>) -> usize {
        let v = from.map_or_else(|| vec![0; SLOT_PAGES as usize], |c| self.cells[c].clone());
        self.cells.push(v);
        self.cells.len() - 1
    }

    fn new_id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    /// What reading `page` of `reg` must give.
    fn expect(&self, reg: &Region, page: u64) -> Expect {
        if reg.kind == Kind::Device {
            return Expect::Device;
        }
        if let Some(v) = reg.private.as_ref().and_then(|l| l[page as usize]) {
            return Expect::Value(v);
        }
        if reg.kind == Kind::File && page >= self.file_pages {
            return Expect::PastEof;
        }
        Expect::Value(self.cells[reg.base][page as usize])
    }

    /// For a private region, its layer with its own copy of pages
    /// `0..upto` (what they read now) and the rest as they are; `None` for
    /// a shared one.
    fn own_copies(&self, reg: &Region, upto: u64) -> Option<Vec<Option<u8>>> {
        let layer = reg.private.as_ref()?;
        Some(
            (0..SLOT_PAGES)
                .map(|p| match self.expect(reg, p) {
                    Expect::Value(v) if p < upto => Some(v),
                    _ => layer[p as usize],
                })
                .collect(),
        )
    }

    /// Whether `got` is a shortage of frames while the balloon holds
    /// memory back: then the operation may fail and must change nothing.
    fn starved_out<T>(&self, got: &Result<T, FaultError>) -> bool {
        self.balloon.is_some() && matches!(got, Err(e) if is_shortage(e))
    }

    /// The model of a slot the caller found mapped.
    fn region_mut(&mut self, space: usize, slot: usize) -> &mut Region {
        self.model[space]
            .as_mut()
            .and_then(|m| m.get_mut(&slot))
            .expect("a mapped slot of a live space")
    }

    /// The live space `space` and its model, if any.
    fn live(&self, space: usize) -> Option<(&VmSpace<P>, &BTreeMap<usize, Region>)> {
        Some((self.spaces[space].as_ref()?, self.model[space].as_ref()?))
    }

    /// Runs `op` on both sides.
    ///
    /// # Errors
    ///
    /// What disagreed.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::MapAnon { space, slot, share } => self.map(space, slot, None, !share),
            Op::MapObject {
                space,
                slot,
                object,
            } => self.map(space, slot, Some(object % OBJECTS), false),
            Op::MapFile {
                space,
                slot,
                private,
            } => self.map(space, slot, Some(FILE), private),
            Op::MapDevice {
                space,
                slot,
                private,
            } => self.map_device(space, slot, private),
            Op::Unmap { space, slot } => {
                if let Some((s, _)) = self.live(space) {
                    s.unmap(slot_va(slot, 0), SLOT_PAGES * PAGE)
                        .map_err(|e| format!("{op:?}: {e}"))?;
                    self.model[space].as_mut().expect("live").remove(&slot);
                }
                Ok(())
            }
            Op::Protect { space, slot, write } => self.protect(space, slot, write),
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
            Op::Read { space, slot, page } => self.read(space, slot, page),
            Op::Wire { space, slot } => self.wire(space, slot),
            Op::Unwire { space, slot } => self.unwire(space, slot),
            Op::Msync { space, slot } => self.msync(space, slot),
            Op::Truncate { pages } => self.truncate(pages),
            Op::Collapse { space, slot } => {
                if let Some((s, m)) = self.live(space) {
                    if m.contains_key(&slot) {
                        if let Some((object, _)) = s.object_at(slot_va(slot, 0)) {
                            self.vm.collapse(&object);
                        }
                    }
                }
                Ok(())
            }
            Op::Pageout => {
                self.vm.pageout(self.vm.total_pages());
                Ok(())
            }
            Op::Starve { keep } => {
                self.balloon = None;
                let take = self.vm.free_pages().saturating_sub(keep);
                self.balloon = Some(self.vm.inflate_balloon(take));
                Ok(())
            }
            Op::Feed => {
                self.balloon = None;
                Ok(())
            }
        }
    }

    fn map(
        &mut self,
        space: usize,
        slot: usize,
        object: Option<usize>,
        private: bool,
    ) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        if m.contains_key(&slot) {
            return Ok(());
        }
        let (va, len) = (slot_va(slot, 0), SLOT_PAGES * PAGE);
        let mut req = match object {
            None => MapRequest::anon(va, len, Prot::RW),
            Some(o) => {
                let r = MapRequest::object(va, len, self.objects[o].clone(), 0, Prot::RW);
                if private { r.private() } else { r }
            }
        };
        if !private {
            req = req.inheritance(Inheritance::Share);
        }
        s.map(req).map_err(|e| format!("map: {e}"))?;
        let base = match object {
            Some(o) => self.object_cells[o],
            None => self.new_cell(None),
        };
        let kind = if object == Some(FILE) {
            Kind::File
        } else {
            Kind::Memory
        };
        self.insert_region(space, slot, kind, base, private);
        Ok(())
    }

    /// The model's side of a new mapping: writable, unwired, with an empty
    /// private layer if `private`.
    fn insert_region(&mut self, space: usize, slot: usize, kind: Kind, base: usize, private: bool) {
        let region = Region {
            kind,
            base,
            private: private.then(|| vec![None; SLOT_PAGES as usize]),
            id: self.new_id(),
            write: true,
            wired: false,
        };
        self.model[space]
            .as_mut()
            .expect("live")
            .insert(slot, region);
    }

    fn map_device(&mut self, space: usize, slot: usize, private: bool) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        if m.contains_key(&slot) {
            return Ok(());
        }
        let device = self.objects[OBJECTS + 1].clone();
        let req = MapRequest::object(slot_va(slot, 0), SLOT_PAGES * PAGE, device, 0, Prot::RW);
        if private {
            let got = s.map(req.private());
            ensure!(
                matches!(got, Err(MapError::PrivateDevice { .. })),
                "private device mapping: {got:?}"
            );
            return Ok(());
        }
        s.map(req.inheritance(Inheritance::Share))
            .map_err(|e| format!("map device: {e}"))?;
        self.insert_region(space, slot, Kind::Device, 0, false);
        Ok(())
    }

    fn protect(&mut self, space: usize, slot: usize, write: bool) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        if !m.contains_key(&slot) {
            return Ok(());
        }
        let prot = if write { Prot::RW } else { Prot::READ };
        match s.protect(slot_va(slot, 0), SLOT_PAGES * PAGE, prot) {
            Ok(()) => {}
            Err(MapError::ResourceShortage) if self.balloon.is_some() => return Ok(()),
            Err(e) => return Err(format!("protect: {e}")),
        }
        let reg = &self.model[space].as_ref().expect("live")[&slot];
        // A wired private region that gains write gets its own copy of
        // every page (modern FreeBSD's `vm_map_protect`).
        let copies = (reg.wired && write && !reg.write)
            .then(|| self.own_copies(reg, SLOT_PAGES))
            .flatten();
        let reg = self.region_mut(space, slot);
        reg.write = write;
        if let Some(copies) = copies {
            reg.private = Some(copies);
        }
        Ok(())
    }

    fn fork(&mut self, space: usize) -> Result<(), String> {
        let Some(free) = (0..SPACES).find(|&i| self.model[i].is_none()) else {
            return Ok(());
        };
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let child = match s.fork() {
            Ok(child) => child,
            Err(MapError::ResourceShortage | MapError::Pmap(PmapError::NoMemory))
                if self.balloon.is_some() =>
            {
                return Ok(());
            }
            Err(MapError::Fault(e)) if self.balloon.is_some() && is_shortage(&e) => return Ok(()),
            Err(e) => return Err(format!("fork: {e}")),
        };
        let regions: Vec<(usize, Region)> = m.iter().map(|(&k, r)| (k, r.clone())).collect();
        let mut cm = BTreeMap::new();
        for (slot, reg) in regions {
            // A wired private region is copied for the child outright
            // (seed `vm_fault_copy_entry`): every page becomes its own.
            let private = if reg.wired {
                self.own_copies(&reg, SLOT_PAGES)
            } else {
                reg.private.clone()
            };
            let id = self.new_id();
            cm.insert(
                slot,
                Region {
                    private,
                    id,
                    wired: false,
                    ..reg
                },
            );
        }
        self.model[free] = Some(cm);
        self.spaces[free] = Some(child);
        Ok(())
    }

    fn read(&self, space: usize, slot: usize, page: u64) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let va = slot_va(slot, page);
        let Some(reg) = m.get(&slot) else {
            let got = s.read_u8(va + AT);
            ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "read of unmapped {space}/{slot}/{page}: {got:?}"
            );
            return Ok(());
        };
        let expect = self.expect(reg, page);
        let got = if expect == Expect::Device {
            s.fault(va, Prot::READ, FaultFlags::NORMAL).map(|_| 0)
        } else {
            s.read_u8(va + AT)
        };
        if self.starved_out(&got) {
            return Ok(());
        }
        match expect {
            Expect::Device => {
                ensure!(got.is_ok(), "device read {space}/{slot}/{page}: {got:?}");
                let pa = s.extract(va).map(Pfn::phys_addr);
                ensure!(
                    pa == Some(DEVICE_PA + page * PAGE),
                    "device page {page} mapped at {pa:x?}"
                );
            }
            Expect::PastEof => ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "read past EOF {space}/{slot}/{page}: {got:?}"
            ),
            Expect::Value(want) => ensure!(
                got == Ok(want),
                "read {space}/{slot}/{page}: got {got:?}, model {want}"
            ),
        }
        Ok(())
    }

    fn write(&mut self, space: usize, slot: usize, page: u64, value: u8) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let va = slot_va(slot, page);
        let Some(reg) = m.get(&slot) else {
            let got = s.write(va + AT, &[value]);
            ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "write to unmapped: {got:?}"
            );
            return Ok(());
        };
        let expect = self.expect(reg, page);
        let got = if reg.write && expect == Expect::Device {
            s.fault(va, Prot::WRITE, FaultFlags::DIRTY).map(|_| ())
        } else {
            s.write(va + AT, &[value])
        };
        if self.starved_out(&got) {
            return Ok(());
        }
        if !reg.write {
            ensure!(
                matches!(got, Err(FaultError::ProtectionFailure { .. })),
                "write to read-only: {got:?}"
            );
            return Ok(());
        }
        match expect {
            Expect::Device => ensure!(got.is_ok(), "device write {space}/{slot}/{page}: {got:?}"),
            Expect::PastEof => ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "write past EOF {space}/{slot}/{page}: {got:?}"
            ),
            Expect::Value(_) => {
                ensure!(got.is_ok(), "write {space}/{slot}/{page}: {got:?}");
                let base = reg.base;
                let reg = self.region_mut(space, slot);
                match &mut reg.private {
                    Some(layer) => layer[page as usize] = Some(value),
                    None => self.cells[base][page as usize] = value,
                }
            }
        }
        Ok(())
    }

    fn wire(&mut self, space: usize, slot: usize) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let Some(reg) = m.get(&slot).filter(|r| !r.wired) else {
            return Ok(());
        };
        // Wiring faults every page in order with the entry's protection
        // (seed L247), so a writable private region gets its own copy of
        // each page it reaches; a page past EOF stops it.
        let stop = (0..SLOT_PAGES).find(|&p| self.expect(reg, p) == Expect::PastEof);
        let got = s.wire(slot_va(slot, 0), SLOT_PAGES * PAGE, true);
        let reached = match (&got, stop) {
            (Ok(()), None) => SLOT_PAGES,
            (Err(MapError::Fault(FaultError::OutOfBounds { addr, .. })), Some(p))
                if *addr == slot_va(slot, p) =>
            {
                p
            }
            // A small (or starved) machine may lack the memory; nothing
            // stays wired, the pages before the failure were reached.
            (Err(MapError::Fault(e)), _) if is_shortage(e) => (e.addr() - slot_va(slot, 0)) / PAGE,
            _ => return Err(format!("wire {space}/{slot} (EOF stop {stop:?}): {got:?}")),
        };
        let copies = reg.write.then(|| self.own_copies(reg, reached)).flatten();
        let reg = self.region_mut(space, slot);
        if let Some(copies) = copies {
            reg.private = Some(copies);
        }
        reg.wired = got.is_ok();
        Ok(())
    }

    fn unwire(&mut self, space: usize, slot: usize) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        if m.get(&slot).is_some_and(|r| r.wired) {
            s.unwire(slot_va(slot, 0), SLOT_PAGES * PAGE, true)
                .map_err(|e| format!("unwire: {e}"))?;
            let reg = self.model[space]
                .as_mut()
                .and_then(|m| m.get_mut(&slot))
                .expect("checked");
            reg.wired = false;
        }
        Ok(())
    }

    fn msync(&mut self, space: usize, slot: usize) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let Some(reg) = m.get(&slot) else {
            return Ok(());
        };
        s.msync(slot_va(slot, 0), SLOT_PAGES * PAGE)
            .map_err(|e| format!("msync: {e}"))?;
        if reg.kind == Kind::File && reg.private.is_none() {
            self.check_file()?;
        }
        Ok(())
    }

    /// The file on disk holds the model's file contents.
    fn check_file(&self) -> Result<(), String> {
        let disk = std::fs::read(&self.file.path).map_err(|e| format!("read file: {e}"))?;
        ensure!(
            disk.len() as u64 == self.file_pages * PAGE,
            "file is {} bytes, model {} pages",
            disk.len(),
            self.file_pages
        );
        let cell = &self.cells[self.object_cells[FILE]];
        for p in 0..self.file_pages {
            let got = disk[(p * PAGE + AT) as usize];
            ensure!(
                got == cell[p as usize],
                "after msync, file page {p} holds {got}, model {}",
                cell[p as usize]
            );
        }
        Ok(())
    }

    fn truncate(&mut self, pages: u64) -> Result<(), String> {
        let wired_file = self
            .model
            .iter()
            .flatten()
            .flat_map(BTreeMap::values)
            .any(|r| r.kind == Kind::File && r.wired);
        if wired_file {
            return Ok(());
        }
        self.file
            .pager
            .set_len(&self.vm, &self.file.object, pages * PAGE)
            .map_err(|e| format!("truncate: {e}"))?;
        self.file_pages = pages;
        let cell = self.object_cells[FILE];
        self.cells[cell][pages as usize..].fill(0);
        Ok(())
    }

    /// The invariants that must hold after every step.
    ///
    /// # Errors
    ///
    /// The first one broken.
    pub fn check(&self) -> Result<(), String> {
        self.vm.check_consistency().map_err(|e| e.to_string())?;
        // Per frame: who maps it, as which memory, and whether writable.
        let mut by_frame: BTreeMap<u64, Vec<(Memory, bool)>> = BTreeMap::new();
        for (i, s) in self.spaces.iter().enumerate() {
            let (Some(s), Some(m)) = (s, &self.model[i]) else {
                continue;
            };
            for (&slot, reg) in m {
                for page in 0..SLOT_PAGES {
                    let va = slot_va(slot, page);
                    let Some((pa, writable)) = (self.probe)(&self.vm, s, va) else {
                        continue;
                    };
                    let memory = self.check_mapping(reg, page, pa, writable)?;
                    by_frame.entry(pa).or_default().push((memory, writable));
                }
            }
        }
        for (pa, maps) in by_frame {
            if maps.iter().any(|m| m.1) {
                ensure!(
                    maps.iter().all(|m| m.0 == maps[0].0),
                    "frame {pa:#x} writable in one space is also mapped for other memory: {maps:?}"
                );
            }
        }
        Ok(())
    }

    /// One mapping of `page` of `reg` at frame `pa`: a device page maps
    /// its device address; any other frame is in use (not free) and holds
    /// what the model says the address reads. Returns which memory it is.
    fn check_mapping(
        &self,
        reg: &Region,
        page: u64,
        pa: u64,
        writable: bool,
    ) -> Result<Memory, String> {
        let want = match self.expect(reg, page) {
            Expect::Device => {
                ensure!(
                    pa == DEVICE_PA + page * PAGE,
                    "device page {page} mapped at {pa:#x}"
                );
                return Ok(Memory::Device(page));
            }
            Expect::PastEof => return Err(format!("page {page} past EOF still mapped at {pa:#x}")),
            Expect::Value(v) => v,
        };
        let pfn = Pfn::containing(pa);
        let id = self
            .vm
            .page_of(pfn)
            .ok_or_else(|| format!("{pa:#x} mapped for memory is outside it"))?;
        ensure!(
            self.vm.page(id).queue() != PageQueue::Free,
            "free frame {pa:#x} is mapped (page {page})"
        );
        let mut b = [0];
        self.vm.phys().read(pfn, AT as usize, &mut b);
        ensure!(
            b[0] == want,
            "frame {pa:#x} mapped for page {page} holds {}, model {want}",
            b[0]
        );
        let own = reg
            .private
            .as_ref()
            .is_some_and(|l| writable || l[page as usize].is_some());
        Ok(if own {
            Memory::Private(reg.id, page)
        } else {
            Memory::Shared(reg.base, page)
        })
    }

    /// Every byte every live space can read equals the model's (after
    /// giving back any frames held by [`Op::Starve`]).
    ///
    /// # Errors
    ///
    /// The first byte that differs.
    pub fn check_all_reads(&mut self) -> Result<(), String> {
        self.balloon = None;
        for space in 0..SPACES {
            let slots: Vec<usize> = self.model[space]
                .as_ref()
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default();
            for slot in slots {
                for page in 0..SLOT_PAGES {
                    self.read(space, slot, page)?;
                }
            }
        }
        Ok(())
    }
}

/// Whether `e` says no frame could be had (for a page or a page table).
fn is_shortage(e: &FaultError) -> bool {
    matches!(
        e,
        FaultError::ResourceShortage { .. }
            | FaultError::Pmap {
                error: PmapError::NoMemory,
                ..
            }
    )
}

/// Which memory a mapping shows, for the isolation check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Memory {
    /// A page of a mapping's own private layer.
    Private(usize, u64),
    /// A page of a shared base cell.
    Shared(usize, u64),
    Device(u64),
}
