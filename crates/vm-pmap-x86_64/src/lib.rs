//! vm-pmap-x86_64
