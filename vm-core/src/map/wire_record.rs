//! The wire record of a wired map entry: which page it holds wired at each
//! of its pages. The protocol that fills and releases it is wiring's
//! ([`space::wire`](crate::space::wire)); the record lives with the entry.

use crate::page::PageId;
use crate::page_queues::Pages;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicU32, Ordering};

/// A slot with no page.
const NO_PAGE: u32 = u32::MAX;

/// The pages one wired entry holds wired, by page of the entry (see
/// "Accounting: the wire record" in [`space::wire`](crate::space::wire)).
#[derive(Debug)]
pub(crate) struct WireRecord {
    slots: Box<[AtomicU32]>,
}

impl WireRecord {
    /// A record for an entry of `pages` pages, holding nothing yet.
    pub(crate) fn new(pages: u64) -> WireRecord {
        WireRecord {
            slots: (0..pages).map(|_| AtomicU32::new(NO_PAGE)).collect(),
        }
    }

    /// Records that the entry shows page `id` at its page `index`, moving
    /// the entry's wiring to it. A fault calls this with the page busy and
    /// the map read-locked, so two callers for one slot are rare; the
    /// order (wire the new page, swap, unwire the old) keeps the counts
    /// right even then: the page a racing caller swaps out was wired
    /// before it became visible in the slot.
    pub(crate) fn note(&self, pages: &Pages, index: u64, id: PageId) {
        let Some(slot) = self.slots.get(index as usize) else {
            debug_assert!(false, "wire record index {index} out of range");
            return;
        };
        if slot.load(Ordering::Acquire) == id.0 {
            return;
        }
        pages.wire(id);
        let old = slot.swap(id.0, Ordering::AcqRel);
        if old == id.0 {
            pages.unwire(id, true);
        } else if old != NO_PAGE {
            pages.unwire(PageId(old), true);
        }
    }

    /// Every (index, page) the record holds.
    pub(crate) fn held(&self) -> impl Iterator<Item = (u64, PageId)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let id = s.load(Ordering::Acquire);
            (id != NO_PAGE).then_some((i as u64, PageId(id)))
        })
    }

    /// Splits the record at page `at`: `self` keeps the pages below, the
    /// returned record those from `at` (an entry clipped in two).
    pub(crate) fn split_off(&mut self, at: u64) -> WireRecord {
        let at = (at as usize).min(self.slots.len());
        let mut all = core::mem::take(&mut self.slots).into_vec();
        let upper = all.split_off(at);
        self.slots = all.into_boxed_slice();
        WireRecord {
            slots: upper.into_boxed_slice(),
        }
    }
}
