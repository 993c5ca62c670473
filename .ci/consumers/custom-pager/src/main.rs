//! A pager that serves every page as its index repeated, checked through a
//! fault, a private copy-on-write write and the testkit's consistency check.

use std::sync::Arc;
use vm_core::{Contiguity, MapRequest, PageSlot, Pager, PagerError, PagerKind, Prot};

struct Counting;

impl Pager for Counting {
    fn kind(&self) -> PagerKind {
        PagerKind::FILE.with_growth(false)
    }
    fn has_page(&self, pindex: u64) -> Option<Contiguity> {
        (pindex < 8).then(Contiguity::default)
    }
    fn get_pages(&self, pages: &mut [PageSlot<'_>], _req: usize) -> Result<(), PagerError> {
        for p in pages {
            let b = u8::try_from(p.pindex()).map_err(|_| PagerError::Bad)?;
            p.fill_from(0, b);
            p.set_all_valid();
        }
        Ok(())
    }
}

fn main() {
    let (vm, space) = vm_testkit::machine(64);
    let obj = vm.new_object(8, Arc::new(Counting));
    space
        .map(MapRequest::object(0x10_0000, 8 * 4096, obj, 0, Prot::RW).private())
        .expect("map");
    assert_eq!(space.read_u8(0x10_3000).expect("read"), 3);
    space.write_u8(0x10_3000, 0xee).expect("copy on write");
    assert_eq!(space.read_u8(0x10_3000).expect("read"), 0xee);
    assert_eq!(space.read_u8(0x10_4000).expect("read"), 4);
    vm.check_consistency().expect("consistent");
    println!("custom pager: served, copied on write, consistent");
}
