//! # vm-pager-vnode
//!
//! FreeBSD's vnode pager for `vm-core`: an object whose pages are a real
//! file's. Reads come in clusters, one positioned vectored read
//! (`preadv`) per contiguous run; the page that holds end of file is valid
//! up to EOF (rounded up to a 512-byte block) and zero beyond; pages past
//! EOF are out of bounds (SIGBUS); dirty pages go back with `pwritev`,
//! never past EOF; truncation through the pager shrinks the object and
//! unmaps what lies past the new end.
//!
//! ```
//! use std::io::Write;
//! use vm_core::{MapRequest, Prot, Vm, VmConfig};
//! use vm_pager_vnode::VnodePager;
//!
//! let path = std::env::temp_dir().join(format!("vnode-doc-{}", std::process::id()));
//! std::fs::File::create(&path).unwrap().write_all(b"hello, file").unwrap();
//! let vm = Vm::new(vm_testkit::RefPmap::new(), VmConfig::with_memory(1 << 20)).unwrap();
//! let pager = VnodePager::open(&path, true).unwrap();
//! let space = vm.new_space().unwrap();
//! space.map(MapRequest::object(0x10000, 0x1000, pager.object(&vm), 0, Prot::RW)).unwrap();
//! space.write(0x10000, b"HELLO").unwrap();
//! space.msync(0x10000, 0x1000).unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"HELLO, file");
//! # std::fs::remove_file(&path).unwrap();
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use vm_core::file_io::{read_pages, write_pages};
use vm_core::page::DEV_BSIZE;
use vm_core::{
    Contiguity, IoError, PAGE_SIZE, PageOut, PageSlot, Pager, PagerError, PagerKind, Pmap, Vm,
    VmObject,
};

/// Pages a cluster may reach on each side: the fault path's largest
/// read-ahead window ([`VmConfig::read_ahead_max`](vm_core::VmConfig)),
/// so one `preadv` serves a whole window (FreeBSD's vnode pager reads up
/// to `maxphys`, 1 MiB).
const MAX_CONTIG: u64 = 255;

/// Counts of what the pager did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnodeStats {
    /// Read system calls.
    pub read_calls: u64,
    /// Pages read in (`v_vnodepgsin`).
    pub pages_in: u64,
    /// Write system calls.
    pub write_calls: u64,
    /// Pages written out (`v_vnodepgsout`).
    pub pages_out: u64,
}

#[derive(Default)]
struct Counts {
    read_calls: AtomicU64,
    pages_in: AtomicU64,
    write_calls: AtomicU64,
    pages_out: AtomicU64,
}

/// A pager over one file. See the [crate docs](crate).
pub struct VnodePager {
    file: File,
    size: AtomicU64,
    /// Write-back (shared) against a change of length (exclusive): a
    /// write that read the old size must not land past a new, shorter end
    /// and grow the file again (FreeBSD serialises the two on the vnode
    /// lock).
    resize: RwLock<()>,
    /// One change of length at a time (`set_len` reads the old length
    /// first). Not `resize`: a change of length waits for a busy page,
    /// which write-back may hold while it waits for `resize`.
    lengths: Mutex<()>,
    counts: Counts,
}

impl std::fmt::Debug for VnodePager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VnodePager")
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

fn io_err(e: &io::Error, context: &'static str) -> PagerError {
    PagerError::Error(IoError::from_io(e, context))
}

impl VnodePager {
    /// A pager over an open file; its size is the file's now.
    ///
    /// # Errors
    ///
    /// The error of reading the file's metadata.
    pub fn new(file: File) -> io::Result<Arc<VnodePager>> {
        let size = file.metadata()?.len();
        Ok(Arc::new(VnodePager {
            file,
            size: AtomicU64::new(size),
            resize: RwLock::new(()),
            lengths: Mutex::new(()),
            counts: Counts::default(),
        }))
    }

    /// Opens `path` read-only or read-write.
    ///
    /// # Errors
    ///
    /// The error of opening the file.
    pub fn open(path: &Path, writable: bool) -> io::Result<Arc<VnodePager>> {
        Self::new(OpenOptions::new().read(true).write(writable).open(path)?)
    }

