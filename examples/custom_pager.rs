//! A custom pager in one short file: a compressed in-memory swap (like
//! Linux's zram). Pages written out are run-length encoded into a map;
//! pages read back are decoded. Installed as the machine's swap, it makes
//! a 4 MiB working set fit a 1 MiB machine.
//!
//! ```text
//! cargo run --release --example custom_pager
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_core::{
    Contiguity, PAGE_SIZE, PageOut, PageSlot, Pager, PagerError, PagerKind, Prot, SwapProvider, Vm,
    VmConfig,
};
use vm_testkit::RefPmap;

/// Run-length encoding: (count, byte) pairs.
fn compress(page: &[u8]) -> Vec<(u16, u8)> {
    let mut out: Vec<(u16, u8)> = Vec::new();
    for &b in page {
        match out.last_mut() {
            Some((n, v)) if *v == b => *n += 1,
            _ => out.push((1, b)),
        }
    }
    out
}

/// The pager of one object: page index → compressed page.
#[derive(Default)]
struct ZramPager {
    pages: Mutex<HashMap<u64, Vec<(u16, u8)>>>,
    stored_bytes: Arc<AtomicU64>,
}

impl Pager for ZramPager {
    fn kind(&self) -> PagerKind {
        PagerKind::ANONYMOUS
    }

    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        self.pages
            .lock()
            .unwrap()
            .contains_key(&pindex)
            .then(Contiguity::default)
    }

    fn get_pages(&self, pages: &mut [PageSlot<'_>], reqpage: usize) -> Result<(), PagerError> {
        let store = self.pages.lock().unwrap();
        let slot = &mut pages[reqpage];
        let runs = store.get(&slot.pindex()).ok_or(PagerError::Fail)?;
        let mut at = 0;
        for &(n, b) in runs {
            slot.frame().fill(at, n as usize, b);
            at += n as usize;
        }
        slot.set_all_valid();
        Ok(())
    }

    fn put_pages(&self, pages: &[PageOut<'_>]) -> Result<(), PagerError> {
        let mut store = self.pages.lock().unwrap();
        for p in pages {
            let mut bytes = [0u8; PAGE_SIZE as usize];
            p.read(0, &mut bytes);
            let runs = compress(&bytes);
            self.stored_bytes
                .fetch_add(3 * runs.len() as u64, Ordering::Relaxed);
            store.insert(p.pindex(), runs);
        }
        Ok(())
    }

    fn page_unswapped(&self, pindex: u64) {
        self.pages.lock().unwrap().remove(&pindex);
    }
}

/// Hands each anonymous object its own zram pager.
#[derive(Default)]
struct Zram {
    stored_bytes: Arc<AtomicU64>,
}

impl SwapProvider for Zram {
    fn pager_for(&self, _pages: u64) -> Option<Arc<dyn Pager>> {
        Some(Arc::new(ZramPager {
            stored_bytes: self.stored_bytes.clone(),
            ..ZramPager::default()
        }))
    }
}

fn main() -> ExitCode {
    let vm = Vm::new(RefPmap::new(), VmConfig::with_memory(1 << 20)).expect("machine");
    let zram = Arc::new(Zram::default());
    vm.set_swap(zram.clone());
    let space = vm.new_space().expect("space");
    let base = 0x1000_0000;
    let pages = 1024u64; // 4 MiB
    space.map_anon(base, pages * 4096, Prot::RW).expect("map");
    for p in 0..pages {
        // Compressible contents: a header and a long run.
        space
            .write(base + p * 4096, &p.to_le_bytes())
            .expect("write");
        space
            .write(base + p * 4096 + 8, &[(p % 7) as u8; 4000])
            .expect("write");
    }
    let mut ok = true;
    for p in 0..pages {
        let mut b = [0u8; 9];
        space.read(base + p * 4096, &mut b).expect("read");
        ok &= u64::from_le_bytes(b[..8].try_into().unwrap()) == p && b[8] == (p % 7) as u8;
    }
    let s = vm.counters().snapshot();
    println!(
        "{} MiB written through {} KiB of RAM: {} pages compressed out, {} read back, {} KiB stored; every byte back: {ok}",
        (pages * 4096) >> 20,
        vm.total_pages() * 4,
        s.v_swappgsout,
        s.v_swappgsin,
        zram.stored_bytes.load(Ordering::Relaxed) >> 10
    );
    if ok && s.v_swappgsout > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
