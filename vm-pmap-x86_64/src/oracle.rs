//! The x86 oracle: runs a small guest under KVM whose guest-physical
//! memory *is* the `Vm`'s physical memory and whose CR3 is a space built by
//! this pmap, so a real MMU walks our tables.
//!
//! The guest runs at CPL 3 through a script of reads and writes. Its #PF
//! handler (a CPL 0 stub) exits to the host with CR2 and the error code;
//! the host checks the code against the software MMU, calls `vm-core`'s
//! fault handler, and resumes the guest (skipping the access if the fault
//! cannot be resolved, as a signal handler would). After each access the
//! guest exits once more so the host can compare the A/D bits the CPU set
//! with what the software MMU sets.
//!
//! Linux x86_64 with `/dev/kvm` only; [`Oracle::new`] says why it cannot
//! run elsewhere, so tests skip cleanly.

use crate::entry::PfErrorCode;
use crate::mmu::{self, Access, CpuMode};
use crate::{X86Pmap, X86Space};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::{Duration, Instant};
use vm_core::{FaultFlags, PAGE_SIZE, Prot, Vm, VmSpace};

/// Guest kernel region: GDT, TSS, IDT (page 0), handler code (page 1),
/// kernel stack (pages 2-3).
pub const KERNEL_VA: u64 = 0x10_0000;
/// Guest user code.
pub const USER_CODE_VA: u64 = 0x20_0000;
/// The script the user code follows: 16-byte records (op, address).
pub const SCRIPT_VA: u64 = 0x30_0000;
const SCRIPT_PAGES: u64 = 8;
const GDT: u64 = KERNEL_VA;
const TSS: u64 = KERNEL_VA + 0x100;
const IDT: u64 = KERNEL_VA + 0x800;
const HANDLER: u64 = KERNEL_VA + 0x1000;
const FLUSH: u64 = HANDLER + 0x80;
const STUBS: u64 = HANDLER + 0x100;
const KSTACK_TOP: u64 = KERNEL_VA + 0x4000;

const PORT_PF: u16 = 0x0e;
const PORT_STEP: u16 = 0x10;
const PORT_DONE: u16 = 0x11;
const PORT_UNEXPECTED: u16 = 0xff;

/// #PF handler: push rax; push rdx; mov rax, cr2; mov rdx, [rsp+16];
/// out 0x0e, al; mov rax, cr3; mov cr3, rax; pop rdx; pop rax; add rsp, 8;
/// iretq. The CR3 reload after the host served the fault flushes the
/// guest's TLB and paging-structure caches: the host's pmap may have
/// removed or changed other mappings meanwhile (this embedder's TLB
/// hook, as an OS's shootdown would).
const PF_HANDLER: [u8; 26] = [
    0x50, 0x52, 0x0f, 0x20, 0xd0, 0x48, 0x8b, 0x54, 0x24, 0x10, 0xe6, 0x0e, 0x0f, 0x20, 0xd8, 0x0f,
    0x22, 0xd8, 0x5a, 0x58, 0x48, 0x83, 0xc4, 0x08, 0x48, 0xcf,
];

/// The flush the user code asks for with `int3` when a run starts: push
/// rax; mov rax, cr3; mov cr3, rax; pop rax; iretq. Between runs the host
/// unmaps and remaps freely, and a CPU may keep translations, and
/// pointers to page-table frames since freed and reused, for as long as
/// nobody flushes them (it even fills them speculatively): without this
/// a run wrote through stale entries into free frames.
const FLUSH_HANDLER: [u8; 10] = [0x50, 0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0x58, 0x48, 0xcf];
/// The vector the user code flushes with (`#BP`, `int3`), whose gate user
/// code may use.
const FLUSH_VECTOR: u64 = 3;

