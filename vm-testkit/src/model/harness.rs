//! The machine and the model side by side: see the [module docs](super).

use super::{DEVICE_PA, HOLDS, MAPPABLE, OBJECTS, Op, PAGE, SLOT_PAGES, SLOTS, SPACES, slot_base};
use crate::MemPager;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_core::{
    Balloon, FaultError, FaultFlags, HeldPages, HoldError, Inheritance, MapError, MapRequest,
    MemAttr, PageQueue, PagerKind, Pfn, PhysAddr, Pmap, PmapError, Prot, Vm, VmObject, VmSpace,
};
use vm_pager_device::{DeviceMmap, DevicePager};
use vm_pager_vnode::VnodePager;

/// The partly filling object's place among the objects.
const PARTIAL: usize = OBJECTS;
/// The file's place after them.
const FILE: usize = OBJECTS + 1;
/// The device's.
const DEVICE: usize = OBJECTS + 2;
/// The byte of each page the model reads and writes.
const AT: u64 = 11;
/// A byte no operation writes (in the second 512-byte block, which the
/// partly filling pager never declares valid): every page of memory must
/// read zero there.
const JUNK: usize = 600;

/// Reads a mapping the way the hardware holds it: the frame's physical
/// address and whether it is writable, or `None` when `va` is not mapped.
pub type Probe<P> = fn(&Vm<P>, &VmSpace<P>, u64) -> Option<(u64, bool)>;

/// What a slot shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Memory of a base cell (anonymous, or one of the objects).
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
    user_wired: bool,
    kernel_wires: u32,
}

impl Region {
    fn wired(&self) -> bool {
        self.user_wired || self.kernel_wires != 0
    }
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

/// Where writes through a hold land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Page `page` of base cell `cell` (shared memory). `alive` goes false
    /// when a truncation takes the page.
    Cell { cell: usize, alive: bool },
    /// The private layer of mapping instance `id` in `space`/`slot`.
    Layer {
        space: usize,
        slot: usize,
        id: usize,
    },
}

/// A hold the harness keeps, with where its writes land.
struct ModelHold<P: Pmap> {
    handle: HeldPages<P>,
    page: u64,
    write: bool,
    target: Target,
}

/// The model's device of `.0` pages: page `i` at [`DEVICE_PA`] + `i`
/// pages.
struct Device(u64);

