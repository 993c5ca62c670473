//! Hardware demand paging: a KVM guest touches fresh memory from user
//! mode; every #PF exits to the host, `vm-core` resolves it on tables the
//! x86_64 pmap keeps in the guest's physical memory, and the guest resumes.
//!
//! ```text
//! cargo run --release -p vm-pmap-x86_64 --example kvm_demand_paging [pages]
//! ```
//!
//! Prints `SKIP: <reason>` where KVM cannot run.

use std::process::ExitCode;
use vm_core::{Prot, Vm, VmConfig};
use vm_pmap_x86_64::oracle::{self, Op, Oracle};
use vm_pmap_x86_64::{NoTlb, X86Pmap};

const REGION: u64 = 0x1000_0000;

fn main() -> ExitCode {
    let pages: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let mode = match oracle::host_cpu_mode() {
        Ok(m) => m,
        Err(why) => {
            println!("SKIP: {why}");
            return ExitCode::SUCCESS;
        }
    };
    let mem = (pages + 4096) * 4096;
    let vm = Vm::new(X86Pmap::with_hook(mode, NoTlb), VmConfig::with_memory(mem)).expect("machine");
    let space = vm.new_space().expect("space");
    let mut guest = match Oracle::new(&vm, &space) {
        Ok(g) => g,
        Err(why) => {
            println!("SKIP: {why}");
            return ExitCode::SUCCESS;
        }
    };
    space.map_anon(REGION, pages * 4096, Prot::RW).expect("map");
    let script: Vec<Op> = (0..pages).map(|i| Op::Write(REGION + i * 4096)).collect();
    // Pass 1 demand-faults every page; pass 2 repeats the same accesses on
    // mapped pages, so each step costs one bare exit: the floor.
    let mut ok = true;
    let mut passes = Vec::new();
    for pass in 0..2 {
        let (mut elapsed, mut faults, mut codes) = (std::time::Duration::ZERO, 0, 0);
        for chunk in script.chunks(500) {
            let r = match guest.run(&vm, &space, chunk) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("guest failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            ok &= r.mismatches.is_empty() && r.faults_refused.is_empty();
            elapsed += r.elapsed;
            faults += r.faults_served;
            codes += r.codes_checked;
        }
        let per_page = elapsed.as_secs_f64() * 1e6 / pages as f64;
        println!(
            "pass {}: {pages} pages, {faults} faults served, {codes} error codes checked against the software MMU, \
             {per_page:.2} µs per page",
            pass + 1
        );
        passes.push(per_page);
    }
    let fault = passes[0] - passes[1];
    println!(
        "guest #PF -> host vm-core fault() -> resume: {fault:.2} µs per fault; bare exit: {:.2} µs; ratio {:.2}",
        passes[1],
        fault / passes[1]
    );
    let landed = (0..pages).all(|i| {
        let va = REGION + i * 4096;
        let mut b = [0u8; 8];
        space.extract(va).is_some_and(|pfn| {
            vm.phys().read(pfn, 0, &mut b);
            u64::from_le_bytes(b) == va
        })
    });
    let s = vm.counters().snapshot();
    println!(
        "{} zero-fill faults, every store landed in the frame extract names: {landed}",
        s.v_zfod
    );
    if ok && landed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
