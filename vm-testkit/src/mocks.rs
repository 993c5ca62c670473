//! mockall mocks of the two traits, for tests that check call sequences:
//! which pages a fault asks the pager for, with what protection it maps.
//!
//! The mocks are generated from the traits themselves by vm-core's `mock`
//! feature (`#[automock]`), so they cannot drift from them; this module
//! re-exports them and adds [`Permissive`]. [`MockPmap`]'s spaces are `()`;
//! [`MockPager`] mocks every pager operation, the default ones included.
//! Set expectations with `expect_*`.

pub use vm_core::pager::MockPager;
pub use vm_core::pmap::MockPmap;

/// A mock set up for the calls every test makes around the ones it
/// checks.
pub trait Permissive {
    /// A mock that accepts those calls: set the expectations of the test
    /// on top.
    #[must_use]
    fn permissive() -> Self;
}

impl Permissive for MockPmap {
    /// Accepts attaching, space creation and destruction and removals
    /// (what every `Vm` does around a test), says no address is
    /// prefaultable and maps no run of neighbours nor any superpage (so
    /// faults enter only their own page), and no page referenced (for the
    /// pageout scan).
    fn permissive() -> MockPmap {
        let mut m = MockPmap::new();
        m.expect_attach().return_const(());
        m.expect_create_space().returning(|| Ok(()));
        m.expect_destroy_space().return_const(());
        m.expect_remove().return_const(());
        m.expect_mapping_count().return_const(0usize);
        m.expect_is_prefaultable().return_const(false);
        m.expect_enter_quick_run().return_const(0usize);
        m.expect_enter_superpage().returning(|_, _, _| Ok(false));
        m.expect_ts_referenced().return_const(0u32);
        m
    }
}

impl Permissive for MockPager {
    /// Accepts the notifications a pager gets besides reads (a dirtied
    /// page, discarded ranges, the end of the object) and refuses
    /// collapse's absorb, as the trait's defaults do.
    fn permissive() -> MockPager {
        let mut m = MockPager::new();
        m.expect_page_unswapped().return_const(());
        m.expect_discard().return_const(());
        m.expect_dealloc().return_const(());
        m.expect_absorb().return_const(false);
        m
    }
}
