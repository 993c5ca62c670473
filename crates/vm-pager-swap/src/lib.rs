//! vm-pager-swap
