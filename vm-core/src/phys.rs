//! Physical memory: how the core reaches the bytes of a frame (the kernel's
//! direct map).
//!
//! Frames are memory shared with other agents. Who may touch a frame's
//! bytes is decided by the page's busy state, not by a Rust borrow: a busy
//! page belongs to whoever busied it, a mapped valid page to the users of
//! its mappings, a held page also to its holder (a device). So no Rust
//! reference to frame bytes is ever made: the methods here take frame
//! numbers and move bytes through the [`frame`](crate::frame) windows,
//! which copy the way the hardware does.

use crate::addr::{PAGE_SIZE, Pfn};
use crate::frame::{FrameReader, FrameWriter};
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

    /// Host pointer to the first byte of `pfn`, or `None` outside memory
    /// (for a hypervisor or a device model; never make a Rust reference to
    /// what it points at, see the module docs).
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

    fn frame(&self, pfn: Pfn) -> NonNull<u8> {
        match self.frame_ptr(pfn) {
            Some(p) => p,
            None => panic!("{pfn} is outside physical memory (internal invariant)"),
        }
    }

    /// A window to read frame `pfn`'s bytes, `None` outside memory.
    #[must_use]
    pub fn reader(&self, pfn: Pfn) -> Option<FrameReader<'_>> {
        let ptr = self.frame_ptr(pfn)?;
        // SAFETY: a whole frame inside the region, which lives as long as
        // `self`; the window makes no reference to the bytes.
        Some(unsafe { FrameReader::from_raw(ptr, PAGE_SIZE as usize) })
    }

    /// A window to write frame `pfn`'s bytes, `None` outside memory.
    #[must_use]
    pub fn writer(&self, pfn: Pfn) -> Option<FrameWriter<'_>> {
        let ptr = self.frame_ptr(pfn)?;
        // SAFETY: as `reader`, for writes.
        Some(unsafe { FrameWriter::from_raw(ptr, PAGE_SIZE as usize) })
    }

    /// As [`writer`](Self::writer), for frames the core allocated here.
    pub(crate) fn writer_of(&self, pfn: Pfn) -> FrameWriter<'_> {
        let ptr = self.frame(pfn);
        // SAFETY: as `writer`.
        unsafe { FrameWriter::from_raw(ptr, PAGE_SIZE as usize) }
    }

    /// As [`reader`](Self::reader), for frames the core allocated here.
    pub(crate) fn reader_of(&self, pfn: Pfn) -> FrameReader<'_> {
        let ptr = self.frame(pfn);
        // SAFETY: as `reader`.
        unsafe { FrameReader::from_raw(ptr, PAGE_SIZE as usize) }
    }

    /// Fills frame `pfn` with zeros (FreeBSD `pmap_zero_page`).
    ///
    /// # Panics
    ///
    /// If `pfn` is not a frame of this memory; the core only passes frames it
    /// allocated here.
    pub fn zero(&self, pfn: Pfn) {
        self.writer_of(pfn).fill(0, PAGE_SIZE as usize, 0);
    }

    /// Whether every byte of frame `pfn` is zero (false outside memory).
    /// Reads the frame once, a chunk at a time.
    #[must_use]
    pub fn is_zero(&self, pfn: Pfn) -> bool {
        let Some(frame) = self.reader(pfn) else {
            return false;
        };
        let mut chunk = [0u8; 512];
        (0..PAGE_SIZE as usize).step_by(chunk.len()).all(|off| {
            frame.read(off, &mut chunk);
            // A word-wise OR, which the compiler vectorises.
            let or = chunk.chunks_exact(8).fold(0u64, |acc, w| {
                acc | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))
            });
            or == 0
        })
    }

    /// Copies frame `src` to frame `dst` (FreeBSD `pmap_copy_page`).
    ///
    /// # Panics
    ///
    /// If either frame is outside this memory, or they are the same frame.
    pub fn copy(&self, src: Pfn, dst: Pfn) {
        assert_ne!(src, dst, "copy_page onto itself");
        self.writer_of(dst).copy_from(0, &self.reader_of(src));
    }

    /// Copies `buf.len()` bytes out of frame `pfn` starting at `offset`.
    ///
    /// # Panics
    ///
    /// If the range leaves the frame or the frame is outside memory.
    pub fn read(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) {
        self.reader_of(pfn).read(offset, buf);
    }

    /// Copies `data` into frame `pfn` at `offset`.
    ///
    /// # Panics
    ///
    /// If the range leaves the frame or the frame is outside memory.
    pub fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) {
        self.writer_of(pfn).write(offset, data);
    }

    /// Zeroes the byte range `start..end` of frame `pfn`.
    pub(crate) fn zero_range(&self, pfn: Pfn, start: usize, end: usize) {
        debug_assert!(start <= end && end <= PAGE_SIZE as usize);
        self.writer_of(pfn).fill(start, end - start, 0);
    }
}
