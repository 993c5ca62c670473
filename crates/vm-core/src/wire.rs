//! Wiring: keeping a range resident and mapped (`mlock`, kernel wiring;
//! seed `vm_fault_wire` / `vm_fault_unwire`, L1026-1086, driven as
//! FreeBSD's `vm_map_wire` / `vm_map_unwire` do).

use crate::addr::PAGE_SIZE;
use crate::error::MapError;
use crate::fault::FaultFlags;
use crate::map::EntryFlags;
use crate::pmap::Pmap;
use crate::prot::Prot;
use crate::space::VmSpace;
use alloc::vec::Vec;

impl<P: Pmap> VmSpace<P> {
    /// Wires `start..start+len`: every page is faulted in, entered wired in
    /// the pmap, and wired in memory (never paged out) until unwired. A
    /// user wiring (`mlock`) counts once per entry and faults for read
    /// (seed L1045); a kernel wiring nests and faults for read and write.
    ///
    /// # Errors
    ///
    /// [`MapError::NotMapped`] if the range has holes;
    /// [`MapError::Fault`] with the first page that could not be faulted —
    /// everything wired by this call is unwired again first.
    pub fn wire(&self, start: u64, len: u64, user: bool) -> Result<(), MapError> {
        let end = self.check_range(start, len)?;
        let changed = self.mark_wired(start, end, user)?;
        let (access, flags) = if user {
            (Prot::READ, FaultFlags::USER_WIRE)
        } else {
            (Prot::RW, FaultFlags::CHANGE_WIRING)
        };
        let mut va = start;
        while va < end {
            if let Err(e) = self.fault(va, access, flags) {
                self.unwire_pages(start, va);
                self.unmark_wired(&changed, user);
                return Err(MapError::Fault(e));
            }
            va += PAGE_SIZE;
        }
        Ok(())
    }

    /// Unwires `start..start+len` (`munlock`, kernel unwiring).
    ///
    /// # Errors
    ///
    /// [`MapError::NotMapped`] for holes, [`MapError::NotWired`] if part of
    /// the range is not wired in the asked way; nothing changes then.
    pub fn unwire(&self, start: u64, len: u64, user: bool) -> Result<(), MapError> {
        let end = self.check_range(start, len)?;
        let mut g = self.map.write();
        let keys = g
            .clip_range(start, end)
            .ok_or(MapError::NotMapped { start, end })?;
        let not_wired = keys.iter().any(|k| {
            let e = &g.entries[k];
            e.wired_count == 0 || (user && !e.eflags.contains(EntryFlags::USER_WIRED))
        });
        if not_wired {
            return Err(MapError::NotWired { start, end });
        }
        for k in keys {
            let e = g.entries.get_mut(&k).expect("clipped entry");
            e.wired_count -= 1;
            if user {
                e.eflags.remove(EntryFlags::USER_WIRED);
            }
            if e.wired_count == 0 {
                let (s, t) = (e.start, e.end);
                self.unwire_pages(s, t);
            }
        }
        Ok(())
    }

    /// Raises the wiring of the entries of `start..end`; returns the entry
    /// starts whose count this call raised.
    fn mark_wired(&self, start: u64, end: u64, user: bool) -> Result<Vec<u64>, MapError> {
        let mut g = self.map.write();
        let keys = g
            .clip_range(start, end)
            .ok_or(MapError::NotMapped { start, end })?;
        let mut changed = Vec::new();
        for k in keys {
            let e = g.entries.get_mut(&k).expect("clipped entry");
            if user {
                if e.eflags.contains(EntryFlags::USER_WIRED) {
                    continue;
                }
                e.eflags.insert(EntryFlags::USER_WIRED);
            }
            e.wired_count += 1;
            changed.push(k);
        }
        Ok(changed)
    }

    fn unmark_wired(&self, starts: &[u64], user: bool) {
        let mut g = self.map.write();
        for s in starts {
            if let Some(e) = g.entries.get_mut(s) {
                e.wired_count = e.wired_count.saturating_sub(1);
                if user {
                    e.eflags.remove(EntryFlags::USER_WIRED);
                }
            }
        }
    }
}
