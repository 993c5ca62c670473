//! Helpers shared by the regression tests of issues 11 and 12
//! (`regress_integrity.rs`, `regress_wiring.rs`), included with
//! `mod regress_support;`.
//!
//! * [`watchdog`]: runs a test body on its own thread and fails the test if
//!   it has not finished in time, so a hang is reported instead of wedging
//!   CI;
//! * [`MemSwap`]: a swap provider handing out in-memory [`MemPager`]s, so
//!   the pageout scan can launder anonymous memory;
//! * [`HookPmap`]: the reference pmap with one-shot pauses inside
//!   `translate` and `ts_referenced`, to stop a byte access or the pageout
//!   scan at the exact point a race needs;
//! * [`PanicPager`]: a pager whose `put_pages` panics on command.
#![allow(dead_code)]

use core::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;
use vm_core::VirtAddr;
use vm_core::pmap::{Displaced, DisplacedSink, Mapping, PageInfo, Pmap, PmapError, RefMod};
use vm_core::{
    Contiguity, PageOut, PageSlot, Pager, PagerError, PagerKind, Pfn, Prot, SwapProvider, Vm,
    VmSpace,
};
use vm_testkit::{MemPager, RefPmap, RefSpace};

/// Runs `f` on a thread of its own; fails with `what` if it has not
/// returned after `secs` seconds, and re-raises its panic if it panicked.
pub fn watchdog(secs: u64, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("{what}: still running after {secs} s (hang)"),
    }
}

/// Swap for anonymous memory, in memory: every object paged out gets a
/// fresh [`MemPager`] of type swap.
#[derive(Default)]
pub struct MemSwap {
    /// The pagers handed out, in order.
    pub pagers: Mutex<Vec<Arc<MemPager>>>,
}

impl SwapProvider for MemSwap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        let p = Arc::new(MemPager::new(PagerKind::ANONYMOUS));
        self.pagers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p.clone());
        Some(p)
    }
}

/// Where a [`HookPmap`] pause stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAt {
    /// After a successful `translate(va, access)` with `access` containing
    /// the given protection (the translation is done, nothing is held).
    Translate {
        /// The page address.
        va: u64,
        /// Protection the access must include.
        access: Prot,
    },
    /// At the start of `ts_referenced(pfn)` (before the pmap looks).
    TsReferenced(Pfn),
}

struct Armed {
    at: HookAt,
    started: mpsc::Sender<()>,
    resume: mpsc::Receiver<()>,
}

/// Control of an armed [`HookPmap`] pause.
pub struct HookPause {
    started: mpsc::Receiver<()>,
    resume: mpsc::Sender<()>,
}

impl HookPause {
    /// Blocks until the paused call has reached the hook.
    ///
    /// # Panics
    ///
    /// If it has not within 20 seconds.
    pub fn wait_started(&self) {
        self.started
            .recv_timeout(Duration::from_secs(20))
            .expect("the hooked pmap call never came");
    }

    /// Lets the paused call go on.
    pub fn resume(&self) {
        let _ = self.resume.send(());
    }
}

/// [`RefPmap`] with a one-shot pause: see [`HookPmap::arm`].
#[derive(Default)]
pub struct HookPmap {
    inner: RefPmap,
    armed: Mutex<Option<Armed>>,
}

impl HookPmap {
    /// A reference pmap with nothing armed.
    #[must_use]
    pub fn new() -> HookPmap {
        HookPmap::default()
    }

    /// The wrapped reference pmap (its inspection methods).
    pub fn reference(&self) -> &RefPmap {
        &self.inner
    }

    /// The next call matching `at` stops until the returned pause is
    /// resumed (at most 30 seconds).
    #[must_use]
    pub fn arm(&self, at: HookAt) -> HookPause {
        let (stx, srx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel();
        *self.armed.lock().unwrap_or_else(PoisonError::into_inner) = Some(Armed {
            at,
            started: stx,
            resume: rrx,
        });
        HookPause {
            started: srx,
            resume: rtx,
        }
    }

    fn stop_if(&self, matches: impl Fn(HookAt) -> bool) {
        let taken = {
            let mut g = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
            match g.as_ref() {
                Some(a) if matches(a.at) => g.take(),
                _ => None,
            }
        };
        if let Some(a) = taken {
            let _ = a.started.send(());
            let _ = a.resume.recv_timeout(Duration::from_secs(30));
        }
    }
}

impl Pmap for HookPmap {
    type Space = RefSpace;

