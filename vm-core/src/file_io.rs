//! Positioned, vectored file I/O for pagers: one `preadv`/`pwritev` per
//! contiguous run of pages, retried on short transfers and `EINTR`.
//!
//! The functions take the pager's [`PageSlot`]s and [`PageOut`]s, not
//! buffers: frame bytes are never lent as Rust slices (see
//! [`frame`](crate::frame)), so the `iovec`s that point the kernel at them
//! are built here, from the windows' raw pointers.
//!
//! Why `libc` and not `rustix`: rustix's `preadv` takes
//! `&mut [IoSliceMut]`, that is `&mut [u8]` references to frame bytes that
//! other threads may read or write at the same time (a frame is shared
//! memory), which is undefined behaviour however briefly it lives. Raw
//! `iovec`s built from pointers avoid making such a reference; the FFI
//! stays in this module.

use crate::addr::PAGE_SIZE;
use crate::pager::{PageOut, PageSlot};
use smallvec::SmallVec;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Vectors kept on the stack: a read-ahead cluster or write-back run.
type Iovecs = SmallVec<[libc::iovec; 64]>;

/// The first `len` bytes of consecutive pages, as vectors.
fn vectors(pages: impl Iterator<Item = *mut u8>, mut len: usize) -> Iovecs {
    let mut iov = Iovecs::new();
    for base in pages {
        if len == 0 {
            break;
        }
        let n = len.min(PAGE_SIZE as usize);
        iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: n,
        });
        len -= n;
    }
    iov
}

/// Reads `len` bytes of `file` at `off` into consecutive `slots` (a page
/// each; `len` is cut to the slots' size) with `preadv`, until `len` or
/// EOF; returns the bytes read and counts system calls in `calls`. Marks no
/// slot valid: that is the pager's judgement.
///
/// # Errors
///
/// The first I/O error other than `EINTR`.
pub fn read_pages(
    file: &File,
    slots: &mut [PageSlot<'_>],
    off: u64,
    len: usize,
    calls: &AtomicU64,
) -> io::Result<usize> {
    let len = len.min(slots.len() * PAGE_SIZE as usize);
    let mut iov = vectors(slots.iter_mut().map(|s| s.frame().as_mut_ptr()), len);
    transfer(&mut iov, off, calls, |iov, off| {
        // SAFETY: each vector lies inside a distinct slot's window, which
        // the `&mut` borrow of `slots` keeps alive and unshared for the
        // call; the count fits the slice.
        unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        }
    })
}

/// Writes the first `len` bytes of consecutive `pages` (cut to their size)
/// to `file` at `off` with `pwritev`, counting system calls in `calls`.
///
/// # Errors
///
/// The first I/O error other than `EINTR`; a write of zero bytes.
pub fn write_pages(
    file: &File,
    pages: &[PageOut<'_>],
    off: u64,
    len: usize,
    calls: &AtomicU64,
) -> io::Result<()> {
    let want = len.min(pages.len() * PAGE_SIZE as usize);
    let mut iov = vectors(pages.iter().map(|p| p.frame().as_ptr().cast_mut()), want);
    let done = transfer(&mut iov, off, calls, |iov, off| {
        // SAFETY: each vector lies inside a page's window, alive for the
        // borrow of `pages`; `pwritev` only reads through them.
        unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        }
    })?;
    if done < want {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "pwritev wrote nothing",
        ));
    }
    Ok(())
}

/// Repeats the vectored system call `op` over what is left of `iov` until
/// it is all transferred or a call moves nothing; returns the bytes moved.
fn transfer(
    iov: &mut [libc::iovec],
    mut off: u64,
    calls: &AtomicU64,
    op: impl Fn(&[libc::iovec], u64) -> isize,
) -> io::Result<usize> {
    let mut total = 0;
    let mut iov = iov;
    while !iov.is_empty() {
        calls.fetch_add(1, Ordering::Relaxed);
        let r = op(iov, off);
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        let r = r as usize;
        total += r;
        off += r as u64;
        iov = advance(iov, r);
    }
    Ok(total)
}

/// Drops `n` consumed bytes from the front of `iov`.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut i = 0;
    while i < iov.len() && n >= iov[i].iov_len {
        n -= iov[i].iov_len;
        i += 1;
    }
    let rest = &mut iov[i..];
    if let Some(v) = rest.first_mut() {
        // SAFETY: n < iov_len, so the new base stays inside the buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
        v.iov_len -= n;
    }
    rest
}
