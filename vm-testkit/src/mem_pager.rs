//! [`MemPager`]: a pager that serves pages from memory, logs its calls and
//! fails on command — for tests, examples and fault injection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;
use vm_core::{Contiguity, IoError, PAGE_SIZE, PageSlot, Pager, PagerError, PagerKind};

/// What the next `get_pages` call should do instead of succeeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// Behave normally (to fail a later call rather than the next).
    Normal,
    /// Fail with this error.
    Fail(PagerError),
    /// Succeed but mark only these 512-byte blocks of each page valid.
    Partial(u8),
    /// Succeed without filling or validating anything (a broken pager).
    Nonsense,
}

/// One `get_pages` call as the pager saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetCall {
    /// The page indexes asked for, ascending.
    pub pindexes: Vec<u64>,
    /// Index of the required page in `pindexes`.
    pub reqpage: usize,
}

/// A pager over an in-memory page store that logs its calls and fails on
/// command (for tests, examples and fault injection).
pub struct MemPager {
    kind: PagerKind,
    store: Mutex<HashMap<u64, Box<[u8]>>>,
    script: Mutex<VecDeque<Injected>>,
    calls: Mutex<Vec<GetCall>>,
    unswapped: Mutex<Vec<u64>>,
    delay: Mutex<Option<Duration>>,
    contiguity: Mutex<Contiguity>,
    pause: Mutex<Option<(mpsc::Sender<u64>, mpsc::Receiver<()>)>>,
    puts: Mutex<Vec<Vec<u64>>>,
    valid_mask: Mutex<Option<u8>>,
}

/// Control of a paused `get_pages` call: see [`MemPager::pause_next`].
pub struct Pause {
    started: mpsc::Receiver<u64>,
    resume: mpsc::Sender<()>,
}

impl Pause {
    /// Blocks until the paused call has started; returns the page it was
    /// asked for.
    ///
    /// # Panics
    ///
    /// If no call starts within 30 seconds.
    pub fn wait_started(&self) -> u64 {
        self.started
            .recv_timeout(Duration::from_secs(30))
            .expect("pager call did not start")
    }