impl DeviceMmap for Device {
    fn mmap(&self, offset: u64, _prot: Prot) -> Option<(PhysAddr, MemAttr)> {
        (offset < self.0 * PAGE).then_some((PhysAddr(DEVICE_PA + offset), MemAttr::Uncacheable))
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

/// The machine and the model side by side. See the [module docs](super).
pub struct Harness<P: Pmap> {
    vm: Arc<Vm<P>>,
    /// Holds first: they are released before the spaces go.
    holds: Vec<Option<ModelHold<P>>>,
    spaces: Vec<Option<VmSpace<P>>>,
    /// The named anonymous objects, the partly filling one, the file's
    /// object, the device's.
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
    /// Pages per slot (and of each object, the file and the device).
    slot_pages: u64,
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
    /// with one empty space, the named objects written whole, and a zeroed
    /// file of [`SLOT_PAGES`] pages in the temporary directory.
    ///
    /// # Panics
    ///
    /// If the pmap cannot make a space, the file cannot be made, or the
    /// machine cannot hold the objects' pages.
    pub fn new(vm: Arc<Vm<P>>, probe: Probe<P>) -> Harness<P> {
        Harness::with_slot_pages(vm, probe, SLOT_PAGES)
    }

    /// As [`new`](Self::new), with slots, objects, the file and the device
    /// of `slot_pages` pages each (at least 1). Slots of 512 pages are
    /// 2 MiB-aligned superpages: on a machine whose policy maps them whole
    /// ([`SuperpagePolicy::Always`](vm_core::SuperpagePolicy)) every
    /// operation of the language then meets promoted mappings.
    ///
    /// # Panics
    ///
    /// As [`new`](Self::new); and if `slot_pages` is 0.
    pub fn with_slot_pages(vm: Arc<Vm<P>>, probe: Probe<P>, slot_pages: u64) -> Harness<P> {
        assert!(slot_pages > 0, "slots of no pages");
        let path = temp_file();
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(slot_pages * PAGE))
            .expect("model file");
        let pager = VnodePager::open(&path, true).expect("model file");
        let file = ModelFile {
            path,
            object: pager.object(&vm),
            pager,
        };
        let mut objects: Vec<_> = (0..OBJECTS)
            .map(|_| vm.new_anon_object(slot_pages))
            .collect();
        let partial = Arc::new(MemPager::with_pattern(PagerKind::ANONYMOUS, slot_pages));
        partial.set_valid_mask(Some(0x01));
        objects.push(vm.new_object(slot_pages, partial));
        objects.push(file.object.clone());
        objects.push(DevicePager::object(&vm, Device(slot_pages), slot_pages));
        write_whole(&vm, &objects[..OBJECTS], slot_pages);
        let first = vm.new_space().expect("first space");
        let mut h = Harness {
            vm,
            holds: (0..HOLDS).map(|_| None).collect(),
            spaces: vec![Some(first), None, None],
            objects,
            file,
            file_pages: slot_pages,
            cells: Vec::new(),
            model: vec![Some(BTreeMap::new()), None, None],
            object_cells: Vec::new(),
            next_id: 0,
            balloon: None,
            probe,
            slot_pages,
        };
        h.object_cells = (0..=FILE).map(|_| h.new_cell()).collect();
        let partial_cell = h.object_cells[PARTIAL];
        for p in 0..slot_pages {
            h.cells[partial_cell][p as usize] = crate::pattern_byte(p, AT as usize);
        }
        h
    }

    /// The address of `page` of `slot` in this harness's geometry.
    #[must_use]
    pub fn slot_va(&self, slot: usize, page: u64) -> u64 {
        slot_base(slot, self.slot_pages) + page * PAGE
    }

    /// Pages per slot.
    #[must_use]
    pub fn slot_pages(&self) -> u64 {
        self.slot_pages
    }

    /// Space `space` of the machine, if it is alive.
    #[must_use]
    pub fn space(&self, space: usize) -> Option<&VmSpace<P>> {
        self.spaces.get(space)?.as_ref()
    }

    fn new_cell(&mut self) -> usize {
        self.cells.push(vec![0; self.slot_pages as usize]);
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
            (0..self.slot_pages)
                .map(|p| match self.expect(reg, p) {
                    Expect::Value(v) if p < upto => Some(v),
                    _ => layer[p as usize],
                })
                .collect(),
        )
    }

    /// Gives a private region its own copy of one page (what it reads now).
    fn own_page(&mut self, space: usize, slot: usize, page: u64) {
        let reg = self.region(space, slot).clone();
        if let (Some(_), Expect::Value(v)) = (&reg.private, self.expect(&reg, page)) {
            if let Some(layer) = self.region_mut(space, slot).private.as_mut() {
                layer[page as usize] = Some(v);
            }
        }
    }

    /// Whether `got` is a shortage of frames while the balloon holds
    /// memory back: then the operation may fail and must change nothing.
    fn starved_out<T>(&self, got: &Result<T, FaultError>) -> bool {
        self.balloon.is_some() && matches!(got, Err(e) if is_shortage(e))
    }

