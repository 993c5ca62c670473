//! Where page contents come from: the [`Pager`] trait (FreeBSD
//! `vm_pager.h`).
//!
//! A pager serves one object. The core calls it with pages it has made busy
//! and with no lock held; the pager sees page indexes and byte buffers,
//! nothing about locks or frames. It is object-safe (`Arc<dyn Pager>`)
//! because one shadow chain mixes object types.
//!
//! ```
//! use vm_core::{Contiguity, PageSlot, Pager, PagerError, PagerKind};
//!
//! /// Every page holds its own index in its first byte.
//! struct Numbered;
//!
//! impl Pager for Numbered {
//!     fn kind(&self) -> PagerKind { PagerKind::ANONYMOUS }
//!     fn has_page(&self, _pindex: u64) -> Option<Contiguity> {
//!         Some(Contiguity::default())
//!     }
//!     fn get_pages(&self, pages: &mut [PageSlot<'_>], _req: usize) -> Result<(), PagerError> {
//!         for p in pages {
//!             p.fill_from(0, 0);
//!             p.write(0, &[p.pindex() as u8]);
//!             p.set_all_valid();
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::frame::{FrameReader, FrameWriter};
use crate::page::VM_PAGE_BITS_ALL;

/// What a pager's objects hold, for the policy that depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectClass {
    /// Memory reachable only through its mappings (FreeBSD `OBJT_DEFAULT`
    /// and `OBJT_SWAP`): unless the object is named
    /// ([`Vm::new_object`](crate::Vm::new_object) and friends), its pages may
    /// move between the objects of a shadow chain (the copy-on-write rename,
    /// collapse, a fork's split) and are freed when their only mapping goes.
    Anonymous,
    /// A file's pages (`OBJT_VNODE`): named, never moved or freed on
    /// behalf of one mapping.
    File,
    /// Device memory (`OBJT_DEVICE`): unmanaged frames the pager names
    /// with [`PageSlot::set_device`]; mapped shared only (there are no
    /// pages to copy), never clustered.
    Device,
}

/// A pager's description of its objects: their [`ObjectClass`] and the
/// policy switches the core consults. The built-in pagers use the same
/// values a custom one can ([`ANONYMOUS`](Self::ANONYMOUS) for swap,
/// [`FILE`](Self::FILE) for vnode, [`DEVICE`](Self::DEVICE)), and each
/// switch can be turned.
///
/// ```
/// use vm_core::{ObjectClass, PagerKind};
///
/// // A compressed-memory pager: anonymous, but a page read back is
/// // not worth keeping clean and read-only, and it cannot cluster.
/// let zram = PagerKind::ANONYMOUS
///     .with_clean_read_only(false)
///     .with_clustering(false);
/// assert_eq!(zram.class(), ObjectClass::Anonymous);
/// assert!(!zram.clusters());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagerKind {
    class: ObjectClass,
    clean_read_only: bool,
    clusters: bool,
    grows: bool,
}

impl PagerKind {
    /// Anonymous memory with backing store, as swap: clean pages that have
    /// a copy on the pager are mapped read-only, clustered reads.
    pub const ANONYMOUS: PagerKind = PagerKind {
        class: ObjectClass::Anonymous,
        clean_read_only: true,
        clusters: true,
        grows: false,
    };
    /// A file: clustered reads, mappable past its current end.
    pub const FILE: PagerKind = PagerKind {
        class: ObjectClass::File,
        clean_read_only: false,
        clusters: true,
        grows: true,
    };
    /// Device memory: no clustering, no growth.
    pub const DEVICE: PagerKind = PagerKind {
        class: ObjectClass::Device,
        clean_read_only: false,
        clusters: false,
        grows: false,
    };

    /// The class of the objects.
    #[must_use]
    pub const fn class(self) -> ObjectClass {
        self.class
    }

    /// Whether the objects are anonymous ([`ObjectClass::Anonymous`]).
    #[must_use]
    pub const fn is_anonymous(self) -> bool {
        matches!(self.class, ObjectClass::Anonymous)
    }

    /// Whether a read fault maps a clean page read-only, so that the first
    /// write faults and tells the pager ([`Pager::page_unswapped`]) that
    /// its copy is stale (FreeBSD does this for swap objects).
    #[must_use]
    pub const fn maps_clean_read_only(self) -> bool {
        self.clean_read_only
    }

    /// Whether faults read neighbouring pages with the faulting one
    /// (read-ahead and read-behind, seed L693-703).
    #[must_use]
    pub const fn clusters(self) -> bool {
        self.clusters
    }

