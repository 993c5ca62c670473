//! Taking free frames out of circulation and giving them back, as a
//! hypervisor's balloon driver does: the host shrinks a machine's usable
//! memory at run time, and a test makes the frame allocator run dry on
//! command (every fault then has to cope with a shortage).
//!
//! A [`Balloon`] owns the frames it took: they are wired and in no object
//! (the consistency check counts them with the page-table pages), and
//! dropping the balloon frees them.
//!
//! ```
//! use vm_core::{FaultError, FaultFlags, Prot, Vm, VmConfig};
//!
//! let vm = Vm::new(vm_testkit::RefPmap::new(), VmConfig {
//!     memory_wait_ms: 1,
//!     ..VmConfig::with_memory(1 << 20)
//! }).unwrap();
//! let space = vm.new_space().unwrap();
//! space.map_anon(0x1000_0000, 0x4000, Prot::RW).unwrap();
//! let balloon = vm.inflate_balloon(u64::MAX); // every free frame
//! assert_eq!(vm.free_pages(), 0);
//! let e = space.fault(0x1000_0000, Prot::WRITE, FaultFlags::DIRTY).unwrap_err();
//! assert!(matches!(e, FaultError::ResourceShortage { .. }));
//! drop(balloon);
//! space.fault(0x1000_0000, Prot::WRITE, FaultFlags::DIRTY).unwrap();
//! ```

use crate::addr::Pfn;
use crate::object::Machine;
use crate::page::PageId;
use crate::page_queues::AllocClass;
use crate::pmap::Pmap;
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;

/// Free frames taken from a machine; see the [module docs](self).
#[must_use = "dropping the balloon gives its frames back at once"]
pub struct Balloon {
    machine: Arc<Machine>,
    frames: Vec<PageId>,
}

impl core::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Balloon")
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl<P: Pmap> Vm<P> {
    /// Takes up to `pages` free frames (the reserve included) out of
    /// circulation until the returned balloon deflates or drops. Takes
    /// only what is free: nothing is reclaimed for it.
    pub fn inflate_balloon(&self, pages: u64) -> Balloon {
        let mut b = Balloon {
            machine: self.machine.clone(),
            frames: Vec::new(),
        };
        b.inflate(pages);
        b
    }
}

impl Balloon {
    /// Takes up to `pages` more free frames; returns how many it took.
    pub fn inflate(&mut self, pages: u64) -> u64 {
        let queues = &self.machine.pages;
        let mut taken = 0;
        while taken < pages {
            let Some(id) = queues.alloc(0, AllocClass::System, false) else {
                break;
            };
            queues.wire(id);
            self.frames.push(id);
            taken += 1;
        }
        taken
    }

    /// Gives back up to `pages` frames; returns how many it gave.
    pub fn deflate(&mut self, pages: u64) -> u64 {
        let queues = &self.machine.pages;
        let mut given = 0;
        while given < pages {
            let Some(id) = self.frames.pop() else { break };
            queues.unwire(id, false);
            queues.free(id);
            given += 1;
        }
        given
    }

    /// Frames held.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.frames.len() as u64
    }

    /// Whether it holds no frame.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames held (a hypervisor may release their host memory).
    pub fn frames(&self) -> impl Iterator<Item = Pfn> + '_ {
        self.frames.iter().map(|&id| self.machine.pages.pfn(id))
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.deflate(u64::MAX);
    }
}
