//! The page array and its queues: free-page allocation, active/inactive
//! accounting and the free-page thresholds (FreeBSD `vm_page.c`,
//! `vm_pageq.c`).
//!
//! Free pages sit on intrusive doubly linked lists (the links live in the
//! free page's `pindex`), split over shards with a lock each, so allocation
//! needs no heap and no machine-wide lock, and a given free frame can be
//! taken off its list by its id (`Pages::alloc_at`). Each shard counts
//! its free pages of each aligned 2 MiB run of frames, and a run's word
//! says which shards hold their whole share of it, so a wholly free run
//! can be found and claimed for a superpage reservation
//! (`Pages::claim_run`) without a per-page write to a shared word. A
//! claimed run's free frames leave the lists and are *held* by the run
//! (FreeBSD `vm_reserv`'s population map): a bit per frame, so a fault
//! takes its reserved frame with one atomic operation on the run's own
//! cache line, no list and no shard lock; they count as free, and an
//! allocation of any frame that finds the lists empty releases a held
//! run back onto them (FreeBSD breaks reservations the same way). Each
//! shard keeps known-zero pages apart so a zero-fill fault can skip the
//! zeroing (`v_ozfod`). Active and inactive are queue bits on the page
//! plus counters: the pageout scan walks the array
//! like a clock hand instead of following linked lists.

use crate::addr::Pfn;
use crate::mem_attr::MemAttr;
use crate::page::{PageFlags, PageId, PageQueue, VmPage};
use crate::sync::{BatchedCount, ShardedCount};
use crate::sync::{Mutex, MutexGuard, WaitTable};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const NIL: u32 = u32::MAX;
const SHARDS: usize = 16;
/// Frames in an aligned run: a 2 MiB superpage's worth (FreeBSD
/// `VM_LEVEL_0_NPAGES`).
pub(crate) const RUN_PAGES: u64 = crate::addr::SUPERPAGE_PAGES;
/// Runs [`Pages::claim_run`] looks at, at most, per claim.
const CLAIM_SCAN: u32 = 64;
/// Recently whole runs [`Pages::claim_run`] tries before it scans (a
/// power of two). With 16, a region of more than 32 MiB freed and faulted
/// again got only 16 of its runs back and swept memory for the rest: on a
/// host-mapped machine the sweep's untouched runs cost a host fault per
/// page (64 MiB zero-fill samples 50-90 ms instead of 17, some of 256 MiB
/// over 400 ms instead of 72). FreeBSD's buddy lists likewise hand back
/// the 2 MiB blocks freed last first.
const RECENT_RUNS: usize = 256;
/// No run: a reservation that found no wholly free run.
pub(crate) const NO_RUN: u32 = u32::MAX;
/// A run's word: bit `s` set while shard `s` holds all of its share of
/// the run free on its lists; and the run's state bits below.
///
/// The run's free frames are off the lists, held in its [`RunBits`]
/// (set from a claim until a release).
const RUN_HELD: u32 = 1 << 31;
/// A reservation took the run and may still be filling it: no other claim
/// is given it (cleared when the run is wholly free again).
const RUN_OWNED: u32 = 1 << 30;
/// A frame not known to be zero went back to the held run since the
/// zeroer last looked (a hint: set on such a free, cleared by the
/// zeroer's look and by a release; never set on a run not held).
const RUN_PLAIN: u32 = 1 << 28;
/// Words of a run's [`RunBits`].
const RUN_WORDS: usize = RUN_PAGES as usize / 64;
/// Every shard's share free: the run is wholly free.
const RUN_WHOLE: u32 = (1 << SHARDS) - 1;
/// Pages of a run on one shard's lists.
const SHARE: u8 = (RUN_PAGES / SHARDS as u64) as u8;
/// Wait-table key of "free memory appeared".
const MEMORY_KEY: u64 = u64::MAX;

/// Who is allocating: ordinary allocations leave the reserve alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocClass {
    /// Page faults and object pages (`VM_ALLOC_NORMAL`).
    Normal,
    /// Page-table pages and other system needs; may use the reserve
    /// (`VM_ALLOC_SYSTEM`).
    System,
}

/// Free-page thresholds, in pages (FreeBSD `v_free_reserved`,
/// `v_free_severe`, `v_free_target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Only [`AllocClass::System`] allocations may go below this.
    pub reserved: u64,
    /// Below this a fault waits for the pageout daemon instead of
    /// allocating (`vm_page_count_severe`).
    pub severe: u64,
    /// The pageout daemon works until this many pages are free.
    pub target: u64,
}

impl Thresholds {
    /// Defaults scaled to memory size, in the proportions FreeBSD uses.
    #[must_use]
    pub fn for_frames(frames: u64) -> Thresholds {
        let reserved = frames / 1024;
        let severe = reserved + frames / 512;
        Thresholds {
            reserved,
            severe,
            target: severe * 3,
        }
    }
}

#[derive(Debug)]
struct FreeShard {
    zeroed: u32,
    plain: u32,
    /// This shard's free pages of each run (its share of a run is
    /// `RUN_PAGES / SHARDS` pages: ids of one residue modulo `SHARDS`), 64
    /// runs to a line of its own: the shards' counts written beside each
    /// other would bounce between the threads allocating from them.
    run_free: Box<[crossbeam_utils::CachePadded<[u8; 64]>]>,
}

impl FreeShard {
    fn run_free(&mut self, run: usize) -> &mut u8 {
        &mut self.run_free[run / 64][run % 64]
    }
}

/// The [`Pages::nonempty`] bit of shard `s`'s zeroed or plain list.
fn list_bit(s: usize, zeroed: bool) -> u32 {
    1 << (s + if zeroed { 0 } else { SHARDS })
}

/// Which frames of a held run are free in it: bit `i` *clear* while frame
/// `i` of the run is free and held here; set while it is in use or (the
/// run not held) on the lists. Whoever turns a bit from clear to set owns
/// the frame: a fault taking its reserved frame, a release moving it to
/// the lists. One cache line, the run's own.
#[repr(align(64))]
struct RunBits([AtomicU64; RUN_WORDS]);

impl Default for RunBits {
    fn default() -> Self {
        RunBits(core::array::from_fn(|_| AtomicU64::new(u64::MAX)))
    }
}

/// Free-page counts and the count of threads waiting for free memory.
/// The counts are batched per thread: a fault compares the free count with
/// its thresholds, and every allocation and free changes it, so one shared
/// word would move between the CPUs at every fault.
#[derive(Debug, Default)]
struct FreeCounts {
    free: BatchedCount,
    free_zeroed: BatchedCount,
    mem_waiters: AtomicU32,
}

/// The page array plus queues.
pub(crate) struct Pages {
    pages: Box<[VmPage]>,
    base_pfn: u64,
    /// The free lists, each on a cache line of its own (four unpadded
    /// shards share one, and their threads would bounce it).
    shards: Box<[crossbeam_utils::CachePadded<Mutex<FreeShard>>]>,
    /// The free counts (each on cache lines of its own).
    counts: FreeCounts,
    active: ShardedCount,
    inactive: ShardedCount,
    wired: ShardedCount,
    waits: WaitTable,
    pub(crate) thresholds: Thresholds,
    /// Records for device (fictitious) pages, ids after the RAM pages.
    fict: Box<[VmPage]>,
    /// Frame number | memory attribute << 56 of each fictitious page.
    fict_frame: Box<[AtomicU64]>,
    fict_free: Mutex<Vec<u32>>,
    /// Per aligned run of [`RUN_PAGES`] frames: which shards hold their
    /// whole share of it free, | [`RUN_CLAIMED`]. Changed only when a
    /// shard's share becomes whole or stops being so (not per page: two
    /// threads allocating from one run would bounce a per-page count).
    /// Runs that memory covers only in part are never whole.
    runs: Box<[AtomicU32]>,
    /// Each run's held frames (see [`RunBits`]).
    held: Box<[RunBits]>,
    /// Where the next release of a held run looks first.
    release_cursor: AtomicU32,
    /// Which lists hold a page: bit `s` shard `s`'s zeroed list, bit
    /// `SHARDS + s` its plain one (changed under the shard's lock when a
    /// list becomes empty or stops being so), so that an allocation does
    /// not lock sixteen shards to find them empty when runs hold the free
    /// memory.
    nonempty: crossbeam_utils::CachePadded<AtomicU32>,
    /// Where the zeroer's next look into held runs starts.
    zero_cursor: AtomicU32,
    /// Held while frames move between the lists and a run in bulk (a
    /// claim from the lists, a release), so that an allocation finding
    /// the lists empty can wait for them instead of failing.
    transit: Mutex<()>,
    /// Where [`claim_run`](Self::claim_run) looks next (it goes down from
    /// the top of memory, away from the low frames the lists hand out
    /// first).
    run_cursor: AtomicU32,
    /// The runs that most recently became wholly free (a ring, newest at
    /// `recent_next - 1`): claimed first, so reservations reuse frames
    /// just freed (warm in the caches, and backed by the host where
    /// physical memory is a host mapping) rather than sweeping all of
    /// memory. A region of several superpages freed and faulted again
    /// gets all its runs back, not one warm and the rest cold.
    recent: [AtomicU32; RECENT_RUNS],
    /// Counts the runs that became wholly free (each bump after the run's
    /// word says so): a claim that finds it unchanged since a fruitless
    /// look at every run knows no run is whole.
    recent_next: AtomicU32,
    /// `recent_next` when the current sweep began (high half) and
    /// `run_cursor` then (low half): once the cursor has moved past every
    /// run with `recent_next` unchanged, every run was looked at and
    /// none was claimable, and claims fail at once until a run becomes
    /// whole (a sparse space's faults, one per 2 MiB, with memory that
    /// has no whole run left, scanned `CLAIM_SCAN` runs each).
    sweep_from: AtomicU64,
}