    /// Whether an object may be mapped past its current size, because it
    /// can grow (a file; an access there is `SIGBUS` until it does).
    #[must_use]
    pub const fn grows(self) -> bool {
        self.grows
    }

    /// The same, with [`maps_clean_read_only`](Self::maps_clean_read_only)
    /// set to `on`.
    #[must_use]
    pub const fn with_clean_read_only(self, on: bool) -> PagerKind {
        PagerKind {
            clean_read_only: on,
            ..self
        }
    }

    /// The same, with [`clusters`](Self::clusters) set to `on`.
    #[must_use]
    pub const fn with_clustering(self, on: bool) -> PagerKind {
        PagerKind {
            clusters: on,
            ..self
        }
    }

    /// The same, with [`grows`](Self::grows) set to `on`.
    #[must_use]
    pub const fn with_growth(self, on: bool) -> PagerKind {
        PagerKind { grows: on, ..self }
    }
}

/// Pages next to a requested one that the pager can read in the same
/// operation (the seed's `before`/`after` of `vm_pager_has_page`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Contiguity {
    /// Contiguous pages available below the requested one.
    pub behind: u32,
    /// Contiguous pages available above the requested one.
    pub ahead: u32,
}

/// An I/O failure, kept small and `no_std`: an errno-style code and what
/// was being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoError {
    /// The OS error number, when there is one (`EIO` = 5 otherwise).
    pub code: i32,
    /// What the pager was doing.
    pub context: &'static str,
}

impl core::fmt::Display for IoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (errno {})", self.context, self.code)
    }
}

impl IoError {
    /// The pager cannot do this at all (`EOPNOTSUPP`).
    pub const UNSUPPORTED: IoError = IoError {
        code: 95,
        context: "operation not supported by this pager",
    };
}

#[cfg(feature = "std")]
impl IoError {
    /// Wraps a host I/O error.
    #[must_use]
    pub fn from_io(e: &std::io::Error, context: &'static str) -> IoError {
        IoError {
            code: e.raw_os_error().unwrap_or(5),
            context,
        }
    }
}

/// A pager's failure (FreeBSD `VM_PAGER_*` other than OK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum PagerError {
    /// The page is outside the object (`VM_PAGER_BAD`): an access past end
    /// of file.
    #[error("page outside the object (VM_PAGER_BAD)")]
    Bad,
    /// The page is in range but the pager does not have it
    /// (`VM_PAGER_FAIL`): look further down the shadow chain.
    #[error("pager does not have the page (VM_PAGER_FAIL)")]
    Fail,
    /// An I/O error (`VM_PAGER_ERROR`).
    #[error("I/O error (VM_PAGER_ERROR): {0}")]
    Error(IoError),
    /// A transient shortage; try again later (`VM_PAGER_AGAIN`).
    #[error("try again (VM_PAGER_AGAIN)")]
    Again,
}

/// One busy page handed to [`Pager::get_pages`]: its index in the object,
/// its bytes, and which 512-byte blocks the pager made valid.
///
/// A slot starts invalid. The pager marks what it filled with
/// [`set_all_valid`](Self::set_all_valid) or [`set_valid`](Self::set_valid).
/// After a successful read the core zero-fills the invalid blocks of the
/// requested page (seed L882-885) and drops the other pages that were left
/// wholly invalid, so a pager that forgets cannot leak stale memory.
#[derive(Debug)]
pub struct PageSlot<'a> {
    pindex: u64,
    frame: FrameWriter<'a>,
    valid: u8,
    device: Option<(PhysAddr, crate::mem_attr::MemAttr)>,
}

impl<'a> PageSlot<'a> {
    /// A slot over the page-sized window `frame` (used by the core; public
    /// for pager tests, with [`FrameWriter::from_slice`]).
    ///
    /// # Panics
    ///
    /// If `frame` is not [`PAGE_SIZE`] bytes long.
    #[must_use]
    pub fn new(pindex: u64, frame: FrameWriter<'a>) -> Self {
        assert_eq!(
            frame.len(),
            PAGE_SIZE as usize,
            "a page slot covers one page"
        );
        PageSlot {
            pindex,
            frame,
            valid: 0,
            device: None,
        }
    }

    /// The page's index in the object.
    #[must_use]
    pub fn pindex(&self) -> u64 {
        self.pindex
    }

