//! Red team, "hunt" round: a cell-graph model fuzzer combining fork (Share /
//! Copy / None, children alive and exiting), partial protect / unmap
//! (clipping), user wiring, object_at handles mapped shared into other
//! spaces, a named anonymous object mapped shared and private, a real file
//! mapped shared and private (msync checked against the disk, truncation and
//! extension), collapse and page-out to a real swap file on a small machine;
//! plus targeted scenarios. Tests named `hunt_bug_*` assert the correct
//! behaviour and fail on the code they were written against.
#![allow(clippy::unwrap_used, dead_code)]

mod common;
use common::{Rng, config, consistent, rd64, rdpage, wrpage};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_core::{Inheritance, MapRequest, Pmap, Prot, Vm, VmObject, VmSpace};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;

// ---------------------------------------------------------------------
// Targeted: a handle from object_at survives the unmapping of the range
// ---------------------------------------------------------------------

/// `object_at` promises (object/mod.rs `unexposed`, commit 7131563) that
/// while a user holds the handle, the object keeps the pages it shows: no
/// collapse, bypass, COW rename or fork move takes them out. Unmapping the
/// last mapping of a private anonymous object (release_entries'
/// `page_remove` of a ONEMAPPING object) still frees them; mapped again
/// through the handle, the written bytes read as zeros.
fn handle_survives_unmap<P: Pmap>(vm: &Arc<Vm<P>>) {
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let base = 0x1000_0000;
    a.map_anon(base, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        wrpage(&a, base + i * PAGE, 0x1111 * (i + 1)).unwrap();
    }
    let (obj, pindex) = a.object_at(base).unwrap();
    assert_eq!(pindex, 0);
    a.unmap(base, 4 * PAGE).unwrap();
    b.map(MapRequest::object(
        0x2000_0000,
        4 * PAGE,
        obj.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    drop(obj);
    for i in 0..4 {
        assert_eq!(
            rdpage(&b, 0x2000_0000 + i * PAGE),
            Ok(0x1111 * (i + 1)),
            "page {i} of the object held through object_at, after the owner unmapped it"
        );
    }
    drop(a);
    drop(b);
    consistent(vm, "end");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn hunt_bug_handle_loses_pages_on_unmap_ref() {
    handle_survives_unmap(&Vm::new(RefPmap::new(), config(64)).unwrap());
}
#[test]
fn hunt_bug_handle_loses_pages_on_unmap_x86() {
    handle_survives_unmap(&Vm::new(X86Pmap::new(), config(64)).unwrap());
}

/// Same with the owner's exit (Drop of the space) instead of an unmap.
fn handle_survives_exit<P: Pmap>(vm: &Arc<Vm<P>>) {
    let a = vm.new_space().unwrap();
    let base = 0x1000_0000;
    a.map_anon(base, 2 * PAGE, Prot::RW).unwrap();
    wrpage(&a, base, 0xabcd).unwrap();
    wrpage(&a, base + PAGE, 0xef01).unwrap();
    let (obj, _) = a.object_at(base).unwrap();
    drop(a);
    let b = vm.new_space().unwrap();
    b.map(MapRequest::object(0x2000_0000, 2 * PAGE, obj, 0, Prot::RW))
        .unwrap();
    assert_eq!(
        rdpage(&b, 0x2000_0000),
        Ok(0xabcd),
        "page 0 after owner exit"
    );
    assert_eq!(
        rdpage(&b, 0x2000_1000),
        Ok(0xef01),
        "page 1 after owner exit"
    );
    drop(b);
    consistent(vm, "end");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn hunt_bug_handle_loses_pages_on_exit_ref() {
    handle_survives_exit(&Vm::new(RefPmap::new(), config(64)).unwrap());
}

// ---------------------------------------------------------------------
// The model fuzzer
// ---------------------------------------------------------------------

/// What a memory cell holds: its own value, whatever another cell holds
/// (a copy-on-write view not yet written), or nothing (a file page past
/// EOF: SIGBUS).
enum Content {
    Own(u64),
    Follows(CellRef),
    Gone,
}
type CellRef = Rc<RefCell<Content>>;
fn cell(c: Content) -> CellRef {
    Rc::new(RefCell::new(c))
}
fn value(c: &CellRef) -> Option<u64> {
    match &*c.borrow() {
        Content::Own(v) => Some(*v),
        Content::Follows(b) => value(b),
        Content::Gone => None,
    }
}
fn is_own(c: &CellRef) -> bool {
    matches!(&*c.borrow(), Content::Own(_))
}
/// A copy-on-write view gets its own copy now.
fn own(c: &CellRef) {
    let v = value(c);
    if let (Some(v), false) = (v, is_own(c)) {
        *c.borrow_mut() = Content::Own(v);
    }
}

#[derive(Clone)]
struct Pg {
    cell: CellRef,
    prot: Prot,
    wired: bool,
    inh: Inheritance,
}

/// Regions, same address in every space: 0 anon (inheritance varied),
/// 1 named object O shared, 2 file shared, 3 file private, 4 O private,
/// 5 another space's anonymous object (object_at) mapped shared.
const REG: [(u64, u64); 6] = [
    (0x1000_0000, 8),
    (0x2000_0000, 6),
    (0x3000_0000, 6),
    (0x4000_0000, 6),
    (0x5000_0000, 6),
    (0x6000_0000, 4),
];
const FILE_PAGES: u64 = 6;
const OBJ_PAGES: u64 = 6;

struct Sp<P: Pmap> {
    s: VmSpace<P>,
    pages: BTreeMap<u64, Pg>,
    id: u32,
}

struct World<P: Pmap> {
    vm: Arc<Vm<P>>,
    spaces: Vec<Sp<P>>,
    file_cells: Vec<CellRef>,
    file_size_pages: u64,
    obj_cells: Vec<CellRef>,
    obj: Arc<VmObject>,
    fobj: Arc<VmObject>,
    pager: Arc<VnodePager>,
    file_path: PathBuf,
    next_val: u64,
    next_id: u32,
    log: Vec<String>,
}

impl<P: Pmap> World<P> {
    fn fail(&self, msg: String) -> ! {
        let keep = std::env::var("HUNT_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        let tail: Vec<&String> = self.log.iter().rev().take(keep).collect::<Vec<_>>();
        let mut t = String::new();
        for l in tail.iter().rev() {
            t.push_str(l);
            t.push('\n');
        }
        panic!("{} {msg}\n--- last ops ---\n{t}", self.log[0]);
    }

    fn map_region(&mut self, si: usize, r: usize, src: Option<(usize, u64, u64)>) {
        let (base, n) = REG[r];
        let sp = &self.spaces[si];
        let res = match r {
            0 => sp.s.map_anon(base, n * PAGE, Prot::RW),
            1 => sp.s.map(MapRequest::object(
                base,
                n * PAGE,
                self.obj.clone(),
                0,
                Prot::RW,
            )),
            2 => sp.s.map(MapRequest::object(
                base,
                n * PAGE,
                self.fobj.clone(),
                0,
                Prot::RW,
            )),
            3 => sp
                .s
                .map(MapRequest::object(base, n * PAGE, self.fobj.clone(), 0, Prot::RW).private()),
            4 => sp
                .s
                .map(MapRequest::object(base, n * PAGE, self.obj.clone(), 0, Prot::RW).private()),
            _ => {
                let (ssi, sva, len) = src.unwrap();
                let (o, pidx) = self.spaces[ssi].s.object_at(sva).unwrap();
                sp.s.map(MapRequest::object(
                    base,
                    len * PAGE,
                    o,
                    pidx * PAGE,
                    Prot::RW,
                ))
            }
        };
        if let Err(e) = res {
            self.fail(format!("map region {r} in space {si}: {e}"));
        }
        let cnt = if r == 5 { src.unwrap().2 } else { n };
        // Anonymous pages are written at once: a private view over a hole
        // may zero-fill its own page (FreeBSD; POSIX leaves it unspecified).
        let mut init = Vec::new();
        if r == 0 {
            for i in 0..n {
                let v = self.next_val;
                self.next_val += 1;
                if let Err(e) = wrpage(&self.spaces[si].s, base + i * PAGE, v) {
                    self.fail(format!("initial write: {e}"));
                }
                init.push(v);
            }
        }
        for i in 0..cnt {
            let (c, inh) = match r {
                0 => (cell(Content::Own(init[i as usize])), Inheritance::Copy),
                1 => (self.obj_cells[i as usize].clone(), Inheritance::Share),
                2 => (self.file_cells[i as usize].clone(), Inheritance::Share),
                3 => (
                    cell(Content::Follows(self.file_cells[i as usize].clone())),
                    Inheritance::Copy,
                ),
                4 => (
                    cell(Content::Follows(self.obj_cells[i as usize].clone())),
                    Inheritance::Copy,
                ),
                _ => {
                    let (ssi, sva, _) = src.unwrap();
                    (
                        self.spaces[ssi].pages[&(sva + i * PAGE)].cell.clone(),
                        Inheritance::Share,
                    )
                }
            };
            self.spaces[si].pages.insert(
                base + i * PAGE,
                Pg {
                    cell: c,
                    prot: Prot::RW,
                    wired: false,
                    inh,
                },
            );
        }
    }

    fn expect(&self, si: usize, va: u64) -> Result<u64, ()> {
        let pg = self.spaces[si].pages.get(&va).ok_or(())?;
        if !pg.prot.contains(Prot::READ) {
            return Err(());
        }
        value(&pg.cell).ok_or(())
    }

    fn check_page(&self, si: usize, va: u64, what: &str) {
        let exp = self.expect(si, va);
        let got = rdpage(&self.spaces[si].s, va);
        match (exp, &got) {
            (Ok(v), Ok(g)) if v == *g => {}
            (Err(()), Err(_)) => {}
            _ => self.fail(format!(
                "{what}: space {} (#{si}) va {va:#x}: expected {exp:?} got {got:?}",
                self.spaces[si].id
            )),
        }
    }

    fn check_all(&self, what: &str) {
        for si in 0..self.spaces.len() {
            for &(base, n) in &REG {
                for i in 0..n {
                    self.check_page(si, base + i * PAGE, what);
                }
            }
        }
        if let Err(e) = self.vm.check_consistency() {
            self.fail(format!("{what}: inconsistent: {e}"));
        }
    }

    fn range(&mut self, rng: &mut Rng) -> (usize, u64, u64) {
        let r = rng.below(REG.len() as u64) as usize;
        let n = REG[r].1;
        let a = rng.below(n);
        let b = a + 1 + rng.below((n - a).min(4));
        (r, REG[r].0 + a * PAGE, b - a)
    }

    fn all_mapped(&self, si: usize, va: u64, n: u64) -> bool {
        (0..n).all(|i| self.spaces[si].pages.contains_key(&(va + i * PAGE)))
    }

    fn step(&mut self, rng: &mut Rng, wire_ok: bool) {
        let si = rng.below(self.spaces.len() as u64) as usize;
        let op = rng.below(100);
        match op {
            0..=29 => {
                let (_, va, _) = self.range(rng);
                let v = self.next_val;
                self.next_val += 1;
                self.log
                    .push(format!("write s{} {va:#x} = {v:#x}", self.spaces[si].id));
                let exp_ok = self.spaces[si]
                    .pages
                    .get(&va)
                    .is_some_and(|pg| pg.prot.contains(Prot::WRITE) && value(&pg.cell).is_some());
                let got = wrpage(&self.spaces[si].s, va, v);
                match (exp_ok, &got) {
                    (true, Ok(())) => {
                        *self.spaces[si].pages[&va].cell.borrow_mut() = Content::Own(v);
                    }
                    (false, Err(_)) => {}
                    _ => self.fail(format!(
                        "write s{} {va:#x}: expected ok={exp_ok}, got {got:?}",
                        self.spaces[si].id
                    )),
                }
            }
            30..=41 => {
                let (_, va, _) = self.range(rng);
                self.log
                    .push(format!("read s{} {va:#x}", self.spaces[si].id));
                self.check_page(si, va, "read");
            }
            42..=49 => {
                let (_, va, n) = self.range(rng);
                let prot = [Prot::NONE, Prot::READ, Prot::RW][rng.below(3) as usize];
                self.log.push(format!(
                    "protect s{} {va:#x}+{n} {prot:?}",
                    self.spaces[si].id
                ));
                let mapped = self.all_mapped(si, va, n);
                if mapped {
                    // An upgrade that must copy a page past EOF fails half-way: not modelled.
                    let bad = (0..n).any(|i| {
                        let pg = &self.spaces[si].pages[&(va + i * PAGE)];
                        pg.wired
                            && !pg.prot.contains(Prot::WRITE)
                            && prot.contains(Prot::WRITE)
                            && value(&pg.cell).is_none()
                    });
                    if bad {
                        self.log.push("  (skipped)".into());
                        return;
                    }
                }
                let got = self.spaces[si].s.protect(va, n * PAGE, prot);
                match (mapped, &got) {
                    (true, Ok(())) => {
                        for i in 0..n {
                            let pg = self.spaces[si].pages.get_mut(&(va + i * PAGE)).unwrap();
                            if pg.wired
                                && !pg.prot.contains(Prot::WRITE)
                                && prot.contains(Prot::WRITE)
                            {
                                own(&pg.cell);
                            }
                            pg.prot = prot;
                        }
                    }
                    (false, Err(_)) => {}
                    _ => self.fail(format!("protect: mapped={mapped} got {got:?}")),
                }
            }
            50..=53 => {
                let (_, va, n) = self.range(rng);
                self.log
                    .push(format!("unmap s{} {va:#x}+{n}", self.spaces[si].id));
                if let Err(e) = self.spaces[si].s.unmap(va, n * PAGE) {
                    self.fail(format!("unmap: {e}"));
                }
                for i in 0..n {
                    self.spaces[si].pages.remove(&(va + i * PAGE));
                }
            }
            54..=59 => {
                let r = rng.below(REG.len() as u64) as usize;
                let (base, n) = REG[r];
                if (0..n).any(|i| self.spaces[si].pages.contains_key(&(base + i * PAGE))) {
                    return;
                }
                if r == 5 {
                    // Another space's anonymous entry, where it shows its own pages.
                    let ssi = rng.below(self.spaces.len() as u64) as usize;
                    let p = rng.below(REG[0].1);
                    let sva = REG[0].0 + p * PAGE;
                    let Some(e) = self.spaces[ssi]
                        .s
                        .entries()
                        .into_iter()
                        .find(|e| e.start <= sva && sva < e.end)
                    else {
                        return;
                    };
                    if e.object.is_none() {
                        return;
                    }
                    let len = ((e.end - sva) / PAGE).min(REG[5].1).min(1 + rng.below(4));
                    let ok = (0..len).all(|i| {
                        self.spaces[ssi]
                            .pages
                            .get(&(sva + i * PAGE))
                            .is_some_and(|pg| is_own(&pg.cell))
                    });
                    if !ok {
                        return;
                    }
                    self.log.push(format!(
                        "map s{} region 5 <- s{} {sva:#x}+{len}",
                        self.spaces[si].id, self.spaces[ssi].id
                    ));
                    self.map_region(si, 5, Some((ssi, sva, len)));
                } else {
                    self.log
                        .push(format!("map s{} region {r}", self.spaces[si].id));
                    self.map_region(si, r, None);
                }
            }
            60..=65 => {
                if self.spaces.len() >= 3 {
                    return;
                }
                if rng.pct(50) {
                    let n = REG[0].1;
                    let a = rng.below(n);
                    let b = a + 1 + rng.below(n - a);
                    let va = REG[0].0 + a * PAGE;
                    let inh = [Inheritance::Copy, Inheritance::Share, Inheritance::None]
                        [rng.below(3) as usize];
                    self.log.push(format!(
                        "inherit s{} {va:#x}+{} {inh:?}",
                        self.spaces[si].id,
                        b - a
                    ));
                    let mapped = self.all_mapped(si, va, b - a);
                    let got = self.spaces[si].s.set_inheritance(va, (b - a) * PAGE, inh);
                    match (mapped, &got) {
                        (true, Ok(())) => {
                            for i in 0..b - a {
                                self.spaces[si].pages.get_mut(&(va + i * PAGE)).unwrap().inh = inh;
                            }
                        }
                        (false, Err(_)) => {}
                        _ => self.fail(format!("set_inheritance: mapped={mapped} got {got:?}")),
                    }
                }
                // A wired page past EOF: what fork does is not modelled.
                if self.spaces[si]
                    .pages
                    .values()
                    .any(|pg| pg.wired && pg.inh == Inheritance::Copy && value(&pg.cell).is_none())
                {
                    return;
                }
                let id = self.next_id;
                self.next_id += 1;
                self.log
                    .push(format!("fork s{} -> s{id}", self.spaces[si].id));
                let child = match self.spaces[si].s.fork() {
                    Ok(c) => c,
                    Err(e) => self.fail(format!("fork: {e}")),
                };
                let mut cpages = BTreeMap::new();
                for (&va, pg) in self.spaces[si].pages.iter_mut() {
                    let c = match pg.inh {
                        Inheritance::None => continue,
                        Inheritance::Share => pg.cell.clone(),
                        Inheritance::Copy if pg.wired => {
                            cell(Content::Own(value(&pg.cell).unwrap()))
                        }
                        Inheritance::Copy => {
                            let old = pg.cell.clone();
                            pg.cell = cell(Content::Follows(old.clone()));
                            cell(Content::Follows(old))
                        }
                    };
                    cpages.insert(
                        va,
                        Pg {
                            cell: c,
                            prot: pg.prot,
                            wired: false,
                            inh: pg.inh,
                        },
                    );
                }
                self.spaces.push(Sp {
                    s: child,
                    pages: cpages,
                    id,
                });
            }
            66..=68 => {
                if self.spaces.len() <= 1 {
                    return;
                }
                self.log.push(format!("exit s{}", self.spaces[si].id));
                let sp = self.spaces.remove(si);
                drop(sp);
            }
            69..=74 if wire_ok => {
                let (_, va, n) = self.range(rng);
                let wired_now: usize = self
                    .spaces
                    .iter()
                    .map(|s| s.pages.values().filter(|p| p.wired).count())
                    .sum();
                if wired_now > 16 {
                    return;
                }
                self.log
                    .push(format!("wire s{} {va:#x}+{n}", self.spaces[si].id));
                let exp_ok = (0..n).all(|i| {
                    self.spaces[si]
                        .pages
                        .get(&(va + i * PAGE))
                        .is_some_and(|pg| {
                            // A user wiring of an already user-wired entry changes nothing.
                            // (Not checked: whether NoAccess is reported for
                            // an already user-wired PROT_NONE entry.)
                            pg.wired || (pg.prot.contains(Prot::READ) && value(&pg.cell).is_some())
                        })
                });
                let got = self.spaces[si].s.wire(va, n * PAGE, true);
                match (exp_ok, &got) {
                    (true, Ok(())) => {
                        for i in 0..n {
                            let pg = self.spaces[si].pages.get_mut(&(va + i * PAGE)).unwrap();
                            if pg.prot.contains(Prot::WRITE) {
                                own(&pg.cell);
                            }
                            pg.wired = true;
                        }
                    }
                    (false, Err(_)) => {
                        // A wiring that fails on a page past EOF has faulted
                        // (and copied, where writable) the pages before it;
                        // those private copies stay (as in FreeBSD).
                        let access = (0..n).all(|i| {
                            self.spaces[si]
                                .pages
                                .get(&(va + i * PAGE))
                                .is_some_and(|pg| pg.wired || pg.prot.contains(Prot::READ))
                        });
                        if access {
                            for i in 0..n {
                                let pg = &self.spaces[si].pages[&(va + i * PAGE)];
                                if pg.wired {
                                    continue;
                                }
                                if value(&pg.cell).is_none() {
                                    break;
                                }
                                if pg.prot.contains(Prot::WRITE) {
                                    own(&pg.cell);
                                }
                            }
                        }
                    }
                    _ => self.fail(format!("wire: expected ok={exp_ok} got {got:?}")),
                }
            }
            75..=79 => {
                let (_, va, n) = self.range(rng);
                self.log
                    .push(format!("unwire s{} {va:#x}+{n}", self.spaces[si].id));
                let exp_ok = (0..n).all(|i| {
                    self.spaces[si]
                        .pages
                        .get(&(va + i * PAGE))
                        .is_some_and(|pg| pg.wired)
                });
                let got = self.spaces[si].s.unwire(va, n * PAGE, true);
                match (exp_ok, &got) {
                    (true, Ok(())) => {
                        for i in 0..n {
                            self.spaces[si]
                                .pages
                                .get_mut(&(va + i * PAGE))
                                .unwrap()
                                .wired = false;
                        }
                    }
                    (false, Err(_)) => {}
                    _ => self.fail(format!("unwire: expected ok={exp_ok} got {got:?}")),
                }
            }
            80..=85 => {
                self.log.push("pageout".into());
                self.vm.pageout(self.vm.total_pages());
            }
            86..=89 => {
                // msync every run of the shared file region, then the disk.
                let base = REG[2].0;
                let mut i = 0;
                while i < FILE_PAGES {
                    if !self.spaces[si].pages.contains_key(&(base + i * PAGE)) {
                        i += 1;
                        continue;
                    }
                    let a = i;
                    while i < FILE_PAGES && self.spaces[si].pages.contains_key(&(base + i * PAGE)) {
                        i += 1;
                    }
                    self.log
                        .push(format!("msync s{} pages {a}..{i}", self.spaces[si].id));
                    if let Err(e) = self.spaces[si].s.msync(base + a * PAGE, (i - a) * PAGE) {
                        self.fail(format!("msync: {e}"));
                    }
                    let disk = std::fs::read(&self.file_path).unwrap();
                    for p in a..i {
                        if let Some(v) = value(&self.file_cells[p as usize]) {
                            let off = (p * PAGE) as usize;
                            let h = u64::from_le_bytes(disk[off..off + 8].try_into().unwrap());
                            let t = u64::from_le_bytes(
                                disk[off + PAGE as usize - 8..off + PAGE as usize]
                                    .try_into()
                                    .unwrap(),
                            );
                            if h != v || t != v {
                                self.fail(format!(
                                    "disk after msync: file page {p}: expected {v:#x}, disk {h:#x}/{t:#x}"
                                ));
                            }
                        }
                    }
                }
            }
            90..=92 => {
                // Known: a wired file page truncated and regrown makes fork
                // and mprotect fail (hunt_bug_*_truncate_extend): steer clear.
                let wired_file = self.spaces.iter().any(|sp| {
                    sp.pages
                        .iter()
                        .any(|(&va, pg)| pg.wired && (REG[2].0..REG[4].0).contains(&va))
                });
                if wired_file {
                    return;
                }
                let k = rng.below(FILE_PAGES + 1);
                self.log.push(format!("truncate file to {k} pages"));
                if let Err(e) = self.pager.set_len(&*self.vm, &self.fobj, k * PAGE) {
                    self.fail(format!("set_len: {e}"));
                }
                for (p, c) in self.file_cells.iter().enumerate() {
                    let p = p as u64;
                    if p >= k {
                        *c.borrow_mut() = Content::Gone;
                    } else if value(c).is_none() {
                        *c.borrow_mut() = Content::Own(0);
                    }
                }
                self.file_size_pages = k;
            }
            93..=96 => {
                let (_, va, _) = self.range(rng);
                if let Some((o, _)) = self.spaces[si].s.object_at(va) {
                    self.log
                        .push(format!("collapse s{} {va:#x}", self.spaces[si].id));
                    self.vm.collapse(&o);
                }
            }
            _ => {
                self.check_all("periodic");
            }
        }
    }
}

fn fuzz_run<P: Pmap>(pmap: P, mem_pages: u64, seed: u64, steps: usize, wire_ok: bool) {
    let steps = std::env::var("HUNT_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(steps);
    eprintln!("seed {seed} steps {steps}");
    let swap_t = TempPath::new();
    let file_t = TempPath::new();
    let mut bytes = vec![0u8; (FILE_PAGES * PAGE) as usize];
    for p in 0..FILE_PAGES {
        let v = 0x1_0000 + p;
        let off = (p * PAGE) as usize;
        for (k, b) in bytes[off..off + PAGE as usize].iter_mut().enumerate() {
            *b = (k as u8) ^ 0xa5;
        }
        bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
        bytes[off + PAGE as usize - 8..off + PAGE as usize].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&file_t.0, &bytes).unwrap();
    let vm = Vm::new(pmap, config(mem_pages)).unwrap();
    let swap = Swap::create(&swap_t.0, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let pager = VnodePager::open(&file_t.0, true).unwrap();
    let fobj = pager.object(&*vm);
    let obj = vm.new_anon_object(OBJ_PAGES);
    let file_cells = (0..FILE_PAGES)
        .map(|p| cell(Content::Own(0x1_0000 + p)))
        .collect();
    let obj_cells = (0..OBJ_PAGES).map(|_| cell(Content::Own(0))).collect();
    let mut w = World {
        vm: vm.clone(),
        spaces: Vec::new(),
        file_cells,
        file_size_pages: FILE_PAGES,
        obj_cells,
        obj,
        fobj,
        pager,
        file_path: file_t.0.clone(),
        next_val: (seed << 32) | 0x100,
        next_id: 1,
        log: vec![format!("[seed {seed}]")],
    };
    w.spaces.push(Sp {
        s: vm.new_space().unwrap(),
        pages: BTreeMap::new(),
        id: 0,
    });
    for r in 0..5 {
        w.map_region(0, r, None);
    }
    // The named object has no holes either (see map_region).
    for i in 0..OBJ_PAGES {
        let v = w.next_val;
        w.next_val += 1;
        wrpage(&w.spaces[0].s, REG[1].0 + i * PAGE, v).unwrap();
        *w.obj_cells[i as usize].borrow_mut() = Content::Own(v);
    }
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for _ in 0..steps {
        w.step(&mut rng, wire_ok);
    }
    w.check_all("final");
    let spaces = std::mem::take(&mut w.spaces);
    drop(spaces);
    let World {
        obj, fobj, pager, ..
    } = w;
    drop(obj);
    drop(fobj);
    drop(pager);
    consistent(&vm, "after teardown");
    assert_eq!(swap.stats().used, 0, "seed {seed}: swap blocks leaked");
    assert_eq!(
        vm.free_pages(),
        vm.total_pages(),
        "seed {seed}: frames leaked (live objects {:?})",
        vm.live_objects()
    );
}

fn seeds() -> std::ops::Range<u64> {
    let n = std::env::var("HUNT_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let s = std::env::var("HUNT_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    s..s + n
}

#[test]
fn hunt_model_ref() {
    for seed in seeds() {
        fuzz_run(RefPmap::new(), 120, seed, 400, true);
    }
}

#[test]
fn hunt_model_x86() {
    for seed in seeds() {
        fuzz_run(X86Pmap::new(), 160, seed, 400, true);
    }
}

// ---------------------------------------------------------------------
// Targeted: fork of a wired private file mapping after truncate + extend
// ---------------------------------------------------------------------

/// A read-only private file mapping is user-wired (wired in place: the
/// file object's pages). The file is truncated to 0 and extended again.
/// The parent reads zeros there (the file's new pages). `fork` must
/// succeed (FreeBSD's fork never fails on a wired entry) and the child must
/// read what the parent reads.
fn fork_after_truncate_extend<P: Pmap>(vm: &Arc<Vm<P>>) {
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x5au8; 2 * PAGE as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&**vm);
    let base = 0x4000_0000;
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(base, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(base, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork of a wired file mapping after truncate+extend: {:?}",
        child.as_ref().err()
    );
    let child = child.unwrap();
    for i in 0..2 {
        let p = rd64(&s, base + i * PAGE);
        let c = rd64(&child, base + i * PAGE);
        assert_eq!(p, Ok(0), "parent page {i} after the file regrew");
        assert_eq!(c, p, "child page {i}");
    }
    drop(child);
    s.unwire(base, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    consistent(vm, "end");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn hunt_bug_fork_after_wired_file_truncate_extend_ref() {
    fork_after_truncate_extend(&Vm::new(RefPmap::new(), config(64)).unwrap());
}
#[test]
fn hunt_bug_fork_after_wired_file_truncate_extend_x86() {
    fork_after_truncate_extend(&Vm::new(X86Pmap::new(), config(64)).unwrap());
}

/// The same truncate + extend under a read-only user-wired private file
/// mapping, then `mprotect(RW)`: the upgrade of a user-wired COW entry
/// (upgrade_wired_entry) meets the same non-resident page.
fn upgrade_after_truncate_extend<P: Pmap>(vm: &Arc<Vm<P>>) {
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x5au8; 2 * PAGE as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&**vm);
    let base = 0x4000_0000;
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(base, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(base, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let r = s.protect(base, 2 * PAGE, Prot::RW);
    assert!(
        r.is_ok(),
        "mprotect(RW) of the wired mapping after truncate+extend: {r:?}"
    );
    wrpage(&s, base, 0x77).unwrap();
    assert_eq!(rdpage(&s, base), Ok(0x77));
    s.unwire(base, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    consistent(vm, "end");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn hunt_bug_mprotect_after_wired_file_truncate_extend_ref() {
    upgrade_after_truncate_extend(&Vm::new(RefPmap::new(), config(64)).unwrap());
}

// ---------------------------------------------------------------------
// Concurrent: shared (minherit share) memory between parent and child
// while others fork/exit grandchildren, page out, protect and collapse
// ---------------------------------------------------------------------

fn shared_concurrent<P: Pmap + 'static>(pmap: P, mem: u64) {
    use std::sync::atomic::AtomicBool;
    let swap_t = TempPath::new();
    let vm = Vm::new(pmap, config(mem)).unwrap();
    let swap = Swap::create(&swap_t.0, 8 << 20).unwrap();
    vm.set_swap(swap.provider());
    let sh = 0x1000_0000u64;
    let pv = 0x2000_0000u64;
    let n = 16u64;
    let parent = Arc::new(vm.new_space().unwrap());
    parent.map_anon(sh, n * PAGE, Prot::RW).unwrap();
    parent.map_anon(pv, n * PAGE, Prot::RW).unwrap();
    for i in 0..n {
        wrpage(&parent, sh + i * PAGE, 1).unwrap();
        wrpage(&parent, pv + i * PAGE, 0x1000 + i).unwrap();
    }
    // Make the shared region's pages a shadow chain first (a copy fork).
    let first = parent.fork().unwrap();
    parent
        .set_inheritance(sh, n * PAGE, Inheritance::Share)
        .unwrap();
    let child = Arc::new(parent.fork().unwrap());
    drop(first);
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new((0..n).map(|_| AtomicU64::new(1)).collect::<Vec<_>>());
    let mut hs = Vec::new();
    // Writer in the parent and one in the child, on alternate pages.
    for (who, sp) in [(0u64, parent.clone()), (1u64, child.clone())] {
        let (stop, last) = (stop.clone(), last.clone());
        hs.push(std::thread::spawn(move || {
            let mut v = 2;
            while !stop.load(Ordering::Relaxed) {
                for i in (who..n).step_by(2) {
                    wrpage(&sp, sh + i * PAGE, v).unwrap();
                    last[i as usize].store(v, Ordering::Relaxed);
                }
                v += 1;
            }
        }));
    }
    // Fork storm: grandchildren of both that write their private copies and exit.
    {
        let (stop, p, c) = (stop.clone(), parent.clone(), child.clone());
        hs.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let src = if k.is_multiple_of(2) { &p } else { &c };
                let g = src.fork().unwrap();
                // The private region is copied; the shared one shared.
                for i in 0..n {
                    let got = rdpage(&g, pv + i * PAGE);
                    assert!(got.is_ok(), "grandchild read {got:?}");
                }
                // The child's private region may be read-only at fork time.
                g.protect(pv, n * PAGE, Prot::RW).unwrap();
                wrpage(&g, pv + (k % n) * PAGE, 0xdead).unwrap();
                if k.is_multiple_of(3) {
                    g.wire(pv, 2 * PAGE, true).unwrap();
                }
                drop(g);
                k += 1;
            }
        }));
    }
    // Pressure, collapse and protect flips on the private region of the child.
    {
        let (stop, vm2, c) = (stop.clone(), vm.clone(), child.clone());
        hs.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                vm2.pageout(vm2.total_pages());
                if let Some((o, _)) = c.object_at(sh) {
                    vm2.collapse(&o);
                }
                let prot = if k.is_multiple_of(2) {
                    Prot::READ
                } else {
                    Prot::RW
                };
                c.protect(pv, n * PAGE, prot).unwrap();
                k += 1;
            }
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for h in hs {
        while !h.is_finished() {
            assert!(std::time::Instant::now() < deadline, "threads hang");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        h.join().unwrap();
    }
    for i in 0..n {
        let want = last[i as usize].load(Ordering::Relaxed);
        assert_eq!(
            rdpage(&parent, sh + i * PAGE),
            Ok(want),
            "parent shared page {i}"
        );
        assert_eq!(
            rdpage(&child, sh + i * PAGE),
            Ok(want),
            "child shared page {i}"
        );
        assert_eq!(
            rdpage(&parent, pv + i * PAGE),
            Ok(0x1000 + i),
            "parent private page {i}"
        );
        assert_eq!(
            rdpage(&child, pv + i * PAGE),
            Ok(0x1000 + i),
            "child private page {i}"
        );
    }
    drop(parent);
    drop(child);
    consistent(&vm, "end");
    assert_eq!(swap.stats().used, 0, "swap leaked");
    assert_eq!(vm.free_pages(), vm.total_pages(), "frames leaked");
}

#[test]
fn hunt_shared_concurrent_ref() {
    shared_concurrent(RefPmap::new(), 48);
}
#[test]
fn hunt_shared_concurrent_x86() {
    shared_concurrent(X86Pmap::new(), 64);
}

/// The same, with data written into the regrown file before the fork: the
/// wired entry's pages are faulted back from the file (the new bytes), and
/// the child's copy is taken from them.
fn fork_after_truncate_extend_write<P: Pmap>(vm: &Arc<Vm<P>>) {
    use std::os::unix::fs::FileExt;
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x5au8; 2 * PAGE as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&**vm);
    let base = 0x4000_0000;
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(base, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(base, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
    file.write_all_at(&[0x77u8; PAGE as usize], PAGE).unwrap();
    let child = s.fork().unwrap();
    // The file changes again after the fork: the child's copy does not.
    file.write_all_at(&[0x99u8; PAGE as usize], PAGE).unwrap();
    assert_eq!(rd64(&child, base), Ok(0), "child page 0 (a hole)");
    assert_eq!(
        rd64(&child, base + PAGE),
        Ok(0x7777_7777_7777_7777),
        "child page 1"
    );
    s.protect(base, 2 * PAGE, Prot::RW).unwrap();
    assert_eq!(
        rd64(&s, base + PAGE),
        Ok(0x7777_7777_7777_7777),
        "parent page 1"
    );
    drop(child);
    s.unwire(base, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    consistent(vm, "end");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn wired_file_regrown_with_data_forks_a_snapshot_ref() {
    fork_after_truncate_extend_write(&Vm::new(RefPmap::new(), config(64)).unwrap());
}

#[test]
fn wired_file_regrown_with_data_forks_a_snapshot_x86() {
    fork_after_truncate_extend_write(&Vm::new(X86Pmap::new(), config(64)).unwrap());
}
