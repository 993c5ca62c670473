use vm_core::{FaultFlags, Prot};

#[test]
fn smoke() {
    let (vm, space) = vm_testkit::machine(64);
    space.map_anon(0x10000, 0x4000, Prot::RW).unwrap();
    space.write(0x10010, b"hello").unwrap();
    let mut b = [0u8; 5];
    space.read(0x10010, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    let child = space.fork().unwrap();
    child.write(0x10010, b"HELLO").unwrap();
    space.read(0x10010, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    child.read(0x10010, &mut b).unwrap();
    assert_eq!(&b, b"HELLO");
    let s = vm.counters().snapshot();
    assert_eq!(s.v_cow_faults, 1);
    drop(child);
    space.fault(0x11000, Prot::READ, FaultFlags::NORMAL).unwrap();
    vm.check_consistency().unwrap();
}
