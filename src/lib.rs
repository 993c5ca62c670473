//! Examples and benches of the vm-fault workspace live in `examples/` and `benches/`.