const ATTR_SHIFT: u32 = 56;

impl Pages {
    pub(crate) fn new(
        base_pfn: u64,
        frames: u32,
        all_zero: bool,
        thresholds: Thresholds,
        fictitious: u32,
    ) -> Pages {
        let pages: Box<[VmPage]> = (0..frames)
            .map(|_| VmPage::default())
            .collect::<Vec<_>>()
            .into();
        let n_runs = Self::runs_for(base_pfn, frames) as usize;
        let shards = (0..SHARDS)
            .map(|_| {
                crossbeam_utils::CachePadded::new(Mutex::new(FreeShard {
                    zeroed: NIL,
                    plain: NIL,
                    run_free: (0..n_runs.div_ceil(64))
                        .map(|_| crossbeam_utils::CachePadded::new([0; 64]))
                        .collect(),
                }))
            })
            .collect::<Vec<_>>()
            .into();
        let this = Pages {
            pages,
            base_pfn,
            shards,
            counts: FreeCounts::default(),
            active: ShardedCount::default(),
            inactive: ShardedCount::default(),
            wired: ShardedCount::default(),
            waits: WaitTable::default(),
            thresholds,
            fict: (0..fictitious)
                .map(|_| VmPage::default())
                .collect::<Vec<_>>()
                .into(),
            fict_frame: (0..fictitious)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into(),
            fict_free: Mutex::new((0..fictitious).rev().collect()),
            runs: (0..n_runs)
                .map(|_| AtomicU32::new(0))
                .collect::<Vec<_>>()
                .into(),
            held: (0..n_runs).map(|_| RunBits::default()).collect(),
            release_cursor: AtomicU32::new(0),
            zero_cursor: AtomicU32::new(0),
            nonempty: crossbeam_utils::CachePadded::new(AtomicU32::new(0)),
            transit: Mutex::new(()),
            run_cursor: AtomicU32::new(0),
            recent: core::array::from_fn(|_| AtomicU32::new(NO_RUN)),
            recent_next: AtomicU32::new(0),
            sweep_from: AtomicU64::new(0),
        };
        // Push in reverse so low frames are handed out first.
        for i in (0..frames).rev() {
            if all_zero {
                this.pages[i as usize].set_flags(PageFlags::ZERO);
            }
            this.push_free(PageId(i));
        }
        // Nothing is warm yet: claims start from the top, away from the
        // low frames the lists hand out first.
        for slot in &this.recent {
            slot.store(NO_RUN, Ordering::Relaxed);
        }
        this
    }

    pub(crate) fn len(&self) -> u32 {
        self.pages.len() as u32
    }

    /// Aligned runs that frames `base_pfn..base_pfn + frames` touch.
    fn runs_for(base_pfn: u64, frames: u32) -> u64 {
        let end = base_pfn + u64::from(frames);
        end.div_ceil(RUN_PAGES) - base_pfn / RUN_PAGES
    }

    /// The run holding page `id` (RAM only).
    fn run_of(&self, id: PageId) -> usize {
        ((self.base_pfn + u64::from(id.0)) / RUN_PAGES - self.base_pfn / RUN_PAGES) as usize
    }

    /// The first page of run `run`, if memory holds the whole run.
    pub(crate) fn run_first(&self, run: u32) -> Option<PageId> {
        let pfn = (self.base_pfn / RUN_PAGES + u64::from(run)) * RUN_PAGES;
        let id = pfn.checked_sub(self.base_pfn)?;
        (id + RUN_PAGES <= self.pages.len() as u64).then_some(PageId(id as u32))
    }

    /// Counts page `id` onto (`true`) or off its run's free pages in
    /// `shard` (its lock held). A run whole again is free to be claimed
    /// again.
    fn run_count(&self, shard: &mut FreeShard, id: PageId, freed: bool) {
        let r = self.run_of(id);
        let bit = 1 << (id.0 as usize % SHARDS);
        let c = shard.run_free(r);
        if freed {
            *c += 1;
            if *c == SHARE {
                let old = self.runs[r].fetch_or(bit, Ordering::AcqRel);
                if (old | bit) & RUN_WHOLE == RUN_WHOLE {
                    self.note_whole(r);
                }
            }
        } else {
            if *c == SHARE {
                self.runs[r].fetch_and(!bit, Ordering::AcqRel);
            }
            *c -= 1;
        }
    }

    /// Remembers run `r` as just become wholly free (see `recent`).
    fn note_whole(&self, r: usize) {
        // Release: a claim that sees the count see the run whole too.
        let slot = self.recent_next.fetch_add(1, Ordering::Release);
        self.recent[slot as usize % RECENT_RUNS].store(r as u32, Ordering::Relaxed);
    }

    /// Claims a wholly free run no reservation owns, for a reservation:
    /// one whose frames are all on the lists (they leave them, held by
    /// the run; see [`RunBits`]) or one held already whose frames all came
    /// back. Looks at no more than [`CLAIM_SCAN`] runs, going down from
    /// where the last look stopped (from the top of memory at first, away
    /// from the low frames the lists hand out first), so a fault pays a
    /// bounded cost when memory is fragmented. `None` if none of those is
    /// whole, and at once when every run was looked at in vain since the
    /// last one became whole (`sweep_from`).
    pub(crate) fn claim_run(&self) -> Option<u32> {
        let n = self.runs.len() as u32;
        if n == 0 {
            return None;
        }
        // Both read before any run is looked at: a run that becomes whole
        // after its look changes `next` (see `note_whole`).
        let next = self.recent_next.load(Ordering::Acquire);
        let cursor = self.run_cursor.load(Ordering::Relaxed);
        if self.swept_in_vain(next, cursor, n) {
            return None;
        }
        let claim = |r: usize| self.claim_held(r) || self.claim_listed(r);
        // Newest first: a stale slot (the run since taken) fails the claim.
        for k in 1..=RECENT_RUNS {
            let warm =
                self.recent[(next as usize).wrapping_sub(k) % RECENT_RUNS].load(Ordering::Relaxed);
            if warm < n && claim(warm as usize) {
                return Some(warm);
            }
        }
        // The cursor only grows (wrapping), so that how far it moved
        // says how many runs were looked at.
        for k in 0..n.min(CLAIM_SCAN) {
            let r = (n - 1 - cursor.wrapping_add(k) % n) as usize;
            if claim(r) {
                self.run_cursor
                    .store(cursor.wrapping_add(k + 1), Ordering::Relaxed);
                return Some(r as u32);
            }
        }
        self.run_cursor
            .store(cursor.wrapping_add(n.min(CLAIM_SCAN)), Ordering::Relaxed);
        None
    }

    /// Whether the claims since `recent_next` last changed have moved
    /// `run_cursor` past all `n` runs (each found not claimable, none
    /// become whole since). Starts a new sweep when it changed.
    fn swept_in_vain(&self, next: u32, cursor: u32, n: u32) -> bool {
        let from = self.sweep_from.load(Ordering::Relaxed);
        if (from >> 32) as u32 != next {
            let from = u64::from(next) << 32 | u64::from(cursor);
            self.sweep_from.store(from, Ordering::Relaxed);
            return false;
        }
        // Signed: a racing claim may have stored an older cursor.
        let moved = cursor.wrapping_sub(from as u32) as i32;
        i64::from(moved) >= i64::from(n)
    }

