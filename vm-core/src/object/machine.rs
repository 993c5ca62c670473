//! The machine-wide state objects share, whatever the pmap type: the
//! frames and their page records, the counters, and the registry of live
//! objects. It lives in the object layer because every object holds it
//! (to free its pages and to be found by id) and it holds the objects'
//! registry; the machine ([`Vm`](crate::Vm)) owns it beside its pmap.

use super::VmObject;
use crate::counters::Counters;
use crate::frames::Frames;
use crate::sync::Mutex;
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