    /// The page's bytes, for the pager to fill (a window, never a
    /// reference: see [`frame`](crate::frame)).
    pub fn frame(&mut self) -> &mut FrameWriter<'a> {
        &mut self.frame
    }

    /// Copies `data` into the page at byte `offset`.
    ///
    /// # Panics
    ///
    /// If the bytes leave the page.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        self.frame.write(offset, data);
    }

    /// Fills the page's bytes from `offset` to its end with `byte`.
    ///
    /// # Panics
    ///
    /// If `offset` is past the page.
    pub fn fill_from(&mut self, offset: usize, byte: u8) {
        let len = (PAGE_SIZE as usize)
            .checked_sub(offset)
            .expect("offset inside the page");
        self.frame.fill(offset, len, byte);
    }

    /// The page's bytes, to read back.
    #[must_use]
    pub fn reader(&self) -> FrameReader<'_> {
        self.frame.reader()
    }

    /// Marks the whole page valid.
    pub fn set_all_valid(&mut self) {
        self.valid = VM_PAGE_BITS_ALL;
    }

    /// Sets the valid mask: bit *i* covers bytes `512*i .. 512*(i+1)`.
    /// Used for the page that holds end of file.
    pub fn set_valid(&mut self, mask: u8) {
        self.valid = mask;
    }

    /// Says the page is device memory at physical address `pa` (page
    /// aligned), to be mapped with `attr`, instead of data in the buffer:
    /// the core maps a fictitious, unmanaged page for it (what FreeBSD's
    /// device pager does with `d_mmap`'s answer).
    pub fn set_device(&mut self, pa: PhysAddr, attr: crate::mem_attr::MemAttr) {
        self.device = Some((pa.page_trunc(), attr));
        self.valid = VM_PAGE_BITS_ALL;
    }

    /// The device frame set by [`set_device`](Self::set_device).
    #[must_use]
    pub fn device(&self) -> Option<(PhysAddr, crate::mem_attr::MemAttr)> {
        self.device
    }

    /// The valid mask set so far.
    #[must_use]
    pub fn valid(&self) -> u8 {
        self.valid
    }
}

/// Where an object's pages come from (FreeBSD `struct pagerops`).
///
/// Implementations must be thread-safe; the core never holds a lock while
/// calling them, and never calls `get_pages` twice for the same page at
/// once (the pages are busy). Only [`kind`](Self::kind),
/// [`has_page`](Self::has_page) and [`get_pages`](Self::get_pages) are
/// required; a pager that can write back implements
/// [`put_pages`](Self::put_pages).
///
/// ```
/// use std::sync::Arc;
/// use vm_core::{Contiguity, MapRequest, PageSlot, Pager, PagerError, PagerKind, Prot};
///
/// /// A read-only "file" of four pages, page `i` filled with byte `i`.
/// struct Rom;
/// impl Pager for Rom {
///     fn kind(&self) -> PagerKind { PagerKind::FILE.with_growth(false) }
///     fn has_page(&self, pindex: u64) -> Option<Contiguity> {
///         (pindex < 4).then(Contiguity::default)
///     }
///     fn get_pages(&self, pages: &mut [PageSlot<'_>], _req: usize) -> Result<(), PagerError> {
///         for p in pages {
///             let byte = u8::try_from(p.pindex()).map_err(|_| PagerError::Bad)?;
///             p.fill_from(0, byte);
///             p.set_all_valid();
///         }
///         Ok(())
///     }
/// }
///
/// let (vm, space) = vm_testkit::machine(16);
/// let rom = vm.new_object(4, Arc::new(Rom));
/// space.map(MapRequest::object(0x10_0000, 0x4000, rom, 0, Prot::READ))?;
/// assert_eq!(space.read_u8(0x10_2000)?, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait Pager: Send + Sync + core::any::Any {
    /// What the pager's objects are: their class and the policy switches
    /// the core follows for them (clustering, read-only clean pages,
    /// growth, which pages may move between objects). Asked once, when an
    /// object is given the pager.
    fn kind(&self) -> PagerKind;

    /// Whether the pager has page `pindex`, and how many neighbours it could
    /// read with it (`vm_pager_has_page`). `None` means "not here": look
    /// further down the chain or zero-fill.
    fn has_page(&self, pindex: u64) -> Option<Contiguity>;

    /// Reads `pages` (contiguous indexes, ascending) in one operation;
    /// `reqpage` is the index in `pages` of the page the fault needs
    /// (`vm_pager_get_pages`). On `Ok` the requested page must be filled;
    /// the others are optional.
    ///
    /// # Errors
    ///
    /// [`PagerError`]: `Fail` to fall through to the backing object, `Bad`
    /// for outside the object, `Error` for I/O failure, `Again` for a
    /// transient shortage.
    fn get_pages<'a>(&self, pages: &mut [PageSlot<'a>], reqpage: usize) -> Result<(), PagerError>;

    /// Page `pindex` was dirtied in memory: any copy on backing store is
    /// stale and may be freed (`vm_pager_page_unswapped`).
    fn page_unswapped(&self, pindex: u64) {
        let _ = pindex;
    }

    /// Writes `pages` (contiguous indexes, ascending) to backing store
    /// (`vm_pager_put_pages`). The core calls it with the pages busy and
    /// write-protected; on `Ok` they are clean.
    ///
    /// The default refuses: a pager that cannot write (a device) says so.
    ///
    /// # Errors
    ///
    /// [`PagerError::Error`] when the pages could not be written; they stay
    /// dirty in memory, nothing is lost.
    fn put_pages<'a>(&self, pages: &[PageOut<'a>]) -> Result<(), PagerError> {
        let _ = pages;
        Err(PagerError::Error(IoError::UNSUPPORTED))
    }

    /// Pages `start..end` of the object are gone for good (unmapped from
    /// their only mapping, or truncated): release their backing store
    /// (`swap_pager_freespace`).
    fn discard(&self, start: u64, end: u64) {
        let _ = (start, end);
    }

    /// The object is being destroyed: release backing store
    /// (`vm_pager_deallocate`).
    fn dealloc(&self) {}

    /// Collapse merges the object of pager `from` into this pager's object
    /// (FreeBSD `swap_pager_copy`): take over `from`'s copy of its page
    /// `p` as this object's page `p - offset` wherever `wanted(p - offset)`
    /// and this pager has no copy of its own there, release all of `from`'s
    /// other copies, and leave `from` holding nothing. Returns whether it
    /// did; the default cannot (collapse then leaves the chain as it is).
    ///
    /// A pager recognises one of its own kind by downcasting: every pager
    /// is [`Any`](core::any::Any), so `(from as &dyn Any).downcast_ref()`.
    fn absorb<'w>(&self, from: &dyn Pager, offset: u64, wanted: &mut WantedPages<'w>) -> bool {
        let _ = (from, offset, wanted);
        false
    }
}

