//! # vm-core
//!
//! FreeBSD's page-fault subsystem (`sys/vm/vm_fault.c` and the model it
//! works on) as a library: a machine [`Vm`] with physical memory and a page
//! array, address spaces ([`VmSpace`]) made of a [`VmMap`] and a pmap,
//! [`VmObject`]s with shadow chains, and the fault handler
//! [`VmSpace::fault`], generic over two traits:
//!
//! * [`Pmap`] — the machine-dependent page tables (monomorphised: one pmap
//!   type per machine, it sits on the hot path);
//! * [`Pager`] — where page contents come from (object-safe, because one
//!   shadow chain mixes object types).
//!
//! Every machine is an instance: two [`Vm`]s in one process never see each
//! other, so tests run in parallel.
//!
//! "seed L*n*" in comments refers to line *n* of FreeBSD 7's (2007)
//! `sys/vm/vm_fault.c`, the version this crate was first written against.
//!
//! ```
//! use vm_core::{Prot, FaultFlags, Vm, VmConfig};
//! use vm_testkit::RefPmap;
//!
//! let vm = Vm::new(RefPmap::new(), VmConfig::with_memory(1 << 20)).unwrap();
//! let space = vm.new_space().unwrap();
//! space.map_anon(0x10000, 0x4000, Prot::READ | Prot::WRITE).unwrap();
//! space.write(0x10010, b"hello").unwrap();
//! let mut buf = [0u8; 5];
//! space.read(0x10010, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! assert_eq!(vm.counters().snapshot().v_zfod, 1);
//! ```
//!
//! ## Layers
//!
//! The modules read bottom-up; each uses only those below it
//! (`tests/layering.rs` checks this):
//!
//! 1. vocabulary — [`addr`], [`prot`], [`mem_attr`], [`frame`], [`sync`];
//!    then [`page`] and [`counters`];
//! 2. physical memory — [`phys`], [`page_queues`];
//! 3. the plug-in traits — [`pmap`], [`pager`] (and [`file_io`] for pagers
//!    on host files);
//! 4. [`object`] (with the machine-wide state objects share and the guards
//!    for busy pages), [`error`], [`map`];
//! 5. the machine, [`vm`], and its operations on objects: [`collapse`],
//!    [`clean`], [`balloon`], [`pageout`];
//! 6. the fault handler, [`fault`], over a machine, a map and a pmap
//!    space;
//! 7. address spaces, [`space`] (map, protect, wire, hold, fork, msync,
//!    and the [`VmSpace::fault`] entry point); [`check`] on top.
//!
//! ## Features
//!
//! * `std` (default): physical memory backed by an anonymous mapping of the
//!   host, blocking locks and sleeping waits. Without it the crate is
//!   `#![no_std]` + `alloc`: the embedder hands in its own physical memory
//!   ([`PhysMem::from_raw_parts`]) and, if it has a scheduler, the way
//!   threads block and wake ([`sync::set_parker`]); the locks are
//!   [`lock_api`] locks, and without a parker waits spin.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

extern crate alloc;

pub mod addr;
pub mod balloon;
pub mod check;
pub mod clean;
pub mod collapse;
pub mod counters;
#[cfg(feature = "std")]
mod daemon;
pub mod error;
pub mod fault;
#[cfg(all(feature = "std", unix))]
pub mod file_io;
pub mod frame;
mod frames;
pub mod io_executor;
pub mod map;
pub mod mem_attr;
pub mod object;
pub mod page;
pub mod page_queues;
pub mod pageout;
pub mod pager;
pub mod phys;
pub mod pmap;
pub mod prot;
pub mod space;
pub mod sync;
pub mod vm;
pub mod zeroing;

#[cfg(all(loom, test))]
mod loom_protocols;

pub use addr::{
    PAGE_SHIFT, PAGE_SIZE, Pfn, PhysAddr, SUPERPAGE_PAGES, VirtAddr, page_round_up, page_trunc,
};
pub use balloon::Balloon;
pub use check::ConsistencyError;
pub use counters::{CounterShard, CounterSnapshot, Counters};
pub use error::{BusCode, FaultError, KernReturn, MapError, SegvCode, Signal};
pub use fault::{FaultFlags, FaultKind, FaultOutcome};
pub use frame::{FrameReader, FrameWriter};
pub use io_executor::IoExecutor;
pub use map::{Behavior, EntryFlags, Inheritance, MapEntryInfo, SuperpageAdvice, VmMap};
pub use object::{ObjectId, VmObject};
pub use page::{PageFlags, PageId, PageQueue, VM_PAGE_BITS_ALL, VmPage};
pub use pager::{
    Contiguity, IoError, ObjectClass, PageOut, PageSlot, Pager, PagerError, PagerKind,
    SwapProvider, WantedPages,
};
pub use phys::PhysMem;
pub use pmap::{Displaced, DisplacedSink, Mapping, MemAttr, PageInfo, Pmap, PmapError};
pub use prot::Prot;
pub use space::hold::{HeldPages, HoldError};
pub use space::{MapRequest, VmSpace};
pub use vm::{FaultAround, SuperpagePolicy, Vm, VmConfig, VmInitError};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
