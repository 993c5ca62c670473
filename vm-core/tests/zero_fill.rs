//! Zero fill at the end of the chain: seed L649-675, L443-452.

mod common;
use common::*;
use vm_core::{FaultError, FaultFlags, FaultKind, Prot};

#[test]
fn fresh_memory_is_prezeroed_and_skips_zeroing() {
    let (vm, space) = machine(32);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    let out = space.fault(BASE, Prot::WRITE, FaultFlags::DIRTY).unwrap();
    assert_eq!(out.kind, FaultKind::ZeroFill);
    assert_eq!(out.prot, Prot::RW);
    assert!(!out.major);
    let s = vm.counters().snapshot();
    assert_eq!((s.v_vm_faults, s.v_zfod, s.v_ozfod), (1, 1, 1));
    assert_eq!(space.rusage(), (1, 0));
    assert_eq!(space.extract(BASE), Some(out.pfn));
    let page = vm.page(vm.page_of(out.pfn).unwrap());
    assert_eq!(page.valid(), 0xff);
    assert_eq!(page.dirty(), 0xff);
    assert_eq!(page.queue(), vm_core::PageQueue::Active);
    consistent(&vm);
}

#[test]
fn reused_frames_are_zeroed() {
    let (vm, space) = machine(8);
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for i in 0..8 {
        space.write(BASE + i * PAGE, &[0xAA; 4096]).unwrap();
    }
    space.unmap(BASE, 8 * PAGE).unwrap();
    assert_eq!(vm.free_pages(), 8);
    assert_eq!(vm.free_zeroed_pages(), 0);
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    let before = vm.counters().snapshot();
    let mut buf = [1u8; 4096];
    for i in 0..8 {
        space.read(BASE + i * PAGE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "page {i} not zero");
    }
    let d = vm.counters().snapshot().since(&before);
    assert_eq!((d.v_zfod, d.v_ozfod), (8, 0));
    consistent(&vm);
}

#[test]
fn idle_zeroed_pages_are_used_by_zero_fill() {
    let (vm, space) = machine(8);
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    space.write(BASE, &[7; 8192]).unwrap();
    space.unmap(BASE, 8 * PAGE).unwrap();
    assert_eq!(vm.zero_free_pages(100), 2);
    assert_eq!(vm.free_zeroed_pages(), 8);
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    let before = vm.counters().snapshot();
    assert_eq!(byte(&space, BASE), 0);
    assert_eq!(vm.counters().snapshot().since(&before).v_ozfod, 1);
}

#[test]
fn out_of_memory_is_reported_after_bounded_waits_and_recovers() {
    let (vm, space) = machine(4);
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        space.write_u8(BASE + i * PAGE, 1).unwrap();
    }
    let e = space
        .fault(BASE + 4 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap_err();
    assert_eq!(
        e,
        FaultError::ResourceShortage {
            addr: BASE + 4 * PAGE
        }
    );
    assert_eq!(e.signal(), vm_core::Signal::Bus(vm_core::BusCode::OomErr));
    assert!(vm.counters().snapshot().v_wait_memory >= 1);
    consistent(&vm);
    // Freeing memory lets the same fault succeed.
    space.unmap(BASE, PAGE).unwrap();
    space
        .fault(BASE + 4 * PAGE, Prot::WRITE, FaultFlags::DIRTY)
        .unwrap();
    consistent(&vm);
}

#[test]
fn a_fault_waiting_for_memory_proceeds_when_memory_is_freed() {
    let config = vm_core::VmConfig {
        memory_wait_ms: 50,
        memory_retries: 200,
        ..vm_testkit::test_config(2)
    };
    let vm = vm_core::Vm::new(vm_testkit::RefPmap::new(), config).unwrap();
    let space = std::sync::Arc::new(vm.new_space().unwrap());
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space.write_u8(BASE, 1).unwrap();
    space.write_u8(BASE + PAGE, 1).unwrap();
    let s2 = space.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(2));
        s2.unmap(BASE, PAGE).unwrap();
    });
    // The fault sleeps until the unmap frees a page.
    let r = space.fault(BASE + 2 * PAGE, Prot::WRITE, FaultFlags::DIRTY);
    t.join().unwrap();
    r.unwrap();
    consistent(&vm);
}

/// Waits (bounded) until every free page is known to be zero.
fn wait_all_zeroed<P: vm_core::Pmap>(vm: &vm_core::Vm<P>) {
    let until = std::time::Instant::now() + vm_testkit::support::scaled_secs(20);
    while vm.free_zeroed_pages() < vm.free_pages() {
        assert!(
            std::time::Instant::now() < until,
            "the zeroer left {} of {} free pages unzeroed",
            vm.free_pages() - vm.free_zeroed_pages(),
            vm.free_pages()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The page-zeroing thread zeroes every free page that held data, and
/// the zero-fill faults that follow skip their zeroing.
#[test]
fn the_page_zeroer_zeroes_freed_pages_for_later_zero_fills() {
    let (vm, space) = machine(512);
    space.map_anon(BASE, 300 * PAGE, Prot::RW).unwrap();
    for i in 0..300 {
        space.write(BASE + i * PAGE, &[0xA5; 4096]).unwrap();
    }
    space.unmap(BASE, 300 * PAGE).unwrap();
    assert!(vm.free_pages() - vm.free_zeroed_pages() >= 300);
    let zeroer = vm.spawn_page_zeroer(std::time::Duration::from_millis(1));
    wait_all_zeroed(&vm);
    drop(zeroer);
    space.map_anon(BASE, 300 * PAGE, Prot::RW).unwrap();
    let before = vm.counters().snapshot();
    let mut buf = [1u8; 4096];
    for i in 0..300 {
        space.read(BASE + i * PAGE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "page {i} not zero");
    }
    let d = vm.counters().snapshot().since(&before);
    assert_eq!((d.v_zfod, d.v_ozfod), (300, 300), "a fault zeroed");
    consistent(&vm);
}

/// Faults, unmaps and forks beside a zeroer that never sleeps: memory is
/// never short because of it (it holds a batch at a time, far under the
/// machine's slack here), no page in use is ever zeroed under its owner,
/// and every fresh page reads zero.
#[test]
fn faults_beside_the_page_zeroer_keep_their_data_and_memory() {
    vm_testkit::support::bounded(60, || {
        let (vm, space) = machine(384);
        let zeroer = vm.spawn_page_zeroer(std::time::Duration::ZERO);
        const N: u64 = 160;
        for round in 0..12u8 {
            space.map_anon(BASE, N * PAGE, Prot::RW).unwrap();
            for i in 0..N {
                let va = BASE + i * PAGE;
                assert_eq!(
                    byte(&space, va + 17),
                    0,
                    "round {round}: page {i} not fresh"
                );
                space.write(va, &[round ^ i as u8 | 1; 64]).unwrap();
            }
            let child = space.fork().unwrap();
            for i in (0..N).step_by(3) {
                child.write_u8(BASE + i * PAGE + 1, 0xEE).unwrap();
            }
            for i in 0..N {
                let mut got = [0u8; 64];
                space.read(BASE + i * PAGE, &mut got).unwrap();
                assert!(
                    got.iter().all(|&b| b == round ^ i as u8 | 1),
                    "round {round}: page {i} lost its data"
                );
            }
            drop(child);
            space.unmap(BASE, N * PAGE).unwrap();
        }
        drop(zeroer);
        consistent(&vm);
        assert_eq!(vm.zero_free_pages(0), 0);
    });
}
