//! Red-team model fuzzer: what the reference model (tests/model.rs) does not
//! cover — holds kept across other operations (fork, pageout, protect,
//! wiring), write_forced, kernel wiring nested with user wiring on partial
//! ranges, PROT_NONE, a named object mapped private beside shared.
//!
//! Oracle: per space, the 8 bytes at offset 64 of every page.
#![allow(clippy::unwrap_used, dead_code)]

mod common;
use common::Rng;
use std::sync::Arc;
use vm_core::{
    FaultError, HeldPages, MapError, MapRequest, Pager, PagerKind, Pmap, Prot, SwapProvider, Vm,
    VmObject, VmSpace,
};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::{MemPager, RefPmap};

const PAGE: u64 = 4096;
const OFF: u64 = 64;
/// Regions: 0 anon private, 1 named object shared, 2 same named object private.
const BASES: [u64; 3] = [0x1000_0000, 0x2000_0000, 0x3000_0000];
const PAGES: [u64; 3] = [6, 4, 4];
const MAXSPACES: usize = 3;

#[derive(Default)]
struct MemSwap;
impl SwapProvider for MemSwap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        Some(Arc::new(MemPager::new(PagerKind::ANONYMOUS)))
    }
}

#[derive(Clone)]
struct PageModel {
    prot: Prot,
    user: bool,
    kernel: u32,
    /// The entry is copy-on-write (private named object mappings; a wired
    /// copy made by fork or an mprotect upgrade is not).
    cow: bool,
    /// Private named: Some(frozen) or None (follows the object).
    val: Option<u64>,
    /// Anon (region 0): the memory cell the page shows, and whether it is
    /// inherited shared.
    cell: usize,
    share: bool,
}

#[derive(Clone)]
struct SpaceModel {
    regions: [Vec<PageModel>; 3],
}

struct Hold<P: Pmap + 'static> {
    space: usize,
    region: usize,
    page: u64,
    write: bool,
    held: HeldPages<P>,
}

/// Known bugs to steer around (so the fuzzer looks for new ones).
#[derive(Clone, Copy)]
struct Avoid {
    /// rt_hold_in_clipped_entry_loses_owner_writes_after_fork
    fork_with_holds: bool,
    /// rt_wired_cow_upgrade_strands_hold
    upgrade_with_holds: bool,
    /// rt_fork_wired_prot_none_readable_in_child_x86
    fork_wired_none: bool,
}

struct World<P: Pmap + 'static> {
    vm: Arc<Vm<P>>,
    named: Arc<VmObject>,
    named_val: Vec<u64>,
    spaces: Vec<Option<Box<VmSpace<P>>>>,
    models: Vec<Option<SpaceModel>>,
    holds: Vec<Hold<P>>,
    counter: u64,
    log: Vec<String>,
    avoid: Avoid,
    cells: Vec<u64>,
}

fn fresh_model() -> SpaceModel {
    let r = |n: u64, val: Option<u64>| {
        (0..n)
            .map(|_| PageModel {
                prot: Prot::RW,
                user: false,
                kernel: 0,
                cow: val.is_none(),
                val,
                cell: usize::MAX,
                share: false,
            })
            .collect::<Vec<_>>()
    };
    SpaceModel {
        regions: [r(PAGES[0], Some(0)), r(PAGES[1], None), r(PAGES[2], None)],
    }
}

