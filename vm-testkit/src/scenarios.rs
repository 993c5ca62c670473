//! End-to-end scenarios generic over the pmap, so every pmap crate can run
//! the same checks `vm-core` runs on the reference pmap:
//!
//! ```
//! vm_testkit::scenarios::run_all(vm_testkit::RefPmap::new);
//! ```
//!
//! Each scenario builds its own machine, uses only the public API of
//! `vm-core` and the [`Pmap`] trait, and ends with the consistency check.

use crate::{MemPager, pattern_byte, test_config};
use std::sync::Arc;
use vm_core::{FaultFlags, FaultKind, Inheritance, MapRequest, PagerKind, Pmap, Prot, Vm};

const PAGE: u64 = vm_core::PAGE_SIZE;
const BASE: u64 = 0x1000_0000;

/// A named check on a fresh machine.
type Scenario<P> = (&'static str, fn(Arc<Vm<P>>));

/// Runs every scenario with pmaps from `make`.
///
/// # Panics
///
/// When a scenario finds the system misbehaving, naming the scenario.
pub fn run_all<P: Pmap>(make: impl Fn() -> P) {
    let scenarios: [Scenario<P>; 8] = [
        ("zero_fill", zero_fill),
        ("protection", protection),
        ("fork_cow", fork_cow),
        ("cow_stale_mappings", cow_stale_mappings),
        ("pager_in_and_errors", pager_in_and_errors),
        ("wire_unwire", wire_unwire),
        ("unmap_frees_everything", unmap_frees_everything),
        ("threads", threads),
    ];
    for (name, f) in scenarios {
        let vm = Vm::new(make(), test_config(256)).unwrap_or_else(|e| panic!("{name}: {e}"));
        f(vm.clone());
        if let Err(e) = vm.check_consistency() {
            panic!("{name}: {e}");
        }
    }
}

fn zero_fill<P: Pmap>(vm: Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    let out = s
        .fault(BASE + PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    assert_eq!(out.kind, FaultKind::ZeroFill);
    assert_eq!(s.extract(BASE + PAGE), Some(out.pfn));
    s.write(BASE + 5, b"abc").unwrap();
    let mut b = [0u8; 3];
    s.read(BASE + 5, &mut b).unwrap();
    assert_eq!(&b, b"abc");
    assert_eq!(vm.counters().snapshot().v_zfod, 2);
}

fn protection<P: Pmap>(vm: Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 2 * PAGE, Prot::RW).unwrap();
    s.write(BASE, b"x").unwrap();
    s.protect(BASE, 2 * PAGE, Prot::READ).unwrap();
    assert!(
        s.write(BASE, b"y").is_err(),
        "a read-only page must not be writable"
    );
    assert_eq!(s.read_u8(BASE).unwrap(), b'x');
    s.protect(BASE, 2 * PAGE, Prot::RW).unwrap();
    s.write(BASE, b"z").unwrap();
    assert_eq!(s.read_u8(BASE).unwrap(), b'z');
}

fn fork_cow<P: Pmap>(vm: Arc<Vm<P>>) {
    let p = vm.new_space().unwrap();
    p.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    p.write(BASE, b"parent").unwrap();
    let c = p.fork().unwrap();
    assert_eq!(c.read_u8(BASE).unwrap(), b'p');
    assert_eq!(c.extract(BASE), p.extract(BASE), "shared until written");
    c.write(BASE, b"C").unwrap();
    p.write(BASE + 1, b"A").unwrap();
    let (mut x, mut y) = ([0u8; 6], [0u8; 6]);
    p.read(BASE, &mut x).unwrap();
    c.read(BASE, &mut y).unwrap();
    assert_eq!((&x, &y), (b"pArent", b"Carent"));
    drop(c);
    p.write(BASE + 2, b"!").unwrap();
}

fn cow_stale_mappings<P: Pmap>(vm: Arc<Vm<P>>) {
    let a = vm.new_space().unwrap();
    a.map_anon(BASE, PAGE, Prot::RW).unwrap();
    a.write(BASE, b"old").unwrap();
    let b = a.fork().unwrap();
    a.set_inheritance(BASE, PAGE, Inheritance::Share).unwrap();
    let c = a.fork().unwrap();
    assert_eq!(c.read_u8(BASE).unwrap(), b'o');
    assert_eq!(a.read_u8(BASE).unwrap(), b'o');
    a.write(BASE, b"NEW").unwrap();
    assert_eq!(
        c.read_u8(BASE).unwrap(),
        b'N',
        "stale mapping survived the copy"
    );
    assert_eq!(b.read_u8(BASE).unwrap(), b'o');
}

fn pager_in_and_errors<P: Pmap>(vm: Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let pager = Arc::new(MemPager::with_pattern(PagerKind::FILE, 4));
    let obj = vm.new_object(4, pager.clone());
    s.map(MapRequest::object(
        BASE,
        4 * PAGE,
        obj.clone(),
        0,
        Prot::READ,
    ))
    .unwrap();
    assert_eq!(s.read_u8(BASE + PAGE + 9).unwrap(), pattern_byte(1, 9));
    pager.inject(crate::Injected::Fail(MemPager::io_error()));
    assert!(s.read_u8(BASE + 2 * PAGE).is_err());
    assert_eq!(s.read_u8(BASE + 2 * PAGE).unwrap(), pattern_byte(2, 0));
    vm.resize_object(&obj, 1);
    assert!(
        s.read_u8(BASE + 2 * PAGE).is_err(),
        "past the end after truncation"
    );
}

fn wire_unwire<P: Pmap>(vm: Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    s.wire(BASE, 4 * PAGE, true).unwrap();
    assert!(vm.queue_counts().2 >= 4);
    for i in 0..4 {
        assert!(s.extract(BASE + i * PAGE).is_some());
    }
    let child = s.fork().unwrap();
    assert_ne!(child.extract(BASE), s.extract(BASE));
    s.unwire(BASE, 4 * PAGE, true).unwrap();
}

fn unmap_frees_everything<P: Pmap>(vm: Arc<Vm<P>>) {
    let free = vm.free_pages();
    let s = vm.new_space().unwrap();
    s.map_anon(BASE, 16 * PAGE, Prot::RW).unwrap();
    s.map_anon(0x7000_0000_0000, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..16 {
        s.write_u8(BASE + i * PAGE, 1).unwrap();
    }
    s.write_u8(0x7000_0000_0000, 1).unwrap();
    s.unmap(BASE, 16 * PAGE).unwrap();
    assert_eq!(s.extract(BASE), None);
    drop(s);
    assert_eq!(vm.free_pages(), free, "pages and page tables all came back");
}

fn threads<P: Pmap>(vm: Arc<Vm<P>>) {
    let s = Arc::new(vm.new_space().unwrap());
    s.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    s.write_u8(BASE + i * PAGE + t, t as u8 + 1).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for i in 0..64 {
        for t in 0..4u64 {
            assert_eq!(s.read_u8(BASE + i * PAGE + t).unwrap(), t as u8 + 1);
        }
    }
}