    fn create_space(&self) -> Result<RefSpace, PmapError> {
        self.inner.create_space()
    }
    fn destroy_space(&self, space: &RefSpace) {
        self.inner.destroy_space(space);
    }
    fn enter(
        &self,
        space: &RefSpace,
        va: VirtAddr,
        m: Mapping,
    ) -> Result<Option<Displaced>, PmapError> {
        self.inner.enter(space, va, m)
    }
    fn enter_quick(&self, space: &RefSpace, va: VirtAddr, page: PageInfo, prot: Prot) -> bool {
        self.inner.enter_quick(space, va, page, prot)
    }
    fn remove(&self, space: &RefSpace, range: Range<VirtAddr>, sink: &mut DisplacedSink<'_>) {
        self.inner.remove(space, range, sink);
    }
    fn protect(
        &self,
        space: &RefSpace,
        range: Range<VirtAddr>,
        prot: Prot,
        sink: &mut DisplacedSink<'_>,
    ) {
        self.inner.protect(space, range, prot, sink);
    }
    fn extract(&self, space: &RefSpace, va: VirtAddr) -> Option<Pfn> {
        self.inner.extract(space, va)
    }
    fn is_prefaultable(&self, space: &RefSpace, va: VirtAddr) -> bool {
        self.inner.is_prefaultable(space, va)
    }
    fn change_wiring(&self, space: &RefSpace, va: VirtAddr, wired: bool) {
        self.inner.change_wiring(space, va, wired);
    }
    fn translate(&self, space: &RefSpace, va: VirtAddr, access: Prot) -> Option<Pfn> {
        let r = self.inner.translate(space, va, access);
        let va = va.as_u64();
        if r.is_some() {
            self.stop_if(|at| {
                matches!(at, HookAt::Translate { va: v, access: a } if v == va && access.contains(a))
            });
        }
        r
    }
    fn remove_all(&self, pfn: Pfn) -> RefMod {
        self.inner.remove_all(pfn)
    }
    fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod {
        self.inner.page_protect(pfn, prot)
    }
    fn is_modified(&self, pfn: Pfn) -> bool {
        self.inner.is_modified(pfn)
    }
    fn clear_modify(&self, pfn: Pfn) {
        self.inner.clear_modify(pfn);
    }
    fn ts_referenced(&self, pfn: Pfn) -> u32 {
        self.stop_if(|at| at == HookAt::TsReferenced(pfn));
        self.inner.ts_referenced(pfn)
    }
    fn mapping_count(&self, pfn: Pfn) -> usize {
        self.inner.mapping_count(pfn)
    }
}

/// A machine of `pages` pages on a [`HookPmap`], configured as
/// `vm_testkit::machine`, with one space.
pub fn hook_machine(pages: u64) -> (Arc<Vm<HookPmap>>, VmSpace<HookPmap>) {
    let vm = Vm::new(HookPmap::new(), vm_testkit::test_config(pages)).expect("test machine");
    let space = vm.new_space().expect("reference pmap never fails");
    (vm, space)
}

/// A file pager (a [`MemPager`] of type vnode underneath) whose
/// `put_pages` panics while [`armed`](Self::armed) is set.
pub struct PanicPager {
    /// The pager doing the real work.
    pub mem: MemPager,
    /// Whether `put_pages` panics.
    pub armed: AtomicBool,
    /// `put_pages` calls that panicked.
    pub panics: std::sync::atomic::AtomicU64,
}

impl PanicPager {
    /// Pages `0..pages` with the [`vm_testkit::pattern_byte`] pattern;
    /// armed.
    #[must_use]
    pub fn with_pattern(pages: u64) -> PanicPager {
        PanicPager {
            mem: MemPager::with_pattern(PagerKind::FILE, pages),
            armed: AtomicBool::new(true),
            panics: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Pager for PanicPager {
    fn kind(&self) -> PagerKind {
        PagerKind::FILE
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.mem.has_page(pindex)
    }
    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        self.mem.get_pages(pages, reqpage)
    }
    fn put_pages(&self, pages: &[PageOut<'_>]) -> Result<(), PagerError> {
        if self.armed.load(Ordering::Acquire) {
            self.panics.fetch_add(1, Ordering::AcqRel);
            panic!("PanicPager: put_pages panics on command");
        }
        self.mem.put_pages(pages)
    }
}