    /// Lets the paused call go on.
    pub fn resume(&self) {
        let _ = self.resume.send(());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The byte [`MemPager::with_pattern`] puts at `offset` of page `pindex`.
#[must_use]
pub fn pattern_byte(pindex: u64, offset: usize) -> u8 {
    (pindex as u8).wrapping_mul(31).wrapping_add(offset as u8) | 1
}

impl MemPager {
    /// An empty pager whose objects are of `kind`.
    #[must_use]
    pub fn new(kind: PagerKind) -> MemPager {
        MemPager {
            kind,
            store: Mutex::new(HashMap::new()),
            script: Mutex::new(VecDeque::new()),
            calls: Mutex::new(Vec::new()),
            unswapped: Mutex::new(Vec::new()),
            delay: Mutex::new(None),
            contiguity: Mutex::new(Contiguity::default()),
            pause: Mutex::new(None),
            puts: Mutex::new(Vec::new()),
            valid_mask: Mutex::new(None),
        }
    }

    /// A pager holding pages `0..pages`, each filled with
    /// [`pattern_byte`].
    #[must_use]
    pub fn with_pattern(kind: PagerKind, pages: u64) -> MemPager {
        let p = MemPager::new(kind);
        for i in 0..pages {
            let data: Vec<u8> = (0..PAGE_SIZE as usize)
                .map(|o| pattern_byte(i, o))
                .collect();
            p.put(i, &data);
        }
        p
    }

    /// Stores `data` (at most a page; the rest is zero) as page `pindex`.
    pub fn put(&self, pindex: u64, data: &[u8]) {
        let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        let n = data.len().min(page.len());
        page[..n].copy_from_slice(&data[..n]);
        lock(&self.store).insert(pindex, page);
    }

    /// Forgets page `pindex`: `has_page` says no from now on.
    pub fn forget(&self, pindex: u64) {
        lock(&self.store).remove(&pindex);
    }

    /// Queues a misbehaviour for the next `get_pages` call (a `Fail` is
    /// also taken by the next `put_pages`).
    pub fn inject(&self, what: Injected) {
        lock(&self.script).push_back(what);
    }

    /// Makes `get_pages` sleep this long (to overlap faults with I/O).
    pub fn set_delay(&self, d: Option<Duration>) {
        *lock(&self.delay) = d;
    }

    /// Makes the next `get_pages` call stop after it starts, until the
    /// returned [`Pause`] resumes it (at most 30 seconds): a test can then
    /// act while a fault is inside its I/O.
    #[must_use]
    pub fn pause_next(&self) -> Pause {
        let (stx, srx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel();
        *lock(&self.pause) = Some((stx, rrx));
        Pause {
            started: srx,
            resume: rtx,
        }
    }

    /// From now on every read fills whole pages but declares only the
    /// 512-byte blocks of `mask` valid (`None`: all): a pager that fills part
    /// of a page and leaves junk in the rest, which the fault path must
    /// never show.
    pub fn set_valid_mask(&self, mask: Option<u8>) {
        *lock(&self.valid_mask) = mask;
    }

    /// What `has_page` reports as readable around a page.
    pub fn set_contiguity(&self, c: Contiguity) {
        *lock(&self.contiguity) = c;
    }

    /// The `get_pages` calls so far.
    #[must_use]
    pub fn calls(&self) -> Vec<GetCall> {
        lock(&self.calls).clone()
    }

    /// The `put_pages` calls so far: the page indexes of each.
    #[must_use]
    pub fn puts(&self) -> Vec<Vec<u64>> {
        lock(&self.puts).clone()
    }

    /// The bytes stored for page `pindex`.
    #[must_use]
    pub fn stored(&self, pindex: u64) -> Option<Vec<u8>> {
        lock(&self.store).get(&pindex).map(|p| p.to_vec())
    }

    /// The pages reported dirtied through `page_unswapped`.
    #[must_use]
    pub fn unswapped(&self) -> Vec<u64> {
        lock(&self.unswapped).clone()
    }
}

impl Pager for MemPager {
    fn kind(&self) -> PagerKind {
        self.kind
    }

    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        lock(&self.store)
            .contains_key(&pindex)
            .then(|| *lock(&self.contiguity))
    }

    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        lock(&self.calls).push(GetCall {
            pindexes: pages.iter().map(PageSlot::pindex).collect(),
            reqpage,
        });
        if let Some(d) = *lock(&self.delay) {
            std::thread::sleep(d);
        }
        let pause = lock(&self.pause).take();
        if let Some((started, resume)) = pause {
            let _ = started.send(pages.get(reqpage).map_or(u64::MAX, PageSlot::pindex));
            let _ = resume.recv_timeout(Duration::from_secs(30));
        }
        let injected = lock(&self.script).pop_front();
        if let Some(Injected::Fail(e)) = injected {
            return Err(e);
        }
        if injected == Some(Injected::Nonsense) {
            return Ok(());
        }
        let always = *lock(&self.valid_mask);
        let store = lock(&self.store);
        let wanted = pages.get(reqpage).map(PageSlot::pindex);
        if wanted.is_none_or(|p| !store.contains_key(&p)) {
            return Err(PagerError::Fail);
        }
        for slot in pages.iter_mut() {
            let Some(src) = store.get(&slot.pindex()) else {
                continue;
            };
            slot.write(0, src);
            match (injected, always) {
                (Some(Injected::Partial(mask)), _) | (_, Some(mask)) => slot.set_valid(mask),
                _ => slot.set_all_valid(),
            }
        }
        Ok(())
    }

    fn page_unswapped(&self, pindex: u64) {
        lock(&self.unswapped).push(pindex);
    }

    fn put_pages(&self, pages: &[vm_core::PageOut<'_>]) -> Result<(), PagerError> {
        lock(&self.puts).push(pages.iter().map(vm_core::PageOut::pindex).collect());
        let next = lock(&self.script).front().copied();
        if let Some(Injected::Fail(e)) = next {
            lock(&self.script).pop_front();
            return Err(e);
        }
        for p in pages {
            let mut data = vec![0u8; PAGE_SIZE as usize];
            p.read(0, &mut data);
            self.put(p.pindex(), &data);
        }
        Ok(())
    }
}

impl MemPager {
    /// An I/O error value for injections.
    #[must_use]
    pub fn io_error() -> PagerError {
        PagerError::Error(IoError {
            code: 5,
            context: "injected read error",
        })
    }
}
