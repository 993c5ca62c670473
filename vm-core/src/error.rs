//! Errors: what a fault or a map operation reports, with the facts kept.

use crate::object::ObjectId;
use crate::pager::PagerError;
use crate::prot::Prot;

/// `si_code` of a SIGSEGV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegvCode {
    /// No mapping at the address (`SEGV_MAPERR`, 1).
    MapErr = 1,
    /// Mapping forbids the access (`SEGV_ACCERR`, 2).
    AccErr = 2,
}

/// `si_code` of a SIGBUS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BusCode {
    /// Misaligned address (`BUS_ADRALN`, 1).
    AdrAln = 1,
    /// Object-specific error: past the end of the object, or I/O failed
    /// (`BUS_OBJERR`, 3).
    ObjErr = 3,
    /// No memory to resolve the fault (`BUS_OOMERR`, 100 on FreeBSD).
    OomErr = 100,
}

/// The signal a kernel would deliver for a failed user fault (FreeBSD
/// `vm_fault_trap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGSEGV with its code.
    Segv(SegvCode),
    /// SIGBUS with its code.
    Bus(BusCode),
}

impl Signal {
    /// The signal number on FreeBSD (SIGSEGV 11, SIGBUS 10).
    #[must_use]
    pub fn number(self) -> i32 {
        match self {
            Signal::Segv(_) => 11,
            Signal::Bus(_) => 10,
        }
    }
}

impl core::fmt::Display for Signal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Signal::Segv(SegvCode::MapErr) => f.write_str("SIGSEGV (SEGV_MAPERR)"),
            Signal::Segv(SegvCode::AccErr) => f.write_str("SIGSEGV (SEGV_ACCERR)"),
            Signal::Bus(BusCode::AdrAln) => f.write_str("SIGBUS (BUS_ADRALN)"),
            Signal::Bus(BusCode::ObjErr) => f.write_str("SIGBUS (BUS_OBJERR)"),
            Signal::Bus(BusCode::OomErr) => f.write_str("SIGBUS (BUS_OOMERR)"),
        }
    }
}

/// Mach/FreeBSD `KERN_*` return codes, for callers that mirror the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernReturn {
    /// `KERN_INVALID_ADDRESS` (1).
    InvalidAddress = 1,
    /// `KERN_PROTECTION_FAILURE` (2).
    ProtectionFailure = 2,
    /// `KERN_NO_SPACE` (3).
    NoSpace = 3,
    /// `KERN_INVALID_ARGUMENT` (4).
    InvalidArgument = 4,
    /// `KERN_FAILURE` (5).
    Failure = 5,
    /// `KERN_RESOURCE_SHORTAGE` (6).
    ResourceShortage = 6,
    /// `KERN_OUT_OF_BOUNDS` (13, modern FreeBSD).
    OutOfBounds = 13,
}

/// Why a fault could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// Nothing is mapped at the address, or it is not a valid user address
    /// (non-canonical, outside the space's range).
    #[error("no mapping at {addr:#x}")]
    InvalidAddress {
        /// The faulting address.
        addr: u64,
    },
    /// The mapping does not allow the access.
    #[error("{access} access to {addr:#x} denied: mapping allows {allowed}")]
    ProtectionFailure {
        /// The faulting address.
        addr: u64,
        /// What was asked.
        access: Prot,
        /// What the mapping allows.
        allowed: Prot,
    },
    /// The entry is marked no-fault (the seed panics here).
    #[error("fault at {addr:#x} on a no-fault entry")]
    NoFaultEntry {
        /// The faulting address.
        addr: u64,
    },
    /// The object behind the address is being destroyed (seed L321-324).
    #[error("object {object} behind {addr:#x} is dead")]
    DeadObject {
        /// The faulting address.
        addr: u64,
        /// The dead object.
        object: ObjectId,
    },
    /// The address maps past the end of its object (seed L435-437, or the
    /// pager said BAD): the SIGBUS of an access beyond end of file.
    #[error(
        "{addr:#x} is past the end of object {object} (page {pindex}, object has {size} pages)"
    )]
    OutOfBounds {
        /// The faulting address.
        addr: u64,
        /// The object.
        object: ObjectId,
        /// The page index asked for.
        pindex: u64,
        /// The object's size in pages.
        size: u64,
    },
    /// The pager failed to read the page.
    #[error("pager of object {object} failed at page {pindex} for {addr:#x}: {error}")]
    Pager {
        /// The faulting address.
        addr: u64,
        /// The object whose pager failed.
        object: ObjectId,
        /// The page index it was asked for.
        pindex: u64,
        /// What the pager said.
        error: PagerError,
    },
    /// No memory could be had after waiting for it.
    #[error("out of memory resolving a fault at {addr:#x}")]
    ResourceShortage {
        /// The faulting address.
        addr: u64,
    },
    /// The pmap could not enter the mapping.
    #[error("pmap failed to map {addr:#x}: {error}")]
    Pmap {
        /// The faulting address.
        addr: u64,
        /// The pmap's error.
        error: crate::pmap::PmapError,
    },
}

