//! A reference model of address spaces and an operation language, for
//! property tests and fuzzing of a whole machine.
//!
//! Each space maps *slots* (regions of [`SLOT_PAGES`] pages, or of a size
//! chosen by [`Harness::with_slot_pages`]: 512-page slots are 2 MiB
//! superpages). A slot shows a *base*
//! (a vector of page values: fresh anonymous memory, one of the named
//! anonymous objects, an object whose pager fills only part of each page,
//! or the file) and, when mapped private, a layer of private pages on top:
//! a page the space wrote (or that the kernel copied for it) reads from the
//! layer, the others read through to the base, so a private mapping sees a
//! shared writer's changes until it has its own copy, as FreeBSD does. Fork
//! copies the layer or shares the base as inheritance says. Device slots map
//! fixed device addresses.
//!
//! Wiring follows mlock(2) and FreeBSD's `vm_map_wire`: a user wiring does
//! not stack, kernel wirings nest, and a slot's pages are faulted in (a
//! writable private slot copying them all) when it goes from unwired to
//! wired. Holds follow the library's rules: a hold of a private page first
//! takes the space's own copy of it; writes through a write hold land in
//! the held page, which stays the memory of the mapping it was taken in
//! (the parent's, across a fork) until that mapping goes; a read hold
//! cannot write. A forced write lands in a private mapping's own copy, or
//! in a writable shared mapping.
//!
//! [`Harness`] runs the same operations on a real [`Vm`](vm_core::Vm) and
//! on the model and checks, after every step, that they agree: allowed
//! accesses see the model's bytes, forbidden ones fail with the right error
//! (and, while [`Op::Starve`] holds the frames back, an operation that needs
//! one may fail with a shortage and must then change nothing), the file on
//! disk holds what write-back promised, the machine is consistent (wire
//! counts included), and isolation holds (every mapped frame holds what the
//! model says that address reads, and zeros where no pager filled it; a
//! frame one space can write is mapped nowhere for other memory; no free
//! frame is mapped).
//!
//! What the model leaves out: holes in the named objects (they are written
//! whole when the harness starts: whether a read of a hole through a private
//! mapping pins a zero page depends on which object of its chain is first
//! at that moment, FreeBSD's timing rather than a property); partial file
//! pages (the file is truncated to whole pages; the partial object covers
//! pagers that fill part of a page).

mod harness;
mod op;

pub use harness::{Harness, Probe};
pub use op::Op;

/// Bytes in a page.
const PAGE: u64 = vm_core::PAGE_SIZE;
/// Slots per space.
pub const SLOTS: usize = 4;
/// Pages per slot (and of each object, the file and the device).
pub const SLOT_PAGES: u64 = 8;
/// Spaces alive at most.
pub const SPACES: usize = 3;
/// Named anonymous objects.
pub const OBJECTS: usize = 2;
/// Objects [`Op::MapObject`] can name: the named anonymous ones, then the
/// partly filling one.
pub const MAPPABLE: usize = OBJECTS + 1;
/// Hold slots.
pub const HOLDS: usize = 4;
/// Where the model device's page 0 is (outside the machine's memory).
pub const DEVICE_PA: u64 = 0xfd00_0000;

/// The address of `page` of `slot` with slots of [`SLOT_PAGES`] pages
/// (what [`Harness::new`] uses; see [`Harness::slot_va`] for others).
#[must_use]
pub fn slot_va(slot: usize, page: u64) -> u64 {
    slot_base(slot, SLOT_PAGES) + page * PAGE
}

/// Where `slot` starts with slots of `slot_pages` pages: 1 MiB apart
/// (small slots share leaf tables in pairs), or whole 2 MiB apart when a
/// slot is larger, so each slot starts on a superpage boundary.
fn slot_base(slot: usize, slot_pages: u64) -> u64 {
    const SUPERPAGE: u64 = 2 << 20;
    let stride = (slot_pages * PAGE).max(1 << 20);
    let stride = if stride > 1 << 20 {
        stride.div_ceil(SUPERPAGE) * SUPERPAGE
    } else {
        stride
    };
    0x1000_0000 + slot as u64 * stride
}
