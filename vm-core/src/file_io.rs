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
    off: u64,
    calls: &AtomicU64,
) -> io::Result<usize> {
    transfer(iov, off, calls, |iov, off| {
        // SAFETY: each iovec points to a distinct buffer the caller owns
        // mutably for this call; the count fits the slice.
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

/// `pwritev` at `off` until all of `iov` is written, counting system
/// calls in `calls`.
///
/// # Errors
///
/// The first I/O error other than `EINTR`; a write of zero bytes.
pub fn write_fully(
    file: &File,
    iov: &[libc::iovec],
    off: u64,
    calls: &AtomicU64,
) -> io::Result<()> {
    let mut owned = iov.to_vec();
    let want: usize = iov.iter().map(|v| v.iov_len).sum();
    let done = transfer(&mut owned, off, calls, |iov, off| {
        // SAFETY: each iovec points into a page the caller keeps alive and
        // unchanged (busy, write-protected) for this call.
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