/// User code (CPL 3): flushes the TLB (`int3`, [`FLUSH_HANDLER`]), then
/// walks the script at [`SCRIPT_VA`]; op 1 reads the address, op 2 writes
/// the address to itself, op 0 ends. Each access is a 3-byte instruction,
/// so the host can skip one that cannot be resolved.
///
/// ```text
///  0: int3
///  1: mov rsi, SCRIPT_VA        11: mov rax, [rsi]     14: test rax, rax
/// 17: jz 45                     19: mov rbx, [rsi+8]   23: cmp rax, 1
/// 27: jne 34                    29: mov rax, [rbx]     32: jmp 37
/// 34: mov [rbx], rbx            37: out 0x10, al       39: add rsi, 16
/// 43: jmp 11                    45: out 0x11, al       47: jmp 47
/// ```
fn user_code() -> Vec<u8> {
    let mut c = alloc::vec![0xcc, 0x48, 0xbe];
    c.extend_from_slice(&SCRIPT_VA.to_le_bytes());
    c.extend_from_slice(&[
        0x48, 0x8b, 0x06, 0x48, 0x85, 0xc0, 0x74, 0x1a, 0x48, 0x8b, 0x5e, 0x08, 0x48, 0x83, 0xf8,
        0x01, 0x75, 0x05, 0x48, 0x8b, 0x03, 0xeb, 0x03, 0x48, 0x89, 0x1b, 0xe6, 0x10, 0x48, 0x83,
        0xc6, 0x10, 0xeb, 0xde, 0xe6, 0x11, 0xeb, 0xfe,
    ]);
    c
}

/// One access of the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read 8 bytes at the address.
    Read(u64),
    /// Write the address (8 bytes) to itself.
    Write(u64),
}

impl Op {
    fn va(self) -> u64 {
        match self {
            Op::Read(v) | Op::Write(v) => v,
        }
    }

    fn access(self) -> Access {
        match self {
            Op::Read(_) => Access::USER_READ,
            Op::Write(_) => Access::USER_WRITE,
        }
    }
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Page faults the guest took and the host resolved with `vm-core`.
    pub faults_served: u64,
    /// Every #PF as (script step, CR2, error code).
    pub fault_log: Vec<(usize, u64, u64)>,
    /// Faults `vm-core` refused (the access was skipped), with the error.
    pub faults_refused: Vec<(u64, String)>,
    /// Error codes compared with the software MMU.
    pub codes_checked: u64,
    /// A/D bit comparisons with the software MMU.
    pub ad_checked: u64,
    /// Disagreements between the CPU and the software MMU, or other
    /// surprises. Empty when the oracle agrees.
    pub mismatches: Vec<String>,
    /// Wall time of the whole guest run.
    pub elapsed: Duration,
    /// Round trips guest → host → guest spent on page faults.
    pub fault_time: Duration,
    /// Round trips spent on plain step exits (no fault work): the floor.
    pub step_time: Duration,
    /// Step exits.
    pub steps: u64,
}

/// A KVM guest on a space of `vm`. See the [module docs](self).
pub struct Oracle {
    _kvm: Kvm,
    vm_fd: VmFd,
    vcpu: VcpuFd,
    /// The machine's memory as the guest's physical memory.
    region: kvm_userspace_memory_region,
    /// The pmap's invalidation counts when the guest last ran.
    flushes_seen: (u64, u64),
}

/// The CPU mode KVM's guest CPU reports (MAXPHYADDR from CPUID), for
/// building an [`X86Pmap`] whose software MMU matches it.
///
/// # Errors
///
/// Why KVM cannot be used here.
pub fn host_cpu_mode() -> Result<CpuMode, String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let maxphy = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax & 0xff);
    Ok(CpuMode {
        maxphyaddr: maxphy,
        ..CpuMode::default()
    })
}

