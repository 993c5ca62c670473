//! The machine's frames: its physical memory with the record of every
//! page, the layer below objects and the pmap (which gets them as a
//! [`PhysFrames`](crate::pmap::PhysFrames)).

use crate::page_queues::Pages;
use crate::phys::PhysMem;

/// Physical memory and its page records: the part of a machine below
/// objects and the pmap.
pub(crate) struct Frames {
    pub(crate) phys: PhysMem,
    pub(crate) pages: Pages,
}
