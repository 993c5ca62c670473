//! Reading and writing frame bytes without Rust references.
//!
//! A frame of physical memory is shared with other agents: other threads of
//! the library (a fault, a write-back, a hold's user), a device doing DMA, a
//! guest CPU under KVM. A Rust reference (`&[u8]`, `&mut [u8]`) to such
//! bytes would promise the compiler that nobody else touches them for its
//! lifetime, a promise nobody here can keep. So frame bytes are only ever
//! copied, filled or handed to the kernel through raw pointers, the way the
//! hardware moves them: on x86_64 with `rep movsb` / `rep stosb` in inline
//! assembly, which the compiler cannot reason about (the shape of Asterinas
//! OSTD's `VmReader` / `VmWriter` and of the kernel's copy routines).
//!
//! [`FrameReader`] and [`FrameWriter`] are windows onto frame bytes (or onto
//! an ordinary buffer, for tests) with a lifetime that keeps the memory
//! alive; they never lend a reference to what they cover.

use core::marker::PhantomData;
use core::ptr::NonNull;

/// Raw byte moves, as the hardware does them.
mod hw {
    /// Copies `len` bytes from `src` to `dst` (which may overlap no
    /// reference-holding memory of the caller's own).
    ///
    /// # Safety
    ///
    /// `src` is valid for reads and `dst` for writes of `len` bytes.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller vouches for both ranges; `rep movsb` moves
        // `rcx` bytes forward from `rsi` to `rdi` (the direction flag is
        // clear by the ABI) and touches nothing else.
        unsafe {
            core::arch::asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Fills `len` bytes at `dst` with `byte`.
    ///
    /// # Safety
    ///
    /// `dst` is valid for writes of `len` bytes.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn fill(dst: *mut u8, byte: u8, len: usize) {
        // SAFETY: the caller vouches for the range; `rep stosb` stores
        // `al` into `rcx` bytes from `rdi` upward.
        unsafe {
            core::arch::asm!(
                "rep stosb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                in("al") byte,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Elsewhere: the compiler's own raw copies (no references are made
    /// either way).
    ///
    /// # Safety
    ///
    /// As the x86_64 version.
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller vouches for both ranges.
        unsafe { core::ptr::copy(src, dst, len) }
    }

    /// # Safety
    ///
    /// As the x86_64 version.
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn fill(dst: *mut u8, byte: u8, len: usize) {
        // SAFETY: the caller vouches for the range.
        unsafe { core::ptr::write_bytes(dst, byte, len) }
    }
}

/// Checks that `offset..offset+len` lies inside a window of `size` bytes.
fn check(offset: usize, len: usize, size: usize) {
    assert!(
        offset.checked_add(len).is_some_and(|end| end <= size),
        "bytes {offset}..{offset}+{len} leave a window of {size} bytes"
    );
}

/// A window onto bytes to read (a frame, or a buffer). See the
/// [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct FrameReader<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _memory: PhantomData<&'a [u8]>,
}

impl<'a> FrameReader<'a> {
    /// A window onto `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` is valid for reads of `len` bytes for `'a`.
    pub(crate) unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> FrameReader<'a> {
        FrameReader {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// A window onto an ordinary buffer (for pagers' tests).
    #[must_use]
    pub fn from_slice(buf: &'a [u8]) -> FrameReader<'a> {
        FrameReader {
            ptr: NonNull::from(buf).cast(),
            len: buf.len(),
            _memory: PhantomData,
        }
    }

    /// Bytes in the window.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the bytes at `offset..offset + buf.len()` into `buf`.
    ///
    /// # Panics
    ///
    /// If the range leaves the window.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        check(offset, buf.len(), self.len);
        // SAFETY: the range is inside the window, valid for reads for 'a;
        // `buf` is the caller's own memory.
        unsafe { hw::copy(buf.as_mut_ptr(), self.ptr.as_ptr().add(offset), buf.len()) }
    }

    /// The byte at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is outside the window.
    #[must_use]
    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0];
        self.read(offset, &mut b);
        b[0]
    }

    /// The first byte's address, for handing the window to the operating
    /// system (a `pwritev`); never to make a reference of.
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

/// A window onto bytes to write (a frame, or a buffer). See the
/// [module docs](self).
#[derive(Debug)]
pub struct FrameWriter<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> FrameWriter<'a> {
    /// A window onto `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` is valid for reads and writes of `len` bytes for `'a`.
    pub(crate) unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> FrameWriter<'a> {
        FrameWriter {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// A window onto an ordinary buffer (for pagers' tests).
    #[must_use]
    pub fn from_slice(buf: &'a mut [u8]) -> FrameWriter<'a> {
        FrameWriter {
            len: buf.len(),
            ptr: NonNull::from(buf).cast(),
            _memory: PhantomData,
        }
    }

    /// Bytes in the window.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` to the bytes at `offset..offset + data.len()`.
    ///
    /// # Panics
    ///
    /// If the range leaves the window.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        check(offset, data.len(), self.len);
        // SAFETY: the range is inside the window, valid for writes for 'a;
        // `data` is the caller's own memory.
        unsafe { hw::copy(self.ptr.as_ptr().add(offset), data.as_ptr(), data.len()) }
    }

    /// Fills the bytes at `offset..offset + len` with `byte`.
    ///
    /// # Panics
    ///
    /// If the range leaves the window.
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) {
        check(offset, len, self.len);
        // SAFETY: the range is inside the window, valid for writes for 'a.
        unsafe { hw::fill(self.ptr.as_ptr().add(offset), byte, len) }
    }

    /// Copies all of `src` to the bytes from `offset`.
    ///
    /// # Panics
    ///
    /// If `src` does not fit from `offset`.
    pub fn copy_from(&mut self, offset: usize, src: &FrameReader<'_>) {
        check(offset, src.len, self.len);
        // SAFETY: the destination range is inside this window (writes),
        // the source window is valid for reads; `hw::copy` moves bytes
        // without references, so even overlapping windows are fine.
        unsafe { hw::copy(self.ptr.as_ptr().add(offset), src.as_ptr(), src.len) }
    }

    /// The same bytes, to read.
    #[must_use]
    pub fn reader(&self) -> FrameReader<'_> {
        FrameReader {
            ptr: self.ptr,
            len: self.len,
            _memory: PhantomData,
        }
    }

    /// The first byte's address, for handing the window to the operating
    /// system (a `preadv`); never to make a reference of.
    #[must_use]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_copy_fill_and_refuse_what_leaves_them() {
        let mut a = [0u8; 16];
        let b: [u8; 4] = [1, 2, 3, 4];
        let mut w = FrameWriter::from_slice(&mut a);
        w.write(2, &b);
        w.fill(8, 4, 9);
        w.copy_from(12, &FrameReader::from_slice(&b[..2]));
        let mut out = [0u8; 16];
        w.reader().read(0, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0, 9, 9, 9, 9, 1, 2, 0, 0]);
        assert_eq!(w.reader().read_u8(3), 2);
        let r = std::panic::catch_unwind(move || {
            let mut c = [0u8; 4];
            FrameWriter::from_slice(&mut c).write(3, &[1, 2]);
        });
        assert!(r.is_err(), "a write past the window panics");
    }
}