impl<P: Pmap + 'static> World<P> {
    fn new(vm: Arc<Vm<P>>, avoid: Avoid) -> Self {
        vm.set_swap(Arc::new(MemSwap));
        let named = vm.new_anon_object(PAGES[1]);
        let mut w = World {
            vm,
            named,
            named_val: vec![0; PAGES[1] as usize],
            spaces: Vec::new(),
            models: Vec::new(),
            holds: Vec::new(),
            counter: 1,
            log: Vec::new(),
            avoid,
            cells: Vec::new(),
        };
        let s = w.vm.new_space().unwrap();
        s.map_anon(BASES[0], PAGES[0] * PAGE, Prot::RW).unwrap();
        s.map(MapRequest::object(
            BASES[1],
            PAGES[1] * PAGE,
            w.named.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
        s.map(
            MapRequest::object(BASES[2], PAGES[2] * PAGE, w.named.clone(), 0, Prot::RW).private(),
        )
        .unwrap();
        // Every page of the named object exists (a read of a hole through
        // a shadowed private mapping zero-fills into the shadow, as FreeBSD
        // does; the model does not follow that).
        for p in 0..PAGES[1] {
            let v = 1000 + p;
            s.write(BASES[1] + p * PAGE + OFF, &v.to_le_bytes())
                .unwrap();
            w.named_val[p as usize] = v;
        }
        w.spaces.push(Some(Box::new(s)));
        let mut m = fresh_model();
        for pm in &mut m.regions[0] {
            pm.cell = w.cells.len();
            w.cells.push(0);
        }
        w.models.push(Some(m));
        w
    }

    fn view(&self, s: usize, r: usize, p: u64) -> u64 {
        let m = self.models[s].as_ref().unwrap();
        match (r, m.regions[r][p as usize].val) {
            (0, _) => self.cells[m.regions[0][p as usize].cell],
            (1, _) => self.named_val[p as usize],
            (_, Some(v)) => v,
            (_, None) => self.named_val[p as usize],
        }
    }

    fn privatize(&mut self, s: usize, r: usize, p: u64) {
        if r == 2
            && self.models[s].as_ref().unwrap().regions[2][p as usize]
                .val
                .is_none()
        {
            let v = self.view(s, r, p);
            self.models[s].as_mut().unwrap().regions[2][p as usize].val = Some(v);
        }
    }

    fn set_val(&mut self, s: usize, r: usize, p: u64, v: u64) {
        if r == 0 {
            let c = self.models[s].as_ref().unwrap().regions[0][p as usize].cell;
            self.cells[c] = v;
        } else if r == 1 {
            self.named_val[p as usize] = v;
        } else {
            self.models[s].as_mut().unwrap().regions[r][p as usize].val = Some(v);
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.spaces.len())
            .filter(|&i| self.spaces[i].is_some())
            .collect()
    }

    fn space(&self, s: usize) -> &VmSpace<P> {
        self.spaces[s].as_ref().unwrap()
    }

    fn pm(&mut self, s: usize, r: usize, p: u64) -> &mut PageModel {
        &mut self.models[s].as_mut().unwrap().regions[r][p as usize]
    }

    fn step(&mut self, rng: &mut Rng) {
        let live = self.live();
        let s = live[rng.below(live.len() as u64) as usize];
        let r = rng.below(3) as usize;
        let n = PAGES[r];
        let p0 = rng.below(n);
        let len = 1 + rng.below(n - p0);
        let va = BASES[r] + p0 * PAGE;
        let op = rng.below(100);
        match op {
            0..=24 => {
                // write
                let v = self.counter;
                self.counter += 1;
                let prot = self.models[s].as_ref().unwrap().regions[r][p0 as usize].prot;
                self.log.push(format!("s{s} write r{r} p{p0} = {v}"));
                let res = self.space(s).write(va + OFF, &v.to_le_bytes());
                if prot.contains(Prot::WRITE) {
                    res.unwrap_or_else(|e| panic!("write failed: {e:?}"));
                    self.set_val(s, r, p0, v);
                } else {
                    assert!(
                        matches!(res, Err(FaultError::ProtectionFailure { .. })),
                        "write to {prot:?}: {res:?}"
                    );
                }
            }
            25..=31 => {
                // write_forced: private memory (anonymous not inherited
                // shared, or the named object mapped private) is written
                // where it can be read, as FreeBSD's proc_rwmem asks for
                // read access with VM_PROT_COPY; shared memory only where
                // it can be written.
                let v = self.counter;
                self.counter += 1;
                let prot = self.models[s].as_ref().unwrap().regions[r][p0 as usize].prot;
                self.log.push(format!("s{s} write_forced r{r} p{p0} = {v}"));
                let res = self.space(s).write_forced(va + OFF, &v.to_le_bytes());
                let pm = &self.models[s].as_ref().unwrap().regions[r][p0 as usize];
                // Anonymous memory another space shares (through an
                // earlier fork with Share) is shared whatever its
                // inheritance says now.
                let shared_cell = self
                    .models
                    .iter()
                    .flatten()
                    .flat_map(|m| m.regions[0].iter())
                    .filter(|other| other.cell == pm.cell)
                    .count()
                    > 1;
                // The model tracks copy-on-write loosely, so it insists
                // only where the answer is clear: a writable mapping is
                // written; the named object through its shared mapping,
                // or anonymous memory another space shares, is never
                // written without write permission; private memory that
                // can be read is written. Wherever the write lands, the
                // later reads of every space check it landed right.
                let must = prot.contains(Prot::WRITE)
                    || (r == 2 && prot.contains(Prot::READ))
                    || (r == 0 && !shared_cell && !pm.share && prot.contains(Prot::READ));
                let never = !prot.contains(Prot::WRITE) && (r == 1 || (r == 0 && shared_cell));
                match res {
                    Ok(()) => {
                        assert!(!never, "write_forced to shared {prot:?} memory succeeded");
                        if r == 2 {
                            self.privatize(s, r, p0);
                        }
                        self.set_val(s, r, p0, v);
                    }
                    Err(e) => assert!(!must, "write_forced failed: {e:?}"),
                }
            }
            32..=41 => {
                // wire
                let user = rng.below(2) == 0;
                self.log
                    .push(format!("s{s} wire r{r} p{p0}+{len} user={user}"));
                let res = self.space(s).wire(va, len * PAGE, user);
                let pages: Vec<PageModel> = (p0..p0 + len)
                    .map(|p| self.models[s].as_ref().unwrap().regions[r][p as usize].clone())
                    .collect();
                let no_access = pages.iter().any(|m| {
                    let count = m.kernel + u32::from(m.user);
                    let leaves_zero = count == 0 && !(user && m.user);
                    leaves_zero && !m.prot.intersects(Prot::READ | Prot::EXECUTE)
                });
                if no_access {
                    assert!(
                        matches!(res, Err(MapError::NoAccess { .. })),
                        "wire of PROT_NONE: {res:?}"
                    );
                    return;
                }
                res.unwrap_or_else(|e| panic!("wire failed: {e:?}"));
                for p in p0..p0 + len {
                    let m = self.pm(s, r, p);
                    let before = m.kernel + u32::from(m.user);
                    if user {
                        m.user = true;
                    } else {
                        m.kernel += 1;
                    }
                    let after = m.kernel + u32::from(m.user);
                    let writable = m.prot.contains(Prot::WRITE);
                    if before == 0 && after == 1 && writable {
                        self.privatize(s, r, p);
                    }
                }
            }
            42..=49 => {
                let user = rng.below(2) == 0;
                self.log
                    .push(format!("s{s} unwire r{r} p{p0}+{len} user={user}"));
                let res = self.space(s).unwire(va, len * PAGE, user);
                let ok = (p0..p0 + len).all(|p| {
                    let m = &self.models[s].as_ref().unwrap().regions[r][p as usize];
                    if user { m.user } else { m.kernel > 0 }
                });
                if !ok {
                    assert!(
                        matches!(res, Err(MapError::NotWired { .. })),
                        "unwire of unwired: {res:?}"
                    );
                    return;
                }
                res.unwrap_or_else(|e| panic!("unwire failed: {e:?}"));
                for p in p0..p0 + len {
                    let m = self.pm(s, r, p);
                    if user {
                        m.user = false;
                    } else {
                        m.kernel -= 1;
                    }
                }
            }
            50..=59 => {
                let prot = [Prot::NONE, Prot::READ, Prot::RW][rng.below(3) as usize];
                // Would this upgrade a user-wired COW entry that has holds?
                if self.avoid.upgrade_with_holds
                    && prot.contains(Prot::WRITE)
                    && self.holds.iter().any(|h| h.space == s && h.region == r)
                {
                    return;
                }
                self.log
                    .push(format!("s{s} protect r{r} p{p0}+{len} {prot:?}"));
                self.space(s).protect(va, len * PAGE, prot).unwrap();
                for p in p0..p0 + len {
                    let m = self.pm(s, r, p);
                    let gains = !m.prot.contains(Prot::WRITE) && prot.contains(Prot::WRITE);
                    let upgrade = m.user && gains;
                    m.prot = prot;
                    // User-wired COW entries that gain write are copied.
                    if upgrade && m.cow {
                        m.cow = false;
                        self.privatize(s, r, p);
                    }
                }
            }
            60..=69 => {
                // hold one page
                if self.holds.len() >= 6 {
                    let i = rng.below(self.holds.len() as u64) as usize;
                    let h = self.holds.swap_remove(i);
                    self.log
                        .push(format!("drop hold s{} r{} p{}", h.space, h.region, h.page));
                    drop(h);
                    return;
                }
                let write = rng.below(2) == 0;
                let access = if write { Prot::RW } else { Prot::READ };
                let prot = self.models[s].as_ref().unwrap().regions[r][p0 as usize].prot;
                self.log.push(format!("s{s} hold r{r} p{p0} write={write}"));
                let res = self.space(s).hold(va, PAGE, access);
                if !prot.contains(access) {
                    assert!(res.is_err(), "hold for {access:?} of {prot:?} succeeded");
                    return;
                }
                let held = res.unwrap_or_else(|e| panic!("hold failed: {e:?}"));
                self.privatize(s, r, p0);
                self.holds.push(Hold {
                    space: s,
                    region: r,
                    page: p0,
                    write,
                    held,
                });
            }
            70..=76 => {
                // write through a hold
                let Some(i) =
                    (!self.holds.is_empty()).then(|| rng.below(self.holds.len() as u64) as usize)
                else {
                    return;
                };
                let v = self.counter;
                self.counter += 1;
                let (hs, hr, hp, hw) = {
                    let h = &self.holds[i];
                    (h.space, h.region, h.page, h.write)
                };
                self.log
                    .push(format!("write via hold s{hs} r{hr} p{hp} = {v}"));
                let res = self.holds[i].held.write(OFF as usize, &v.to_le_bytes());
                if hw {
                    res.unwrap();
                    self.set_val(hs, hr, hp, v);
                } else {
                    assert!(res.is_err());
                }
            }
            77..=82 => {
                // fork
                if self.live().len() >= MAXSPACES {
                    // exit one child instead
                    let victims: Vec<usize> = self.live().into_iter().filter(|&i| i != 0).collect();
                    let v = victims[rng.below(victims.len() as u64) as usize];
                    self.log.push(format!("exit s{v}"));
                    self.holds.retain(|h| h.space != v);
                    self.spaces[v] = None;
                    self.models[v] = None;
                    return;
                }
                if self.avoid.fork_with_holds && self.holds.iter().any(|h| h.space == s) {
                    return;
                }
                if self.avoid.fork_wired_none
                    && self.models[s]
                        .as_ref()
                        .unwrap()
                        .regions
                        .iter()
                        .flatten()
                        .any(|m| m.kernel + u32::from(m.user) > 0 && !m.prot.contains(Prot::READ))
                {
                    return;
                }
                let aliased = |cell: usize| {
                    self.models
                        .iter()
                        .flatten()
                        .flat_map(|m| m.regions[0].iter())
                        .filter(|pm| pm.cell == cell)
                        .count()
                        > 1
                };
                if self.models[s].as_ref().unwrap().regions[0]
                    .iter()
                    .any(|pm| !pm.share && pm.kernel + u32::from(pm.user) == 0 && aliased(pm.cell))
                {
                    // A copy of memory another space shares sees that
                    // space's later writes (FreeBSD does the same).
                    return;
                }
                self.log.push(format!("s{s} fork"));
                let child = self
                    .space(s)
                    .fork()
                    .unwrap_or_else(|e| panic!("fork: {e:?}"));
                // A copied entry that is not wired becomes copy-on-write.
                for region in self.models[s].as_mut().unwrap().regions.iter_mut() {
                    for m in region.iter_mut() {
                        if m.kernel + u32::from(m.user) == 0 {
                            m.cow = true;
                        }
                    }
                }
                let mut cm = self.models[s].clone().unwrap();
                for (ri, region) in cm.regions.iter_mut().enumerate() {
                    for (pi, m) in region.iter_mut().enumerate() {
                        let wired = m.kernel + u32::from(m.user) > 0;
                        if ri == 2 && wired {
                            // copy_entry copies every page of a wired entry
                            if m.val.is_none() {
                                m.val = Some(self.named_val[pi]);
                            }
                            m.cow = false;
                        }
                        m.user = false;
                        m.kernel = 0;
                    }
                }
                for pm in &mut cm.regions[0] {
                    if !pm.share {
                        let v = self.cells[pm.cell];
                        pm.cell = self.cells.len();
                        self.cells.push(v);
                    }
                }
                self.spaces.push(Some(Box::new(child)));
                self.models.push(Some(cm));
            }
            83..=88 => {
                self.log.push("pageout".into());
                self.vm.pageout(self.vm.total_pages());
            }
            89..=91 => {
                self.log.push(format!("s{s} collapse r{r}"));
                if let Some((o, _)) = self.space(s).object_at(va) {
                    self.vm.collapse(&o);
                }
            }
            92..=93 => {
                self.log.push(format!("s{s} msync r{r}"));
                self.space(s).msync(va, len * PAGE).unwrap();
            }
            _ => {
                // inheritance of region 0: share / copy
                if r != 0 {
                    return;
                }
                let share = rng.below(2) == 0;
                let inh = if share {
                    vm_core::Inheritance::Share
                } else {
                    vm_core::Inheritance::Copy
                };
                self.log
                    .push(format!("s{s} inherit r0 p{p0}+{len} share={share}"));
                self.space(s).set_inheritance(va, len * PAGE, inh).unwrap();
                for p in p0..p0 + len {
                    self.pm(s, 0, p).share = share;
                }
            }
        }
    }

    fn check(&self) {
        for s in self.live() {
            for r in 0..3 {
                for p in 0..PAGES[r] {
                    let m = &self.models[s].as_ref().unwrap().regions[r][p as usize];
                    let mut b = [0u8; 8];
                    let res = self.space(s).read(BASES[r] + p * PAGE + OFF, &mut b);
                    if m.prot.contains(Prot::READ) {
                        res.unwrap_or_else(|e| panic!("read s{s} r{r} p{p}: {e:?}"));
                        assert_eq!(
                            u64::from_le_bytes(b),
                            self.view(s, r, p),
                            "space {s} region {r} page {p}"
                        );
                    } else {
                        assert!(
                            matches!(res, Err(FaultError::ProtectionFailure { .. })),
                            "read of PROT_NONE s{s} r{r} p{p}: {res:?}"
                        );
                    }
                }
            }
        }
        for h in &self.holds {
            let mut b = [0u8; 8];
            h.held.read(OFF as usize, &mut b).unwrap();
            assert_eq!(
                u64::from_le_bytes(b),
                self.view(h.space, h.region, h.page),
                "hold of space {} region {} page {} (write={})",
                h.space,
                h.region,
                h.page,
                h.write
            );
        }
        if let Err(e) = self.vm.check_consistency_with_holds() {
            panic!("{e}");
        }
    }
}

impl<P: Pmap + 'static> Drop for World<P> {
    fn drop(&mut self) {
        self.holds.clear();
        self.spaces.clear();
    }
}

