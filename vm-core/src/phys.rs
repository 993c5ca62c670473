//! Physical memory: how the core reaches the bytes of a frame (the kernel's
//! direct map).
//!
//! Frames are plain memory. Who may touch a frame's bytes is decided by the
//! page's busy state, not by a Rust borrow: a busy page belongs to whoever
//! busied it, a mapped valid page to the users of its mappings. The methods
//! here therefore take frame numbers and copy through raw pointers.

use crate::addr::{PAGE_SIZE, Pfn};
use core::ptr::NonNull;

/// The machine's RAM: `frames` frames of [`PAGE_SIZE`] bytes starting at
/// physical address `base`.
pub struct PhysMem {
    ptr: NonNull<u8>,
    base_pfn: u64,
    frames: u64,
    #[cfg(feature = "std")]
    _map: Option<memmap2::MmapMut>,
}

// SAFETY: PhysMem is a window onto memory that lives as long as the value;
// concurrent access to frame bytes is coordinated by the page busy protocol
// documented at module level, the same as a kernel's direct map.
unsafe impl Send for PhysMem {}
// SAFETY: see above.
unsafe impl Sync for PhysMem {}

impl core::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PhysMem")
            .field("base_pfn", &self.base_pfn)
            .field("frames", &self.frames)
            .finish()
    }
}

impl PhysMem {
    /// Anonymous, zero-filled host memory of `bytes` (rounded down to whole
    /// pages), starting at physical address 0. The host gives out pages only
    /// when they are touched, so gigabytes of "RAM" cost nothing up front.
    ///
    /// # Errors
    ///
    /// The host's error if the mapping cannot be made.
    #[cfg(feature = "std")]
    pub fn anonymous(bytes: u64) -> std::io::Result<PhysMem> {
        let frames = bytes / PAGE_SIZE;
        let len = usize::try_from(frames * PAGE_SIZE)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "physical memory must hold at least one page",
            ));
        }
        let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
        // Back the frames with the host's huge pages where it offers them,
        // as a hypervisor backs guest memory: far fewer host TLB misses on
        // every frame the machine touches. Advice only; refusal is harmless.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let ptr = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null");
        Ok(PhysMem {
            ptr,
            base_pfn: 0,
            frames,
            _map: Some(map),
        })
    }

    /// Physical memory the embedder already has: `frames` frames at host
    /// pointer `ptr`, which is physical frame `base_pfn`.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `frames * PAGE_SIZE`
    /// bytes for the life of the returned value, page aligned, and used by
    /// nothing else except through this value (or by hardware that follows
    /// the mappings this crate makes).
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, base_pfn: u64, frames: u64) -> PhysMem {
        PhysMem {
            ptr,
            base_pfn,
            frames,
            #[cfg(feature = "std")]
            _map: None,
        }
    }

    /// First frame number.
    #[must_use]
    pub fn base_pfn(&self) -> u64 {
        self.base_pfn
    }

    /// Number of frames.
    #[must_use]
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Whether `pfn` is a frame of this memory.
    #[must_use]
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.0.wrapping_sub(self.base_pfn) < self.frames
    }

    /// Host pointer to the first byte of `pfn`, or `None` outside memory.
    ///
    /// Writing through the pointer is only sound for a caller that owns the
    /// frame's contents under the busy protocol (see the module docs).
    #[must_use]
    pub fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<u8>> {
        if !self.contains(pfn) {
            return None;
        }
        let off = (pfn.0 - self.base_pfn) * PAGE_SIZE;
        // SAFETY: off < frames * PAGE_SIZE, inside the region `ptr` covers.
        Some(unsafe { self.ptr.add(off as usize) })
    }

    /// Host base pointer and length in bytes: what a hypervisor registers
    /// as guest-physical memory.
    #[must_use]
    pub fn host_region(&self) -> (NonNull<u8>, u64) {
        (self.ptr, self.frames * PAGE_SIZE)
    }

    fn frame(&self, pfn: Pfn) -> *mut u8 {
        match self.frame_ptr(pfn) {
            Some(p) => p.as_ptr(),
            None => panic!("{pfn} is outside physical memory (internal invariant)"),
        }
    }

    /// Fills frame `pfn` with zeros (FreeBSD `pmap_zero_page`).
    ///
    /// # Panics
    ///
    /// If `pfn` is not a frame of this memory; the core only passes frames it
    /// allocated here.
    pub fn zero(&self, pfn: Pfn) {
        // SAFETY: the frame is inside the region; the caller owns its
        // contents (busy page) per the module's protocol.
        unsafe { core::ptr::write_bytes(self.frame(pfn), 0, PAGE_SIZE as usize) }
    }

    /// Copies frame `src` to frame `dst` (FreeBSD `pmap_copy_page`).
    ///
    /// # Panics
    ///
    /// If either frame is outside this memory, or they are the same frame.
    pub fn copy(&self, src: Pfn, dst: Pfn) {
        assert_ne!(src, dst, "copy_page onto itself");
        // SAFETY: both frames are inside the region and distinct, so the
        // ranges do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(self.frame(src), self.frame(dst), PAGE_SIZE as usize)
        }
    }

    /// Copies `buf.len()` bytes out of frame `pfn` starting at `offset`.
    ///
    /// # Panics
    ///
    /// If the range leaves the frame or the frame is outside memory.
    pub fn read(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= PAGE_SIZE as usize);
        // SAFETY: the range is inside the frame; `buf` is a distinct Rust
        // allocation.
        unsafe {
            core::ptr::copy_nonoverlapping(self.frame(pfn).add(offset), buf.as_mut_ptr(), buf.len())
        }
    }

    /// Copies `data` into frame `pfn` at `offset`.
    ///
    /// # Panics
    ///
    /// If the range leaves the frame or the frame is outside memory.
    pub fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE_SIZE as usize);
        // SAFETY: the range is inside the frame; `data` is a distinct Rust
        // allocation.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.frame(pfn).add(offset), data.len())
        }
    }

    /// Zeroes the byte range `start..end` of frame `pfn`.
    pub(crate) fn zero_range(&self, pfn: Pfn, start: usize, end: usize) {
        debug_assert!(start <= end && end <= PAGE_SIZE as usize);
        // SAFETY: the range is inside the frame.
        unsafe { core::ptr::write_bytes(self.frame(pfn).add(start), 0, end - start) }
    }

    /// A shared view of a frame for a pager writing a busy page out.
    ///
    /// # Safety
    ///
    /// The caller holds the page busy and has write-protected every mapping
    /// of it, so nothing writes the frame for the life of the slice.
    pub(crate) unsafe fn frame_ref(&self, pfn: Pfn) -> &[u8; PAGE_SIZE as usize] {
        // SAFETY: inside the region, aligned to a page; the absence of
        // writers is the caller's promise.
        unsafe { &*(self.frame(pfn) as *const [u8; PAGE_SIZE as usize]) }
    }

    /// A mutable view of a frame for a pager filling a busy page.
    ///
    /// # Safety
    ///
    /// The caller owns the frame's contents (it holds the page busy and the
    /// page is not mapped writable anywhere) for the life of the slice, and
    /// makes no other reference to the same frame meanwhile.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's contract, as for a direct map
    pub(crate) unsafe fn frame_mut(&self, pfn: Pfn) -> &mut [u8; PAGE_SIZE as usize] {
        // SAFETY: inside the region, aligned to a page; exclusivity is the
        // caller's promise.
        unsafe { &mut *(self.frame(pfn) as *mut [u8; PAGE_SIZE as usize]) }
    }
}
