//! A tour of the fault subsystem: one small process life on a fresh
//! machine, with the kernel's counters at the end.
//!
//! ```text
//! cargo run --release --example tour
//! ```
//!
//! Exits non-zero if any step's result is not what the kernel would give.

use std::process::ExitCode;
use std::sync::Arc;
use vm_core::{FaultFlags, MapRequest, ObjectType, Prot, Vm, VmConfig};
use vm_testkit::{MemPager, RefPmap, pattern_byte};

const HEAP: u64 = 0x1000_0000;
const FILE: u64 = 0x2000_0000;
const STACK_TOP: u64 = 0x7fff_0000_0000;
const PAGE: u64 = vm_core::PAGE_SIZE;

struct Tour {
    failures: u32,
}

impl Tour {
    fn step(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        println!("[{}] {what}: {detail}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.failures += 1;
        }
    }
}

fn main() -> ExitCode {
    let vm = match Vm::new(RefPmap::new(), VmConfig::with_memory(64 << 20)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cannot create the machine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut t = Tour { failures: 0 };
    println!(
        "machine: {} pages of {} bytes, reference pmap\n",
        vm.total_pages(),
        PAGE
    );
    if let Err(e) = run(&vm, &mut t) {
        t.step("unexpected error", false, e);
    }
    println!("\ncounters (vmstat -s):\n{}", vm.counters().snapshot());
    match vm.check_consistency() {
        Ok(r) => t.step("consistency check", true, format!("{r:?}")),
        Err(e) => t.step("consistency check", false, e),
    }
    if t.failures == 0 {
        println!("\nall steps behaved as a kernel would");
        ExitCode::SUCCESS
    } else {
        println!("\n{} step(s) went wrong", t.failures);
        ExitCode::FAILURE
    }
}

fn run(vm: &Arc<Vm<RefPmap>>, t: &mut Tour) -> Result<(), Box<dyn std::error::Error>> {
    let proc1 = vm.new_space()?;

    // Anonymous memory: the first touch of each page is a zero-fill fault.
    proc1.map_anon(HEAP, 64 * PAGE, Prot::RW)?;
    let out = proc1.fault(HEAP, Prot::WRITE, FaultFlags::DIRTY)?;
    t.step(
        "zero-fill write fault",
        out.kind == vm_core::FaultKind::ZeroFill,
        format!("{out:?}"),
    );
    proc1.write(HEAP + 100, b"hello from the parent")?;
    let mut buf = [0u8; 21];
    proc1.read(HEAP + 100, &mut buf)?;
    t.step(
        "read back",
        &buf == b"hello from the parent",
        String::from_utf8_lossy(&buf),
    );

    // Prefault: the next fault maps resident neighbours too.
    let before = vm.counters().snapshot().v_prefaults;
    let proc0 = vm.new_space()?;
    let shared = vm.new_anon_object(16);
    proc0.map(MapRequest::object(
        HEAP,
        16 * PAGE,
        shared.clone(),
        0,
        Prot::RW,
    ))?;
    for i in 0..16 {
        proc0.write_u8(HEAP + i * PAGE, i as u8)?;
    }
    let peer = vm.new_space()?;
    peer.map(MapRequest::object(HEAP, 16 * PAGE, shared, 0, Prot::READ))?;
    peer.fault(HEAP + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)?;
    let pre = vm.counters().snapshot().v_prefaults - before;
    t.step(
        "prefault around a fault",
        pre == 8,
        format!("{pre} neighbours mapped (seed: 4 each side)"),
    );
    drop((proc0, peer));

    // A file: pages come from its pager on first touch (a major fault),
    // with read-behind and read-ahead in the same call.
    let pager = Arc::new(MemPager::with_pattern(ObjectType::Vnode, 64));
    pager.set_contiguity(vm_core::Contiguity {
        behind: 16,
        ahead: 16,
    });
    let file = vm.new_object(64, pager.clone());
    proc1.map(MapRequest::object(FILE, 64 * PAGE, file, 0, Prot::READ))?;
    let out = proc1.fault(FILE + 20 * PAGE, Prot::READ, FaultFlags::NORMAL)?;
    let b = proc1.read_u8(FILE + 20 * PAGE + 7)?;
    let first = pager.calls()[0].clone();
    t.step(
        "file page-in with clustering",
        out.major && b == pattern_byte(20, 7) && first.pindexes.len() == 16,
        format!(
            "major={}, one pager call for pages {:?}",
            out.major, first.pindexes
        ),
    );
    for p in 21..60 {
        proc1.read_u8(FILE + p * PAGE)?;
    }
    t.step(
        "sequential scan reads ahead",
        pager.calls().len() <= 5,
        format!("40 pages scanned in {} pager calls", pager.calls().len()),
    );

    // A stack grows down on a fault below it.
    proc1.map_stack(STACK_TOP, 4 * PAGE, 256 * PAGE)?;
    proc1.write(STACK_TOP - 20 * PAGE, b"deep frame")?;
    t.step(
        "stack growth",
        proc1.entries().len() == 4,
        format!("{} entries", proc1.entries().len()),
    );

    // Fork: the child shares the parent's pages copy-on-write.
    let proc2 = proc1.fork()?;
    let same = proc1.extract(HEAP)
        == proc2
            .fault(HEAP, Prot::READ, FaultFlags::NORMAL)
            .ok()
            .map(|o| o.pfn);
    t.step(
        "child reads the parent's page in place",
        same,
        "same frame, mapped read-only",
    );
    proc2.write(HEAP + 100, b"HELLO FROM THE CHILD!")?;
    proc1.read(HEAP + 100, &mut buf)?;
    let parent_kept = &buf == b"hello from the parent";
    proc2.read(HEAP + 100, &mut buf)?;
    t.step(
        "copy-on-write after fork",
        parent_kept && &buf == b"HELLO FROM THE CHILD!",
        format!("child now sees {:?}", String::from_utf8_lossy(&buf)),
    );
    drop(proc2);
    proc1.write(HEAP + 100, b"H")?;
    t.step(
        "child exited: the parent's write moves the page up",
        vm.counters().snapshot().v_cow_optim == 1,
        "v_cow_optim = 1",
    );

    // Wiring: pages are faulted in and held.
    proc1.wire(HEAP, 8 * PAGE, true)?;
    t.step(
        "mlock of 8 pages",
        vm.queue_counts().2 == 8,
        format!("{} wired", vm.queue_counts().2),
    );
    proc1.unwire(HEAP, 8 * PAGE, true)?;

    // Errors come back with the facts and the signal a kernel would send.
    proc1.protect(HEAP, PAGE, Prot::READ)?;
    let e = proc1.write(HEAP, b"x").unwrap_err();
    t.step(
        "write to a read-only page",
        e.signal().to_string() == "SIGSEGV (SEGV_ACCERR)",
        format!("{e} -> {}", e.signal()),
    );
    let e = proc1.read_u8(0x5000_0000).unwrap_err();
    t.step(
        "read of an unmapped address",
        e.signal().to_string() == "SIGSEGV (SEGV_MAPERR)",
        format!("{e} -> {}", e.signal()),
    );
    vm.resize_object(&proc1.object_at(FILE).unwrap().0, 8);
    let e = proc1.read_u8(FILE + 12 * PAGE).unwrap_err();
    t.step(
        "read past the end of a truncated file",
        e.signal().to_string() == "SIGBUS (BUS_OBJERR)",
        format!("{e} -> {}", e.signal()),
    );

    let (minflt, majflt) = proc1.rusage();
    println!("\nprocess 1: {minflt} minor and {majflt} major faults");
    Ok(())
}
