//! The machine-wide state objects share, whatever the pmap type: the
//! frames and their page records, the counters, and the registry of live
//! objects. It lives in the object layer because every object holds it
//! (to free its pages and to be found by id) and it holds the objects'
//! registry; the machine ([`Vm`](crate::Vm)) owns it beside its pmap.

use super::VmObject;
use crate::counters::Counters;
use crate::frames::Frames;
use crate::sync::{Gate, Mutex};
use alloc::sync::{Arc, Weak};
use hashbrown::HashMap;

/// The parts of a machine that do not depend on the pmap type: shared with
/// objects and with the pmap (through
/// [`PhysFrames`](crate::pmap::PhysFrames)).
pub(crate) struct Machine {
    /// Memory and page records, shared with the pmap (its `phys` and
    /// `pages` read as the machine's own through `Deref`).
    pub(crate) frames: Arc<Frames>,
    pub(crate) counters: Counters,
    pub(crate) objects: ObjectRegistry,
    /// Background reads in flight (asynchronous read-ahead).
    pub(crate) background: Gate,
}

impl Machine {
    /// The key waiters for background reads sleep on.
    fn background_key(&self) -> u64 {
        core::ptr::from_ref(&self.background) as u64
    }

    /// A background read is handed to an executor.
    pub(crate) fn background_enter(&self) {
        self.background.enter();
    }

    /// A background read is done.
    pub(crate) fn background_leave(&self) {
        self.background
            .leave(self.pages.waits(), self.background_key());
    }

    /// Sleeps until no background read is in flight.
    pub(crate) fn background_wait(&self) {
        self.background
            .wait_idle(self.pages.waits(), self.background_key());
    }
}

impl core::ops::Deref for Machine {
    type Target = Frames;
    fn deref(&self) -> &Frames {
        &self.frames
    }
}

/// The machine's table of live objects, so a page's owner id leads back to
/// its object. Sharded; touched on object creation and destruction only.
pub(crate) struct ObjectRegistry {
    pub(super) next: core::sync::atomic::AtomicU64,
    shards: [Mutex<HashMap<u64, Weak<VmObject>>>; 8],
}

impl Default for ObjectRegistry {
    fn default() -> Self {
        ObjectRegistry {
            next: core::sync::atomic::AtomicU64::new(1),
            shards: core::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl ObjectRegistry {
    pub(super) fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Weak<VmObject>>> {
        &self.shards[(id % 8) as usize]
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<VmObject>> {
        self.shard(id).lock().get(&id).and_then(Weak::upgrade)
    }

    /// Every live object (for checks and scans).
    pub(crate) fn all(&self) -> alloc::vec::Vec<Arc<VmObject>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .values()
                    .filter_map(Weak::upgrade)
                    .collect::<alloc::vec::Vec<_>>()
            })
            .collect()
    }
}
