//! Memory pressure end to end: the pageout scan launders anonymous memory
//! to a swap file and faults read it back.

use std::sync::Arc;
use vm_core::{FaultError, Prot, Vm, VmConfig};
use vm_pager_swap::Swap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1000_0000;

fn machine(pages: u64) -> Arc<Vm<RefPmap>> {
    Vm::new(RefPmap::new(), vm_testkit::test_config(pages)).unwrap()
}

/// Deterministic contents for (page, offset).
fn byte(page: u64, off: u64) -> u8 {
    (page.wrapping_mul(2654435761) >> 7) as u8 ^ off as u8
}

#[test]
fn sixty_four_mib_through_sixteen_mib_of_memory() {
    let t = TempPath::new();
    let vm = Vm::new(
        RefPmap::new(),
        VmConfig {
            memory_bytes: 16 << 20,
            ..VmConfig::default()
        },
    )
    .unwrap();
    let swap = Swap::create(&t.0, 80 << 20).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    let pages = (64 << 20) / PAGE;
    space.map_anon(BASE, pages * PAGE, Prot::RW).unwrap();
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..pages {
        buf.iter_mut()
            .enumerate()
            .for_each(|(o, b)| *b = byte(p, o as u64));
        space.write(BASE + p * PAGE, &buf).unwrap();
    }
    for p in 0..pages {
        space.read(BASE + p * PAGE, &mut buf).unwrap();
        assert!(
            buf.iter().enumerate().all(|(o, &b)| b == byte(p, o as u64)),
            "page {p} came back wrong"
        );
    }
    let s = vm.counters().snapshot();
    let st = swap.stats();
    println!("{st:?}\n{s}");
    assert!(s.v_swappgsout >= pages - vm.total_pages());
    assert!(s.v_swappgsin > 0);
    assert!(
        st.read_calls < st.pages_in,
        "swap-ins are clustered: {st:?}"
    );
    vm.check_consistency().unwrap();
    drop(space);
    assert_eq!(swap.stats().used, 0, "swap freed with the object");
    assert_eq!(vm.free_pages(), vm.total_pages());
}

#[test]
fn a_full_swap_device_keeps_pages_in_memory_and_reports_the_shortage() {
    let t = TempPath::new();
    let vm = machine(32);
    let swap = Swap::create(&t.0, 8 * PAGE).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 64 * PAGE, Prot::RW).unwrap();
    let mut last = Ok(());
    let mut written = 0;
    for p in 0..64 {
        last = space.write_u8(BASE + p * PAGE, p as u8 + 1);
        if last.is_err() {
            break;
        }
        written += 1;
    }
    let e = last.unwrap_err();
    assert!(matches!(e, FaultError::ResourceShortage { .. }), "{e}");
    assert!(swap.stats().full > 0);
    assert_eq!(swap.stats().used, 8);
    // Nothing was lost: every page written is resident or on swap (reading
    // the swapped ones back would need memory that does not exist).
    let (obj, _) = space.object_at(BASE).unwrap();
    assert_eq!(obj.resident_count() as u64 + swap.stats().used, written);
    for p in 0..written {
        if let Some(id) = obj.resident_page(p) {
            assert_eq!(vm.page(id).dirty(), 0xff, "unwritten pages stay dirty");
        }
    }
    vm.check_consistency().unwrap();
    // Unmapping gives the swap space back and the machine recovers (once
    // the handle, which would keep the object's contents, is gone).
    drop(obj);
    space.unmap(BASE, 64 * PAGE).unwrap();
    assert_eq!(swap.stats().used, 0);
    space.map_anon(BASE, 4 * PAGE, Prot::RW).unwrap();
    space.write_u8(BASE, 1).unwrap();
}

#[test]
fn a_page_dirtied_after_swap_in_frees_its_block() {
    let t = TempPath::new();
    let vm = machine(64);
    let swap = Swap::create(&t.0, 64 * PAGE).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for p in 0..8 {
        space.write_u8(BASE + p * PAGE, 0x50 + p as u8).unwrap();
    }
    // Push everything out.
    vm.pageout(vm.total_pages());
    assert_eq!(swap.stats().used, 8);
    assert_eq!(space.read_u8(BASE + 3 * PAGE).unwrap(), 0x53, "swapped in");
    assert_eq!(
        swap.stats().used,
        8,
        "a clean swapped-in page keeps its block"
    );
    space.write_u8(BASE + 3 * PAGE, 0x99).unwrap();
    assert_eq!(swap.stats().used, 7, "dirtying it frees the block");
    vm.check_consistency().unwrap();
}

