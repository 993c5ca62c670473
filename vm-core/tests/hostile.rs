//! Hostile input: every bad address, range or pager answer gets a clear
//! error (or, for a panicking pager, a panic that leaves the machine
//! consistent), never undefined behaviour or a hang.

mod common;
use common::*;
use std::sync::Arc;
use vm_core::{
    Contiguity, FaultError, FaultFlags, MapError, MapRequest, PageSlot, Pager, PagerError,
    PagerKind, Prot,
};

#[test]
fn bad_ranges_are_refused_and_change_nothing() {
    let (vm, space) = machine(16);
    let cases: [(u64, u64); 8] = [
        (BASE + 1, PAGE),                // misaligned start
        (BASE, PAGE + 1),                // misaligned length
        (BASE, 0),                       // empty
        (u64::MAX - PAGE + 1, 2 * PAGE), // overflows
        (0, PAGE),                       // below the space
        (0x0000_8000_0000_0000, PAGE),   // past the user half
        (0xffff_8000_0000_0000, PAGE),   // kernel half
        (!(PAGE - 1), PAGE),             // the last page of the address space
    ];
    for (start, len) in cases {
        for r in [
            space.map_anon(start, len, Prot::RW),
            space.unmap(start, len),
            space.protect(start, len, Prot::READ),
            space.wire(start, len, true),
        ] {
            assert!(
                matches!(
                    r,
                    Err(MapError::Misaligned { .. } | MapError::BadRange { .. })
                ),
                "{start:#x}+{len:#x}: {r:?}"
            );
        }
    }
    assert!(space.entries().is_empty());
    space.map_anon(BASE, 2 * PAGE, Prot::READ).unwrap();
    assert_eq!(
        space.map_anon(BASE + PAGE, PAGE, Prot::RW),
        Err(MapError::Overlap {
            start: BASE + PAGE,
            end: BASE + 2 * PAGE
        })
    );
    assert!(matches!(
        space.protect(BASE, 4 * PAGE, Prot::READ),
        Err(MapError::NotMapped { .. })
    ));
    let req = MapRequest::anon(BASE + 8 * PAGE, PAGE, Prot::RW).max_prot(Prot::READ);
    assert!(matches!(
        space.map(req),
        Err(MapError::ProtectionExceedsMax { .. })
    ));
    let obj = vm.new_anon_object(2);
    let past = MapRequest::object(BASE + 16 * PAGE, 4 * PAGE, obj.clone(), 0, Prot::RW);
    assert!(matches!(space.map(past), Err(MapError::ObjectRange { .. })));
    let huge = MapRequest::object(BASE + 16 * PAGE, PAGE, obj, !(PAGE - 1), Prot::RW);
    assert!(matches!(space.map(huge), Err(MapError::ObjectRange { .. })));
    // Objects of another machine are refused.
    let (other, _) = machine(4);
    let foreign = MapRequest::object(
        BASE + 16 * PAGE,
        PAGE,
        other.new_anon_object(1),
        0,
        Prot::RW,
    );
    assert!(matches!(
        space.map(foreign),
        Err(MapError::ForeignObject { .. })
    ));
    consistent(&vm);
}

#[test]
fn bad_accesses_are_errors() {
    let (vm, space) = machine(16);
    space.map_anon(BASE, PAGE, Prot::RW).unwrap();
    assert!(matches!(
        space.read(u64::MAX - 1, &mut [0; 8]),
        Err(FaultError::InvalidAddress { .. })
    ));
    assert!(
        matches!(space.write(BASE + PAGE - 2, &[1; 8]), Err(FaultError::InvalidAddress { addr }) if addr == BASE + PAGE)
    );
    assert_eq!(
        space.read_u8(BASE + PAGE - 2).unwrap(),
        1,
        "the bytes before the hole were written"
    );
    assert!(space.hold(u64::MAX - 10, 100, Prot::READ).is_err());
    assert!(space.fault(u64::MAX, Prot::ALL, FaultFlags::all()).is_err());
    assert!(
        space.fault(BASE, Prot::empty(), FaultFlags::NORMAL).is_ok(),
        "no access means a read"
    );
    consistent(&vm);
}

/// A pager that panics when asked for page 1.
struct Panicky;

impl Pager for Panicky {
    fn kind(&self) -> PagerKind {
        PagerKind::FILE
    }
    fn has_page(&self, _: u64) -> Option<Contiguity> {
        Some(Contiguity {
            behind: 4,
            ahead: 4,
        })
    }
    fn get_pages(&self, pages: &mut [PageSlot<'_>], req: usize) -> Result<(), PagerError> {
        assert_ne!(pages[req].pindex(), 1, "pager bug");
        pages[req].fill_from(0, 9);
        pages[req].set_all_valid();
        Ok(())
    }
}

#[test]
fn a_panicking_pager_unwinds_through_the_guards_and_leaves_the_machine_consistent() {
    // Decision: a pager's panic is not caught (it is a bug in the pager,
    // and catching would need UnwindSafe bounds on every pager). The
    // fault's owned guards release everything as the panic unwinds.
    let (vm, space) = machine(32);
    let obj = vm.new_object(4, Arc::new(Panicky));
    space
        .map(MapRequest::object(
            BASE,
            4 * PAGE,
            obj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| space.read_u8(BASE + PAGE)));
    std::panic::set_hook(prev);
    assert!(r.is_err(), "the pager's panic reached the caller");
    consistent(&vm);
    assert_eq!(
        obj.resident_count(),
        0,
        "the cluster's pages were freed while unwinding"
    );
    assert_eq!(
        space.read_u8(BASE + 2 * PAGE).unwrap(),
        9,
        "and the machine keeps working"
    );
}

/// A pager that claims far more contiguous pages than the object has, on
/// both sides: the cluster is cut to the object and the entry, nothing
/// lands past the object's end, and the fault works.
#[test]
fn a_pager_claiming_an_absurd_cluster_is_cut_to_the_object() {
    let (vm, space) = machine(64);
    let pager = Arc::new(vm_testkit::MemPager::with_pattern(PagerKind::FILE, 4));
    let obj = vm.new_object(4, pager.clone());
    // The entry is twice the object (a file mapped past its end).
    space
        .map(MapRequest::object(
            BASE,
            8 * PAGE,
            obj.clone(),
            0,
            Prot::READ,
        ))
        .unwrap();
    pager.set_contiguity(Contiguity {
        behind: u32::MAX,
        ahead: u32::MAX,
    });
    for p in [3, 0] {
        assert_eq!(
            byte(&space, BASE + p * PAGE),
            vm_testkit::pattern_byte(p, 0)
        );
    }
    for call in pager.calls() {
        assert!(call.pindexes.iter().all(|&p| p < 4), "{call:?}");
    }
    assert!(obj.resident_count() <= 4);
    assert!(matches!(
        space.read_u8(BASE + 5 * PAGE),
        Err(FaultError::OutOfBounds { pindex: 5, .. })
    ));
    consistent(&vm);
}
