//! # vm-pager-swap
//!
//! FreeBSD's swap pager for `vm-core`: a swap device that is a real file,
//! a block-map allocator of page-sized blocks that hands out contiguous runs
//! (halving the run when space is fragmented, as `swap_pager_putpages`
//! does), per-object metadata from page index to block, `has_page`
//! reporting the swap-contiguous neighbours (up to 8 each way), and one
//! `preadv`/`pwritev` per contiguous run of blocks.
//!
//! Install it on a machine with [`Vm::set_swap`](vm_core::Vm::set_swap):
//! anonymous objects become swap-backed the first time the pageout daemon
//! writes one of their pages out. A full device makes that page-out fail
//! cleanly: the page stays resident and dirty.
//!
//! ```
//! use vm_core::{Prot, Vm};
//! use vm_pager_swap::Swap;
//!
//! let vm = Vm::new(vm_testkit::RefPmap::new(), vm_testkit::test_config(64)).unwrap();
//! let path = std::env::temp_dir().join(format!("swap-doc-{}", std::process::id()));
//! let swap = Swap::create(&path, 1 << 20).unwrap();
//! vm.set_swap(swap.provider());
//! let space = vm.new_space().unwrap();
//! space.map_anon(0x1000_0000, 128 * 4096, Prot::RW).unwrap();
//! for i in 0..128u64 {
//!     space.write_u8(0x1000_0000 + i * 4096, i as u8).unwrap(); // twice the RAM
//! }
//! for i in 0..128u64 {
//!     assert_eq!(space.read_u8(0x1000_0000 + i * 4096).unwrap(), i as u8);
//! }
//! assert!(vm.counters().snapshot().v_swappgsout > 0);
//! # drop(space); drop(swap); std::fs::remove_file(&path).unwrap();
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod blocks;

use blocks::BlockMap;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use vm_core::file_io::{read_pages, write_pages};
use vm_core::{
    Contiguity, IoError, PAGE_SIZE, PageOut, PageSlot, Pager, PagerError, PagerKind, SwapProvider,
    WantedPages,
};

/// Neighbours `has_page` reports at most on each side: a 32-page run
/// either way (FreeBSD's `SWAP_META_PAGES`), so a growing read-ahead window
/// swaps in whole runs the pageout wrote together.
const MAX_CONTIG: u64 = 31;
/// `ENOSPC`.
const ENOSPC: i32 = 28;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts of what the swap device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapStats {
    /// Blocks on the device.
    pub blocks: u64,
    /// Blocks in use.
    pub used: u64,
    /// Read system calls.
    pub read_calls: u64,
    /// Pages read (`v_swappgsin`).
    pub pages_in: u64,
    /// Write system calls.
    pub write_calls: u64,
    /// Pages written (`v_swappgsout`).
    pub pages_out: u64,
    /// Page-outs refused because the device was full.
    pub full: u64,
}

impl std::fmt::Display for SwapStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} blocks in use; {} pages read in {} calls, {} written in {} calls; \
             {} page-outs refused (full)",
            self.used,
            self.blocks,
            self.pages_in,
            self.read_calls,
            self.pages_out,
            self.write_calls,
            self.full
        )
    }
}

struct Device {
    file: File,
    map: Mutex<BlockMap>,
    read_calls: AtomicU64,
    pages_in: AtomicU64,
    write_calls: AtomicU64,
    pages_out: AtomicU64,
    full: AtomicU64,
}

/// A swap device on a file. Cheap to clone (shared).
#[derive(Clone)]
pub struct Swap {
    dev: Arc<Device>,
}

