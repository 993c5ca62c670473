//! vm-pager-device
