//! # vm-testkit
//!
//! Parts for testing code built on `vm-core`, and `vm-core` itself:
//!
//! * [`RefPmap`] — a reference pmap (address → frame maps and reverse
//!   lists), so the core runs end to end without hardware page tables;
//! * [`MockPmap`] / [`MockPager`] — `mockall` mocks of the two traits, for
//!   checking call sequences;
//! * [`MemPager`] — an in-memory pager that logs calls and fails on
//!   command;
//! * [`machine`] — a small machine on the reference pmap in one call;
//! * [`scenarios`] — end-to-end checks generic over the pmap;
//! * [`model`] — a reference model and operation language for property
//!   tests and fuzzing of a whole machine.
//!
//! ```
//! use vm_core::{Prot, FaultFlags};
//!
//! let (vm, space) = vm_testkit::machine(64);
//! space.map_anon(0x1000, 0x2000, Prot::RW).unwrap();
//! space.fault(0x1000, Prot::WRITE, FaultFlags::DIRTY).unwrap();
//! vm.check_consistency().unwrap();
//! ```
#![warn(missing_docs)]

mod mem_pager;
mod mocks;
pub mod model;
mod ref_pmap;
pub mod scenarios;
pub mod support;

pub use mem_pager::{GetCall, Injected, MemPager, Pause, pattern_byte};
pub use mocks::{MockPager, MockPmap, Permissive};
pub use ref_pmap::{RefPmap, RefPmapCalls, RefPte, RefSpace};

use std::sync::Arc;
use vm_core::{Vm, VmConfig, VmSpace};

/// A machine of `pages` pages on a [`RefPmap`], with free-page thresholds
/// at zero and short memory waits (tests fill memory on purpose), and one
/// empty address space.
///
/// # Panics
///
/// If the host cannot map the memory.
#[must_use]
pub fn machine(pages: u64) -> (Arc<Vm<RefPmap>>, VmSpace<RefPmap>) {
    let vm = Vm::new(RefPmap::new(), test_config(pages)).expect("test machine");
    let space = vm.new_space().expect("reference pmap never fails");
    (vm, space)
}

/// The configuration [`machine`] uses.
#[must_use]
pub fn test_config(pages: u64) -> VmConfig {
    VmConfig {
        thresholds: Some(vm_core::page_queues::Thresholds {
            reserved: 0,
            severe: 0,
            target: 0,
        }),
        memory_wait_ms: 5,
        ..VmConfig::with_memory(pages * vm_core::PAGE_SIZE)
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
