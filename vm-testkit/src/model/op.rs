//! The operation language of the model.

use super::{HOLDS, MAPPABLE, SLOT_PAGES, SLOTS, SPACES};

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    /// Map fresh anonymous memory, inherited shared or copied.
    MapAnon {
        space: usize,
        slot: usize,
        share: bool,
    },
    /// Map object `object` (`0..MAPPABLE`: the named anonymous objects,
    /// then the one whose pager fills only part of each page), shared or
    /// private.
    MapObject {
        space: usize,
        slot: usize,
        object: usize,
        private: bool,
    },
    /// Map the file, shared or private (copy-on-write).
    MapFile {
        space: usize,
        slot: usize,
        private: bool,
    },
    /// Map the device (a private mapping must be refused).
    MapDevice {
        space: usize,
        slot: usize,
        private: bool,
    },
    Unmap {
        space: usize,
        slot: usize,
    },
    Protect {
        space: usize,
        slot: usize,
        write: bool,
    },
    Fork {
        space: usize,
    },
    Exit {
        space: usize,
    },
    Write {
        space: usize,
        slot: usize,
        page: u64,
        value: u8,
    },
    Read {
        space: usize,
        slot: usize,
        page: u64,
    },
    /// Wire a slot: `user` as `mlock` (does not stack), else a kernel
    /// wiring (nests).
    Wire {
        space: usize,
        slot: usize,
        user: bool,
    },
    /// Take the user's wiring (`munlock`) or one kernel wiring.
    Unwire {
        space: usize,
        slot: usize,
        user: bool,
    },
    /// Write a slot's dirty pages back (`msync`).
    Msync {
        space: usize,
        slot: usize,
    },
    /// Truncate or extend the file to `pages` pages.
    Truncate {
        pages: u64,
    },
    /// Collapse the shadow chain under a slot.
    Collapse {
        space: usize,
        slot: usize,
    },
    /// Run the pageout scan over everything.
    Pageout,
    /// Starve the machine: a balloon takes all free frames but `keep`.
    Starve {
        keep: u64,
    },
    /// Give the balloon's frames back.
    Feed,
    /// Hold (pin) a page, for writing or reading, in hold slot `hold`
    /// (`0..HOLDS`; a hold already there is released first).
    Hold {
        space: usize,
        slot: usize,
        page: u64,
        write: bool,
        hold: usize,
    },
    /// Write through hold `hold`, as a device doing DMA would.
    HoldWrite {
        hold: usize,
        value: u8,
    },
    /// Release hold `hold`.
    Release {
        hold: usize,
    },
    /// A forced write (ptrace): into a private copy even where the
    /// mapping is read-only.
    ForceWrite {
        space: usize,
        slot: usize,
        page: u64,
        value: u8,
    },
}

impl Op {
    /// The space, slot and page (or, for [`Op::Truncate`], page count) the
    /// operation names, where it names them: for checking them against a
    /// harness's geometry.
    pub(super) fn indices(&self) -> (Option<usize>, Option<usize>, Option<u64>) {
        match *self {
            Op::MapAnon { space, slot, .. }
            | Op::MapObject { space, slot, .. }
            | Op::MapFile { space, slot, .. }
            | Op::MapDevice { space, slot, .. }
            | Op::Unmap { space, slot }
            | Op::Protect { space, slot, .. }
            | Op::Wire { space, slot, .. }
            | Op::Unwire { space, slot, .. }
            | Op::Msync { space, slot }
            | Op::Collapse { space, slot } => (Some(space), Some(slot), None),
            Op::Write {
                space, slot, page, ..
            }
            | Op::Read { space, slot, page }
            | Op::Hold {
                space, slot, page, ..
            }
            | Op::ForceWrite {
                space, slot, page, ..
            } => (Some(space), Some(slot), Some(page)),
            Op::Fork { space } | Op::Exit { space } => (Some(space), None, None),
            Op::Truncate { pages } => (None, None, Some(pages)),
            Op::Pageout
            | Op::Starve { .. }
            | Op::Feed
            | Op::HoldWrite { .. }
            | Op::Release { .. } => (None, None, None),
        }
    }

    /// Decodes operations from raw bytes (for fuzzers): three bytes each.
    #[must_use]
    pub fn decode(data: &[u8]) -> Vec<Op> {
        data.chunks_exact(3)
            .map(|c| Op::from_bytes([c[0], c[1], c[2]]))
            .collect()
    }

    fn from_bytes(c: [u8; 3]) -> Op {
        let (space, slot, page) = (
            c[1] as usize % SPACES,
            (c[1] >> 2) as usize % SLOTS,
            u64::from(c[1] >> 4) % SLOT_PAGES,
        );
        let flag = c[2] & 1 != 0;
        let hold = (c[2] >> 1) as usize % HOLDS;
        match c[0] % 28 {
            0 | 1 => Op::MapAnon {
                space,
                slot,
                share: flag,
            },
            2 => Op::MapObject {
                space,
                slot,
                object: (c[2] >> 1) as usize % MAPPABLE,
                private: flag,
            },
            3 => Op::MapFile {
                space,
                slot,
                private: flag,
            },
            4 => Op::MapDevice {
                space,
                slot,
                private: c[2] % 8 == 0,
            },
            5 => Op::Unmap { space, slot },
            6 => Op::Protect {
                space,
                slot,
                write: flag,
            },
            7 => Op::Fork { space },
            8 => Op::Exit { space },
            9..=11 => Op::Write {
                space,
                slot,
                page,
                value: c[2],
            },
            12 | 13 => Op::Read { space, slot, page },
            14 => Op::Wire {
                space,
                slot,
                user: flag,
            },
            15 => Op::Unwire {
                space,
                slot,
                user: flag,
            },
            16 => Op::Msync { space, slot },
            17 => Op::Truncate {
                pages: u64::from(c[2]) % (SLOT_PAGES + 1),
            },
            18 => Op::Collapse { space, slot },
            19 => Op::Pageout,
            20 => Op::Starve {
                keep: u64::from(c[2] % 4),
            },
            21 => Op::Feed,
            22 | 23 => Op::Hold {
                space,
                slot,
                page,
                write: flag,
                hold,
            },
            24 => Op::HoldWrite {
                hold: c[1] as usize % HOLDS,
                value: c[2],
            },
            25 => Op::Release {
                hold: c[1] as usize % HOLDS,
            },
            _ => Op::ForceWrite {
                space,
                slot,
                page,
                value: c[2],
            },
        }
    }
}