fn run_seed<P: Pmap + 'static>(vm: Arc<Vm<P>>, seed: u64, steps: usize, avoid: Avoid) {
    let mut w = World::new(vm, avoid);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for i in 0..steps {
            w.step(&mut rng);
            w.check();
            if i % 12 == 11 && !w.holds.is_empty() {
                w.log.push("drop all holds".into());
                w.holds.clear();
                w.check();
            }
        }
        w.holds.clear();
        for s in w.live() {
            for r in 0..3 {
                let _ = w.space(s).unwire(BASES[r], PAGES[r] * PAGE, true);
                while w.space(s).unwire(BASES[r], PAGES[r] * PAGE, false).is_ok() {}
            }
        }
        w.spaces.clear();
        if let Err(e) = w.vm.check_consistency() {
            panic!("at the end: {e}");
        }
        let named = w.named.resident_count() as u64;
        assert_eq!(
            w.vm.free_pages() + named,
            w.vm.total_pages(),
            "frames leaked"
        );
    }));
    if let Err(e) = r {
        let keep = std::env::var("RT_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40);
        let tail: Vec<&String> = w.log.iter().rev().take(keep).collect::<Vec<_>>();
        eprintln!("seed {seed} failed; last ops (newest first):");
        for l in tail {
            eprintln!("  {l}");
        }
        std::panic::resume_unwind(e);
    }
}

