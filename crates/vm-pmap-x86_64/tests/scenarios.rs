//! vm-core end to end on real x86_64 tables: the testkit's scenarios.

#[test]
fn scenarios_on_four_level_tables() {
    vm_testkit::scenarios::run_all(vm_pmap_x86_64::X86Pmap::new);
}

#[test]
fn scenarios_on_five_level_tables() {
    vm_testkit::scenarios::run_all(vm_pmap_x86_64::X86Pmap::new_la57);
}
