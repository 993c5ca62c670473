//! Unit-testing your own VM code with vm-testkit's mocks: a `prefetch`
//! helper (your code) is checked against a `MockPmap` that asserts exactly
//! which mappings it asks for, without real page tables.
//!
//! ```text
//! cargo run --example mock_testing
//! ```

use std::sync::{Arc, Mutex};
use vm_core::{FaultError, FaultFlags, Pmap, Prot, Vm, VmSpace};
use vm_testkit::{MockPmap, Permissive, test_config};

/// Your code: faults in every page of a range for reading, stopping at
/// the first error.
fn prefetch<P: Pmap>(space: &VmSpace<P>, start: u64, pages: u64) -> Result<u64, FaultError> {
    for i in 0..pages {
        space.fault(start + i * 4096, Prot::READ, FaultFlags::NORMAL)?;
    }
    Ok(pages)
}

fn main() {
    // The pmap must be asked to map each page once, read-only or better,
    // never wired.
    let entered = Arc::new(Mutex::new(Vec::new()));
    let seen = entered.clone();
    let mut pmap = MockPmap::permissive();
    pmap.expect_enter()
        .withf(|_, _, m| m.prot.contains(Prot::READ) && m.access == Prot::READ && !m.wired)
        .times(4)
        .returning(move |_, va, _| {
            seen.lock().unwrap().push(va.as_u64());
            Ok(None)
        });
    // Tearing the space down frees its pages, removing their mappings.
    pmap.expect_remove_all().returning(|_| Default::default());
    let vm = Vm::new(pmap, test_config(32)).unwrap();
    let space = vm.new_space().unwrap();
    space.map_anon(0x10_0000, 4 * 4096, Prot::RW).unwrap();
    assert_eq!(prefetch(&space, 0x10_0000, 4), Ok(4));
    assert_eq!(
        *entered.lock().unwrap(),
        vec![0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]
    );
    // Past the mapping your code must stop with the kernel's error.
    let e = prefetch(&space, 0x10_4000, 4).unwrap_err();
    assert_eq!(e, FaultError::InvalidAddress { addr: 0x10_4000 });
    vm.check_consistency().unwrap();
    println!("prefetch asked the pmap for exactly 4 read mappings, then stopped at {e}");
}