fn seeds() -> std::ops::Range<u64> {
    let n = std::env::var("RT_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let first = std::env::var("RT_SEED0")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    first..first + n
}

const AVOID_ALL: Avoid = Avoid {
    fork_with_holds: false,
    upgrade_with_holds: false,
    fork_wired_none: false,
};

#[test]
fn fuzz_ref_pmap() {
    for seed in seeds() {
        run_seed(
            Vm::new(RefPmap::new(), vm_testkit::test_config(256)).unwrap(),
            seed,
            60,
            AVOID_ALL,
        );
    }
}

#[test]
fn fuzz_x86_pmap() {
    for seed in seeds() {
        run_seed(
            Vm::new(X86Pmap::new(), vm_testkit::test_config(256)).unwrap(),
            seed,
            60,
            AVOID_ALL,
        );
    }
}

#[test]
fn fuzz_small_machine_ref() {
    for seed in seeds() {
        run_seed(
            Vm::new(RefPmap::new(), vm_testkit::test_config(40)).unwrap(),
            seed + 100_000,
            60,
            AVOID_ALL,
        );
    }
}

#[test]
fn fuzz_small_machine_x86() {
    for seed in seeds() {
        run_seed(
            Vm::new(X86Pmap::new(), vm_testkit::test_config(56)).unwrap(),
            seed + 200_000,
            60,
            AVOID_ALL,
        );
    }
}
