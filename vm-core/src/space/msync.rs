//! `msync`: writing back what a range of the space maps, object by object
//! (the object-level write-back is [`clean`](crate::clean)).

use super::VmSpace;
use crate::addr::{PAGE_SIZE, VirtAddr, page_trunc};
use crate::clean::CleanError;
use crate::object::VmObject;
use crate::pmap::Pmap;
use alloc::sync::Arc;
use alloc::vec::Vec;

impl<P: Pmap> VmSpace<P> {
    /// Writes the dirty pages that `start..start+len` maps from objects
    /// with a pager back to it (`msync(MS_SYNC)`). Returns the number of
    /// pages written.
    ///
    /// # Errors
    ///
    /// [`CleanError`]: a bad range, or the first pager failure (pages not
    /// written stay dirty).
    pub fn msync(&self, start: impl Into<VirtAddr>, len: u64) -> Result<u64, CleanError> {
        let start = start.into().as_u64();
        let end = self.check_range(page_trunc(start), len)?;
        let targets: Vec<(Arc<VmObject>, u64, u64)> = {
            let g = self.map.read();
            g.entries
                .range(..end)
                .map(|(_, e)| e)
                .filter(|e| e.end > start)
                .filter_map(|e| {
                    let o = e.object.clone()?;
                    let s = e.pindex(e.start.max(start));
                    let t = e.pindex(e.end.min(end) - PAGE_SIZE) + 1;
                    Some((o, s, t))
                })
                .collect()
        };
        let mut written = 0;
        for (o, s, t) in targets {
            written += self.vm.clean_object(&o, s, t)?;
        }
        Ok(written)
    }
}
