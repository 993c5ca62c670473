//! mockall mocks of the two traits, for tests that check call sequences:
//! which pages a fault asks the pager for, with what protection it maps.
//!
//! [`MockPmap`]'s spaces are `()`; [`MockPager`] mocks every pager
//! operation. Both are ordinary `mockall` mocks: set expectations with
//! `expect_*`.

use mockall::mock;
use vm_core::pmap::{Displaced, PageInfo, Pmap, PmapError, RefMod};
use vm_core::{Contiguity, PageSlot, Pager, PagerError, PagerKind, Pfn, Prot};

mock! {
    /// A mock [`Pmap`] whose address spaces are `()`.
    pub Pmap {}

    impl Pmap for Pmap {
        type Space = ();
        fn create_space(&self) -> Result<(), PmapError>;
        fn destroy_space(&self, space: &());
        fn enter(&self, space: &(), va: u64, page: PageInfo, prot: Prot, access: Prot, wired: bool)
            -> Result<Option<Displaced>, PmapError>;
        fn enter_quick(&self, space: &(), va: u64, page: PageInfo, prot: Prot) -> bool;
        fn remove(&self, space: &(), start: u64, end: u64, sink: &mut dyn FnMut(Displaced));
        fn protect(&self, space: &(), start: u64, end: u64, prot: Prot, sink: &mut dyn FnMut(Displaced));
        fn extract(&self, space: &(), va: u64) -> Option<Pfn>;
        fn is_prefaultable(&self, space: &(), va: u64) -> bool;
        fn change_wiring(&self, space: &(), va: u64, wired: bool);
        fn translate(&self, space: &(), va: u64, access: Prot) -> Option<Pfn>;
        fn remove_all(&self, pfn: Pfn) -> RefMod;
        fn page_protect(&self, pfn: Pfn, prot: Prot) -> RefMod;
        fn is_modified(&self, pfn: Pfn) -> bool;
        fn clear_modify(&self, pfn: Pfn);
        fn ts_referenced(&self, pfn: Pfn) -> u32;
        fn mapping_count(&self, pfn: Pfn) -> usize;
    }
}

mock! {
    /// A mock [`Pager`].
    pub Pager {}

    impl Pager for Pager {
        fn kind(&self) -> PagerKind;
        fn has_page(&self, pindex: u64) -> Option<Contiguity>;
        fn get_pages<'a, 'b>(&self, pages: &'a mut [PageSlot<'b>], reqpage: usize) -> Result<(), PagerError>;
        fn page_unswapped(&self, pindex: u64);
        fn dealloc(&self);
    }
}

impl MockPmap {
    /// A mock that accepts space creation and destruction and removals of
    /// empty ranges, the calls every `Vm` makes around a test, and says no
    /// address is prefaultable (so faults enter only their own page) and no
    /// page referenced (for the pageout scan): set the expectations of the
    /// test on top.
    #[must_use]
    pub fn permissive() -> MockPmap {
        let mut m = MockPmap::new();
        m.expect_create_space().returning(|| Ok(()));
        m.expect_destroy_space().return_const(());
        m.expect_remove().return_const(());
        m.expect_mapping_count().return_const(0usize);
        m.expect_is_prefaultable().return_const(false);
        m.expect_ts_referenced().return_const(0u32);
        m
    }
}