impl FaultError {
    /// The signal a kernel would deliver to a user thread that took this
    /// fault (FreeBSD `vm_fault_trap`). A pager I/O error is reported as
    /// SIGBUS `BUS_OBJERR` — as Linux does and as the signal's definition
    /// says — where FreeBSD's trap code turns `KERN_FAILURE` into SIGSEGV.
    #[must_use]
    pub fn signal(&self) -> Signal {
        match self {
            FaultError::InvalidAddress { .. } | FaultError::NoFaultEntry { .. } => {
                Signal::Segv(SegvCode::MapErr)
            }
            FaultError::ProtectionFailure { .. } | FaultError::DeadObject { .. } => {
                Signal::Segv(SegvCode::AccErr)
            }
            FaultError::OutOfBounds { .. } | FaultError::Pager { .. } => {
                Signal::Bus(BusCode::ObjErr)
            }
            FaultError::ResourceShortage { .. } | FaultError::Pmap { .. } => {
                Signal::Bus(BusCode::OomErr)
            }
        }
    }

    /// The `KERN_*` code the seed's `vm_fault` returns for this case.
    #[must_use]
    pub fn kern_return(&self) -> KernReturn {
        match self {
            FaultError::InvalidAddress { .. } => KernReturn::InvalidAddress,
            FaultError::ProtectionFailure { .. } | FaultError::DeadObject { .. } => {
                KernReturn::ProtectionFailure
            }
            FaultError::NoFaultEntry { .. } => KernReturn::Failure,
            FaultError::Pager { error, .. } => match error {
                PagerError::Bad => KernReturn::ProtectionFailure,
                _ => KernReturn::Failure,
            },
            FaultError::OutOfBounds { .. } => KernReturn::OutOfBounds,
            FaultError::ResourceShortage { .. } | FaultError::Pmap { .. } => {
                KernReturn::ResourceShortage
            }
        }
    }

    /// The faulting address.
    #[must_use]
    pub fn addr(&self) -> u64 {
        match *self {
            FaultError::InvalidAddress { addr }
            | FaultError::ProtectionFailure { addr, .. }
            | FaultError::NoFaultEntry { addr }
            | FaultError::DeadObject { addr, .. }
            | FaultError::OutOfBounds { addr, .. }
            | FaultError::Pager { addr, .. }
            | FaultError::ResourceShortage { addr }
            | FaultError::Pmap { addr, .. } => addr,
        }
    }
}

/// Why a map operation (map, unmap, protect, fork) failed. Nothing changed
/// when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// An address or length is not a multiple of the page size.
    #[error("{what} {value:#x} is not page aligned")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The range is empty, reversed, overflows, or leaves the space's
    /// address range.
    #[error("range {start:#x}+{len:#x} is not a valid user range")]
    BadRange {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Part of the range is already mapped.
    #[error("range {start:#x}..{end:#x} overlaps an existing mapping")]
    Overlap {
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
    /// Part of the range is not mapped.
    #[error("range {start:#x}..{end:#x} is not entirely mapped")]
    NotMapped {
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
    /// Protection exceeds the maximum protection, or max exceeds what the
    /// object allows.
    #[error("protection {prot} exceeds maximum {max}")]
    ProtectionExceedsMax {
        /// Asked protection.
        prot: Prot,
        /// The limit.
        max: Prot,
    },
    /// The object range does not fit the object (a file's object may be
    /// mapped past its end; only an overflowing range is refused then).
    #[error("offset {offset:#x}+{len:#x} is outside object {object} of {size} pages")]
    ObjectRange {
        /// The object.
        object: ObjectId,
        /// Byte offset into it.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The object's size in pages.
        size: u64,
    },
    /// The object belongs to another machine.
    #[error("object {object} belongs to another Vm")]
    ForeignObject {
        /// The object.
        object: ObjectId,
    },
    /// The pmap could not create or change page tables.
    #[error("pmap: {0}")]
    Pmap(crate::pmap::PmapError),
    /// Wiring failed part-way; nothing stays wired.
    #[error("wiring failed: {0}")]
    Fault(FaultError),
    /// Device memory can only be mapped shared.
    #[error("object {object} is device memory: it cannot be mapped private")]
    PrivateDevice {
        /// The device object.
        object: ObjectId,
    },
    /// Part of the range is not wired (in the way asked).
    #[error("range {start:#x}..{end:#x} is not wired")]
    NotWired {
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
    /// Part of the range allows neither read nor execute, so it cannot be
    /// wired (FreeBSD's `mlock` fails so on entries it marks
    /// `MAP_ENTRY_WIRE_SKIPPED`).
    #[error("range {start:#x}..{end:#x} allows no access to wire")]
    NoAccess {
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
    },
    /// A page of a wired entry is not resident (the seed panics in
    /// `vm_fault_copy_entry`).
    #[error("wired page at {addr:#x} is not resident")]
    MissingPage {
        /// Its address.
        addr: u64,
    },
    /// No memory for the operation.
    #[error("out of memory")]
    ResourceShortage,
}
