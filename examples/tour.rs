//! A tour of the fault subsystem: one small process life on the embedded
//! default — the x86_64 pmap, a real file behind the vnode pager, a swap
//! file, a device window — with the kernel's counters at the end.
//!
//! ```text
//! cargo run --release --example tour
//! ```
//!
//! Exits non-zero if any step's result is not what the kernel would give.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use vm_core::{FaultFlags, FaultKind, MapRequest, MemAttr, Prot, Vm, VmConfig, VmSpace};
use vm_pager_device::{DeviceMmap, DevicePager};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;

const HEAP: u64 = 0x1000_0000;
const FILE: u64 = 0x2000_0000;
const DEV: u64 = 0x3000_0000;
const BIG: u64 = 0x4000_0000;
const STACK_TOP: u64 = 0x7fff_0000_0000;
const PAGE: u64 = vm_core::PAGE_SIZE;

type Space = VmSpace<X86Pmap>;
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

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

/// A scratch directory for the file and the swap, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Four pages of a pretend frame buffer at physical 0xfd00_0000.
struct FrameBuffer;

impl DeviceMmap for FrameBuffer {
    fn mmap(&self, offset: u64, _prot: Prot) -> Option<(vm_core::PhysAddr, MemAttr)> {
        (offset < 4 * PAGE).then(|| {
            (
                vm_core::PhysAddr(0xfd00_0000 + offset),
                MemAttr::WriteCombining,
            )
        })
    }
}