fn seg(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the guest's kernel structures and code into `space`.
fn build_guest(space: &VmSpace<X86Pmap>) -> Result<(), String> {
    let e = |e: &dyn core::fmt::Display| format!("building the guest: {e}");
    space
        .map_anon(KERNEL_VA, 4 * PAGE_SIZE, Prot::ALL)
        .map_err(|x| e(&x))?;
    space
        .map_anon(USER_CODE_VA, PAGE_SIZE, Prot::ALL)
        .map_err(|x| e(&x))?;
    space
        .map_anon(SCRIPT_VA, SCRIPT_PAGES * PAGE_SIZE, Prot::RW)
        .map_err(|x| e(&x))?;
    // GDT: null, kernel code, kernel data, user data, user code, TSS.
    let tss_desc_lo =
        0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_desc_lo,
        TSS >> 32,
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    space.write(GDT, &bytes).map_err(|x| e(&x))?;
    // TSS: RSP0 at offset 4.
    space
        .write(TSS + 4, &KSTACK_TOP.to_le_bytes())
        .map_err(|x| e(&x))?;
    // IDT: #PF to the handler, every other exception to a stub that
    // reports its vector.
    let mut idt = Vec::new();
    for v in 0..32u64 {
        let (h, attr) = match v {
            14 => (HANDLER, 0x8e00),
            // Present, DPL 3 (user code may `int3`), interrupt gate.
            FLUSH_VECTOR => (FLUSH, 0xee00),
            _ => (STUBS + 8 * v, 0x8e00),
        };
        let lo = (h & 0xffff) | (0x08 << 16) | (attr << 32) | (((h >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&lo.to_le_bytes());
        idt.extend_from_slice(&(h >> 32).to_le_bytes());
    }
    space.write(IDT, &idt).map_err(|x| e(&x))?;
    space.write(HANDLER, &PF_HANDLER).map_err(|x| e(&x))?;
    space.write(FLUSH, &FLUSH_HANDLER).map_err(|x| e(&x))?;
    for v in 0..32u8 {
        // mov al, v; out 0xff, al; hlt
        space
            .write(STUBS + 8 * u64::from(v), &[0xb0, v, 0xe6, 0xff, 0xf4])
            .map_err(|x| e(&x))?;
    }
    space.write(USER_CODE_VA, &user_code()).map_err(|x| e(&x))?;
    // The kernel region stays resident and mapped while the guest runs.
    space
        .wire(KERNEL_VA, 4 * PAGE_SIZE, false)
        .map_err(|x| e(&x))?;
    space
        .wire(USER_CODE_VA, PAGE_SIZE, false)
        .map_err(|x| e(&x))?;
    Ok(())
}

impl Oracle {
    /// Creates the KVM guest for `space` (whose tables are `vm`'s) and
    /// writes its kernel and user code into the space.
    ///
    /// # Errors
    ///
    /// Why KVM cannot run here (no `/dev/kvm`, no permission, VM creation
    /// refused), or why the guest could not be laid out.
    pub fn new(vm: &Arc<Vm<X86Pmap>>, space: &VmSpace<X86Pmap>) -> Result<Oracle, String> {
        if !std::path::Path::new("/dev/kvm").exists() {
            return Err(String::from("/dev/kvm absent"));
        }
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm_fd = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let (host, len) = vm.phys().host_region();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: vm.phys().base_pfn() * PAGE_SIZE,
            memory_size: len,
            userspace_addr: host.as_ptr() as u64,
        };
        // SAFETY: the region is the Vm's physical memory, which outlives
        // the guest: the caller holds `vm` while the Oracle exists, and the
        // guest only touches memory through the tables this pmap built.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm_fd
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
        build_guest(space)?;
        let mut s = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        s.cs = seg(0x23, 0xb, 3, true);
        let data = seg(0x1b, 0x3, 3, false);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
        s.gdt.base = GDT;
        s.gdt.limit = 7 * 8 - 1;
        s.idt.base = IDT;
        s.idt.limit = 32 * 16 - 1;
        s.tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 11,
            s: 0,
            l: 0,
            g: 0,
            db: 0,
            dpl: 0,
            ..s.cs
        };
        s.cr3 = space.pmap_space().root();
        s.cr4 = 1 << 5; // PAE
        s.cr0 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
        s.efer = (1 << 8) | (1 << 10) | (1 << 11); // LME | LMA | NXE
        vcpu.set_sregs(&s)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        Ok(Oracle {
            _kvm: kvm,
            vm_fd,
            vcpu,
            region,
            flushes_seen: vm.pmap().tlb_stats().get(),
        })
    }

    /// Before the guest runs again: if the pmap invalidated anything since
    /// it last ran, makes KVM forget its copies of our tables. Where KVM
    /// runs the guest on shadow page tables (no nested paging in the
    /// CPU, or a shadowing hypervisor such as PVM, this project's CI
    /// machine) it copies the guest's entries as the guest uses them and
    /// sees changes only through the guest's own writes, which it traps;
    /// our pmap writes the tables from the host's side, so a removal would
    /// stay visible to the guest, however it flushes its TLB (it then
    /// wrote through entries removed a round before, into free frames).
    /// Taking the memory slot away and back drops every shadow copy. With
    /// nested paging the CPU walks our tables itself, and the guest's own
    /// flush ([`FLUSH_HANDLER`], the #PF handler's CR3 reload) suffices.
    fn sync_shadow(&mut self, vm: &Vm<X86Pmap>) -> Result<(), String> {
        let now = vm.pmap().tlb_stats().get();
        if now == self.flushes_seen {
            return Ok(());
        }
        self.flushes_seen = now;
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: deleting the slot, then registering the same memory as in
        // `new` (it outlives the guest, as there).
        unsafe {
            self.vm_fd
                .set_user_memory_region(gone)
                .and_then(|()| self.vm_fd.set_user_memory_region(self.region))
        }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION (resync): {e}"))
    }

    /// Runs `script` in the guest. Faults are served by `space.fault`;
    /// accesses whose leaf entry is already present are checked for A/D
    /// against the software MMU (`check_ad`).
    ///
    /// # Errors
    ///
    /// A KVM failure or an unexpected guest exit.
    pub fn run(
        &mut self,
        vm: &Vm<X86Pmap>,
        space: &VmSpace<X86Pmap>,
        script: &[Op],
    ) -> Result<Report, String> {
        write_script(space, script)?;
        let expected_ad = predict_ad(vm, space.pmap_space(), script);
        let mut regs = self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        regs.rip = USER_CODE_VA;
        regs.rsp = 0;
        regs.rflags = 0x3002; // IOPL 3, so CPL 3 may `out`
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let mut report = Report::default();
        let mut step = 0usize;
        // What the host changed since the last run, outside the timing.
        self.sync_shadow(vm)?;
        let start = Instant::now();
        let mut mark = Instant::now();
        loop {
            self.sync_shadow(vm)?;
            let exit = self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))?;
            let port = match exit {
                VcpuExit::IoOut(port, _) => port,
                other => return Err(format!("unexpected exit {other:?}")),
            };
            let regs = self
                .vcpu
                .get_regs()
                .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
            match port {
                PORT_PF => {
                    report.fault_log.push((step, regs.rax, regs.rdx));
                    self.serve_fault(vm, space, &regs, script.get(step).copied(), &mut report)?;
                    report.fault_time += mark.elapsed();
                }
                PORT_STEP => {
                    if let Some(Some(want)) = expected_ad.get(step) {
                        let op = script[step];
                        let got = vm.pmap().pte(space.pmap_space(), op.va()).unwrap_or(0);
                        report.ad_checked += 1;
                        if got != *want {
                            report.mismatches.push(format!(
                                "{op:?}: CPU left PTE {got:#x}, software MMU {want:#x}"
                            ));
                        }
                    }
                    step += 1;
                    report.steps += 1;
                    report.step_time += mark.elapsed();
                }
                PORT_DONE => break,
                PORT_UNEXPECTED => {
                    return Err(format!(
                        "guest exception vector {} at rip {:#x}",
                        regs.rax & 0xff,
                        regs.rip
                    ));
                }
                p => return Err(format!("guest wrote to unknown port {p:#x}")),
            }
            mark = Instant::now();
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// A #PF exit: check the error code, call the fault handler, resume.
    fn serve_fault(
        &mut self,
        vm: &Vm<X86Pmap>,
        space: &VmSpace<X86Pmap>,
        regs: &kvm_bindings::kvm_regs,
        op: Option<Op>,
        report: &mut Report,
    ) -> Result<(), String> {
        let (cr2, code) = (regs.rax, PfErrorCode::from_bits_truncate(regs.rdx));
        let access = Access {
            write: code.contains(PfErrorCode::WRITE),
            exec: code.contains(PfErrorCode::INSTRUCTION),
            user: true,
        };
        if let Some(op) = op.filter(|op| op.va() == cr2) {
            if op.access() != access {
                report
                    .mismatches
                    .push(format!("{op:?}: CPU reported access {access:?}"));
            }
        }
        match vm.pmap().translate_access(space.pmap_space(), cr2, access) {
            Err(mmu::Fault::PageFault(sw)) if sw == code => report.codes_checked += 1,
            other => report.mismatches.push(format!(
                "#PF at {cr2:#x}: CPU code {code:?}, software MMU {other:?}"
            )),
        }
        let prot = if access.write {
            Prot::WRITE
        } else {
            Prot::READ
        };
        let flags = if access.write {
            FaultFlags::DIRTY
        } else {
            FaultFlags::NORMAL
        };
        match space.fault(cr2, prot, flags) {
            Ok(_) => report.faults_served += 1,
            Err(e) => {
                // Like a signal handler that skips the access: bump the
                // saved RIP past the 3-byte instruction.
                report
                    .faults_refused
                    .push((cr2, format!("{e} ({})", e.signal())));
                let rip_va = regs.rsp + 24;
                let mut rip = [0u8; 8];
                space
                    .read(rip_va, &mut rip)
                    .map_err(|e| format!("reading the saved RIP: {e}"))?;
                let rip = u64::from_le_bytes(rip) + 3;
                space
                    .write(rip_va, &rip.to_le_bytes())
                    .map_err(|e| format!("writing the saved RIP: {e}"))?;
            }
        }
        Ok(())
    }
}

fn write_script(space: &VmSpace<X86Pmap>, script: &[Op]) -> Result<(), String> {
    if (script.len() as u64 + 1) * 16 > SCRIPT_PAGES * PAGE_SIZE {
        return Err(format!("script of {} steps is too long", script.len()));
    }
    let mut bytes = Vec::with_capacity((script.len() + 1) * 16);
    for op in script {
        let (code, va) = match *op {
            Op::Read(v) => (1u64, v),
            Op::Write(v) => (2u64, v),
        };
        bytes.extend_from_slice(&code.to_le_bytes());
        bytes.extend_from_slice(&va.to_le_bytes());
    }
    bytes.extend_from_slice(&[0u8; 16]);
    space
        .write(SCRIPT_VA, &bytes)
        .map_err(|e| format!("writing the script: {e}"))
}

/// For each step whose page is mapped now, the leaf entry the software
/// MMU leaves after the steps up to it; the tables are restored after.
fn predict_ad(vm: &Vm<X86Pmap>, space: &X86Space, script: &[Op]) -> Vec<Option<u64>> {
    let pmap = vm.pmap();
    let saved: Vec<(u64, Option<u64>)> = script
        .iter()
        .map(|op| (op.va(), pmap.pte(space, op.va())))
        .collect();
    let mut out = Vec::with_capacity(script.len());
    let mut live = true;
    for op in script {
        let present = pmap.pte(space, op.va()).is_some_and(|e| e & 1 != 0);
        // Once a step faults into vm-core, the tables change in ways only
        // the fault handler knows: stop predicting.
        live &= present && pmap.translate_access(space, op.va(), op.access()).is_ok();
        out.push(if live { pmap.pte(space, op.va()) } else { None });
    }
    for (va, e) in saved.into_iter().rev() {
        if let Some(e) = e {
            pmap.set_pte_for_oracle(space, va, e);
        }
    }
    out
}