    fn region(&self, space: usize, slot: usize) -> &Region {
        &self.model[space].as_ref().expect("live")[&slot]
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
    /// What disagreed; or that `op` names a space, slot or page outside
    /// the harness (nothing is run then).
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        let (space, slot, page) = op.indices();
        // A page count (truncate) may equal the slot size; a page may not.
        let most = if matches!(op, Op::Truncate { .. }) {
            self.slot_pages
        } else {
            self.slot_pages - 1
        };
        ensure!(
            space.is_none_or(|s| s < SPACES)
                && slot.is_none_or(|s| s < SLOTS)
                && page.is_none_or(|p| p <= most),
            "{op:?} is outside the harness ({SPACES} spaces, {SLOTS} slots of {} pages)",
            self.slot_pages
        );
        match *op {
            Op::MapAnon { space, slot, share } => self.map(space, slot, None, !share),
            Op::MapObject {
                space,
                slot,
                object,
                private,
            } => self.map(space, slot, Some(object % MAPPABLE), private),
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
                    s.unmap(self.slot_va(slot, 0), self.slot_pages * PAGE)
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
            Op::Wire { space, slot, user } => self.wire(space, slot, user),
            Op::Unwire { space, slot, user } => self.unwire(space, slot, user),
            Op::Msync { space, slot } => self.msync(space, slot),
            Op::Truncate { pages } => self.truncate(pages),
            Op::Collapse { space, slot } => {
                if let Some((s, m)) = self.live(space) {
                    if m.contains_key(&slot) {
                        if let Some((object, _)) = s.object_at(self.slot_va(slot, 0)) {
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
            Op::Hold {
                space,
                slot,
                page,
                write,
                hold,
            } => self.hold(space, slot, page, write, hold % HOLDS),
            Op::HoldWrite { hold, value } => self.hold_write(hold % HOLDS, value),
            Op::Release { hold } => {
                self.holds[hold % HOLDS] = None;
                Ok(())
            }
            Op::ForceWrite {
                space,
                slot,
                page,
                value,
            } => self.force_write(space, slot, page, value),
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
        let (va, len) = (self.slot_va(slot, 0), self.slot_pages * PAGE);
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
            None => self.new_cell(),
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
            private: private.then(|| vec![None; self.slot_pages as usize]),
            id: self.new_id(),
            write: true,
            user_wired: false,
            kernel_wires: 0,
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
        let device = self.objects[DEVICE].clone();
        let req = MapRequest::object(
            self.slot_va(slot, 0),
            self.slot_pages * PAGE,
            device,
            0,
            Prot::RW,
        );
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
        match s.protect(self.slot_va(slot, 0), self.slot_pages * PAGE, prot) {
            Ok(()) => {}
            Err(MapError::ResourceShortage) if self.balloon.is_some() => return Ok(()),
            Err(e) => return Err(format!("protect: {e}")),
        }
        let reg = self.region(space, slot);
        // A user-wired private region that gains write gets its own copy
        // of every page (modern FreeBSD's `vm_map_protect`).
        let copies = (reg.user_wired && write && !reg.write)
            .then(|| self.own_copies(reg, self.slot_pages))
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
            let private = if reg.wired() {
                self.own_copies(&reg, self.slot_pages)
            } else {
                reg.private.clone()
            };
            let id = self.new_id();
            cm.insert(
                slot,
                Region {
                    private,
                    id,
                    user_wired: false,
                    kernel_wires: 0,
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
        let va = self.slot_va(slot, page);
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
                    pa == Some(PhysAddr(DEVICE_PA + page * PAGE)),
                    "device page {page} mapped at {pa:x?}"
                );
            }
            Expect::PastEof => ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "read past EOF {space}/{slot}/{page}: {got:?}"
            ),
            Expect::Value(want) => {
                ensure!(
                    got == Ok(want),
                    "read {space}/{slot}/{page}: got {got:?}, model {want}"
                );
                let junk = s.read_u8(va + JUNK as u64);
                ensure!(
                    junk == Ok(0) || self.starved_out(&junk),
                    "read {space}/{slot}/{page}: byte {JUNK} reads {junk:?}, never written"
                );
            }
        }
        Ok(())
    }

    /// The outcome a write-like access to `page` of `reg` must have, given
    /// `writable` (the access is allowed there); `None` for device pages.
    fn write_expect(&self, reg: &Region, page: u64) -> Option<Expect> {
        match self.expect(reg, page) {
            Expect::Device => None,
            e => Some(e),
        }
    }

    fn write(&mut self, space: usize, slot: usize, page: u64, value: u8) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let va = self.slot_va(slot, page);
        let Some(reg) = m.get(&slot) else {
            let got = s.write(va + AT, &[value]);
            ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "write to unmapped: {got:?}"
            );
            return Ok(());
        };
        let expect = self.write_expect(reg, page);
        let got = if reg.write && expect.is_none() {
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
            None => ensure!(got.is_ok(), "device write {space}/{slot}/{page}: {got:?}"),
            Some(Expect::PastEof) => ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "write past EOF {space}/{slot}/{page}: {got:?}"
            ),
            Some(_) => {
                ensure!(got.is_ok(), "write {space}/{slot}/{page}: {got:?}");
                self.store(space, slot, page, value);
            }
        }
        Ok(())
    }

