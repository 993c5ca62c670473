//! Fuzzes the whole machine with `vm_testkit::model`'s operation language:
//! `cargo fuzz run ops` (nightly). Any disagreement with the model, any
//! broken invariant, any panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_core::{Vm, VmSpace};
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::model::{Harness, Op};

fn probe(vm: &Vm<X86Pmap>, s: &VmSpace<X86Pmap>, va: u64) -> Option<(u64, bool)> {
    let pte = vm.pmap().pte(s.pmap_space(), va)?;
    (pte & 1 != 0).then_some((pte & 0x000f_ffff_ffff_f000, pte & 2 != 0))
}

fuzz_target!(|data: &[u8]| {
    let vm = Vm::new(X86Pmap::new(), vm_testkit::test_config(80)).unwrap();
    let mut h = Harness::new(vm, probe);
    for op in Op::decode(data) {
        h.step(&op).unwrap();
        h.check().unwrap();
    }
    h.check_all_reads().unwrap();
});
