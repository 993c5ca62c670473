//! Machine-wide event counters (FreeBSD `struct vmmeter`, `vmstat -s`).

use crate::sync::SHARDS;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use crossbeam_utils::CachePadded;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// One thread's share of the counters: bump these (through
        /// [`Counters::local`]); read totals with [`Counters::snapshot`].
        #[derive(Debug, Default)]
        pub struct CounterShard {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A copy of the counters at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CounterSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Counters {
            /// Reads every counter (the sum of the shards).
            #[must_use]
            pub fn snapshot(&self) -> CounterSnapshot {
                let mut s = CounterSnapshot::default();
                for shard in &self.shards {
                    $(s.$name += shard.$name.load(Ordering::Relaxed);)*
                }
                s
            }
        }

        impl CounterSnapshot {
            /// Each counter as (name, description, value), in a fixed order.
            #[must_use]
            pub fn rows(&self) -> alloc::vec::Vec<(&'static str, &'static str, u64)> {
                alloc::vec![$((stringify!($name), concat!($($doc),*).trim_ascii(), self.$name),)*]
            }

            /// Counter-wise difference `self - earlier` (saturating).
            #[must_use]
            pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }
    };
}

/// Live counters of one [`Vm`](crate::Vm): relaxed atomics (statistics,
/// not synchronisation), split in cache-line-sized shards by thread so
/// that faults on different CPUs do not bounce one line between them (as
/// FreeBSD's `counter(9)` does per CPU).
#[derive(Debug, Default)]
pub struct Counters {
    shards: [CachePadded<CounterShard>; SHARDS],
}

impl Counters {
    /// The calling thread's shard, to bump a counter in.
    #[must_use]
    pub fn local(&self) -> &CounterShard {
        &self.shards[crate::sync::thread_shard() % SHARDS]
    }
}

counters! {
    /// page faults (every call of the fault handler)
    v_vm_faults,
    /// faults that slept on a busy page ("intransit blocking")
    v_intrans,
    /// zero-fill pages
    v_zfod,
    /// zero-fill pages that were already zero
    v_ozfod,
    /// copy-on-write faults
    v_cow_faults,
    /// copy-on-write faults resolved by moving the page
    v_cow_optim,
    /// faults that needed pager I/O (major faults)
    v_io_faults,
    /// pager get_pages calls
    v_pager_calls,
    /// read-ahead windows read in the background (of those calls)
    v_async_reads,
    /// pages read in by pagers
    v_pager_pages,
    /// pages a pager returned only partially valid (zero-filled)
    v_pager_partial,
    /// faults that waited for free memory
    v_wait_memory,
    /// stack growths
    v_stack_growths,
    /// shadow objects created
    v_shadows,
    /// stale mappings of a copied page removed from other pmaps
    v_cow_unmapped,
    /// neighbouring pages mapped by prefault
    v_prefaults,
    /// pages unmapped and deactivated behind a sequential scan
    v_cache_behind,
    /// clusters cut to one page for want of free memory
    v_cluster_short,
    /// backing objects merged into their only shadow
    v_collapses,
    /// fully shadowed backing objects a shadow stopped going through
    v_bypasses,
    /// dirty pages written back by their pager
    v_pages_cleaned,
    /// pages read from swap
    v_swappgsin,
    /// pages written to swap
    v_swappgsout,
    /// pages read from files
    v_vnodepgsin,
    /// pages written to files by the pageout daemon
    v_vnodepgsout,
    /// pages the pageout daemon examined
    v_pdpages,
    /// pages the pageout daemon freed
    v_pdfreed,
    /// pages the pageout daemon found referenced and kept
    v_reactivated,
    /// page-outs that failed for want of swap space or an I/O error
    v_pageout_failed,
}

impl fmt::Display for CounterSnapshot {
    /// A `vmstat -s`-style table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, desc, v) in self.rows() {
            writeln!(f, "{v:>12} {desc} ({name})")?;
        }
        Ok(())
    }
}
