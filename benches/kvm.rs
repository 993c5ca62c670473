//! Hardware in the loop and memory overhead.
//!
//! * `kvm/fault_round_trip` — per page, a KVM guest's write that faults:
//!   #PF → host `VmSpace::fault` → resume, then the script's step exit;
//!   beside `kvm/bare_exit`, the same script on mapped pages (the step exit
//!   alone), in the same run. The difference is the fault's cost. Skipped
//!   (with a message) where KVM cannot run.
//! * Before the timings, the metadata the machine keeps per physical page
//!   and per mapping is printed beside FreeBSD's `struct vm_page` (~104 B)
//!   and Linux's `struct page` (64 B).
//!
//! `cargo bench --bench kvm`

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use vm_core::{Prot, Vm, VmConfig, VmPage};
use vm_pmap_x86_64::oracle::{self, Op, Oracle};
use vm_pmap_x86_64::{NoTlb, X86Pmap};

const PAGES: u64 = 200;

fn overhead() {
    let page = std::mem::size_of::<VmPage>();
    println!(
        "memory overhead: {page} B per physical page in vm-core (VmPage) + {} B in the x86_64 pmap \
         (pv list head, one mapping inline) = {} B (FreeBSD vm_page ~104 B, Linux struct page 64 B); \
         {} B per further mapping of a page",
        vm_pmap_x86_64::PV_HEAD_BYTES,
        page + vm_pmap_x86_64::PV_HEAD_BYTES,
        std::mem::size_of::<(u64, u64)>()
    );
}

fn kvm(c: &mut Criterion) {
    overhead();
    let mode = match oracle::host_cpu_mode() {
        Ok(m) => m,
        Err(why) => return println!("kvm: SKIP: {why}"),
    };
    let vm = Vm::new(
        X86Pmap::with_hook(mode, NoTlb),
        VmConfig::with_memory(256 << 20),
    )
    .unwrap();
    let space = vm.new_space().unwrap();
    let mut guest = match Oracle::new(&vm, &space) {
        Ok(g) => g,
        Err(why) => return println!("kvm: SKIP: {why}"),
    };
    let mut g = c.benchmark_group("kvm");
    g.sample_size(10);
    let mut next = 0x1000_0000u64;
    g.bench_function("fault_round_trip", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Fresh pages, so every access faults.
                space.map_anon(next, PAGES * 4096, Prot::RW).unwrap();
                let script: Vec<Op> = (0..PAGES).map(|i| Op::Write(next + i * 4096)).collect();
                let r = guest.run(&vm, &space, &script).unwrap();
                assert!(
                    r.mismatches.is_empty() && r.faults_served == PAGES,
                    "at {next:#x}: {} faults served of {PAGES}, mismatches {:?}",
                    r.faults_served,
                    r.mismatches
                );
                total += r.elapsed / PAGES as u32;
                space.unmap(next, PAGES * 4096).unwrap();
                next += PAGES * 4096;
            }
            total
        });
    });
    space.map_anon(0x7000_0000, PAGES * 4096, Prot::RW).unwrap();
    let script: Vec<Op> = (0..PAGES)
        .map(|i| Op::Write(0x7000_0000 + i * 4096))
        .collect();
    guest.run(&vm, &space, &script).unwrap();
    g.bench_function("bare_exit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = guest.run(&vm, &space, &script).unwrap();
                assert_eq!(r.faults_served, 0);
                total += r.elapsed / PAGES as u32;
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, kvm);
criterion_main!(benches);
