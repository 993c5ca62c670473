//! # vm-pmap-x86_64
//!
//! An exact x86_64 [`Pmap`](vm_core::Pmap) for `vm-core`: page tables laid
//! out in the machine's physical memory bit for bit as the CPU and
//! FreeBSD's amd64 pmap define them, pv lists for per-page operations, TLB
//! invalidation through an embedder hook, and a software MMU that walks the
//! tables as the CPU does.
//!
//! ```
//! use vm_core::{Prot, Vm, VmConfig};
//! use vm_pmap_x86_64::{X86Pmap, mmu::Access};
//!
//! let vm = Vm::new(X86Pmap::new(), VmConfig::with_memory(4 << 20)).unwrap();
//! let space = vm.new_space().unwrap();
//! space.map_anon(0x40_0000, 0x2000, Prot::READ).unwrap();
//! assert_eq!(space.read_u8(0x40_0000).unwrap(), 0);
//! // The CPU's view: reads work, a user write faults with P|W|U.
//! let t = vm.pmap().translate_access(space.pmap_space(), 0x40_0000, Access::USER_READ).unwrap();
//! assert_eq!(t.pa, space.extract(0x40_0000).unwrap().phys_addr());
//! let f = vm.pmap().translate_access(space.pmap_space(), 0x40_0000, Access::USER_WRITE).unwrap_err();
//! assert_eq!(f, vm_pmap_x86_64::mmu::Fault::PageFault(vm_pmap_x86_64::PfErrorCode::from_bits_truncate(0x7)));
//! ```
//!
//! Software bits follow modern FreeBSD: wired is `AVAIL3` (0x800), managed
//! is `AVAIL2` (0x400); the seed's era kept wired at 0x200.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

extern crate alloc;

pub mod entry;
pub mod mmu;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod oracle;
pub mod paging;
pub mod pat;
mod pmap;
mod ptlock;
mod pv;
mod superpage;
pub mod tables;
pub mod tlb;

pub use entry::{Entry, PfErrorCode, PteFlags};
pub use paging::PagingMode;
pub use pmap::{X86Pmap, X86Space};
pub use pv::PV_HEAD_BYTES;
pub use superpage::SuperpageStats;
pub use tlb::{NoTlb, TlbHook, TlbStats};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
