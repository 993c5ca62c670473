//! The testkit's pmap-generic scenarios on the reference pmap.

#[test]
fn scenarios_on_the_reference_pmap() {
    vm_testkit::scenarios::run_all(vm_testkit::RefPmap::new);
}