    /// Claims run `r` if it is held, owned by no reservation and wholly
    /// free in its bits.
    fn claim_held(&self, r: usize) -> bool {
        // Read first: a failing compare-and-swap would still take the
        // line exclusive, and faults on other CPUs scan the same runs.
        let w = self.runs[r].load(Ordering::Relaxed);
        w & (RUN_HELD | RUN_OWNED) == RUN_HELD
            && self.held_whole(r)
            && self.runs[r]
                .compare_exchange(w, w | RUN_OWNED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether every frame of held run `r` is free in it.
    fn held_whole(&self, r: usize) -> bool {
        self.held[r]
            .0
            .iter()
            .all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Claims run `r` if all its frames are on the lists: each comes off
    /// its list into the run's bits (a frame an allocation took meanwhile
    /// stays in use; freed, it comes back to the run). The free counts do
    /// not change: held frames are free. Under the transit lock, so an
    /// allocation that finds the lists empty waits for the frames to land
    /// (see [`alloc`](Self::alloc)).
    fn claim_listed(&self, r: usize) -> bool {
        if self.runs[r].load(Ordering::Relaxed) != RUN_WHOLE {
            return false;
        }
        let _transit = self.transit.lock();
        let claimed = RUN_WHOLE | RUN_HELD | RUN_OWNED;
        if self.runs[r]
            .compare_exchange(RUN_WHOLE, claimed, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let first = self
            .run_first(r as u32)
            .expect("a whole run lies in memory");
        let mut plain = false;
        for s in 0..SHARDS {
            let mut shard = self.shards[(first.0 as usize + s) % SHARDS].lock();
            for j in (s..RUN_PAGES as usize).step_by(SHARDS) {
                let id = PageId(first.0 + j as u32);
                let flags = self.get(id).flags();
                if flags.contains(PageFlags::LISTED) {
                    self.unlink(&mut shard, id);
                    plain |= !flags.contains(PageFlags::ZERO);
                    self.held[r].0[j / 64].fetch_and(!(1 << (j % 64)), Ordering::SeqCst);
                }
            }
        }
        if plain {
            self.hint_plain(r);
        }
        true
    }

    /// The run, word and bit of frame `id` in its run's [`RunBits`].
    fn held_slot(&self, id: PageId) -> (usize, usize, u64) {
        let j = ((self.base_pfn + u64::from(id.0)) % RUN_PAGES) as usize;
        (self.run_of(id), j / 64, 1 << (j % 64))
    }

    /// Takes frame `id` if its run holds it free.
    fn take_held(&self, id: PageId) -> bool {
        let (r, w, bit) = self.held_slot(id);
        self.runs[r].load(Ordering::Acquire) & RUN_HELD != 0
            && self.held[r].0[w].fetch_or(bit, Ordering::SeqCst) & bit == 0
    }

    /// Gives free frame `id` (its record already free) to its run if the
    /// run is held; `false` if it is not (the caller lists the frame).
    fn give_held(&self, id: PageId, zeroed: bool) -> bool {
        let (r, w, bit) = self.held_slot(id);
        if self.runs[r].load(Ordering::SeqCst) & RUN_HELD == 0 {
            return false;
        }
        #[cfg(all(test, feature = "std"))]
        tests::race_point(self, 1, r);
        let old = self.held[r].0[w].fetch_and(!bit, Ordering::SeqCst);
        debug_assert!(old & bit != 0, "frame {} freed twice into its run", id.0);
        #[cfg(all(test, feature = "std"))]
        tests::race_point(self, 2, r);
        if self.runs[r].load(Ordering::SeqCst) & RUN_HELD == 0 {
            // Released meanwhile: the release moved the frame to the
            // lists, or (its bit still clear) it is ours to list. An
            // allocation from the run may have taken it too: then it is
            // in use, and not ours either.
            return self.held[r].0[w].fetch_or(bit, Ordering::SeqCst) & bit != 0;
        }
        // After the bit: a zeroer that clears the hint before it looks
        // either sees the frame or sees the hint set again.
        if !zeroed {
            self.hint_plain(r);
        }
        if old == bit && self.held_whole(r) {
            // Wholly free: the run's reservation (if it lives) has nothing
            // left in it, and another may claim it.
            self.runs[r].fetch_and(!RUN_OWNED, Ordering::AcqRel);
            self.note_whole(r);
        }
        true
    }

    /// Marks held run `r` as given a frame not known to be zero (for the
    /// zeroer); not if the run is no longer held (a stray mark would keep
    /// it from ever being claimed whole from the lists).
    fn hint_plain(&self, r: usize) {
        if self.runs[r].load(Ordering::SeqCst) & (RUN_HELD | RUN_PLAIN) == RUN_HELD {
            let _ = self.runs[r].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w & RUN_HELD != 0).then_some(w | RUN_PLAIN)
            });
        }
    }

    /// Gives up the claim on held run `r` made for a reservation that took
    /// no frame of it (another claim may have it; its frames stay held).
    pub(crate) fn disown(&self, r: u32) {
        if let Some(w) = self.runs.get(r as usize) {
            w.fetch_and(!RUN_OWNED, Ordering::AcqRel);
            self.note_whole(r as usize);
        }
    }

    /// Moves held run `r`'s free frames back to the lists (FreeBSD's
    /// breaking of a reservation): `false` if it is not held. Under the
    /// transit lock (`_transit`): a claim from the lists, which holds it
    /// too, is never half done here.
    fn release_run(&self, _transit: &MutexGuard<'_, ()>, r: usize) -> bool {
        let released = self.runs[r].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
            (w & RUN_HELD != 0).then_some(w & !(RUN_HELD | RUN_OWNED | RUN_PLAIN))
        });
        if released.is_err() {
            return false;
        }
        // Every frame whose bit this turns on is the release's to list.
        let mut was = [0u64; RUN_WORDS];
        for (w, bits) in was.iter_mut().zip(&self.held[r].0) {
            *w = bits.swap(u64::MAX, Ordering::SeqCst);
        }
        let first = self.run_first(r as u32).expect("a held run lies in memory");
        for s in 0..SHARDS {
            let mut shard = None;
            for j in (s..RUN_PAGES as usize).step_by(SHARDS) {
                if was[j / 64] & (1 << (j % 64)) == 0 {
                    let shard = shard
                        .get_or_insert_with(|| self.shards[(first.0 as usize + s) % SHARDS].lock());
                    self.list_push(shard, PageId(first.0 + j as u32));
                }
            }
        }
        true
    }

    /// Releases a held run with free frames in it, looking first for one
    /// no reservation owns (nothing is lost), then breaking one a
    /// reservation still fills. `false` if no held run has a free frame.
    /// Under the transit lock, as [`release_run`](Self::release_run).
    fn release_some(&self, transit: &MutexGuard<'_, ()>) -> bool {
        let n = self.runs.len();
        let start = self.release_cursor.load(Ordering::Relaxed) as usize;
        for pass in [RUN_OWNED, 0] {
            for k in 0..n {
                let r = (start + k) % n;
                let w = self.runs[r].load(Ordering::Relaxed);
                if w & (RUN_HELD | pass) == RUN_HELD
                    && self.held[r]
                        .0
                        .iter()
                        .any(|b| b.load(Ordering::Relaxed) != u64::MAX)
                    && self.release_run(transit, r)
                {
                    self.release_cursor.store((r + 1) as u32, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }

    pub(crate) fn get(&self, id: PageId) -> &VmPage {
        match self.fict_index(id) {
            None => &self.pages[id.0 as usize],
            Some(i) => &self.fict[i],
        }
    }

    pub(crate) fn pfn(&self, id: PageId) -> Pfn {
        match self.fict_index(id) {
            None => Pfn(self.base_pfn + u64::from(id.0)),
            Some(i) => Pfn(self.fict_frame[i].load(Ordering::Acquire) & ((1 << ATTR_SHIFT) - 1)),
        }
    }

    /// The memory attribute to map page `id` with.
    pub(crate) fn attr(&self, id: PageId) -> MemAttr {
        match self.fict_index(id) {
            None => MemAttr::WriteBack,
            Some(i) => MemAttr::from_index(
                (self.fict_frame[i].load(Ordering::Acquire) >> ATTR_SHIFT) as u8,
            ),
        }
    }

    /// The slot of a fictitious page, `None` for RAM.
    fn fict_index(&self, id: PageId) -> Option<usize> {
        (id.0 as usize).checked_sub(self.pages.len())
    }

    /// A fictitious page for device frame `pfn` (FreeBSD
    /// `vm_page_getfake`): unmanaged, wholly valid, on no queue, not
    /// counted as RAM. `None` when every record is in use.
    pub(crate) fn alloc_fictitious(&self, pfn: Pfn, attr: MemAttr) -> Option<PageId> {
        let i = self.fict_free.lock().pop()?;
        self.fict_frame[i as usize].store(
            pfn.0 | (u64::from(attr.index()) << ATTR_SHIFT),
            Ordering::Release,
        );
        let page = &self.fict[i as usize];
        page.reset_free(PageFlags::empty());
        page.set_queue(PageQueue::None);
        page.set_flags(PageFlags::FICTITIOUS | PageFlags::UNMANAGED);
        page.set_valid(crate::page::VM_PAGE_BITS_ALL);
        Some(PageId(self.pages.len() as u32 + i))
    }

    pub(crate) fn id_of(&self, pfn: Pfn) -> Option<PageId> {
        let i = pfn.0.checked_sub(self.base_pfn)?;
        (i < self.pages.len() as u64).then_some(PageId(i as u32))
    }

    /// Free pages (exact at rest; it reads every thread's share, so the
    /// fault path asks [`free_at_least`](Self::free_at_least) instead).
    pub(crate) fn free_count(&self) -> u64 {
        self.counts.free.exact()
    }

    /// Free pages known to be zero (as [`free_count`](Self::free_count)).
    pub(crate) fn free_zeroed_count(&self) -> u64 {
        self.counts.free_zeroed.exact()
    }

    /// Whether at least `n` pages are free: cheap unless the free count
    /// is near `n`.
    pub(crate) fn free_at_least(&self, n: u64) -> bool {
        self.counts.free.at_least(n)
    }

    pub(crate) fn queue_count(&self, q: PageQueue) -> u64 {
        match q {
            PageQueue::Free => self.free_count(),
            PageQueue::Active => self.active.get(),
            PageQueue::Inactive => self.inactive.get(),
            PageQueue::None => 0,
        }
    }

    pub(crate) fn wired_count(&self) -> u64 {
        self.wired.get()
    }

    /// FreeBSD `vm_page_count_severe`.
    pub(crate) fn count_severe(&self) -> bool {
        !self.free_at_least(self.thresholds.severe.max(1))
    }

    fn push_free(&self, id: PageId) {
        let page = self.get(id);
        let zeroed = page.flags().contains(PageFlags::ZERO);
        // One atomic step to Free, counting out whatever queue a racing
        // requeue left the page on.
        self.uncount(page.reset_free(PageFlags::ZERO));
        // Counted in before anyone can take it (and count it out).
        self.count_taken(-1, -i64::from(zeroed));
        self.place_free(id, zeroed);
    }

    /// Puts free page `id` (its record free, counted) where it belongs:
    /// into its run if the run is held, else on its list.
    fn place_free(&self, id: PageId, zeroed: bool) {
        if !self.give_held(id, zeroed) {
            let mut shard = self.shards[id.0 as usize % SHARDS].lock();
            self.list_push(&mut shard, id);
        }
    }

    /// Puts free page `id` (its record free, counted) at the head of its
    /// list in `shard` (its lock held).
    fn list_push(&self, shard: &mut FreeShard, id: PageId) {
        let page = self.get(id);
        let head = if page.flags().contains(PageFlags::ZERO) {
            &mut shard.zeroed
        } else {
            &mut shard.plain
        };
        page.set_free_links(*head, NIL);
        if *head == NIL {
            let bit = list_bit(
                id.0 as usize % SHARDS,
                page.flags().contains(PageFlags::ZERO),
            );
            self.nonempty.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.set_prev(PageId(*head), id.0);
        }
        *head = id.0;
        page.set_flags(PageFlags::LISTED);
        self.run_count(shard, id, true);
    }

    /// Allocates a free page, preferring a known-zero one when `zero` (the
    /// seed's `VM_ALLOC_ZERO`) and a plain one otherwise, to save zeroed
    /// pages for those who can use them. `hint` spreads concurrent callers
    /// over the shards. The page comes back off every queue, not busy, with
    /// only `ZERO` possibly set.
    pub(crate) fn alloc(&self, hint: u64, class: AllocClass, zero: bool) -> Option<PageId> {
        if !self.free_at_least(self.floor(class) + 1) {
            return None;
        }
        // First the kind asked for, on any shard (skipped when the counts
        // say there is none), then whatever is there.
        let preferred_exists = if zero {
            self.counts.free_zeroed.at_least(1)
        } else {
            self.plain_exists()
        };
        let passes: &[Option<bool>] = if preferred_exists {
            &[Some(zero), None]
        } else {
            &[None]
        };
        let pop = || {
            passes
                .iter()
                .find_map(|&kind| self.pop_any(hint, kind, zero))
        };
        if let Some(id) = pop() {
            return Some(id);
        }
        // The lists empty, the free frames are held by runs, or on their
        // way between a run and the lists (a claim or a release holds the
        // transit lock meanwhile): wait for those to land, then release
        // runs until one of their frames is ours.
        let transit = self.transit.lock();
        loop {
            if let Some(id) = pop() {
                return Some(id);
            }
            if !self.release_some(&transit) {
                return None;
            }
        }
    }

    /// Free pages not known to be zero, for the zeroer, into `out` (as
    /// many as fit; returns how many): from the lists, then from held runs
    /// that were given such frames, a run at a time from where the last
    /// look stopped. Never below the reserve, and never releases a run.
    pub(crate) fn take_plain(&self, hint: u64, out: &mut [PageId]) -> usize {
        let floor = self.floor(AllocClass::Normal) + 1;
        let mut n = 0;
        while n < out.len() && self.free_at_least(floor) {
            let Some(id) = self.pop_any(hint + n as u64, Some(false), false) else {
                break;
            };
            out[n] = id;
            n += 1;
        }
        let runs = self.runs.len();
        let start = self.zero_cursor.load(Ordering::Relaxed) as usize;
        for k in 0..runs {
            if n == out.len() {
                break;
            }
            let r = (start + k) % runs;
            if self.runs[r].load(Ordering::Relaxed) & (RUN_HELD | RUN_PLAIN) != RUN_HELD | RUN_PLAIN
            {
                continue;
            }
            // Cleared before the look, so a frame given meanwhile sets it
            // again; set again if the look stops early.
            self.runs[r].fetch_and(!RUN_PLAIN, Ordering::SeqCst);
            let (got, whole_look) = self.take_plain_held(r, &mut out[n..], floor);
            n += got;
            if !whole_look {
                // Plain frames may be left (the batch filled, or the
                // reserve stopped the look): keep the hint, start here.
                self.hint_plain(r);
                self.zero_cursor.store(r as u32, Ordering::Relaxed);
                break;
            }
        }
        n
    }

    /// Takes free frames of held run `r` not known to be zero into `out`,
    /// while at least `floor` pages are free; returns how many, and
    /// whether it looked at every frame of the run (not stopped by a full
    /// `out` or by the floor).
    fn take_plain_held(&self, r: usize, out: &mut [PageId], floor: u64) -> (usize, bool) {
        let Some(first) = self.run_first(r as u32) else {
            return (0, true);
        };
        let mut n = 0;
        for (w, bits) in self.held[r].0.iter().enumerate() {
            let mut free = !bits.load(Ordering::SeqCst);
            while free != 0 {
                let j = w * 64 + free.trailing_zeros() as usize;
                free &= free - 1;
                let id = PageId(first.0 + j as u32);
                if self.get(id).flags().contains(PageFlags::ZERO) {
                    continue;
                }
                if n == out.len() || !self.free_at_least(floor) {
                    return (n, false);
                }
                if self.take_held(id) {
                    self.taken(id, self.get(id).flags().contains(PageFlags::ZERO));
                    out[n] = id;
                    n += 1;
                }
            }
        }
        (n, true)
    }

    /// Pops a free page of `kind` (zeroed or not; `None`: either, trying
    /// `zero_first` first) from the first shard that has one, from `hint`.
    fn pop_any(&self, hint: u64, kind: Option<bool>, zero_first: bool) -> Option<PageId> {
        let order: &[bool] = match kind {
            Some(k) => {
                if k {
                    &[true]
                } else {
                    &[false]
                }
            }
            None => {
                if zero_first {
                    &[true, false]
                } else {
                    &[false, true]
                }
            }
        };
        let start = (hint as usize) % SHARDS;
        for k in 0..SHARDS {
            let s = (start + k) % SHARDS;
            // Shards with nothing of the kind are not locked (a list that
            // filled since the look is found by the caller's next look).
            let want: u32 = order.iter().map(|&z| list_bit(s, z)).sum();
            if self.nonempty.load(Ordering::Relaxed) & want == 0 {
                continue;
            }
            let mut shard = self.shards[s].lock();
            for &want_zero in order {
                let head = if want_zero {
                    &mut shard.zeroed
                } else {
                    &mut shard.plain
                };
                if *head == NIL {
                    continue;
                }
                let id = PageId(*head);
                self.unlink(&mut shard, id);
                drop(shard);
                self.taken(id, want_zero);
                return Some(id);
            }
        }
        None
    }

    /// Allocates free page `id` itself, if it is free (held by its run, or
    /// on its list) and the free count allows `class` an allocation: a
    /// frame of a reservation.
    pub(crate) fn alloc_at(&self, id: PageId, class: AllocClass) -> Option<PageId> {
        if id.0 as usize >= self.pages.len() || !self.free_at_least(self.floor(class) + 1) {
            return None;
        }
        let page = self.get(id);
        if self.take_held(id) {
            self.taken(id, page.flags().contains(PageFlags::ZERO));
            return Some(id);
        }
        let mut shard = self.shards[id.0 as usize % SHARDS].lock();
        // Set and cleared under this lock: a page on its way onto the
        // list (marked free, not linked yet) is not taken.
        if !page.flags().contains(PageFlags::LISTED) {
            return None;
        }
        let zeroed = page.flags().contains(PageFlags::ZERO);
        self.unlink(&mut shard, id);
        drop(shard);
        self.taken(id, zeroed);
        Some(id)
    }

    /// Takes every page of the run from `first` but the one at offset
    /// `skip` (taken already) off the free lists, as [`alloc_at`] would
    /// one by one, but a shard's share under one hold of its lock and the
    /// counts settled once per shard. All or none: `false`, with nothing
    /// taken, if one of them is not free or the free count would go
    /// below `class`'s floor.
    ///
    /// [`alloc_at`]: Self::alloc_at
    pub(crate) fn alloc_run_rest(&self, first: PageId, skip: u64, class: AllocClass) -> bool {
        let want = RUN_PAGES - 1;
        if u64::from(first.0) + RUN_PAGES > self.pages.len() as u64
            || !self.free_at_least(self.floor(class) + want)
        {
            return false;
        }
        let r = self.run_of(first);
        if self.runs[r].load(Ordering::Acquire) & RUN_HELD != 0 {
            return self.take_held_rest(first, skip);
        }
        // The run's pages on shard `first + s`'s lists: offsets `s`,
        // `s + SHARDS`, ...
        let share = move |s: usize| {
            (s as u64..RUN_PAGES)
                .step_by(SHARDS)
                .filter(move |&j| j != skip)
                .map(move |j| PageId(first.0 + j as u32))
        };
        for s in 0..SHARDS {
            let mut shard = self.shards[(first.0 as usize + s) % SHARDS].lock();
            if !share(s).all(|id| self.get(id).flags().contains(PageFlags::LISTED)) {
                drop(shard);
                for id in (0..s).flat_map(share) {
                    self.free(id);
                }
                return false;
            }
            let (mut taken, mut zeroed) = (0, 0);
            for id in share(s) {
                zeroed += i64::from(self.get(id).flags().contains(PageFlags::ZERO));
                taken += 1;
                self.unlink(&mut shard, id);
            }
            drop(shard);
            self.count_taken(taken, zeroed);
            share(s).for_each(|id| self.hand_out(id));
        }
        true
    }

    /// [`alloc_run_rest`](Self::alloc_run_rest) from a held run: each
    /// word's free frames taken at once, all or none.
    fn take_held_rest(&self, first: PageId, skip: u64) -> bool {
        let r = self.run_of(first);
        let skip = (skip as usize / 64, 1u64 << (skip % 64));
        let mine = |w: usize| if w == skip.0 { !skip.1 } else { u64::MAX };
        for w in 0..RUN_WORDS {
            // The skipped frame's bit is set (the caller has it); every
            // other bit must be clear.
            let expect = if w == skip.0 { skip.1 } else { 0 };
            if self.held[r].0[w]
                .compare_exchange(expect, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // Give back what this took, as frees do (a release may
                // have come between).
                for j in (0..w * 64).filter(|&j| mine(j / 64) & (1 << (j % 64)) != 0) {
                    let id = PageId(first.0 + j as u32);
                    self.place_free(id, self.get(id).flags().contains(PageFlags::ZERO));
                }
                return false;
            }
        }
        let ids = (0..RUN_PAGES as usize)
            .filter(|&j| mine(j / 64) & (1 << (j % 64)) != 0)
            .map(|j| PageId(first.0 + j as u32));
        let zeroed = ids
            .clone()
            .filter(|&id| self.get(id).flags().contains(PageFlags::ZERO))
            .count();
        self.count_taken(RUN_PAGES as i64 - 1, zeroed as i64);
        ids.for_each(|id| self.hand_out(id));
        true
    }

    /// The free count `class` may not allocate below.
    fn floor(&self, class: AllocClass) -> u64 {
        match class {
            AllocClass::Normal => self.thresholds.reserved,
            AllocClass::System => 0,
        }
    }

    /// Takes listed page `id` off its list in `shard` (the zeroed list if
    /// it is a known-zero page, the plain one otherwise).
    fn unlink(&self, shard: &mut FreeShard, id: PageId) {
        let page = self.get(id);
        let (next, prev) = page.free_links();
        if prev == NIL && next == NIL {
            let bit = list_bit(
                id.0 as usize % SHARDS,
                page.flags().contains(PageFlags::ZERO),
            );
            self.nonempty.fetch_and(!bit, Ordering::Relaxed);
        }
        if prev == NIL {
            if page.flags().contains(PageFlags::ZERO) {
                shard.zeroed = next;
            } else {
                shard.plain = next;
            }
        } else {
            let p = self.get(PageId(prev));
            p.set_free_links(next, p.free_links().1);
        }
        if next != NIL {
            self.set_prev(PageId(next), prev);
        }
        page.clear_flags(PageFlags::LISTED);
        self.run_count(shard, id, false);
    }

    /// Sets listed page `id`'s previous link; under its shard's lock.
    fn set_prev(&self, id: PageId, prev: u32) {
        let page = self.get(id);
        page.set_free_links(page.free_links().0, prev);
    }

    /// Settles the counts for page `id`, just taken off a list, and hands
    /// it out: off every queue, in no object.
    fn taken(&self, id: PageId, zeroed: bool) {
        self.count_taken(1, i64::from(zeroed));
        self.hand_out(id);
    }

    /// Counts `taken` pages off the free count, `zeroed` of them off the
    /// zeroed count (negative: onto them).
    fn count_taken(&self, taken: i64, zeroed: i64) {
        self.counts.free.add(-taken);
        self.counts.free_zeroed.add(-zeroed);
    }

    /// Whether some free page is not known zero: from the shared totals
    /// unless they are too close to tell.
    fn plain_exists(&self) -> bool {
        let (free, zeroed) = (&self.counts.free, &self.counts.free_zeroed);
        if free.approx() > zeroed.approx() + 2 * BatchedCount::SLACK {
            return true;
        }
        free.exact() > zeroed.exact()
    }

    /// Page `id`, just taken off a list, as it is handed out: off every
    /// queue, in no object.
    fn hand_out(&self, id: PageId) {
        let page = self.get(id);
        page.set_queue(PageQueue::None);
        page.set_identity(crate::page::NO_OBJECT, 0);
    }

    /// Frees a page: the caller has removed it from its object and from
    /// every pmap. A page still wired or held is freed by its last unwire
    /// or release instead (FreeBSD's `PQ_HOLD` and wired-page rules): the
    /// owner marks it pending, and whoever next sees it neither wired nor
    /// held takes the mark and frees it. So a wiring or a hold that
    /// outlives the page's object (a wired entry over a truncated file, a
    /// pinned page whose mapping went) keeps the frame out of reuse.
    pub(crate) fn free(&self, id: PageId) {
        if let Some(i) = self.fict_index(id) {
            self.fict[i].reset_free(PageFlags::empty());
            self.fict[i].set_queue(PageQueue::None);
            self.fict_free.lock().push(i as u32);
            return;
        }
        self.dequeue(id);
        let page = self.get(id);
        page.set_free_pending();
        if page.unreferenced() {
            self.release_pending(id);
        }
    }

    /// Frees page `id` if its free is pending and this caller takes it.
    fn release_pending(&self, id: PageId) {
        if self.get(id).claim_pending_free() {
            self.push_free(id);
            if self.counts.mem_waiters.load(Ordering::Acquire) != 0 {
                self.waits().notify(MEMORY_KEY);
            }
        }
    }

    /// Whether the page's owner has freed it (it waits for its last
    /// wiring or hold).
    pub(crate) fn free_pending(&self, id: PageId) -> bool {
        self.get(id).flags().contains(PageFlags::FREE_PENDING)
    }

    /// Holds a page (FreeBSD `vm_page_hold`): it is not freed until
    /// [`unhold`](Self::unhold).
    pub(crate) fn hold(&self, id: PageId) {
        self.get(id).hold_inc();
    }

    /// Releases a hold (`vm_page_unhold`), freeing the page if it was freed
    /// while held.
    pub(crate) fn unhold(&self, id: PageId) {
        let page = self.get(id);
        if page.hold_dec() == 1 && page.unreferenced() {
            self.release_pending(id);
        }
    }

    /// The machine's wait table: sleepers on busy pages and on memory.
    pub(crate) fn waits(&self) -> &WaitTable {
        &self.waits
    }

    /// Unbusies page `id` and wakes whoever sleeps on it
    /// (`vm_page_wakeup`).
    pub(crate) fn wake(&self, id: PageId) {
        self.get(id).wake(self.waits(), u64::from(id.0));
    }

    /// Sleeps until page `id` is no longer busy or no longer the page at
    /// (`object`, `pindex`) (`vm_page_sleep_if_busy`, seed L389-394).
    pub(crate) fn wait_for_page(&self, id: PageId, object: u64, pindex: u64) {
        self.get(id)
            .sleep_while_busy(self.waits(), u64::from(id.0), object, pindex);
    }

    /// Sleeps until free memory is above the severe mark or `ms` elapse
    /// (FreeBSD `VM_WAITPFAULT`). Returns whether memory is now available.
    pub(crate) fn wait_for_memory(&self, ms: u64) -> bool {
        self.counts.mem_waiters.fetch_add(1, Ordering::AcqRel);
        self.waits()
            .wait_timeout(MEMORY_KEY, || self.count_severe(), ms);
        self.counts.mem_waiters.fetch_sub(1, Ordering::AcqRel);
        !self.count_severe()
    }

    /// Takes a page off whatever queue it is on.
    pub(crate) fn dequeue(&self, id: PageId) {
        if self.fict_index(id).is_some() {
            return;
        }
        self.uncount(self.get(id).set_queue(PageQueue::None));
    }

    /// Settles the counts for a page that left queue `q`.
    fn uncount(&self, q: PageQueue) {
        match q {
            PageQueue::Active => self.active.add(-1),
            PageQueue::Inactive => self.inactive.add(-1),
            _ => {}
        }
    }

    /// Puts an in-use page on queue `q`. The page's queue bits are the one
    /// record of where it is, changed only by atomic transitions whose
    /// caller settles the counts of the queue left and the queue joined:
    /// a page that is free (or whose free is pending) is never requeued,
    /// and one wired meanwhile is taken off again.
    fn enqueue(&self, id: PageId, q: PageQueue) {
        // Device pages are on no queue (FreeBSD's queue calls ignore
        // fictitious pages).
        if self.fict_index(id).is_some() {
            return;
        }
        let page = self.get(id);
        if page.wire_count() != 0 {
            return;
        }
        let Some(old) = page.requeue(q) else {
            return;
        };
        if old == q {
            return;
        }
        self.uncount(old);
        match q {
            PageQueue::Active => self.active.add(1),
            PageQueue::Inactive => self.inactive.add(1),
            _ => {}
        }
        // A wiring that raced this requeue has dequeued before we queued,
        // or we see its count now: a wired page never stays on a queue.
        if page.wire_count() != 0 {
            self.dequeue(id);
        }
    }

    /// FreeBSD `vm_page_activate`: onto the active queue unless wired.
    pub(crate) fn activate(&self, id: PageId) {
        self.enqueue(id, PageQueue::Active);
    }

    /// FreeBSD `vm_page_deactivate`: onto the inactive queue unless wired.
    pub(crate) fn deactivate(&self, id: PageId) {
        self.enqueue(id, PageQueue::Inactive);
    }

    /// FreeBSD `vm_page_wire`: the first wiring takes the page off its queue.
    pub(crate) fn wire(&self, id: PageId) {
        if self.fict_index(id).is_some() {
            return;
        }
        if self.get(id).wire_inc() == 0 {
            self.dequeue(id);
            self.wired.add(1);
        }
    }

    /// FreeBSD `vm_page_unwire(m, activate)`: the last unwiring puts the
    /// page on the active (or inactive) queue, or frees it if its owner
    /// freed it meanwhile. Unwiring an unwired page is ignored and reported
    /// as false.
    pub(crate) fn unwire(&self, id: PageId, activate: bool) -> bool {
        if self.fict_index(id).is_some() {
            return false;
        }
        match self.get(id).wire_dec() {
            None => false,
            Some(1) => {
                self.wired.add(-1);
                if self.free_pending(id) {
                    if self.get(id).unreferenced() {
                        self.release_pending(id);
                    }
                } else if activate {
                    self.activate(id);
                } else {
                    self.deactivate(id);
                }
                true
            }
            Some(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step another thread might take (here, on a run).
    type Step = fn(&Pages, usize);

    #[cfg(feature = "std")]
    std::thread_local! {
        /// A step to run inside `give_held` at a numbered point, once.
        static RACE: core::cell::Cell<Option<(u8, Step)>> =
            const { core::cell::Cell::new(None) };
    }

    /// Runs the step set for point `at`, if any (on this thread, as if
    /// another thread's step fell there).
    #[cfg(feature = "std")]
    pub(super) fn race_point(p: &Pages, at: u8, run: usize) {
        if let Some((point, step)) = RACE.with(core::cell::Cell::get)
            && point == at
        {
            RACE.with(|c| c.set(None));
            step(p, run);
        }
    }

    /// A release of the run falling just before, then just after, a free
    /// clears the frame's bit: the frame ends on a list exactly once.
    #[cfg(feature = "std")]
    #[test]
    fn a_release_racing_a_free_into_the_run_loses_nothing() {
        for at in [1u8, 2] {
            let p = pages(512, false, 0);
            let r = p.claim_run().unwrap();
            let f = PageId(run_ids(&p, r).start + 70);
            p.alloc_at(f, AllocClass::Normal).unwrap();
            RACE.with(|c| {
                c.set(Some((at, |p: &Pages, r| {
                    assert!(p.release_run(&p.transit.lock(), r));
                })));
            });
            p.free(f);
            assert!(
                RACE.with(core::cell::Cell::get).is_none(),
                "point {at} reached"
            );
            assert!(p.get(f).flags().contains(PageFlags::LISTED), "point {at}");
            assert_eq!(drain(&p).len(), 512, "point {at}");
        }
    }

    fn pages(n: u32, zero: bool, reserved: u64) -> Pages {
        Pages::new(
            0,
            n,
            zero,
            Thresholds {
                reserved,
                severe: reserved + 1,
                target: 0,
            },
            4,
        )
    }

    #[test]
    fn fictitious_pages_live_apart_from_ram() {
        let p = pages(4, true, 0);
        let f = p
            .alloc_fictitious(Pfn(0xfd000), MemAttr::WriteCombining)
            .unwrap();
        assert!(f.0 >= 4);
        assert_eq!(
            (p.pfn(f), p.attr(f)),
            (Pfn(0xfd000), MemAttr::WriteCombining)
        );
        assert!(
            p.get(f)
                .flags()
                .contains(PageFlags::FICTITIOUS | PageFlags::UNMANAGED)
        );
        p.wire(f);
        p.activate(f);
        assert_eq!(
            (
                p.wired_count(),
                p.queue_count(PageQueue::Active),
                p.free_count()
            ),
            (0, 0, 4)
        );
        p.free(f);
        let again: Vec<PageId> = (0..4)
            .map(|_| p.alloc_fictitious(Pfn(1), MemAttr::Uncacheable).unwrap())
            .collect();
        assert!(again.contains(&f));
        assert!(
            p.alloc_fictitious(Pfn(1), MemAttr::Uncacheable).is_none(),
            "all four records in use"
        );
    }

    /// Takes every page the lists give, checking none comes twice.
    fn drain(p: &Pages) -> std::collections::BTreeSet<u32> {
        let mut got = std::collections::BTreeSet::new();
        while let Some(id) = p.alloc(got.len() as u64, AllocClass::System, false) {
            assert!(got.insert(id.0), "page {} handed out twice", id.0);
        }
        got
    }

    #[test]
    fn a_free_page_is_taken_by_its_id_and_the_lists_stay_whole() {
        let p = pages(64, false, 0);
        // Zeroed and plain pages, heads, tails and middles of lists.
        for id in [5u32, 21, 37] {
            p.alloc_at(PageId(id), AllocClass::Normal).unwrap();
            p.get(PageId(id)).set_flags(PageFlags::ZERO);
            p.free(PageId(id));
        }
        assert_eq!((p.free_count(), p.free_zeroed_count()), (64, 3));
        for id in [21u32, 0, 63, 16, 48, 5] {
            assert_eq!(p.alloc_at(PageId(id), AllocClass::Normal), Some(PageId(id)));
            assert_eq!(
                p.alloc_at(PageId(id), AllocClass::Normal),
                None,
                "taken twice"
            );
            assert!(!p.get(PageId(id)).flags().contains(PageFlags::LISTED));
        }
        assert_eq!((p.free_count(), p.free_zeroed_count()), (58, 1));
        assert_eq!(
            p.alloc_at(PageId(64), AllocClass::Normal),
            None,
            "past the end"
        );
        let rest = drain(&p);
        assert_eq!(rest.len(), 58);
        assert!(
            [21u32, 0, 63, 16, 48, 5]
                .iter()
                .all(|id| !rest.contains(id))
        );
        assert_eq!((p.free_count(), p.free_zeroed_count()), (0, 0));
    }

    #[test]
    fn a_whole_run_is_claimed_once_until_it_is_whole_again() {
        // Two whole runs and part of a third (runs are aligned to frames,
        // so memory starting at frame 100 covers 412 frames of the first).
        let p = Pages::new(100, 412 + 2 * 512 + 7, false, Thresholds::for_frames(0), 0);
        let mut claimed = vec![p.claim_run().unwrap(), p.claim_run().unwrap()];
        claimed.sort_unstable();
        assert_eq!(claimed, vec![1, 2], "the partial runs are never whole");
        assert_eq!(p.run_first(0), None);
        assert_eq!(p.run_first(1), Some(PageId(412)));
        assert_eq!(p.claim_run(), None, "both claimed");
        // Taking and giving back a page makes run 1 whole again: claimable.
        let id = p.alloc_at(PageId(412 + 9), AllocClass::Normal).unwrap();
        assert_eq!(p.claim_run(), None);
        p.free(id);
        assert_eq!(p.claim_run(), Some(1));
        assert_eq!(drain(&p).len(), 412 + 2 * 512 + 7);
    }

    #[test]
    fn a_region_of_many_runs_freed_gets_all_its_runs_back() {
        // 48 runs of a 96-run machine taken whole and freed: the next 48
        // claims are exactly those runs (the ring of runs freed last), not
        // 16 of them and the rest from the sweep.
        let p = pages(96 * 512, false, 0);
        let region: Vec<PageId> = (20 * 512..68 * 512).map(PageId).collect();
        for &id in &region {
            assert_eq!(p.alloc_at(id, AllocClass::Normal), Some(id));
        }
        for &id in &region {
            p.free(id);
        }
        let mut back: Vec<u32> = (0..48).map(|_| p.claim_run().unwrap()).collect();
        back.sort_unstable();
        assert_eq!(back, (20..68).collect::<Vec<u32>>());
    }

    #[test]
    fn claims_fail_at_once_after_a_fruitless_sweep_until_a_run_is_whole() {
        // More runs than one claim looks at, none of them whole.
        let runs = 3 * CLAIM_SCAN + 7;
        let p = pages(runs * 512, false, 0);
        let taken: Vec<PageId> = (0..runs)
            .map(|r| p.alloc_at(PageId(r * 512 + 3), AllocClass::Normal).unwrap())
            .collect();
        // Claims that fail until every run was looked at, then claims
        // that fail without looking.
        let sweep = |p: &Pages| {
            for _ in 0..runs.div_ceil(CLAIM_SCAN) {
                assert_eq!(p.claim_run(), None);
            }
            let cursor = p.run_cursor.load(Ordering::Relaxed);
            assert_eq!(p.claim_run(), None);
            assert_eq!(
                p.run_cursor.load(Ordering::Relaxed),
                cursor,
                "every run was looked at: no run is looked at again"
            );
        };
        sweep(&p);
        // A run whole again on the lists: claimable at once.
        p.free(taken[57]);
        assert_eq!(p.claim_run(), Some(57));
        // A held run whole again (the reservation's last frame freed).
        let f = PageId(57 * 512 + 100);
        assert_eq!(p.alloc_at(f, AllocClass::Normal), Some(f));
        sweep(&p);
        p.free(f);
        assert_eq!(p.claim_run(), Some(57));
        // A claim given up (`disown`) leaves the run claimable.
        sweep(&p);
        p.disown(57);
        assert_eq!(p.claim_run(), Some(57));
        for id in taken.into_iter().filter(|id| id.0 / 512 != 57) {
            p.free(id);
        }
        assert_eq!(drain(&p).len(), (runs * 512) as usize);
    }

    #[test]
    fn claims_take_back_the_runs_freed_last_before_any_other() {
        // Eight whole runs; claims start from the top when nothing is warm.
        let p = pages(8 * 512, false, 0);
        assert_eq!(p.claim_run(), Some(7), "nothing warm at start");
        // A region of three superpages (runs 2, 4, 5) taken and freed:
        // all three come back first, newest first, then the sweep goes on.
        let region: Vec<PageId> = [2u32, 4, 5]
            .iter()
            .flat_map(|&r| (r * 512..(r + 1) * 512).map(PageId))
            .collect();
        for &id in &region {
            assert_eq!(p.alloc_at(id, AllocClass::Normal), Some(id));
        }
        for &id in region.iter().rev() {
            p.free(id);
        }
        assert_eq!(
            [p.claim_run(), p.claim_run(), p.claim_run()],
            [Some(2), Some(4), Some(5)]
        );
        assert_eq!(p.claim_run(), Some(6), "then the sweep from the top");
    }

    #[test]
    fn the_rest_of_a_run_is_taken_all_or_none() {
        // Base frame 3: the run's ids do not start on shard 0.
        let p = Pages::new(
            3,
            3 * 512,
            false,
            Thresholds {
                reserved: 0,
                severe: 1,
                target: 0,
            },
            4,
        );
        let first = p.run_first(1).unwrap();
        assert_eq!((u64::from(first.0) + 3) % 512, 0, "run 1 is aligned");
        let free = p.free_count();
        // Two pages of the run zeroed, one of them the skipped one.
        for k in [7u32, 9] {
            let id = PageId(first.0 + k);
            p.alloc_at(id, AllocClass::Normal).unwrap();
            p.get(id).set_flags(PageFlags::ZERO);
            p.free(id);
        }
        assert_eq!(p.free_zeroed_count(), 2);
        // A page of the run in use, in the 13th shard's share: the 12
        // shares before it are taken and given back, nothing is kept.
        let busy = PageId(first.0 + 300);
        p.alloc_at(busy, AllocClass::Normal).unwrap();
        assert!(!p.alloc_run_rest(first, 9, AllocClass::Normal));
        assert_eq!(p.free_count(), free - 1, "a refusal keeps nothing");
        assert_eq!(p.free_zeroed_count(), 2);
        p.free(busy);
        // The skipped page is the caller's already.
        p.alloc_at(PageId(first.0 + 9), AllocClass::Normal).unwrap();
        assert!(p.alloc_run_rest(first, 9, AllocClass::Normal));
        assert_eq!(p.free_count(), free - 512);
        assert_eq!(p.free_zeroed_count(), 0, "page 7's zeroing is counted out");
        assert!(p.get(PageId(first.0 + 7)).flags().contains(PageFlags::ZERO));
        // Every other page is still handed out once; the run's never.
        let rest = drain(&p);
        assert_eq!(rest.len() as u64, free - 512);
        assert!(
            rest.iter()
                .all(|&id| !(first.0..first.0 + 512).contains(&id))
        );
        // Freed again, the run is whole and can be claimed.
        for id in (first.0..first.0 + 512).map(PageId) {
            p.free(id);
        }
        assert_eq!(p.claim_run(), Some(1));
        // Below the floor, nothing is taken either.
        let q = pages(512, false, 2);
        let f = q.run_first(0).unwrap();
        q.alloc_at(f, AllocClass::Normal).unwrap();
        assert!(!q.alloc_run_rest(f, 0, AllocClass::Normal));
        assert!(q.alloc_run_rest(f, 0, AllocClass::System));
    }

    #[test]
    fn allocation_prefers_what_is_asked_and_counts() {
        let p = pages(4, false, 0);
        let a = p.alloc(0, AllocClass::Normal, false).unwrap();
        p.get(a).set_flags(PageFlags::ZERO);
        p.free(a);
        assert_eq!((p.free_count(), p.free_zeroed_count()), (4, 1));
        // A zero-preferring allocation finds the zeroed page wherever it is.
        let z = p.alloc(3, AllocClass::Normal, true).unwrap();
        assert_eq!(z, a);
        assert!(p.get(z).flags().contains(PageFlags::ZERO));
        // A normal one leaves zeroed pages for those who want them.
        p.free(z);
        let n = p.alloc(a.0 as u64, AllocClass::Normal, false).unwrap();
        assert_ne!(n, a);
    }

    #[test]
    fn the_reserve_is_for_system_allocations() {
        let p = pages(4, true, 2);
        assert!(p.alloc(0, AllocClass::Normal, true).is_some());
        assert!(p.alloc(0, AllocClass::Normal, true).is_some());
        assert!(
            p.alloc(0, AllocClass::Normal, true).is_none(),
            "two left: reserved"
        );
        assert!(p.alloc(0, AllocClass::System, true).is_some());
        assert!(p.alloc(0, AllocClass::System, true).is_some());
        assert!(p.alloc(0, AllocClass::System, true).is_none());
        assert!(p.count_severe());
    }

    #[test]
    fn queues_count_and_wired_pages_leave_them() {
        let p = pages(4, true, 0);
        let id = p.alloc(0, AllocClass::Normal, true).unwrap();
        p.activate(id);
        assert_eq!(p.queue_count(PageQueue::Active), 1);
        p.deactivate(id);
        assert_eq!(
            (
                p.queue_count(PageQueue::Active),
                p.queue_count(PageQueue::Inactive)
            ),
            (0, 1)
        );
        p.wire(id);
        p.wire(id);
        assert_eq!(
            (p.queue_count(PageQueue::Inactive), p.wired_count()),
            (0, 1)
        );
        p.activate(id);
        assert_eq!(
            p.queue_count(PageQueue::Active),
            0,
            "wired pages stay off the queues"
        );
        assert!(p.unwire(id, true));
        assert!(p.unwire(id, true));
        assert!(!p.unwire(id, true), "not wired any more");
        assert_eq!((p.queue_count(PageQueue::Active), p.wired_count()), (1, 0));
        p.free(id);
        assert_eq!((p.free_count(), p.queue_count(PageQueue::Active)), (4, 0));
    }

    fn run_ids(p: &Pages, r: u32) -> core::ops::Range<u32> {
        let first = p.run_first(r).unwrap().0;
        first..first + 512
    }

    #[test]
    fn a_claimed_run_holds_its_free_frames_off_the_lists() {
        let p = pages(4 * 512, false, 0);
        let r = p.claim_run().unwrap();
        assert_eq!(p.free_count(), 4 * 512, "held frames are free");
        let ids = run_ids(&p, r);
        assert!(
            ids.clone()
                .all(|i| !p.get(PageId(i)).flags().contains(PageFlags::LISTED))
        );
        // Any allocation takes the other runs' frames first.
        let others: Vec<PageId> = (0..3 * 512)
            .map(|k| p.alloc(k, AllocClass::Normal, false).unwrap())
            .collect();
        assert!(others.iter().all(|id| !ids.contains(&id.0)));
        // The run's own frames by id; a frame taken is not taken twice.
        let f = PageId(ids.start + 77);
        assert_eq!(p.alloc_at(f, AllocClass::Normal), Some(f));
        assert_eq!(p.alloc_at(f, AllocClass::Normal), None);
        assert_eq!(p.free_count(), 512 - 1);
        // Freed, it goes back to the run, not to a list, and the run
        // (whole again) can be claimed again.
        p.get(f).set_flags(PageFlags::ZERO);
        p.free(f);
        assert!(!p.get(f).flags().contains(PageFlags::LISTED));
        assert_eq!((p.free_count(), p.free_zeroed_count()), (512, 1));
        assert_eq!(p.claim_run(), Some(r));
        for id in others {
            p.free(id);
        }
        assert_eq!(drain(&p).len(), 4 * 512);
    }

    #[test]
    fn allocation_releases_idle_held_runs_before_breaking_a_reservation() {
        let p = pages(3 * 512, false, 0);
        let (a, b, c) = (
            p.claim_run().unwrap(),
            p.claim_run().unwrap(),
            p.claim_run().unwrap(),
        );
        // Run `b` filled and emptied again: no reservation owns it now.
        for i in run_ids(&p, b) {
            p.alloc_at(PageId(i), AllocClass::Normal).unwrap();
        }
        for i in run_ids(&p, b) {
            p.free(PageId(i));
        }
        // Run `c` in use but for one frame.
        let kept = run_ids(&p, c).start + 5;
        for i in run_ids(&p, c).filter(|&i| i != kept) {
            p.alloc_at(PageId(i), AllocClass::Normal).unwrap();
        }
        // The lists are empty: the first allocations come from `b`.
        for k in 0..512 {
            let id = p.alloc(k, AllocClass::Normal, false).unwrap();
            assert!(run_ids(&p, b).contains(&id.0), "{k}: {}", id.0);
        }
        // Then a reservation is broken: `a` (wholly free) or `c`'s last.
        let rest = drain(&p);
        assert_eq!(rest.len(), 513);
        assert!(rest.contains(&kept));
        assert!(run_ids(&p, a).all(|i| rest.contains(&i)));
        assert_eq!(p.free_count(), 0);
    }

    #[test]
    fn the_rest_of_a_held_run_is_taken_all_or_none() {
        let p = pages(2 * 512, false, 0);
        let r = p.claim_run().unwrap();
        let first = p.run_first(r).unwrap();
        let skip = 130;
        p.alloc_at(PageId(first.0 + skip), AllocClass::Normal)
            .unwrap();
        let busy = PageId(first.0 + 400);
        p.alloc_at(busy, AllocClass::Normal).unwrap();
        let free = p.free_count();
        assert!(!p.alloc_run_rest(first, u64::from(skip), AllocClass::Normal));
        assert_eq!(p.free_count(), free, "a refusal keeps nothing");
        for i in run_ids(&p, r).filter(|&i| i != first.0 + skip && i != busy.0) {
            assert_eq!(p.alloc_at(PageId(i), AllocClass::Normal), Some(PageId(i)));
            p.free(PageId(i));
        }
        p.free(busy);
        assert!(p.alloc_run_rest(first, u64::from(skip), AllocClass::Normal));
        assert_eq!(p.free_count(), free - 510);
        let rest = drain(&p);
        assert_eq!(rest.len(), 512);
        assert!(run_ids(&p, r).all(|i| !rest.contains(&i)));
    }

    #[test]
    fn the_zeroer_finds_plain_frames_in_held_runs() {
        let p = pages(2 * 512, true, 0);
        let r = p.claim_run().unwrap();
        let f = PageId(run_ids(&p, r).start + 3);
        p.alloc_at(f, AllocClass::Normal).unwrap();
        p.get(f).clear_flags(PageFlags::ZERO);
        p.free(f);
        let mut out = [PageId(0); 4];
        assert_eq!(p.take_plain(0, &mut out), 1, "every other frame is zero");
        assert_eq!(out[0], f);
        p.get(f).set_flags(PageFlags::ZERO);
        p.free(f);
        assert_eq!(p.take_plain(0, &mut out), 0);
        assert_eq!((p.free_count(), p.free_zeroed_count()), (1024, 1024));
    }

    /// Frames taken by id, freed, claimed, released and taken by any
    /// allocation at once: at the end each frame is free exactly once.
    #[test]
    fn held_runs_lose_no_frame_to_racing_frees_and_releases() {
        use std::sync::atomic::AtomicBool;
        let p = pages(4 * 512, false, 0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            for t in 0..3u32 {
                let (p, stop) = (&p, &stop);
                sc.spawn(move || {
                    let mut x = 0x9e37_79b9u32.wrapping_mul(t + 1);
                    let mut mine = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        let id = PageId(x % (4 * 512));
                        let got = match x % 4 {
                            0 => p.alloc(u64::from(t), AllocClass::Normal, false),
                            _ => p.alloc_at(id, AllocClass::Normal),
                        };
                        if let Some(id) = got {
                            mine.push(id);
                        }
                        if mine.len() > 64 || x % 3 == 0 {
                            if let Some(id) = mine.pop() {
                                p.free(id);
                            }
                        }
                    }
                    for id in mine {
                        p.free(id);
                    }
                });
            }
            let (p, stop) = (&p, &stop);
            sc.spawn(move || {
                for k in 0..200_000u32 {
                    if k % 3 == 0 {
                        p.release_some(&p.transit.lock());
                    } else {
                        p.claim_run();
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
        });
        assert_eq!(p.free_count(), 4 * 512);
        assert_eq!(drain(&p).len(), 4 * 512);
    }
}
