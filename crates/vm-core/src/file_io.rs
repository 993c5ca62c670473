//! Positioned, vectored file I/O for pagers: one `preadv`/`pwritev` per
//! contiguous run of pages, retried on short transfers and `EINTR`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// `preadv` at `off` until `iov` is full or EOF; returns the bytes read
/// and counts system calls in `calls`.
///
/// # Errors
///
/// The first I/O error other than `EINTR`.
pub fn read_fully(
    file: &File,
    iov: &mut [libc::iovec],
    mut off: u64,
    calls: &AtomicU64,
) -> io::Result<usize> {
    let mut total = 0;
    let mut iov = iov;
    while !iov.is_empty() {
        calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: each iovec points to a distinct page-sized buffer the
        // caller owns mutably for this call; the count fits the slice.
        let r = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        };
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

/// `pwritev` at `off` until all of `iov` is written, counting system
/// calls in `calls`.
///
/// # Errors
///
/// The first I/O error other than `EINTR`; a write of zero bytes.
pub fn write_fully(
    file: &File,
    iov: &[libc::iovec],
    mut off: u64,
    calls: &AtomicU64,
) -> io::Result<()> {
    let mut owned = iov.to_vec();
    let mut iov = owned.as_mut_slice();
    while !iov.is_empty() {
        calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: each iovec points into a page the caller keeps alive and
        // unchanged (busy, write-protected) for this call.
        let r = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as i32,
                off as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        off += r as u64;
        iov = advance(iov, r as usize);
    }
    Ok(())
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
