//! vm-pager-vnode