    /// The file's size as the pager knows it, in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The file's size in pages (the object's size).
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.size().div_ceil(PAGE_SIZE)
    }

    /// What the pager has done so far.
    #[must_use]
    pub fn stats(&self) -> VnodeStats {
        let c = &self.counts;
        VnodeStats {
            read_calls: c.read_calls.load(Ordering::Relaxed),
            pages_in: c.pages_in.load(Ordering::Relaxed),
            write_calls: c.write_calls.load(Ordering::Relaxed),
            pages_out: c.pages_out.load(Ordering::Relaxed),
        }
    }

    /// A new object of `vm` backed by this file (its size the file's,
    /// rounded up to pages).
    pub fn object<P: Pmap>(self: &Arc<Self>, vm: &Vm<P>) -> Arc<VmObject> {
        vm.new_object(self.pages(), self.clone())
    }

    /// Truncates or extends the file to `len` bytes and makes `object` (this
    /// pager's) follow: pages past the new end are unmapped and freed, the
    /// tail of the new last page is zeroed; a file that grows reads as
    /// zeros from its old end, whatever a mapping wrote past it
    /// ([`Vm::extend_object_bytes`]).
    ///
    /// # Errors
    ///
    /// The error of changing the file's length; the object's size does not
    /// change then.
    pub fn set_len<P: Pmap>(&self, vm: &Vm<P>, object: &VmObject, len: u64) -> io::Result<()> {
        let _one_at_a_time = self.lengths.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.size();
        vm.extend_object_bytes(object, old, len, || {
            let _no_write_back = self.resize.write().unwrap_or_else(PoisonError::into_inner);
            self.file.set_len(len)?;
            self.size.store(len, Ordering::Release);
            Ok(())
        })
    }
}

/// Mask of the blocks holding `bytes` bytes from a page's start, rounded up
/// to whole 512-byte blocks.
fn valid_mask(bytes: usize) -> u8 {
    let blocks = bytes.div_ceil(DEV_BSIZE).min(8);
    ((1u16 << blocks) - 1) as u8
}

impl Pager for VnodePager {
    fn kind(&self) -> PagerKind {
        PagerKind::FILE
    }

    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        let pages = self.pages();
        (pindex < pages).then(|| Contiguity {
            behind: pindex.min(MAX_CONTIG) as u32,
            ahead: (pages - 1 - pindex).min(MAX_CONTIG) as u32,
        })
    }

    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        let size = self.size();
        let page = PAGE_SIZE as usize;
        let Some(first) = pages.first().map(PageSlot::pindex) else {
            return Err(PagerError::Fail);
        };
        let req = pages.get(reqpage).ok_or(PagerError::Bad)?.pindex();
        if req * PAGE_SIZE >= size {
            return Err(PagerError::Bad);
        }
        // Read up to EOF and no further: one system call per run.
        let left = (size - first * PAGE_SIZE) as usize;
        let got = read_pages(
            &self.file,
            pages,
            first * PAGE_SIZE,
            left,
            &self.counts.read_calls,
        )
        .map_err(|e| io_err(&e, "reading file pages"))?;
        for (i, s) in pages.iter_mut().enumerate() {
            let have = got.saturating_sub(i * page).min(page);
            s.fill_from(have, 0);
            if have == page {
                s.set_all_valid();
            } else if have > 0 {
                s.set_valid(valid_mask(have));
            }
        }
        if got <= reqpage * page {
            // The file shrank behind the pager's back: past EOF now.
            return Err(PagerError::Bad);
        }
        self.counts
            .pages_in
            .fetch_add(got.div_ceil(page) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn put_pages(&self, pages: &[PageOut<'_>]) -> Result<(), PagerError> {
        let _sized = self.resize.read().unwrap_or_else(PoisonError::into_inner);
        let size = self.size();
        let Some(first) = pages.first().map(PageOut::pindex) else {
            return Ok(());
        };
        let start = first * PAGE_SIZE;
        // Never write past EOF: the file's length is the file's business.
        let left = size.saturating_sub(start) as usize;
        write_pages(&self.file, pages, start, left, &self.counts.write_calls)
            .map_err(|e| io_err(&e, "writing file pages"))?;
        let written = left.min(pages.len() * PAGE_SIZE as usize);
        self.counts.pages_out.fetch_add(
            written.div_ceil(PAGE_SIZE as usize) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