impl std::fmt::Debug for Swap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swap")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Swap {
    /// Creates (or truncates) the file at `path` as a swap device of
    /// `bytes` bytes (rounded down to pages).
    ///
    /// # Errors
    ///
    /// The error of creating or sizing the file; `InvalidInput` for a
    /// device smaller than a page.
    pub fn create(path: &Path, bytes: u64) -> io::Result<Swap> {
        let blocks = bytes / PAGE_SIZE;
        if blocks == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "swap smaller than a page",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(blocks * PAGE_SIZE)?;
        Ok(Swap {
            dev: Arc::new(Device {
                file,
                map: Mutex::new(BlockMap::new(blocks as usize)),
                read_calls: AtomicU64::new(0),
                pages_in: AtomicU64::new(0),
                write_calls: AtomicU64::new(0),
                pages_out: AtomicU64::new(0),
                full: AtomicU64::new(0),
            }),
        })
    }

    /// What the device has done, and how full it is.
    #[must_use]
    pub fn stats(&self) -> SwapStats {
        let d = &self.dev;
        let map = lock(&d.map);
        SwapStats {
            blocks: map.blocks(),
            used: map.in_use(),
            read_calls: d.read_calls.load(Ordering::Relaxed),
            pages_in: d.pages_in.load(Ordering::Relaxed),
            write_calls: d.write_calls.load(Ordering::Relaxed),
            pages_out: d.pages_out.load(Ordering::Relaxed),
            full: d.full.load(Ordering::Relaxed),
        }
    }

    /// A pager for one new swap-backed object.
    #[must_use]
    pub fn pager(&self) -> Arc<SwapPager> {
        Arc::new(SwapPager {
            dev: self.dev.clone(),
            meta: Mutex::new(BTreeMap::new()),
        })
    }

    /// This device as the machine's swap
    /// ([`Vm::set_swap`](vm_core::Vm::set_swap)).
    #[must_use]
    pub fn provider(&self) -> Arc<dyn SwapProvider> {
        Arc::new(self.clone())
    }
}

impl SwapProvider for Swap {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        Some(self.pager())
    }
}

/// The swap pager of one object: page index → block.
pub struct SwapPager {
    dev: Arc<Device>,
    meta: Mutex<BTreeMap<u64, u64>>,
}

impl std::fmt::Debug for SwapPager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapPager")
            .field("pages", &lock(&self.meta).len())
            .finish()
    }
}

impl SwapPager {
    /// Pages of the object that have a block.
    #[must_use]
    pub fn swapped(&self) -> usize {
        lock(&self.meta).len()
    }

    /// Runs of `(first slot, block, length)` over `blocks`: consecutive
    /// slots with consecutive blocks.
    fn runs(blocks: &[Option<u64>]) -> Vec<(usize, u64, usize)> {
        let mut out: Vec<(usize, u64, usize)> = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let Some(b) = *b else { continue };
            match out.last_mut() {
                Some((s, b0, n)) if *s + *n == i && *b0 + *n as u64 == b => *n += 1,
                _ => out.push((i, b, 1)),
            }
        }
        out
    }

    fn free_blocks(&self, blocks: impl Iterator<Item = u64>) {
        lock(&self.dev.map).free_many(blocks);
    }
}

fn io_err(e: &io::Error, context: &'static str) -> PagerError {
    PagerError::Error(IoError::from_io(e, context))
}