fn main() -> ExitCode {
    let scratch = Scratch(std::env::temp_dir().join(format!("vm-tour-{}", std::process::id())));
    let config = VmConfig::with_memory(16 << 20);
    let vm = match Vm::new(X86Pmap::new(), config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cannot create the machine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut t = Tour { failures: 0 };
    println!(
        "machine: {} pages of {PAGE} bytes, x86_64 page tables in its own physical memory\n",
        vm.total_pages()
    );
    if let Err(e) = run(&vm, &scratch, &mut t) {
        t.step("unexpected error", false, e);
    }
    println!("\ncounters (vmstat -s):\n{}", vm.counters().snapshot());
    match vm.check_consistency() {
        Ok(r) => t.step("consistency check", true, r.to_string()),
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

fn run(vm: &Arc<Vm<X86Pmap>>, scratch: &Scratch, t: &mut Tour) -> Result<()> {
    std::fs::create_dir_all(&scratch.0)?;
    let swap = Swap::create(&scratch.0.join("swap"), 64 << 20)?;
    vm.set_swap(swap.provider());
    let proc1 = vm.new_space()?;
    anonymous(vm, &proc1, t)?;
    file(vm, &proc1, scratch, t)?;
    read_ahead(scratch, t)?;
    proc1.map_stack(STACK_TOP, 4 * PAGE, 256 * PAGE)?;
    proc1.write(STACK_TOP - 20 * PAGE, b"deep frame")?;
    let n = proc1.entries().len();
    t.step(
        "stack grows down on a fault below it",
        n == 4,
        format!("{n} entries"),
    );
    device(vm, &proc1, t)?;
    fork(vm, &proc1, t)?;
    proc1.wire(HEAP, 8 * PAGE, true)?;
    let wired = vm.queue_counts().2;
    t.step(
        "mlock of 8 pages",
        wired >= 8,
        format!("{wired} pages wired (page tables included)"),
    );
    proc1.unwire(HEAP, 8 * PAGE, true)?;
    pressure(vm, &proc1, &swap, t)?;
    errors(vm, &proc1, t)?;
    let (minflt, majflt) = proc1.rusage();
    println!("\nprocess 1: {minflt} minor and {majflt} major faults");
    Ok(())
}

fn anonymous(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, t: &mut Tour) -> Result<()> {
    proc1.map_anon(HEAP, 64 * PAGE, Prot::RW)?;
    let out = proc1.fault(HEAP, Prot::WRITE, FaultFlags::DIRTY)?;
    t.step(
        "zero-fill write fault",
        out.kind == FaultKind::ZeroFill,
        out.to_string(),
    );
    proc1.write(HEAP + 100, b"hello from the parent")?;
    let mut buf = [0u8; 21];
    proc1.read(HEAP + 100, &mut buf)?;
    t.step(
        "read back",
        &buf == b"hello from the parent",
        String::from_utf8_lossy(&buf),
    );
    // Fault-around: a fault also maps resident neighbours.
    let before = vm.counters().snapshot().v_prefaults;
    let shared = vm.new_anon_object(16);
    let (writer, reader) = (vm.new_space()?, vm.new_space()?);
    writer.map(MapRequest::object(
        HEAP,
        16 * PAGE,
        shared.clone(),
        0,
        Prot::RW,
    ))?;
    for i in 0..16 {
        writer.write_u8(HEAP + i * PAGE, i as u8)?;
    }
    reader.map(MapRequest::object(HEAP, 16 * PAGE, shared, 0, Prot::READ))?;
    reader.fault(HEAP + 8 * PAGE, Prot::READ, FaultFlags::NORMAL)?;
    let pre = vm.counters().snapshot().v_prefaults - before;
    t.step(
        "fault-around",
        pre == 15,
        format!("{pre} resident neighbours mapped by one fault (a 16-page window, as Linux)"),
    );
    Ok(())
}

fn file(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, scratch: &Scratch, t: &mut Tour) -> Result<()> {
    let path = scratch.0.join("data");
    let content: Vec<u8> = (0..64 * PAGE + 300).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::File::create(&path)?.write_all(&content)?;
    let pager = VnodePager::open(&path, true)?;
    let obj = pager.object(vm);
    proc1.map(MapRequest::object(FILE, 65 * PAGE, obj, 0, Prot::RW))?;
    let out = proc1.fault(FILE + 20 * PAGE, Prot::READ, FaultFlags::NORMAL)?;
    let st = pager.stats();
    t.step(
        "file page-in with clustering",
        out.major && st.pages_in == 16 && st.read_calls == 1,
        format!(
            "one preadv brought in {} pages around the fault",
            st.pages_in
        ),
    );
    let mut buf = vec![0u8; content.len() - (20 * PAGE) as usize];
    proc1.read(FILE + 20 * PAGE, &mut buf)?;
    let st = pager.stats();
    let same = buf[..] == content[(20 * PAGE) as usize..];
    t.step(
        "sequential scan reads ahead",
        same && st.read_calls <= 6,
        format!(
            "{} pages read in {} system calls; bytes match the file",
            st.pages_in, st.read_calls
        ),
    );
    let mut tail = [1u8; 8];
    proc1.read(FILE + 64 * PAGE + 296, &mut tail)?;
    t.step(
        "end-of-file page is zero past EOF",
        tail[4..] == [0; 4],
        format!(
            "the last 4 bytes of the file, then {} zero bytes past its end",
            tail[4..].iter().filter(|&&b| b == 0).count()
        ),
    );
    proc1.write(FILE + 5, b"EDITED")?;
    let n = proc1.msync(FILE, 65 * PAGE)?;
    let on_disk = std::fs::read(&path)?;
    t.step(
        "msync writes the file",
        &on_disk[5..11] == b"EDITED" && on_disk.len() == content.len(),
        format!("{n} page(s) written"),
    );
    Ok(())
}

/// A 4 MiB sequential scan on a second machine with asynchronous
/// read-ahead: windows double to 256 pages, each window's first page
/// starts the next one's read in the background, and the reader rarely
/// waits for I/O.
fn read_ahead(scratch: &Scratch, t: &mut Tour) -> Result<()> {
    let vm = Vm::new(
        X86Pmap::new(),
        VmConfig {
            async_read_ahead: true,
            ..VmConfig::with_memory(16 << 20)
        },
    )?;
    let pages = 1024;
    let path = scratch.0.join("big");
    let content: Vec<u8> = (0..pages * PAGE).map(|i| (i % 253) as u8).collect();
    std::fs::File::create(&path)?.write_all(&content)?;
    let pager = VnodePager::open(&path, false)?;
    let space = vm.new_space()?;
    space.map(MapRequest::object(
        BIG,
        pages * PAGE,
        pager.object(&vm),
        0,
        Prot::READ,
    ))?;
    let mut same = true;
    for p in 0..pages {
        let at = p * PAGE + p % 97;
        same &= space.read_u8(BIG + at)? == content[at as usize];
    }
    vm.wait_for_background_io();
    let (c, st) = (vm.counters().snapshot(), pager.stats());
    t.step(
        "adaptive, asynchronous read-ahead",
        same && st.pages_in == pages && st.read_calls <= 10 && c.v_async_reads > 0,
        format!(
            "4 MiB in {} preadv calls, {} of them in the background; \
             the reader waited for I/O on {} of {} faults",
            st.read_calls,
            c.v_async_reads,
            c.v_io_faults + c.v_intrans,
            c.v_vm_faults
        ),
    );
    Ok(())
}

fn device(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, t: &mut Tour) -> Result<()> {
    let dev = DevicePager::object(vm, FrameBuffer, 4);
    proc1.map(MapRequest::object(DEV, 4 * PAGE, dev, 0, Prot::RW))?;
    let out = proc1.fault(DEV + PAGE, Prot::WRITE, FaultFlags::DIRTY)?;
    let pte = vm.pmap().pte(proc1.pmap_space(), DEV + PAGE).unwrap_or(0);
    t.step(
        "device window, write-combining",
        out.pfn.phys_addr().as_u64() == 0xfd00_1000 && pte & 0x98 == 0x90,
        format!("PTE {pte:#x}: frame 0xfd001000, PAT|PCD = slot 6 (WC), no pv entry"),
    );
    Ok(())
}

fn fork(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, t: &mut Tour) -> Result<()> {
    let proc2 = proc1.fork()?;
    let same = proc1.extract(HEAP)
        == proc2
            .fault(HEAP, Prot::READ, FaultFlags::NORMAL)
            .ok()
            .map(|o| o.pfn);
    t.step(
        "the child reads the parent's page in place",
        same,
        "same frame, mapped read-only",
    );
    proc2.write(HEAP + 100, b"HELLO FROM THE CHILD!")?;
    let mut buf = [0u8; 21];
    proc1.read(HEAP + 100, &mut buf)?;
    let parent_kept = &buf == b"hello from the parent";
    proc2.read(HEAP + 100, &mut buf)?;
    t.step(
        "copy-on-write after fork",
        parent_kept && &buf == b"HELLO FROM THE CHILD!",
        format!(
            "child sees {:?}, parent kept its own",
            String::from_utf8_lossy(&buf)
        ),
    );
    drop(proc2);
    let before = vm.counters().snapshot().v_cow_optim;
    proc1.write(HEAP + 100, b"H")?;
    let moved = vm.counters().snapshot().v_cow_optim - before;
    t.step(
        "child exited: the parent's write moves the page up",
        moved == 1,
        "v_cow_optim +1, no copy",
    );
    Ok(())
}

fn pressure(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, swap: &Swap, t: &mut Tour) -> Result<()> {
    let pages = 2 * vm.total_pages();
    proc1.map_anon(BIG, pages * PAGE, Prot::RW)?;
    print!(
        "memory pressure: writing {} MiB through {} MiB of RAM ",
        (pages * PAGE) >> 20,
        (vm.total_pages() * PAGE) >> 20
    );
    for p in 0..pages {
        proc1.write(BIG + p * PAGE, &p.to_le_bytes())?;
        if p % (pages / 20) == 0 {
            print!("#");
            std::io::stdout().flush()?;
        }
    }
    println!();
    let mut ok = true;
    for p in 0..pages {
        let mut b = [0u8; 8];
        proc1.read(BIG + p * PAGE, &mut b)?;
        ok &= u64::from_le_bytes(b) == p;
    }
    let s = vm.counters().snapshot();
    t.step(
        "page-out to swap and page-in back",
        ok && s.v_swappgsout > 0 && s.v_swappgsin > 0,
        format!(
            "{} pages out, {} in, every byte back; swap: {}",
            s.v_swappgsout,
            s.v_swappgsin,
            swap.stats()
        ),
    );
    proc1.unmap(BIG, pages * PAGE)?;
    Ok(())
}

fn errors(vm: &Arc<Vm<X86Pmap>>, proc1: &Space, t: &mut Tour) -> Result<()> {
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
    let (obj, _) = proc1.object_at(FILE).ok_or("file mapping")?;
    vm.resize_object(&obj, 8);
    let e = proc1.read_u8(FILE + 12 * PAGE).unwrap_err();
    t.step(
        "read past the end of a truncated file",
        e.signal().to_string() == "SIGBUS (BUS_OBJERR)",
        format!("{e} -> {}", e.signal()),
    );
    Ok(())
}