#[test]
fn wired_and_held_pages_are_never_paged_out() {
    let t = TempPath::new();
    let vm = machine(64);
    let swap = Swap::create(&t.0, 64 * PAGE).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    for p in 0..8 {
        space.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    space.wire(BASE, 2 * PAGE, true).unwrap();
    let held = space.hold(BASE + 2 * PAGE, PAGE, Prot::READ).unwrap();
    vm.pageout(vm.total_pages());
    assert_eq!(swap.stats().used, 5, "3 of 8 stayed");
    let (obj, _) = space.object_at(BASE).unwrap();
    assert!((0..3).all(|p| obj.resident_page(p).is_some()));
    drop(held);
    space.unwire(BASE, 2 * PAGE, true).unwrap();
    vm.check_consistency().unwrap();
}

#[test]
fn the_daemon_thread_keeps_free_memory_at_its_target() {
    let t = TempPath::new();
    let config = VmConfig {
        thresholds: Some(vm_core::page_queues::Thresholds {
            reserved: 0,
            severe: 0,
            target: 16,
        }),
        ..vm_testkit::test_config(64)
    };
    let vm = Vm::new(RefPmap::new(), config).unwrap();
    let swap = Swap::create(&t.0, 64 * PAGE).unwrap();
    vm.set_swap(swap.provider());
    let space = vm.new_space().unwrap();
    space.map_anon(BASE, 60 * PAGE, Prot::RW).unwrap();
    for p in 0..60 {
        space.write_u8(BASE + p * PAGE, p as u8).unwrap();
    }
    assert!(vm.free_pages() < 16);
    let daemon = vm.spawn_pageout_daemon(std::time::Duration::from_millis(1));
    let start = std::time::Instant::now();
    while vm.free_pages() < 16 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "daemon made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(daemon);
    for p in 0..60 {
        assert_eq!(space.read_u8(BASE + p * PAGE).unwrap(), p as u8);
    }
    vm.check_consistency().unwrap();
}

#[test]
fn has_page_reports_swap_contiguous_neighbours() {
    use vm_core::Pager;
    let t = TempPath::new();
    let swap = Swap::create(&t.0, 64 * PAGE).unwrap();
    let pager = swap.pager();
    let page = [7u8; 4096];
    let outs: Vec<vm_core::PageOut<'_>> = (10..16)
        .map(|p| vm_core::PageOut::new(p, vm_core::FrameReader::from_slice(&page), 0xff))
        .collect();
    pager.put_pages(&outs).unwrap();
    let c = pager.has_page(12).unwrap();
    assert_eq!((c.behind, c.ahead), (2, 3));
    assert!(pager.has_page(9).is_none());
    assert_eq!(swap.stats().write_calls, 1, "one pwritev for the run");
    pager.page_unswapped(14);
    assert_eq!(pager.has_page(12).unwrap().ahead, 1);
    pager.dealloc();
    assert_eq!(swap.stats().used, 0);
}

#[test]
fn swapped_chains_still_collapse() {
    let t = TempPath::new();
    let vm = machine(64);
    let swap = Swap::create(&t.0, 256 * PAGE).unwrap();
    vm.set_swap(swap.provider());
    let parent = vm.new_space().unwrap();
    parent.map_anon(BASE, 8 * PAGE, Prot::RW).unwrap();
    let (mut deepest, mut settled) = (0, 0);
    for round in 0..100u64 {
        let child = parent.fork().unwrap();
        child.write_u8(BASE, 0xcc).unwrap();
        drop(child);
        parent
            .write_u8(BASE + (round % 8) * PAGE, round as u8)
            .unwrap();
        // Everything to swap: backing objects become swap-backed.
        vm.pageout(vm.total_pages());
        let (obj, _) = parent.object_at(BASE).unwrap();
        deepest = deepest.max(obj.chain_depth());
        if round == 20 {
            settled = obj.chain_depth();
        }
    }
    // Levels that both already have swap cannot merge yet (moving swap
    // metadata between two pagers is not implemented), so the first few
    // rounds leave a short tail; after that the chain must not grow.
    let (obj, _) = parent.object_at(BASE).unwrap();
    assert!(deepest <= 10, "chain grew to {deepest}");
    assert!(
        obj.chain_depth() <= settled,
        "chain still growing: {} after {settled}",
        obj.chain_depth()
    );
    drop(obj);
    for i in 0..8u64 {
        let last = (0..100u64).filter(|r| r % 8 == i).max().unwrap();
        assert_eq!(parent.read_u8(BASE + i * PAGE).unwrap(), last as u8);
    }
    vm.check_consistency().unwrap();
    drop(parent);
    assert_eq!(swap.stats().used, 0);
}