impl Pager for SwapPager {
    fn kind(&self) -> PagerKind {
        PagerKind::ANONYMOUS
    }

    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        let meta = lock(&self.meta);
        let block = *meta.get(&pindex)?;
        let count = |dir: i64| {
            (1..=MAX_CONTIG)
                .take_while(|&k| {
                    let (p, b) = (
                        pindex as i64 + dir * k as i64,
                        block as i64 + dir * k as i64,
                    );
                    p >= 0 && b >= 0 && meta.get(&(p as u64)) == Some(&(b as u64))
                })
                .count() as u32
        };
        Some(Contiguity {
            behind: count(-1),
            ahead: count(1),
        })
    }

    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        let blocks: Vec<Option<u64>> = {
            let meta = lock(&self.meta);
            pages
                .iter()
                .map(|s| meta.get(&s.pindex()).copied())
                .collect()
        };
        if blocks.get(reqpage).copied().flatten().is_none() {
            return Err(PagerError::Fail);
        }
        for (first, block, n) in Self::runs(&blocks) {
            let got = read_pages(
                &self.dev.file,
                &mut pages[first..first + n],
                block * PAGE_SIZE,
                n * PAGE_SIZE as usize,
                &self.dev.read_calls,
            )
            .map_err(|e| io_err(&e, "reading swap"))?;
            if got != n * PAGE_SIZE as usize {
                return Err(io_err(
                    &io::Error::from(io::ErrorKind::UnexpectedEof),
                    "short read from swap",
                ));
            }
            pages[first..first + n]
                .iter_mut()
                .for_each(PageSlot::set_all_valid);
            self.dev.pages_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn put_pages(&self, pages: &[PageOut<'_>]) -> Result<(), PagerError> {
        // Blocks: the page's own if it has one, else new runs.
        let mut meta = lock(&self.meta);
        let mut blocks: Vec<Option<u64>> = pages
            .iter()
            .map(|p| meta.get(&p.pindex()).copied())
            .collect();
        let mut fresh = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            if blocks[i].is_some() {
                i += 1;
                continue;
            }
            let want = blocks[i..].iter().take_while(|b| b.is_none()).count();
            let Some((start, got)) = lock(&self.dev.map).alloc(want) else {
                self.free_blocks(fresh.into_iter());
                self.dev.full.fetch_add(1, Ordering::Relaxed);
                return Err(PagerError::Error(IoError {
                    code: ENOSPC,
                    context: "swap device full",
                }));
            };
            for k in 0..got {
                blocks[i + k] = Some(start + k as u64);
                fresh.push(start + k as u64);
            }
            i += got;
        }
        for (first, block, n) in Self::runs(&blocks) {
            if let Err(e) = write_pages(
                &self.dev.file,
                &pages[first..first + n],
                block * PAGE_SIZE,
                n * PAGE_SIZE as usize,
                &self.dev.write_calls,
            ) {
                self.free_blocks(fresh.into_iter());
                return Err(io_err(&e, "writing swap"));
            }
        }
        for (p, b) in pages.iter().zip(&blocks) {
            meta.insert(p.pindex(), b.expect("every page got a block"));
        }
        self.dev
            .pages_out
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn page_unswapped(&self, pindex: u64) {
        if let Some(b) = lock(&self.meta).remove(&pindex) {
            self.free_blocks(std::iter::once(b));
        }
    }

    fn discard(&self, start: u64, end: u64) {
        let mut meta = lock(&self.meta);
        let gone: Vec<u64> = meta.range(start..end).map(|(&p, _)| p).collect();
        let blocks: Vec<u64> = gone.iter().filter_map(|p| meta.remove(p)).collect();
        drop(meta);
        self.free_blocks(blocks.into_iter());
    }

    fn dealloc(&self) {
        let blocks: Vec<u64> = std::mem::take(&mut *lock(&self.meta))
            .into_values()
            .collect();
        self.free_blocks(blocks.into_iter());
    }

    /// Takes over the blocks of another swap pager of the same device
    /// (FreeBSD `swap_pager_copy`): no I/O, only the metadata moves.
    fn absorb(&self, from: &dyn Pager, offset: u64, wanted: &mut WantedPages<'_>) -> bool {
        let Some(other) = (from as &dyn std::any::Any).downcast_ref::<SwapPager>() else {
            return false;
        };
        if std::ptr::eq(self, other) || !Arc::ptr_eq(&self.dev, &other.dev) {
            return false;
        }
        let theirs = std::mem::take(&mut *lock(&other.meta));
        let mut mine = lock(&self.meta);
        let mut stale = Vec::new();
        for (p, block) in theirs {
            match p.checked_sub(offset) {
                Some(q) if !mine.contains_key(&q) && wanted(q) => {
                    mine.insert(q, block);
                }
                _ => stale.push(block),
            }
        }
        drop(mine);
        self.free_blocks(stale.into_iter());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_blocks() {
        let r = SwapPager::runs(&[Some(5), Some(6), None, Some(7), Some(9), Some(10)]);
        assert_eq!(r, vec![(0, 5, 2), (3, 7, 1), (4, 9, 2)]);
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
