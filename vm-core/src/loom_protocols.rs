//! Model checks of the concurrency protocols under loom (`--cfg loom`):
//! every interleaving (bounded by `LOOM_MAX_PREEMPTIONS`) of the real
//! code of
//!
//! * the busy-page protocol: a thread sleeping on a busy page is woken by
//!   the unbusy that follows, never left asleep (`VmPage::want` /
//!   `unbusy` / `wake` / `sleep_while_busy` over the [`WaitTable`]);
//! * paging in progress: a waiter for an object's operations to drain is
//!   woken by the last one ([`Gate`]);
//! * the page-release protocol: a page freed while wired or held is freed
//!   exactly once, by whichever of the free and the last release comes
//!   second (`FREE_PENDING`, `VmPage::unreferenced` /
//!   `claim_pending_free`).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p vm-core --lib --release
//! loom_protocols` (CI does, with `LOOM_MAX_PREEMPTIONS=3`).

use crate::page::{PageFlags, PageId, PageQueue, VmPage};
use crate::page_queues::{AllocClass, Pages, Thresholds};
use crate::sync::{Gate, WaitTable};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, Ordering};
use loom::thread;

const KEY: u64 = 7;

#[test]
fn a_sleeper_on_a_busy_page_is_always_woken() {
    loom::model(|| {
        let page = Arc::new(VmPage::default());
        let waits = Arc::new(WaitTable::default());
        assert!(page.try_busy());
        let sleeper = {
            let (page, waits) = (page.clone(), waits.clone());
            thread::spawn(move || {
                page.sleep_while_busy(&waits, KEY, page.object_raw(), page.pindex());
                // Woken: the page is no longer busy, or someone else has
                // it (here nobody does).
                assert!(!page.flags().contains(PageFlags::BUSY));
            })
        };
        page.wake(&waits, KEY);
        sleeper.join().unwrap();
    });
}

#[test]
fn only_one_of_two_busiers_wins_and_the_loser_is_woken() {
    loom::model(|| {
        let page = Arc::new(VmPage::default());
        let waits = Arc::new(WaitTable::default());
        let owners = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (page, waits, owners) = (page.clone(), waits.clone(), owners.clone());
                thread::spawn(move || {
                    while !page.try_busy() {
                        page.sleep_while_busy(&waits, KEY, page.object_raw(), page.pindex());
                    }
                    assert_eq!(owners.fetch_add(1, Ordering::SeqCst), 0, "two owners");
                    owners.fetch_sub(1, Ordering::SeqCst);
                    page.wake(&waits, KEY);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!page.is_busy());
    });
}

#[test]
fn the_last_paging_operation_wakes_the_drain() {
    loom::model(|| {
        let gate = Arc::new(Gate::default());
        let waits = Arc::new(WaitTable::default());
        gate.enter();
        gate.enter();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (gate, waits) = (gate.clone(), waits.clone());
                thread::spawn(move || gate.leave(&waits, KEY))
            })
            .collect();
        gate.wait_idle(&waits, KEY);
        assert_eq!(gate.count(), 0);
        for w in workers {
            w.join().unwrap();
        }
    });
}

/// A page array of one frame, allocated and wired or held as asked.
fn one_page(wired: bool, held: bool) -> (Arc<Pages>, PageId) {
    let pages = Arc::new(Pages::new(
        0,
        1,
        true,
        Thresholds {
            reserved: 0,
            severe: 0,
            target: 0,
        },
        0,
    ));
    let id = pages
        .alloc(0, AllocClass::Normal, true)
        .expect("one free frame");
    pages.activate(id);
    if wired {
        pages.wire(id);
    }
    if held {
        pages.hold(id);
    }
    (pages, id)
}

/// Freed once, back on the free list, and no queue counts a page.
fn freed_once(pages: &Pages) {
    assert_eq!(pages.free_count(), 1, "freed once");
    assert_eq!(pages.queue_count(PageQueue::Active), 0);
    assert_eq!(pages.queue_count(PageQueue::Inactive), 0);
    assert_eq!(pages.wired_count(), 0);
}

#[test]
fn a_page_freed_while_held_or_wired_is_freed_exactly_once() {
    for wired in [false, true] {
        loom::model(move || {
            let (pages, id) = one_page(wired, !wired);
            let releaser = {
                let pages = pages.clone();
                thread::spawn(move || {
                    if wired {
                        pages.unwire(id, true);
                    } else {
                        pages.unhold(id);
                    }
                })
            };
            pages.free(id);
            releaser.join().unwrap();
            freed_once(&pages);
        });
    }
}

#[test]
fn a_page_held_and_wired_is_freed_once_by_the_last_of_three() {
    loom::model(|| {
        let (pages, id) = one_page(true, true);
        let (p1, p2) = (pages.clone(), pages.clone());
        let unwire = thread::spawn(move || {
            p1.unwire(id, true);
        });
        let unhold = thread::spawn(move || p2.unhold(id));
        pages.free(id);
        unwire.join().unwrap();
        unhold.join().unwrap();
        freed_once(&pages);
    });
}

#[test]
fn a_requeue_racing_a_free_leaves_the_counts_right() {
    loom::model(|| {
        let (pages, id) = one_page(false, false);
        let scanner = {
            let pages = pages.clone();
            thread::spawn(move || pages.deactivate(id))
        };
        pages.free(id);
        scanner.join().unwrap();
        freed_once(&pages);
    });
}