    /// The model's side of a write that landed in `page` of a region: its
    /// private layer, or its base.
    fn store(&mut self, space: usize, slot: usize, page: u64, value: u8) {
        let base = self.region(space, slot).base;
        let reg = self.region_mut(space, slot);
        match &mut reg.private {
            Some(layer) => layer[page as usize] = Some(value),
            None => self.cells[base][page as usize] = value,
        }
    }

    fn force_write(
        &mut self,
        space: usize,
        slot: usize,
        page: u64,
        value: u8,
    ) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let va = self.slot_va(slot, page) + AT;
        let Some(reg) = m.get(&slot) else {
            let got = s.write_forced(va, &[value]);
            ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "forced write to unmapped: {got:?}"
            );
            return Ok(());
        };
        let Some(expect) = self.write_expect(reg, page) else {
            return Ok(());
        };
        let private = reg.private.is_some();
        let got = s.write_forced(va, &[value]);
        if self.starved_out(&got) {
            return Ok(());
        }
        if !private && !reg.write {
            ensure!(
                matches!(got, Err(FaultError::ProtectionFailure { .. })),
                "forced write to a read-only shared mapping: {got:?}"
            );
            return Ok(());
        }
        if expect == Expect::PastEof {
            ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "forced write past EOF {space}/{slot}/{page}: {got:?}"
            );
            return Ok(());
        }
        ensure!(got.is_ok(), "forced write {space}/{slot}/{page}: {got:?}");
        self.store(space, slot, page, value);
        Ok(())
    }

    fn wire(&mut self, space: usize, slot: usize, user: bool) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let Some(reg) = m.get(&slot) else {
            return Ok(());
        };
        let got = s.wire(self.slot_va(slot, 0), self.slot_pages * PAGE, user);
        if reg.wired() {
            // Already wired: only the counts change, nothing is faulted.
            ensure!(got.is_ok(), "wire of a wired {space}/{slot}: {got:?}");
        } else {
            // Wiring faults every page in order with the entry's
            // protection (seed L307), so a writable private region gets
            // its own copy of each page it reaches; a page past EOF stops
            // it.
            let stop = (0..self.slot_pages).find(|&p| self.expect(reg, p) == Expect::PastEof);
            let reached = match (&got, stop) {
                (Ok(()), None) => self.slot_pages,
                (Err(MapError::Fault(FaultError::OutOfBounds { addr, .. })), Some(p))
                    if *addr == self.slot_va(slot, p) =>
                {
                    p
                }
                // A small (or starved) machine may lack the memory; nothing
                // stays wired, the pages before the failure were reached.
                (Err(MapError::Fault(e)), _) if is_shortage(e) => {
                    (e.addr() - self.slot_va(slot, 0)) / PAGE
                }
                _ => return Err(format!("wire {space}/{slot} (EOF stop {stop:?}): {got:?}")),
            };
            let copies = reg.write.then(|| self.own_copies(reg, reached)).flatten();
            if let Some(copies) = copies {
                self.region_mut(space, slot).private = Some(copies);
            }
            if got.is_err() {
                return Ok(());
            }
        }
        let reg = self.region_mut(space, slot);
        if user {
            reg.user_wired = true;
        } else {
            reg.kernel_wires += 1;
        }
        Ok(())
    }

    fn unwire(&mut self, space: usize, slot: usize, user: bool) -> Result<(), String> {
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let Some(reg) = m.get(&slot) else {
            return Ok(());
        };
        let allowed = if user {
            reg.user_wired
        } else {
            reg.kernel_wires != 0
        };
        let got = s.unwire(self.slot_va(slot, 0), self.slot_pages * PAGE, user);
        if !allowed {
            ensure!(
                matches!(got, Err(MapError::NotWired { .. })),
                "unwire (user {user}) of {space}/{slot} not so wired: {got:?}"
            );
            return Ok(());
        }
        ensure!(got.is_ok(), "unwire (user {user}) {space}/{slot}: {got:?}");
        let reg = self.region_mut(space, slot);
        if user {
            reg.user_wired = false;
        } else {
            reg.kernel_wires -= 1;
        }
        Ok(())
    }

    fn hold(
        &mut self,
        space: usize,
        slot: usize,
        page: u64,
        write: bool,
        hold: usize,
    ) -> Result<(), String> {
        self.holds[hold] = None;
        let Some((s, m)) = self.live(space) else {
            return Ok(());
        };
        let va = self.slot_va(slot, page);
        let access = if write { Prot::RW } else { Prot::READ };
        let Some(reg) = m.get(&slot) else {
            let got = s.hold(va, PAGE, access).map(|_| ());
            ensure!(
                matches!(got, Err(FaultError::InvalidAddress { .. })),
                "hold of unmapped: {got:?}"
            );
            return Ok(());
        };
        let Some(expect) = self.write_expect(reg, page) else {
            return Ok(());
        };
        let (private, writable, id, base) = (reg.private.is_some(), reg.write, reg.id, reg.base);
        let got = s.hold(va, PAGE, access);
        if self.starved_out(&got) {
            return Ok(());
        }
        if write && !writable {
            ensure!(
                matches!(got, Err(FaultError::ProtectionFailure { .. })),
                "write hold of read-only: {:?}",
                got.map(|_| ())
            );
            return Ok(());
        }
        if expect == Expect::PastEof {
            ensure!(
                matches!(got, Err(FaultError::OutOfBounds { .. })),
                "hold past EOF: {:?}",
                got.map(|_| ())
            );
            return Ok(());
        }
        let handle = got.map_err(|e| format!("hold {space}/{slot}/{page}: {e}"))?;
        let target = if private {
            // A hold of a private page takes the space's own copy first.
            self.own_page(space, slot, page);
            Target::Layer { space, slot, id }
        } else {
            Target::Cell {
                cell: base,
                alive: true,
            }
        };
        self.holds[hold] = Some(ModelHold {
            handle,
            page,
            write,
            target,
        });
        Ok(())
    }

    fn hold_write(&mut self, hold: usize, value: u8) -> Result<(), String> {
        let Some(h) = &self.holds[hold] else {
            return Ok(());
        };
        let got = h.handle.write(AT as usize, &[value]);
        if !h.write {
            ensure!(
                matches!(got, Err(HoldError::NotWritable { .. })),
                "write through a read hold: {got:?}"
            );
            return Ok(());
        }
        ensure!(got.is_ok(), "write through a hold: {got:?}");
        let page = h.page as usize;
        match h.target {
            Target::Cell { cell, alive: true } => self.cells[cell][page] = value,
            Target::Cell { alive: false, .. } => {}
            Target::Layer { space, slot, id } => {
                // Only while the mapping the hold was taken in is there.
                let reg = self.model[space]
                    .as_mut()
                    .and_then(|m| m.get_mut(&slot))
                    .filter(|r| r.id == id);
                if let Some(layer) = reg.and_then(|r| r.private.as_mut()) {
                    layer[page] = Some(value);
                }
            }
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
        s.msync(self.slot_va(slot, 0), self.slot_pages * PAGE)
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
        self.file
            .pager
            .set_len(&self.vm, &self.file.object, pages * PAGE)
            .map_err(|e| format!("truncate: {e}"))?;
        self.file_pages = pages;
        let cell = self.object_cells[FILE];
        self.cells[cell][pages as usize..].fill(0);
        // A held page of the file past the new end is out of the file.
        for h in self.holds.iter_mut().flatten() {
            if let Target::Cell { cell: c, alive } = &mut h.target {
                if *c == cell && h.page >= pages {
                    *alive = false;
                }
            }
        }
        Ok(())
    }

    /// The invariants that must hold after every step.
    ///
    /// # Errors
    ///
    /// The first one broken.
    pub fn check(&self) -> Result<(), String> {
        self.vm
            .check_consistency_with_holds()
            .map_err(|e| e.to_string())?;
        // Per frame: who maps it, as which memory, and whether writable.
        let mut by_frame: BTreeMap<u64, Vec<(Memory, bool)>> = BTreeMap::new();
        for (i, s) in self.spaces.iter().enumerate() {
            let (Some(s), Some(m)) = (s, &self.model[i]) else {
                continue;
            };
            for (&slot, reg) in m {
                for page in 0..self.slot_pages {
                    let va = self.slot_va(slot, page);
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
    /// what the model says the address reads, and zero where nothing was
    /// written. Returns which memory it is.
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
        let pfn = Pfn::containing(PhysAddr(pa));
        let id = self
            .vm
            .page_of(pfn)
            .ok_or_else(|| format!("{pa:#x} mapped for memory is outside it"))?;
        ensure!(
            self.vm.page(id).queue() != PageQueue::Free,
            "free frame {pa:#x} is mapped (page {page})"
        );
        let (mut b, mut junk) = ([0], [0]);
        self.vm.phys().read(pfn, AT as usize, &mut b);
        self.vm.phys().read(pfn, JUNK, &mut junk);
        ensure!(
            b[0] == want,
            "frame {pa:#x} mapped for page {page} holds {}, model {want}",
            b[0]
        );
        ensure!(
            junk[0] == 0,
            "frame {pa:#x} mapped for page {page} shows {} at byte {JUNK}, never written",
            junk[0]
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
    /// giving back any frames held by [`Op::Starve`] and releasing the
    /// holds); then the machine must be consistent with nothing held.
    ///
    /// # Errors
    ///
    /// The first byte that differs.
    pub fn check_all_reads(&mut self) -> Result<(), String> {
        self.balloon = None;
        self.holds.iter_mut().for_each(|h| *h = None);
        for space in 0..SPACES {
            let slots: Vec<usize> = self.model[space]
                .as_ref()
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default();
            for slot in slots {
                for page in 0..self.slot_pages {
                    self.read(space, slot, page)?;
                }
            }
        }
        self.vm.check_consistency().map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Writes every page of the named objects once (zeros, at the model's
/// byte), so that they have no holes: see the [module docs](super).
fn write_whole<P: Pmap>(vm: &Arc<Vm<P>>, objects: &[Arc<VmObject>], pages: u64) {
    let setup = vm.new_space().expect("set-up space");
    for (i, o) in objects.iter().enumerate() {
        let va = slot_base(i, pages);
        setup
            .map(MapRequest::object(va, pages * PAGE, o.clone(), 0, Prot::RW))
            .expect("map an object");
        for p in 0..pages {
            setup
                .write(va + p * PAGE + AT, &[0])
                .expect("fill an object");
        }
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