/// The question [`Pager::absorb`] asks of each page index: whether the
/// absorbing object wants the other object's copy there.
pub type WantedPages<'a> = dyn FnMut(u64) -> bool + 'a;

/// Gives anonymous objects swap backing the first time one of their pages
/// must be paged out (FreeBSD turns `OBJT_DEFAULT` into `OBJT_SWAP` then).
/// Installed with [`Vm::set_swap`](crate::Vm::set_swap).
pub trait SwapProvider: Send + Sync {
    /// A pager for an anonymous object of `pages` pages, or `None` when no
    /// swap can be had.
    fn pager_for(&self, pages: u64) -> Option<alloc::sync::Arc<dyn Pager>>;
}

/// One dirty page handed to [`Pager::put_pages`].
#[derive(Clone, Copy, Debug)]
pub struct PageOut<'a> {
    pindex: u64,
    frame: FrameReader<'a>,
    dirty: u8,
}

impl<'a> PageOut<'a> {
    /// A page to write, over the page-sized window `frame` (used by the
    /// core; public for pager tests, with [`FrameReader::from_slice`]).
    ///
    /// # Panics
    ///
    /// If `frame` is not [`PAGE_SIZE`] bytes long.
    #[must_use]
    pub fn new(pindex: u64, frame: FrameReader<'a>, dirty: u8) -> Self {
        assert_eq!(
            frame.len(),
            PAGE_SIZE as usize,
            "a page out covers one page"
        );
        PageOut {
            pindex,
            frame,
            dirty,
        }
    }

    /// The page's index in the object.
    #[must_use]
    pub fn pindex(&self) -> u64 {
        self.pindex
    }

    /// The page's bytes (a window, never a reference: see
    /// [`frame`](crate::frame)).
    #[must_use]
    pub fn frame(&self) -> FrameReader<'a> {
        self.frame
    }

    /// Copies the page's bytes from `offset` into `buf`.
    ///
    /// # Panics
    ///
    /// If the bytes leave the page.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.frame.read(offset, buf);
    }

    /// Which 512-byte blocks are dirty.
    #[must_use]
    pub fn dirty(&self) -> u8 {
        self.dirty
    }
}
