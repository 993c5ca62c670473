//! Red team s9: named / shared objects (anonymous objects mapped shared into
//! several spaces, vnode files) with superpage reservations and held runs,
//! memory pressure, swap (also full), fork, mlock, protect, partial unmap,
//! msync and the page zeroer, on both pmaps. Public API only.

mod common;

use common::held::{cfg, no_leak, quiet_checks, vm_at, with_swap};
use common::{Rng, consistent, rdpage, squeeze, wrpage};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_core::{MapRequest, Pmap, Prot, SuperpageAdvice, SuperpagePolicy, Vm, VmSpace};
use vm_pager_vnode::VnodePager;
use vm_pmap_x86_64::X86Pmap;
use vm_testkit::RefPmap;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;
const SUPER: u64 = 2 << 20;
const PAGES: u64 = SUPER / PAGE;
const BASE: u64 = 0x4000_0000;

fn tag(i: u64, round: u64) -> u64 {
    (i << 16) | ((round & 0xff) << 8) | 0x5a
}

/// What each storm thread is doing (op code << 32 | round), for hang reports.
static OPS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

fn join_within(hs: Vec<std::thread::JoinHandle<()>>, secs: u64, what: &str) {
    let secs = std::env::var("S9_JOIN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(secs);
    let until = Instant::now() + Duration::from_secs(secs);
    for h in hs {
        while !h.is_finished() {
            let ops: Vec<(u64, u64)> = OPS
                .iter()
                .map(|o| {
                    let v = o.load(Ordering::Relaxed);
                    (v >> 32, v & 0xffff_ffff)
                })
                .collect();
            assert!(
                Instant::now() < until,
                "{what}: hang (threads did not finish in {secs}s); ops (code, round) {ops:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().unwrap();
    }
}

/// Every page `i` of the object, seen at `base + (i - first) * PAGE` in
/// `s` for `i` in `first..last`, holds `model[i]` (0 means never written:
/// zeros).
fn check_view<P: Pmap>(
    s: &VmSpace<P>,
    base: u64,
    first: u64,
    last: u64,
    model: &[u64],
    what: &str,
) {
    for i in first..last {
        let va = base + (i - first) * PAGE;
        assert_eq!(
            rdpage(s, va),
            Ok(model[i as usize]),
            "{what}: object page {i} at {va:#x}"
        );
    }
}

fn machines(frames: u64, policy: SuperpagePolicy) -> (Arc<Vm<X86Pmap>>, Arc<Vm<RefPmap>>) {
    (
        vm_at(X86Pmap::new(), 412, frames, cfg(frames, policy)),
        vm_at(RefPmap::new(), 0, frames, cfg(frames, policy)),
    )
}

// ---------------------------------------------------------------------------
// s01: one named anonymous object shared by two spaces at different 2 MiB
// alignments, fork, protect, wire, partial unmap, swap round trips.
// ---------------------------------------------------------------------------

fn s01<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (sw_, _t) = with_swap(&vm, 32);
    const N: u64 = 3 * PAGES;
    let obj = vm.new_anon_object(N);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let a0 = BASE;
    let b0 = BASE + 64 * SUPER + 256 * PAGE;
    a.map(MapRequest::object(a0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut model = vec![0u64; N as usize];
    for i in 0..N {
        let (s, base) = if i % 2 == 0 { (&a, a0) } else { (&b, b0) };
        let t = tag(i, 1);
        wrpage(s, base + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    check_view(&a, a0, 0, N, &model, &format!("{what} a after writes"));
    check_view(&b, b0, 0, N, &model, &format!("{what} b after writes"));
    consistent(&vm, what);

    let c = a.fork().unwrap();
    check_view(&c, a0, 0, N, &model, &format!("{what} child after fork"));
    for i in (0..N).step_by(3) {
        let t = tag(i, 2);
        wrpage(&c, a0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    check_view(
        &a,
        a0,
        0,
        N,
        &model,
        &format!("{what} a after child writes"),
    );
    check_view(
        &b,
        b0,
        0,
        N,
        &model,
        &format!("{what} b after child writes"),
    );

    squeeze(&vm);
    consistent(&vm, &format!("{what} after squeeze"));
    check_view(&b, b0, 0, N, &model, &format!("{what} b after swap"));
    check_view(&c, a0, 0, N, &model, &format!("{what} child after swap"));
    check_view(&a, a0, 0, N, &model, &format!("{what} a after swap"));

    a.protect(a0 + PAGES * PAGE, PAGES * PAGE, Prot::READ)
        .unwrap();
    assert!(
        a.write_u8(a0 + PAGES * PAGE + 5, 1).is_err(),
        "{what}: write through read-only"
    );
    for i in (PAGES..2 * PAGES).step_by(5) {
        let t = tag(i, 3);
        wrpage(&b, b0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    check_view(&a, a0, 0, N, &model, &format!("{what} a after protect"));

    b.wire(b0, SUPER, true).unwrap();
    for i in (0..PAGES).step_by(7) {
        let t = tag(i, 4);
        wrpage(&b, b0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    squeeze(&vm);
    check_view(
        &a,
        a0,
        0,
        N,
        &model,
        &format!("{what} a after wire + squeeze"),
    );
    b.unmap(b0 + 700 * PAGE, 300 * PAGE).unwrap();
    assert!(b.read_u8(b0 + 800 * PAGE).is_err());
    check_view(
        &b,
        b0,
        0,
        700,
        &model,
        &format!("{what} b after partial unmap"),
    );
    check_view(
        &b,
        b0 + 1000 * PAGE,
        1000,
        N,
        &model,
        &format!("{what} b tail after partial unmap"),
    );
    check_view(&c, a0, 0, N, &model, &format!("{what} child after b unmap"));
    drop(c);
    squeeze(&vm);
    check_view(&a, a0, 0, N, &model, &format!("{what} a after child exit"));
    b.unwire(b0, SUPER, true).unwrap();
    consistent(&vm, what);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s01_named_object_two_alignments_fork_swap_x86() {
    let (x, _) = machines(4 * PAGES + 300, SuperpagePolicy::Always);
    s01(x, "s01 x86 always");
    let (x, _) = machines(4 * PAGES + 300, SuperpagePolicy::Reserve);
    s01(x, "s01 x86 reserve");
}

#[test]
fn s01_named_object_two_alignments_fork_swap_ref() {
    let (_, r) = machines(4 * PAGES + 300, SuperpagePolicy::Always);
    s01(r, "s01 ref always");
    let (_, r) = machines(4 * PAGES + 300, SuperpagePolicy::Reserve);
    s01(r, "s01 ref reserve");
}

// ---------------------------------------------------------------------------
// s02: threads write a shared named object through two spaces while
// another forks / reads / exits children, another pages out with
// balloons, and the zeroer runs. Small machine with swap.
// ---------------------------------------------------------------------------

fn s02<P: Pmap>(vm: Arc<Vm<P>>, what: &str, secs: u64) {
    let (sw_, _t) = with_swap(&vm, 32);
    const N: u64 = 4 * PAGES;
    let obj = vm.new_anon_object(N);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let a0 = BASE;
    let b0 = BASE + 128 * SUPER + 100 * PAGE;
    a.map(MapRequest::object(a0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    // A private anon neighbour under reservations to churn runs.
    let p0 = BASE + 256 * SUPER;
    a.map_anon(p0, 2 * SUPER, Prot::RW).unwrap();
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let a = Arc::new(a);
    let b = Arc::new(b);
    let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let s = if t == 0 { a.clone() } else { b.clone() };
        let base = if t == 0 { a0 } else { b0 };
        let last = last.clone();
        let stop = stop.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(t * 31 + 7);
            let mut r = 1;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                // Pages of parity t belong to thread t.
                let i = rng.below(N / 2) * 2 + t;
                let v = tag(i, r);
                wrpage(&s, base + i * PAGE, v).unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
                last[i as usize].store(v, Ordering::Relaxed);
                let j = rng.below(N / 2) * 2 + t;
                let got =
                    rdpage(&s, base + j * PAGE).unwrap_or_else(|e| panic!("{what}: read {j}: {e}"));
                assert_eq!(
                    got,
                    last[j as usize].load(Ordering::Relaxed),
                    "{what}: thread {t} page {j}"
                );
            }
        }));
    }
    {
        // Forker: forks a, checks its own pages (written only by thread 0
        // of a; we check parity-0 pages that are stable only between
        // writes, so only read for tearing), writes in the child's private
        // copy of the anon neighbour.
        let a = a.clone();
        let stop = stop.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(99);
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let i = rng.below(2 * PAGES);
                let _ = wrpage(&a, p0 + i * PAGE, tag(i, k));
                let c = a.fork().unwrap();
                assert_eq!(
                    rdpage(&c, p0 + i * PAGE),
                    Ok(tag(i, k)),
                    "{what}: child private page {i}"
                );
                wrpage(&c, p0 + i * PAGE, 0xdead).unwrap();
                assert_eq!(
                    rdpage(&a, p0 + i * PAGE),
                    Ok(tag(i, k)),
                    "{what}: parent private page {i}"
                );
                for _ in 0..8 {
                    let j = rng.below(N);
                    // Live-written by the writer threads: may be mid-write.
                    common::rd64(&c, a0 + j * PAGE)
                        .unwrap_or_else(|e| panic!("{what}: child shared {j}: {e}"));
                }
                if k.is_multiple_of(3) {
                    a.unmap(p0, 2 * SUPER).unwrap();
                    a.map_anon(p0, 2 * SUPER, Prot::RW).unwrap();
                }
            }
        }));
    }
    {
        let vm = vm.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(5);
            while !stop.load(Ordering::Relaxed) {
                vm.pageout(rng.below(vm.total_pages()));
                let bl = vm.inflate_balloon(rng.below(200));
                std::thread::sleep(Duration::from_millis(1));
                drop(bl);
                vm.zero_free_pages(64);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 30, what);
    drop(zeroer);
    for i in 0..N {
        let want = last[i as usize].load(Ordering::Relaxed);
        assert_eq!(rdpage(&a, a0 + i * PAGE), Ok(want), "{what}: a page {i}");
        assert_eq!(rdpage(&b, b0 + i * PAGE), Ok(want), "{what}: b page {i}");
    }
    squeeze(&vm);
    for i in 0..N {
        let want = last[i as usize].load(Ordering::Relaxed);
        assert_eq!(
            rdpage(&b, b0 + i * PAGE),
            Ok(want),
            "{what}: b page {i} after swap"
        );
    }
    consistent(&vm, what);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s02_threads_on_shared_object_with_fork_pageout_zeroer_x86() {
    let (x, _) = machines(5 * PAGES, SuperpagePolicy::Always);
    s02(x, "s02 x86 always", 5);
    let (x, _) = machines(5 * PAGES, SuperpagePolicy::Reserve);
    s02(x, "s02 x86 reserve", 4);
}

#[test]
fn s02_threads_on_shared_object_with_fork_pageout_zeroer_ref() {
    let (_, r) = machines(5 * PAGES, SuperpagePolicy::Always);
    s02(r, "s02 ref always", 5);
    let (_, r) = machines(5 * PAGES, SuperpagePolicy::Reserve);
    s02(r, "s02 ref reserve", 4);
}

// ---------------------------------------------------------------------------
// s03: a vnode file mapped shared in two spaces and private in a third,
// superpages on, pressure, msync, fork; the file must hold what the shared
// mappings wrote, the private one must not leak into it.
// ---------------------------------------------------------------------------

fn s03<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    const N: u64 = 2 * PAGES + 37;
    let f = TempPath::new();
    let init: Vec<u8> = (0..N * PAGE).map(|k| (k / PAGE) as u8 ^ 0xa5).collect();
    std::fs::write(&f.0, &init).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let a0 = BASE;
    let b0 = BASE + 32 * SUPER + 3 * PAGE;
    let p0 = BASE + 64 * SUPER;
    a.map(MapRequest::object(a0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, N * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    a.map(MapRequest::object(p0, N * PAGE, obj.clone(), 0, Prot::RW).private())
        .unwrap();
    a.advise_superpages(p0, N * PAGE, SuperpageAdvice::Huge)
        .unwrap();
    let orig = |i: u64| -> u64 {
        let byte = (i as u8) ^ 0xa5;
        u64::from_le_bytes([byte; 8])
    };
    let mut model: Vec<u64> = (0..N).map(orig).collect();
    let mut private: Vec<u64> = (0..N).map(orig).collect();
    for i in 0..N {
        if i % 4 == 1 {
            let t = tag(i, 1);
            wrpage(
                if i % 8 == 1 { &a } else { &b },
                if i % 8 == 1 { a0 } else { b0 } + i * PAGE,
                t,
            )
            .unwrap();
            model[i as usize] = t;
        }
    }
    // The private mapping: reads first (some pages), writes others.
    for i in 0..N {
        if i % 3 == 0 {
            let t = tag(i, 9) | 0x8000_0000_0000_0000;
            wrpage(&a, p0 + i * PAGE, t).unwrap();
            private[i as usize] = t;
        }
    }
    for i in 0..N {
        if i % 3 != 0 {
            // Unwritten private pages: the file's current content.
            private[i as usize] = model[i as usize];
        }
    }
    check_view(&a, a0, 0, N, &model, &format!("{what} a"));
    check_view(&b, b0, 0, N, &model, &format!("{what} b"));
    // Private pages not yet copied follow the file; we only check those
    // we wrote, and those we read now (they may be copied by a read? no:
    // a read maps the file's page).
    for i in (0..N).step_by(3) {
        assert_eq!(
            rdpage(&a, p0 + i * PAGE),
            Ok(private[i as usize]),
            "{what}: private {i}"
        );
    }
    let c = a.fork().unwrap();
    for i in (0..N).step_by(3) {
        assert_eq!(
            rdpage(&c, p0 + i * PAGE),
            Ok(private[i as usize]),
            "{what}: child private {i}"
        );
    }
    for i in (2..N).step_by(4) {
        let t = tag(i, 2);
        wrpage(&c, a0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    squeeze(&vm);
    check_view(
        &b,
        b0,
        0,
        N,
        &model,
        &format!("{what} b after child writes + squeeze"),
    );
    for i in (0..N).step_by(3) {
        assert_eq!(
            rdpage(&c, p0 + i * PAGE),
            Ok(private[i as usize]),
            "{what}: child private {i} after squeeze"
        );
        assert_eq!(
            rdpage(&a, p0 + i * PAGE),
            Ok(private[i as usize]),
            "{what}: private {i} after squeeze"
        );
    }
    b.msync(b0, N * PAGE).unwrap();
    a.msync(a0, N * PAGE).unwrap();
    let file = std::fs::read(&f.0).unwrap();
    assert_eq!(file.len() as u64, N * PAGE, "{what}: file length");
    for i in 0..N {
        let off = (i * PAGE) as usize;
        let head = u64::from_le_bytes(file[off..off + 8].try_into().unwrap());
        let tail = u64::from_le_bytes(
            file[off + PAGE as usize - 8..off + PAGE as usize]
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            (head, tail),
            (model[i as usize], model[i as usize]),
            "{what}: file page {i}"
        );
    }
    // Partial unmap of the shared mapping in b, wire part of a, protect.
    b.unmap(b0 + PAGES * PAGE, 10 * PAGE).unwrap();
    a.wire(a0 + 5 * PAGE, 20 * PAGE, true).unwrap();
    a.protect(a0, 4 * PAGE, Prot::READ).unwrap();
    squeeze(&vm);
    check_view(
        &a,
        a0,
        0,
        N,
        &model,
        &format!("{what} a after wire/protect"),
    );
    a.unwire(a0 + 5 * PAGE, 20 * PAGE, true).unwrap();
    drop(c);
    drop(a);
    drop(b);
    drop(obj);
    consistent(&vm, what);
    squeeze(&vm);
    quiet_checks(&vm, what);
    drop(pager);
}

#[test]
fn s03_vnode_shared_and_private_with_superpages_x86() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, _) = machines(3 * PAGES + 200, policy);
        s03(x, &format!("s03 x86 {policy:?}"));
    }
}

#[test]
fn s03_vnode_shared_and_private_with_superpages_ref() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (_, r) = machines(3 * PAGES + 200, policy);
        s03(r, &format!("s03 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s04: swap that fills up. More shared anonymous memory than RAM + swap:
// writes may fail once both are full, but every write that succeeded must
// read back, and nothing leaks.
// ---------------------------------------------------------------------------

fn s04<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (sw_, _t) = with_swap(&vm, 1); // 256 pages
    let n = vm.total_pages() + 200;
    let obj = vm.new_anon_object(n);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let a0 = BASE;
    let b0 = BASE + 64 * SUPER + 17 * PAGE;
    a.map(MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut model = vec![None::<u64>; n as usize];
    let mut failed = 0;
    for i in 0..n {
        let t = tag(i, 1);
        let (s, base) = if i % 2 == 0 { (&a, a0) } else { (&b, b0) };
        match wrpage(s, base + i * PAGE, t) {
            Ok(()) => model[i as usize] = Some(t),
            Err(_) => {
                failed += 1;
                model[i as usize] = None; // unknown: may hold half
            }
        }
        if i % 64 == 0 {
            vm.pageout(vm.total_pages());
        }
    }
    eprintln!("{what}: {failed} writes failed of {n}");
    let c = a.fork().unwrap();
    for i in 0..n {
        if let Some(t) = model[i as usize] {
            for (s, base, who) in [(&b, b0, "b"), (&c, a0, "child"), (&a, a0, "a")] {
                match rdpage(s, base + i * PAGE) {
                    Ok(v) => assert_eq!(v, t, "{what}: {who} page {i}"),
                    Err(e) => {
                        // A read that cannot get memory may fail; it must
                        // not return wrong data.
                        assert!(!e.contains("torn"), "{what}: {who} page {i}: {e}");
                    }
                }
            }
        }
    }
    drop(c);
    // Free some memory: unmap half the object from both spaces; data in
    // the other half must survive.
    let half = n / 2;
    a.unmap(a0 + half * PAGE, (n - half) * PAGE).unwrap();
    b.unmap(b0 + half * PAGE, (n - half) * PAGE).unwrap();
    vm.resize_object(&obj, half);
    for i in 0..half {
        if let Some(t) = model[i as usize] {
            assert_eq!(
                rdpage(&b, b0 + i * PAGE),
                Ok(t),
                "{what}: b page {i} after shrink"
            );
        }
    }
    squeeze(&vm);
    for i in 0..half {
        if let Some(t) = model[i as usize] {
            assert_eq!(
                rdpage(&a, a0 + i * PAGE),
                Ok(t),
                "{what}: a page {i} after shrink + squeeze"
            );
        }
    }
    consistent(&vm, what);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s04_swap_fills_up_with_shared_object_x86() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, _) = machines(2 * PAGES + 100, policy);
        s04(x, &format!("s04 x86 {policy:?}"));
    }
}

#[test]
fn s04_swap_fills_up_with_shared_object_ref() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (_, r) = machines(2 * PAGES + 100, policy);
        s04(r, &format!("s04 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s05: a named object mapped past its end (the 2 MiB window holds the
// object's end) under Always: accesses past the end fail, inside read
// back; grow the object and the new pages are zero.
// ---------------------------------------------------------------------------

fn s05<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let n = PAGES + PAGES / 2 + 3;
    let obj = vm.new_anon_object(2 * PAGES);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    a.map(MapRequest::object(
        BASE,
        2 * SUPER,
        obj.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    b.map(MapRequest::object(
        BASE + 8 * SUPER,
        2 * SUPER,
        obj.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    vm.resize_object(&obj, n);
    // Write the first page of the second 2 MiB first (fills whole under
    // Always, up to the end).
    wrpage(&a, BASE + PAGES * PAGE, 77).unwrap();
    assert!(
        a.write_u8(BASE + n * PAGE, 1).is_err(),
        "{what}: write past the end"
    );
    assert!(
        b.read_u8(BASE + 8 * SUPER + n * PAGE).is_err(),
        "{what}: read past the end"
    );
    let mut model = vec![0u64; 2 * PAGES as usize];
    model[PAGES as usize] = 77;
    for i in (0..n).step_by(11) {
        let t = tag(i, 1);
        wrpage(&b, BASE + 8 * SUPER + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    check_view(&a, BASE, 0, n, &model, &format!("{what} a"));
    vm.resize_object(&obj, 2 * PAGES);
    check_view(
        &a,
        BASE,
        0,
        2 * PAGES,
        &model,
        &format!("{what} a after grow"),
    );
    check_view(
        &b,
        BASE + 8 * SUPER,
        0,
        2 * PAGES,
        &model,
        &format!("{what} b after grow"),
    );
    vm.resize_object(&obj, PAGES - 5);
    assert!(
        a.read_u8(BASE + PAGES * PAGE).is_err(),
        "{what}: read past the shrunk end"
    );
    check_view(
        &b,
        BASE + 8 * SUPER,
        0,
        PAGES - 5,
        &model,
        &format!("{what} b after shrink"),
    );
    vm.resize_object(&obj, 2 * PAGES);
    for i in PAGES - 5..2 * PAGES {
        model[i as usize] = 0;
    }
    check_view(
        &a,
        BASE,
        0,
        2 * PAGES,
        &model,
        &format!("{what} a after regrow"),
    );
    drop(a);
    drop(b);
    drop(obj);
    quiet_checks(&vm, what);
}

#[test]
fn s05_named_object_end_inside_a_superpage_window() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(4 * PAGES + 100, policy);
        s05(x, &format!("s05 x86 {policy:?}"));
        s05(r, &format!("s05 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s06: whole-superpage fills of a named object racing terminate / unmap
// from other spaces, and pageout of the object, with zeroer.
// ---------------------------------------------------------------------------

fn s06<P: Pmap>(vm: Arc<Vm<P>>, what: &str, secs: u64) {
    let (sw_, _t) = with_swap(&vm, 16);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < until {
        rounds += 1;
        let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
        let obj = vm.new_anon_object(2 * PAGES);
        let spaces: Vec<Arc<VmSpace<P>>> =
            (0..3).map(|_| Arc::new(vm.new_space().unwrap())).collect();
        for (k, s) in spaces.iter().enumerate() {
            s.map(MapRequest::object(
                BASE + k as u64 * 7 * PAGE,
                2 * PAGES * PAGE,
                obj.clone(),
                0,
                Prot::RW,
            ))
            .unwrap();
        }
        let written: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * PAGES).map(|_| AtomicU64::new(0)).collect());
        let mut hs = Vec::new();
        for (k, s) in spaces.iter().enumerate() {
            let s = s.clone();
            let written = written.clone();
            let what = what.to_string();
            hs.push(std::thread::spawn(move || {
                let base = BASE + k as u64 * 7 * PAGE;
                let mut rng = Rng(rounds * 13 + k as u64);
                for _ in 0..200 {
                    let i = rng.below(2 * PAGES / 3) * 3 + k as u64;
                    if i >= 2 * PAGES {
                        continue;
                    }
                    let t = tag(i, rounds);
                    wrpage(&s, base + i * PAGE, t).unwrap_or_else(|e| panic!("{what}: {e}"));
                    written[i as usize].store(t, Ordering::Relaxed);
                }
            }));
        }
        {
            let vm = vm.clone();
            hs.push(std::thread::spawn(move || {
                for _ in 0..20 {
                    vm.pageout(vm.total_pages() / 2);
                    std::thread::yield_now();
                }
            }));
        }
        join_within(hs, 20, what);
        for (k, s) in spaces.iter().enumerate() {
            let base = BASE + k as u64 * 7 * PAGE;
            for i in 0..2 * PAGES {
                let want = written[i as usize].load(Ordering::Relaxed);
                assert_eq!(
                    rdpage(s, base + i * PAGE),
                    Ok(want),
                    "{what} round {rounds}: space {k} page {i}"
                );
            }
        }
        let f = spaces[0].fork().unwrap();
        spaces[1]
            .unmap(BASE + 7 * PAGE + 100 * PAGE, 600 * PAGE)
            .unwrap();
        drop(spaces);
        squeeze(&vm);
        for i in 0..2 * PAGES {
            let want = written[i as usize].load(Ordering::Relaxed);
            assert_eq!(
                rdpage(&f, BASE + i * PAGE),
                Ok(want),
                "{what} round {rounds}: fork page {i}"
            );
        }
        drop(f);
        drop(obj);
        drop(zeroer);
        consistent(&vm, what);
        no_leak(&vm, &format!("{what} round {rounds}"));
    }
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
    eprintln!("{what}: {rounds} rounds");
}

#[test]
fn s06_three_spaces_fill_named_object_beside_pageout_x86() {
    let (x, _) = machines(3 * PAGES + 300, SuperpagePolicy::Always);
    s06(x, "s06 x86 always", 5);
    let (x, _) = machines(3 * PAGES + 300, SuperpagePolicy::Reserve);
    s06(x, "s06 x86 reserve", 3);
}

#[test]
fn s06_three_spaces_fill_named_object_beside_pageout_ref() {
    let (_, r) = machines(3 * PAGES + 300, SuperpagePolicy::Always);
    s06(r, "s06 ref always", 5);
    let (_, r) = machines(3 * PAGES + 300, SuperpagePolicy::Reserve);
    s06(r, "s06 ref reserve", 3);
}

// ---------------------------------------------------------------------------
// s08: a storm on one named object shared by three spaces (different
// 2 MiB alignments): each space's thread owns every third page and writes,
// reads, protects, unmaps and remaps, wires and unwires, forks and checks
// the child, while pageout (swap) and balloons run. Every page ends with
// its owner's last tag, seen the same through every space.
// ---------------------------------------------------------------------------

fn s08<P: Pmap>(vm: Arc<Vm<P>>, what: &str, secs: u64, seed: u64) {
    let (sw_, _t) = with_swap(&vm, 32);
    const N: u64 = 3 * PAGES;
    const K: u64 = 3;
    let obj = vm.new_anon_object(N);
    let bases = [
        BASE,
        BASE + 64 * SUPER + 256 * PAGE,
        BASE + 128 * SUPER + 5 * PAGE,
    ];
    let spaces: Vec<Arc<VmSpace<P>>> = (0..K).map(|_| Arc::new(vm.new_space().unwrap())).collect();
    for (k, s) in spaces.iter().enumerate() {
        s.map(MapRequest::object(
            bases[k],
            N * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    }
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for k in 0..K {
        let s = spaces[k as usize].clone();
        let base = bases[k as usize];
        let last = last.clone();
        let stop = stop.clone();
        let obj = obj.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed * 101 + k);
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                let own = |rng: &mut Rng| rng.below(N / K) * K + k;
                match rng.below(16) {
                    0..=7 => {
                        let i = own(&mut rng);
                        let t = tag(i, r) | (k << 60);
                        wrpage(&s, base + i * PAGE, t)
                            .unwrap_or_else(|e| panic!("{what}: space {k} write {i}: {e}"));
                        last[i as usize].store(t, Ordering::Relaxed);
                    }
                    8..=10 => {
                        let i = own(&mut rng);
                        let got = rdpage(&s, base + i * PAGE)
                            .unwrap_or_else(|e| panic!("{what}: space {k} read {i}: {e}"));
                        assert_eq!(
                            got,
                            last[i as usize].load(Ordering::Relaxed),
                            "{what}: space {k} page {i} round {r}"
                        );
                    }
                    11 => {
                        let i = rng.below(N - 64);
                        let len = 1 + rng.below(64.min(N - i));
                        s.protect(base + i * PAGE, len * PAGE, Prot::READ).unwrap();
                        for j in i..i + len {
                            if j % K == k {
                                assert_eq!(
                                    rdpage(&s, base + j * PAGE),
                                    Ok(last[j as usize].load(Ordering::Relaxed)),
                                    "{what}: space {k} ro page {j}"
                                );
                            }
                        }
                        assert!(
                            s.write_u8(base + i * PAGE, 0).is_err(),
                            "{what}: space {k} wrote read-only"
                        );
                        s.protect(base + i * PAGE, len * PAGE, Prot::RW).unwrap();
                    }
                    12 => {
                        let i = rng.below(N);
                        let len = 1 + rng.below((N - i).min(600));
                        s.unmap(base + i * PAGE, len * PAGE).unwrap();
                        assert!(s.read_u8(base + i * PAGE).is_err());
                        s.map(MapRequest::object(
                            base + i * PAGE,
                            len * PAGE,
                            obj.clone(),
                            i * PAGE,
                            Prot::RW,
                        ))
                        .unwrap();
                    }
                    13 => {
                        let i = rng.below(N - 32);
                        let len = 1 + rng.below(32);
                        s.wire(base + i * PAGE, len * PAGE, true)
                            .unwrap_or_else(|e| panic!("{what}: wire: {e}"));
                        let j = own(&mut rng);
                        let t = tag(j, r) | (k << 60) | (1 << 59);
                        wrpage(&s, base + j * PAGE, t).unwrap();
                        last[j as usize].store(t, Ordering::Relaxed);
                        s.unwire(base + i * PAGE, len * PAGE, true).unwrap();
                    }
                    14 => {
                        let c = s.fork().unwrap_or_else(|e| panic!("{what}: fork: {e}"));
                        for _ in 0..16 {
                            let i = own(&mut rng);
                            assert_eq!(
                                rdpage(&c, base + i * PAGE),
                                Ok(last[i as usize].load(Ordering::Relaxed)),
                                "{what}: space {k} child page {i}"
                            );
                        }
                        // The child shares: its write is the owner's.
                        let i = own(&mut rng);
                        let t = tag(i, r) | (k << 60) | (1 << 58);
                        wrpage(&c, base + i * PAGE, t).unwrap();
                        last[i as usize].store(t, Ordering::Relaxed);
                        assert_eq!(
                            rdpage(&s, base + i * PAGE),
                            Ok(t),
                            "{what}: space {k} page {i} after child write"
                        );
                    }
                    _ => {
                        // Whole 2 MiB window advice flip on own mapping.
                        let adv = if rng.below(2) == 0 {
                            SuperpageAdvice::NoHuge
                        } else {
                            SuperpageAdvice::Huge
                        };
                        let _ = s.advise_superpages(base, N * PAGE, adv);
                    }
                }
            }
        }));
    }
    {
        let vm = vm.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed + 5);
            while !stop.load(Ordering::Relaxed) {
                vm.pageout(rng.below(vm.total_pages()));
                let bl = vm.inflate_balloon(rng.below(300));
                std::thread::yield_now();
                drop(bl);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 30, what);
    for (k, s) in spaces.iter().enumerate() {
        for i in 0..N {
            assert_eq!(
                rdpage(s, bases[k] + i * PAGE),
                Ok(last[i as usize].load(Ordering::Relaxed)),
                "{what}: end space {k} page {i}"
            );
        }
    }
    consistent(&vm, what);
    squeeze(&vm);
    for (k, s) in spaces.iter().enumerate().rev() {
        for i in 0..N {
            assert_eq!(
                rdpage(s, bases[k] + i * PAGE),
                Ok(last[i as usize].load(Ordering::Relaxed)),
                "{what}: end+swap space {k} page {i}"
            );
        }
    }
    drop(spaces);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s08_storm_on_named_object_in_three_spaces_x86() {
    let (x, _) = machines(4 * PAGES + 100, SuperpagePolicy::Always);
    s08(x, "s08 x86 always", 5, 1);
    let (x, _) = machines(4 * PAGES + 100, SuperpagePolicy::Reserve);
    s08(x, "s08 x86 reserve", 4, 2);
}

#[test]
fn s08_storm_on_named_object_in_three_spaces_ref() {
    let (_, r) = machines(4 * PAGES + 100, SuperpagePolicy::Always);
    s08(r, "s08 ref always", 5, 3);
    let (_, r) = machines(4 * PAGES + 100, SuperpagePolicy::Reserve);
    s08(r, "s08 ref reserve", 4, 4);
}

const UNKNOWN: u64 = u64::MAX;
use common::rd64;

// ---------------------------------------------------------------------------
// s09: (s08 on a squeezed machine with a small swap that fills: writes may
// fail, pages whose write failed are unknown until written again)
// s08-like: a storm on one named object shared by three spaces (different
// 2 MiB alignments): each space's thread owns every third page and writes,
// reads, protects, unmaps and remaps, wires and unwires, forks and checks
// the child, while pageout (swap) and balloons run. Every page ends with
// its owner's last tag, seen the same through every space.
// ---------------------------------------------------------------------------

fn s09<P: Pmap>(vm: Arc<Vm<P>>, what: &str, secs: u64, seed: u64, swap_mib: u64) {
    let (sw, _t) = with_swap(&vm, swap_mib);
    const N: u64 = 3 * PAGES;
    const K: u64 = 3;
    let obj = vm.new_anon_object(N);
    let bases = [
        BASE,
        BASE + 64 * SUPER + 256 * PAGE,
        BASE + 128 * SUPER + 5 * PAGE,
    ];
    let spaces: Vec<Arc<VmSpace<P>>> = (0..K).map(|_| Arc::new(vm.new_space().unwrap())).collect();
    for (k, s) in spaces.iter().enumerate() {
        s.map(MapRequest::object(
            bases[k],
            N * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    }
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for k in 0..K {
        let s = spaces[k as usize].clone();
        let base = bases[k as usize];
        let last = last.clone();
        let stop = stop.clone();
        let obj = obj.clone();
        let what = what.to_string();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed * 101 + k);
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                let own = |rng: &mut Rng| rng.below(N / K) * K + k;
                let op = rng.below(16);
                OPS[k as usize].store((op << 32) | (r & 0xffff_ffff), Ordering::Relaxed);
                match op {
                    0..=7 => {
                        let i = own(&mut rng);
                        let t = tag(i, r) | (k << 60);
                        match wrpage(&s, base + i * PAGE, t) {
                            Ok(()) => last[i as usize].store(t, Ordering::Relaxed),
                            Err(_) => last[i as usize].store(UNKNOWN, Ordering::Relaxed),
                        }
                    }
                    8..=10 => {
                        let i = own(&mut rng);
                        let want = last[i as usize].load(Ordering::Relaxed);
                        if let Ok(got) = rd64(&s, base + i * PAGE)
                            && want != UNKNOWN
                        {
                            assert_eq!(got, want, "{what}: space {k} page {i} round {r}");
                        }
                    }
                    11 => {
                        let i = rng.below(N - 64);
                        let len = 1 + rng.below(64.min(N - i));
                        if s.protect(base + i * PAGE, len * PAGE, Prot::READ).is_err() {
                            continue;
                        }
                        for j in i..i + len {
                            let want = last[j as usize].load(Ordering::Relaxed);
                            if j % K == k
                                && want != UNKNOWN
                                && let Ok(got) = rd64(&s, base + j * PAGE)
                            {
                                assert_eq!(got, want, "{what}: space {k} ro page {j}");
                            }
                        }
                        assert!(
                            s.write_u8(base + i * PAGE, 0).is_err(),
                            "{what}: space {k} wrote read-only"
                        );
                        s.protect(base + i * PAGE, len * PAGE, Prot::RW)
                            .unwrap_or_else(|e| panic!("{what}: protect back: {e}"));
                    }
                    12 => {
                        let i = rng.below(N);
                        let len = 1 + rng.below((N - i).min(600));
                        s.unmap(base + i * PAGE, len * PAGE).unwrap();
                        assert!(s.read_u8(base + i * PAGE).is_err());
                        s.map(MapRequest::object(
                            base + i * PAGE,
                            len * PAGE,
                            obj.clone(),
                            i * PAGE,
                            Prot::RW,
                        ))
                        .unwrap_or_else(|e| panic!("{what}: remap: {e}"));
                    }
                    13 => {
                        let i = rng.below(N - 32);
                        let len = 1 + rng.below(32);
                        if s.wire(base + i * PAGE, len * PAGE, true).is_err() {
                            continue;
                        }
                        let j = own(&mut rng);
                        let t = tag(j, r) | (k << 60) | (1 << 59);
                        match wrpage(&s, base + j * PAGE, t) {
                            Ok(()) => last[j as usize].store(t, Ordering::Relaxed),
                            Err(_) => last[j as usize].store(UNKNOWN, Ordering::Relaxed),
                        }
                        s.unwire(base + i * PAGE, len * PAGE, true).unwrap();
                    }
                    14 => {
                        let Ok(c) = s.fork() else { continue };
                        for _ in 0..16 {
                            let i = own(&mut rng);
                            let want = last[i as usize].load(Ordering::Relaxed);
                            if want != UNKNOWN
                                && let Ok(got) = rd64(&c, base + i * PAGE)
                            {
                                assert_eq!(got, want, "{what}: space {k} child page {i}");
                            }
                        }
                        let i = own(&mut rng);
                        let t = tag(i, r) | (k << 60) | (1 << 58);
                        match wrpage(&c, base + i * PAGE, t) {
                            Ok(()) => last[i as usize].store(t, Ordering::Relaxed),
                            Err(_) => last[i as usize].store(UNKNOWN, Ordering::Relaxed),
                        }
                    }
                    _ => {
                        // Whole 2 MiB window advice flip on own mapping.
                        let adv = if rng.below(2) == 0 {
                            SuperpageAdvice::NoHuge
                        } else {
                            SuperpageAdvice::Huge
                        };
                        let _ = s.advise_superpages(base, N * PAGE, adv);
                    }
                }
            }
        }));
    }
    {
        let vm = vm.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed + 5);
            let mut r = 0u64;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                OPS[7].store((100 << 32) | r, Ordering::Relaxed);
                vm.pageout(rng.below(vm.total_pages()));
                OPS[7].store((101 << 32) | r, Ordering::Relaxed);
                let bl = vm.inflate_balloon(rng.below(300));
                std::thread::yield_now();
                drop(bl);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    // A hang detector only: with RAM and swap both full a fault takes up
    // to 1-2 s to give up (64 direct reclaims, each a pageout sweep the
    // full swap refuses), and an op in flight may fault many times (CI
    // saw one finish after more than 30 s).
    join_within(hs, 180, what);
    let mut unreadable = 0;
    let end0 = Instant::now();
    let (mut slow, mut slowest) = (0u64, Duration::ZERO);
    for pass in 0..2 {
        for (k, s) in spaces.iter().enumerate() {
            for i in 0..N {
                let want = last[i as usize].load(Ordering::Relaxed);
                if want == 0 || want == UNKNOWN {
                    // Never written (a zero page would need a frame on a
                    // machine whose RAM and swap may be full) or unknown.
                    continue;
                }
                let t0 = Instant::now();
                let got = rdpage(s, bases[k] + i * PAGE);
                let took = t0.elapsed();
                slowest = slowest.max(took);
                if took > Duration::from_millis(500) {
                    slow += 1;
                    if slow <= 5 {
                        eprintln!(
                            "{what}: end pass {pass} space {k} page {i}: read took {took:?}: {got:?} (want {want:#x}); free {}",
                            vm.free_pages()
                        );
                    }
                }
                assert!(
                    end0.elapsed() < Duration::from_secs(60),
                    "{what}: end-phase reads of a quiet machine take over 60 s: {slow} reads over 0.5 s, slowest {slowest:?}, now at pass {pass} space {k} page {i}; {unreadable} failed"
                );
                match got {
                    Ok(got) => {
                        assert_eq!(got, want, "{what}: end pass {pass} space {k} page {i}");
                    }
                    Err(e) => {
                        assert!(
                            !e.contains("torn") || want == UNKNOWN,
                            "{what}: end pass {pass} space {k} page {i}: {e}"
                        );
                        unreadable += 1;
                    }
                }
            }
        }
        consistent(&vm, what);
        squeeze(&vm);
    }
    let unknown = (0..N)
        .filter(|&i| last[i as usize].load(Ordering::Relaxed) == UNKNOWN)
        .count();
    let written = (0..N)
        .filter(|&i| last[i as usize].load(Ordering::Relaxed) != 0)
        .count();
    eprintln!(
        "{what}: end phase {:?}, {slow} slow reads, slowest {slowest:?}",
        end0.elapsed()
    );
    eprintln!(
        "{what}: {unknown} unknown pages, {unreadable} unreadable reads, {written} written; swap {}; total {}",
        sw.stats(),
        vm.total_pages()
    );
    drop(spaces);
    drop(obj);
    quiet_checks(&vm, what);
}

#[test]
fn s09_storm_with_full_swap_on_small_machines_x86() {
    let (x, _) = machines(2 * PAGES + 200, SuperpagePolicy::Always);
    s09(x, "s09 x86 always", 3, 11, 1);
    let (x, _) = machines(2 * PAGES + 200, SuperpagePolicy::Reserve);
    s09(x, "s09 x86 reserve", 3, 12, 1);
}

#[test]
fn s09_storm_with_full_swap_on_small_machines_ref() {
    let (_, r) = machines(2 * PAGES + 200, SuperpagePolicy::Always);
    s09(r, "s09 ref always", 3, 13, 1);
    let (_, r) = machines(2 * PAGES + 200, SuperpagePolicy::Reserve);
    s09(r, "s09 ref reserve", 3, 14, 1);
}

#[test]
fn s09b_storm_with_full_swap_x86_always_only() {
    let seed: u64 = std::env::var("S9_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11);
    let (x, _) = machines(2 * PAGES + 200, SuperpagePolicy::Always);
    s09(x, "s09b x86 always", 3, seed, 1);
}

// ---------------------------------------------------------------------------
// s11: a vnode file shared by two spaces, each with whole-superpage anon
// neighbours, truncated and regrown (set_len) while its pages are dirty,
// with pageout, msync and fork between. The file and every mapping agree.
// ---------------------------------------------------------------------------

fn s11<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (sw_, _t) = with_swap(&vm, 16);
    let n = PAGES + 100;
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0u8; (n * PAGE) as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let (a0, b0) = (BASE + SUPER, BASE + 16 * SUPER + 9 * PAGE);
    a.map(MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    a.map_anon(BASE + 8 * SUPER, SUPER, Prot::RW).unwrap();
    b.map_anon(BASE + 32 * SUPER, SUPER, Prot::RW).unwrap();
    let mut model = vec![0u64; n as usize];
    let mut anon_a = vec![0u64; PAGES as usize];
    let mut rng = Rng(7);
    let mut size = n;
    for round in 1..40u64 {
        for _ in 0..50 {
            let i = rng.below(size);
            let t = tag(i, round);
            let (s, base) = if rng.below(2) == 0 {
                (&a, a0)
            } else {
                (&b, b0)
            };
            wrpage(s, base + i * PAGE, t).unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
            model[i as usize] = t;
            let j = rng.below(PAGES);
            wrpage(&a, BASE + 8 * SUPER + j * PAGE, t ^ 1).unwrap();
            anon_a[j as usize] = t ^ 1;
            wrpage(&b, BASE + 32 * SUPER + j * PAGE, t ^ 2).unwrap();
        }
        match rng.below(5) {
            0 => {
                let new = 1 + rng.below(n);
                pager.set_len(&vm, &obj, new * PAGE).unwrap();
                if new < size {
                    for i in new..size {
                        model[i as usize] = 0;
                    }
                    if new < n {
                        assert!(
                            a.read_u8(a0 + new * PAGE).is_err(),
                            "{what}: read past the end"
                        );
                    }
                } else {
                    for i in size..new {
                        model[i as usize] = 0;
                    }
                }
                size = new;
            }
            1 => squeeze(&vm),
            2 => {
                b.msync(b0, n * PAGE).unwrap();
                let file = std::fs::read(&f.0).unwrap();
                assert_eq!(
                    file.len() as u64,
                    size * PAGE,
                    "{what}: file length round {round}"
                );
                for i in 0..size {
                    let off = (i * PAGE) as usize;
                    let head = u64::from_le_bytes(file[off..off + 8].try_into().unwrap());
                    let tl = u64::from_le_bytes(
                        file[off + PAGE as usize - 8..off + PAGE as usize]
                            .try_into()
                            .unwrap(),
                    );
                    assert_eq!(
                        (head, tl),
                        (model[i as usize], model[i as usize]),
                        "{what}: file page {i} round {round}"
                    );
                }
            }
            3 => {
                let c = a.fork().unwrap();
                for i in (0..size).step_by(7) {
                    assert_eq!(
                        rdpage(&c, a0 + i * PAGE),
                        Ok(model[i as usize]),
                        "{what}: child file page {i}"
                    );
                }
                for j in (0..PAGES).step_by(5) {
                    assert_eq!(
                        rdpage(&c, BASE + 8 * SUPER + j * PAGE),
                        Ok(anon_a[j as usize]),
                        "{what}: child anon page {j}"
                    );
                    wrpage(&c, BASE + 8 * SUPER + j * PAGE, 0xc0c0).unwrap();
                }
            }
            _ => {
                let bl = vm.inflate_balloon(vm.free_pages() / 2);
                vm.pageout(vm.total_pages());
                drop(bl);
            }
        }
        for i in 0..size {
            assert_eq!(
                rdpage(&a, a0 + i * PAGE),
                Ok(model[i as usize]),
                "{what}: a page {i} round {round}"
            );
            assert_eq!(
                rdpage(&b, b0 + i * PAGE),
                Ok(model[i as usize]),
                "{what}: b page {i} round {round}"
            );
        }
        for j in 0..PAGES {
            assert_eq!(
                rdpage(&a, BASE + 8 * SUPER + j * PAGE),
                Ok(anon_a[j as usize]),
                "{what}: anon page {j} round {round}"
            );
        }
    }
    drop(a);
    drop(b);
    drop(obj);
    squeeze(&vm);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s11_vnode_truncate_regrow_beside_whole_superpages() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(3 * PAGES + 200, policy);
        s11(x, &format!("s11 x86 {policy:?}"));
        s11(r, &format!("s11 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s12: holds (DMA pins) on a named object shared by two spaces, with whole
// superpages: DMA writes seen through both mappings, pinned pages never
// paged out, the object shrunk under the pins (the frames kept out of reuse
// until released, the regrown pages zero), fork with pins (shared mapping:
// the child shares), and release of frames freed while held into held runs.
// ---------------------------------------------------------------------------

fn hold_tag(h: &vm_core::HeldPages<impl Pmap>, i: u64, v: u64) {
    h.write((i * PAGE) as usize, &v.to_le_bytes()).unwrap();
    h.write(((i + 1) * PAGE - 8) as usize, &v.to_le_bytes())
        .unwrap();
}

fn s12<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (sw_, _t) = with_swap(&vm, 16);
    let n = 2 * PAGES;
    let obj = vm.new_anon_object(n);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let (a0, b0) = (BASE, BASE + 16 * SUPER + 64 * PAGE);
    a.map(MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut model = vec![0u64; n as usize];
    // Fill the first 2 MiB whole from a.
    wrpage(&a, a0, tag(0, 1)).unwrap();
    model[0] = tag(0, 1);
    let h = a.hold(a0, SUPER, Prot::READ | Prot::WRITE).unwrap();
    for i in (0..PAGES).step_by(3) {
        let t = tag(i, 2);
        hold_tag(&h, i, t);
        model[i as usize] = t;
    }
    check_view(&b, b0, 0, n, &model, &format!("{what} b sees DMA"));
    squeeze(&vm);
    check_view(
        &a,
        a0,
        0,
        n,
        &model,
        &format!("{what} a after squeeze with pins"),
    );
    // Write the second 2 MiB from b, hold part of it from b.
    for i in (PAGES..n).step_by(5) {
        let t = tag(i, 3);
        wrpage(&b, b0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    let h2 = b
        .hold(
            b0 + (PAGES + 10) * PAGE,
            100 * PAGE,
            Prot::READ | Prot::WRITE,
        )
        .unwrap();
    let c = a.fork().unwrap();
    check_view(&c, a0, 0, n, &model, &format!("{what} child with pins"));
    let t = tag(1, 4);
    wrpage(&c, a0 + PAGE, t).unwrap();
    model[1] = t;
    let mut got = [0u8; 8];
    h.read(PAGE as usize, &mut got).unwrap();
    assert_eq!(
        u64::from_le_bytes(got),
        t,
        "{what}: the pinned frame misses the child's write through a shared mapping"
    );
    // Shrink the object under the pins: pages 300.. go (held ones kept out
    // of reuse), then regrow: they read zero.
    vm.resize_object(&obj, 300);
    for i in 300..n {
        model[i as usize] = 0;
    }
    assert!(
        b.read_u8(b0 + 400 * PAGE).is_err(),
        "{what}: read past the shrunk end"
    );
    // DMA into frames the object no longer has: must not reappear.
    hold_tag(&h, 400, 0xbad);
    for i in 0..100 {
        h2.write((i * PAGE) as usize, &0xbadu64.to_le_bytes())
            .unwrap();
    }
    // Memory churn while freed frames are pinned.
    let bl = vm.inflate_balloon(vm.free_pages() / 2);
    squeeze(&vm);
    drop(bl);
    vm.resize_object(&obj, n);
    check_view(
        &a,
        a0,
        0,
        n,
        &model,
        &format!("{what} a after shrink + regrow under pins"),
    );
    check_view(
        &c,
        a0,
        0,
        n,
        &model,
        &format!("{what} child after shrink + regrow under pins"),
    );
    drop(h);
    drop(h2);
    // The freed pinned frames are free now; claim and fill everything.
    for i in (0..n).step_by(2) {
        let t = tag(i, 5);
        wrpage(&b, b0 + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    squeeze(&vm);
    check_view(&a, a0, 0, n, &model, &format!("{what} a at the end"));
    check_view(&b, b0, 0, n, &model, &format!("{what} b at the end"));
    drop(c);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s12_pins_on_shared_named_object_with_superpages() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(4 * PAGES + 200, policy);
        s12(x, &format!("s12 x86 {policy:?}"));
        s12(r, &format!("s12 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s13: tiny machines (one to three runs, off a run boundary): a named
// object shared by two spaces, whole-superpage private memory beside it,
// zero_free_pages in a loop, balloons, pageout to a small swap, forks,
// unmaps that break reservations. Data checked per round, the books
// audited (zero flags) at the end of every round.
// ---------------------------------------------------------------------------

fn s13<P: Pmap>(mk: impl Fn() -> Arc<Vm<P>>, what: &str, secs: u64) {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let vm = mk();
        let (_sw, _t) = with_swap(&vm, 4);
        let n = PAGES + 64;
        let obj = vm.new_anon_object(n);
        let a = Arc::new(vm.new_space().unwrap());
        let b = Arc::new(vm.new_space().unwrap());
        let (a0, b0) = (BASE, BASE + 8 * SUPER + 3 * PAGE);
        a.map(MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        let p0 = BASE + 32 * SUPER;
        a.map_anon(p0, SUPER, Prot::RW).unwrap();
        b.map_anon(p0, SUPER, Prot::RW).unwrap();
        let last: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let priv_last: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * PAGES).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for (k, s, base) in [(0u64, a.clone(), a0), (1, b.clone(), b0)] {
            let (last, priv_last, stop) = (last.clone(), priv_last.clone(), stop.clone());
            let what = what.to_string();
            hs.push(std::thread::spawn(move || {
                let mut rng = Rng(round * 17 + k);
                let mut r = 0;
                while !stop.load(Ordering::Relaxed) && r < 3000 {
                    r += 1;
                    let i = rng.below(n / 2) * 2 + k;
                    let t = tag(i, r) | (k << 62);
                    match wrpage(&s, base + i * PAGE, t) {
                        Ok(()) => last[i as usize].store(t, Ordering::Relaxed),
                        Err(_) => last[i as usize].store(UNKNOWN, Ordering::Relaxed),
                    }
                    let j = rng.below(PAGES);
                    let pt = tag(j, r) | (k << 62) | 1 << 61;
                    match wrpage(&s, p0 + j * PAGE, pt) {
                        Ok(()) => priv_last[(k * PAGES + j) as usize].store(pt, Ordering::Relaxed),
                        Err(_) => {
                            priv_last[(k * PAGES + j) as usize].store(UNKNOWN, Ordering::Relaxed)
                        }
                    }
                    if r % 200 == 0
                        && let Ok(c) = s.fork()
                    {
                        for _ in 0..8 {
                            let j = rng.below(PAGES);
                            let want = priv_last[(k * PAGES + j) as usize].load(Ordering::Relaxed);
                            if want != UNKNOWN
                                && let Ok(got) = rdpage(&c, p0 + j * PAGE)
                            {
                                assert_eq!(got, want, "{what} round {round}: child private {j}");
                            }
                        }
                    }
                    if r % 500 == 0 {
                        // Break the private reservation: unmap and map anew.
                        s.unmap(p0, SUPER).unwrap();
                        for j in 0..PAGES {
                            priv_last[(k * PAGES + j) as usize].store(0, Ordering::Relaxed);
                        }
                        s.map_anon(p0, SUPER, Prot::RW).unwrap();
                    }
                }
            }));
        }
        {
            let (vm, stop) = (vm.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                let mut rng = Rng(round);
                while !stop.load(Ordering::Relaxed) {
                    vm.zero_free_pages(1 + rng.below(100));
                    let bl = vm.inflate_balloon(rng.below(vm.total_pages()));
                    vm.zero_free_pages(1 + rng.below(40));
                    drop(bl);
                    if rng.below(4) == 0 {
                        vm.pageout(rng.below(vm.total_pages()));
                    }
                }
            }));
        }
        let t0 = Instant::now();
        while !hs[..2].iter().all(|h| h.is_finished()) && t0.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        join_within(hs, 60, what);
        for (s, base) in [(&a, a0), (&b, b0)] {
            for i in 0..n {
                let want = last[i as usize].load(Ordering::Relaxed);
                if want != UNKNOWN
                    && want != 0
                    && let Ok(got) = rdpage(s, base + i * PAGE)
                {
                    assert_eq!(got, want, "{what} round {round}: shared page {i}");
                }
            }
        }
        for (k, s) in [(0u64, &a), (1, &b)] {
            for j in 0..PAGES {
                let want = priv_last[(k * PAGES + j) as usize].load(Ordering::Relaxed);
                if want != UNKNOWN
                    && want != 0
                    && let Ok(got) = rdpage(s, p0 + j * PAGE)
                {
                    assert_eq!(got, want, "{what} round {round}: private {k} page {j}");
                }
            }
        }
        common::audit(&vm, &format!("{what} round {round} live"));
        drop(a);
        drop(b);
        drop(obj);
        quiet_checks(&vm, &format!("{what} round {round}"));
    }
    eprintln!("{what}: {round} rounds");
}

#[test]
fn s13_tiny_machines_named_object_zeroing_x86() {
    for (frames, policy) in [
        (PAGES + 150, SuperpagePolicy::Always),
        (2 * PAGES + 90, SuperpagePolicy::Reserve),
        (3 * PAGES + 10, SuperpagePolicy::Always),
    ] {
        s13(
            move || vm_at(X86Pmap::new(), 300, frames, cfg(frames, policy)),
            &format!("s13 x86 {frames} {policy:?}"),
            5,
        );
    }
}

#[test]
fn s13_tiny_machines_named_object_zeroing_ref() {
    for (frames, policy) in [
        (PAGES + 150, SuperpagePolicy::Always),
        (2 * PAGES + 90, SuperpagePolicy::Reserve),
        (3 * PAGES + 10, SuperpagePolicy::Always),
    ] {
        s13(
            move || vm_at(RefPmap::new(), 77, frames, cfg(frames, policy)),
            &format!("s13 ref {frames} {policy:?}"),
            5,
        );
    }
}

// ---------------------------------------------------------------------------
// s14: a private mapping at an odd offset of a named object that a shared
// mapping wrote; both swapped; then the named object loses every other
// user, so it collapses into the private mapping's shadow (pages and swap
// blocks shifted by the offset); whole-superpage fills after the collapse
// must not hide what is on swap; fork / exit collapses again.
// ---------------------------------------------------------------------------

fn s14<P: Pmap>(vm: Arc<Vm<P>>, what: &str, off: u64) {
    let (sw_, _t) = with_swap(&vm, 32);
    let n = 3 * PAGES;
    let len = n - off;
    let obj = vm.new_anon_object(n);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    a.map(MapRequest::object(BASE, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let b0 = BASE + 16 * SUPER;
    b.map(MapRequest::object(b0, len * PAGE, obj.clone(), off * PAGE, Prot::RW).private())
        .unwrap();
    // The object's pages: written through a, in spots.
    let mut named = vec![0u64; n as usize];
    for i in (0..n).filter(|i| i % 4 != 3) {
        let t = tag(i, 1);
        wrpage(&a, BASE + i * PAGE, t).unwrap();
        named[i as usize] = t;
    }
    // b's view: object page off + j; b copies some.
    let mut view: Vec<u64> = (0..len).map(|j| named[(off + j) as usize]).collect();
    for j in (0..len).filter(|j| j % 5 == 0) {
        let t = tag(j, 2) | 1 << 62;
        wrpage(&b, b0 + j * PAGE, t).unwrap();
        view[j as usize] = t;
    }
    squeeze(&vm);
    check_view(&b, b0, 0, len, &view, &format!("{what} b after swap"));
    squeeze(&vm);
    // a goes; the named object's last other user is the caller's Arc.
    drop(a);
    drop(obj);
    // A fork and its exit make the chain collapse (and exercise COW).
    for round in 0..3u64 {
        let c = b.fork().unwrap();
        check_view(&c, b0, 0, len, &view, &format!("{what} child {round}"));
        wrpage(&c, b0 + 7 * PAGE, 0xc1).unwrap();
        // b writes after the fork: COW away from the child.
        for j in (round..len).step_by(97) {
            let t = tag(j, 3 + round) | 1 << 62;
            wrpage(&b, b0 + j * PAGE, t).unwrap();
            view[j as usize] = t;
        }
        drop(c);
        squeeze(&vm);
        check_view(
            &b,
            b0,
            0,
            len,
            &view,
            &format!("{what} b after fork {round} exit + swap"),
        );
    }
    // Writes into windows after the collapse (fresh whole fills where the
    // object may have pages on swap).
    for j in (0..len).filter(|j| j % 512 == 300) {
        let t = tag(j, 9) | 1 << 62;
        wrpage(&b, b0 + j * PAGE, t).unwrap();
        view[j as usize] = t;
    }
    check_view(
        &b,
        b0,
        0,
        len,
        &view,
        &format!("{what} b after late writes"),
    );
    squeeze(&vm);
    check_view(&b, b0, 0, len, &view, &format!("{what} b at the end"));
    consistent(&vm, what);
    drop(b);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s14_named_object_collapses_into_private_shadow_with_swap() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        for off in [5, 512, 700] {
            let (x, r) = machines(3 * PAGES + 200, policy);
            s14(x, &format!("s14 x86 {policy:?} off {off}"), off);
            s14(r, &format!("s14 ref {policy:?} off {off}"), off);
        }
    }
}

// ---------------------------------------------------------------------------
// s15: mlock / kernel wiring of a named object's whole superpages from two
// spaces, overlapping and partial, unmapped while wired, unwired in parts,
// forked while wired; pageout between every step; the books and data.
// ---------------------------------------------------------------------------

fn s15<P: Pmap>(vm: Arc<Vm<P>>, what: &str, seed: u64) {
    let (sw_, _t) = with_swap(&vm, 32);
    let n = 2 * PAGES;
    let obj = vm.new_anon_object(n);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let (a0, b0) = (BASE, BASE + 16 * SUPER);
    a.map(MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut model = vec![0u64; n as usize];
    let mut rng = Rng(seed);
    // Wirings: (space, start page, len, user)
    let mut wired: Vec<(usize, u64, u64, bool)> = Vec::new();
    let mut mapped = [true, true];
    for step in 0..120u64 {
        let k = rng.below(2) as usize;
        let (s, base) = if k == 0 { (&a, a0) } else { (&b, b0) };
        match rng.below(8) {
            0 | 1 => {
                if mapped[k] {
                    for _ in 0..20 {
                        let i = rng.below(n);
                        let t = tag(i, step);
                        wrpage(s, base + i * PAGE, t)
                            .unwrap_or_else(|e| panic!("{what} step {step}: {e}"));
                        model[i as usize] = t;
                    }
                }
            }
            2 | 3 => {
                if mapped[k] {
                    let i = rng.below(n);
                    let len = 1 + rng.below((n - i).min(600));
                    let user = rng.below(2) == 0;
                    if s.wire(base + i * PAGE, len * PAGE, user).is_ok() {
                        wired.push((k, i, len, user));
                    }
                }
            }
            4 => {
                if !wired.is_empty() {
                    let w = wired.swap_remove(rng.below(wired.len() as u64) as usize);
                    let (s, base) = if w.0 == 0 { (&a, a0) } else { (&b, b0) };
                    if mapped[w.0] {
                        // A partial unwire first, then the rest.
                        let cut = rng.below(w.2);
                        let _ = s.unwire(base + w.1 * PAGE, cut * PAGE, w.3);
                        let _ = s.unwire(base + w.1 * PAGE, w.2 * PAGE, w.3);
                    }
                }
            }
            5 => {
                if mapped[k] {
                    let c = s.fork().unwrap();
                    for i in (rng.below(7)..n).step_by(7) {
                        assert_eq!(
                            rdpage(&c, base + i * PAGE),
                            Ok(model[i as usize]),
                            "{what} step {step}: child page {i}"
                        );
                    }
                    let i = rng.below(n);
                    let t = tag(i, step) | 1 << 62;
                    wrpage(&c, base + i * PAGE, t).unwrap();
                    model[i as usize] = t;
                }
            }
            6 => {
                // Unmap the whole mapping while wired, then map again.
                if mapped[k] {
                    s.unmap(base, n * PAGE).unwrap();
                    wired.retain(|w| w.0 != k);
                    mapped[k] = false;
                } else {
                    s.map(MapRequest::object(base, n * PAGE, obj.clone(), 0, Prot::RW))
                        .unwrap();
                    mapped[k] = true;
                }
            }
            _ => squeeze(&vm),
        }
        consistent(&vm, &format!("{what} step {step}"));
        for (k, s, base) in [(0, &a, a0), (1, &b, b0)] {
            if mapped[k] {
                for i in (step % 11..n).step_by(11) {
                    assert_eq!(
                        rdpage(s, base + i * PAGE),
                        Ok(model[i as usize]),
                        "{what} step {step}: space {k} page {i}"
                    );
                }
            }
        }
    }
    for w in wired.drain(..) {
        let (s, base) = if w.0 == 0 { (&a, a0) } else { (&b, b0) };
        s.unwire(base + w.1 * PAGE, w.2 * PAGE, w.3).unwrap();
    }
    squeeze(&vm);
    consistent(&vm, what);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s15_wiring_named_object_superpages_from_two_spaces() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        for seed in 1..4 {
            let (x, r) = machines(4 * PAGES + 200, policy);
            s15(x, &format!("s15 x86 {policy:?} seed {seed}"), seed);
            s15(r, &format!("s15 ref {policy:?} seed {seed}"), seed);
        }
    }
}

// ---------------------------------------------------------------------------
// s16: in each of two spaces sharing a named object, a writer thread and a
// map-changing thread (unmap + map back, protect READ + back, wire +
// unwire, advice) race on the same ranges; the writer retries until its
// write lands. pageout + balloons + zeroer beside. Every page ends with its
// last tag in both spaces.
// ---------------------------------------------------------------------------

/// s16 (`file` false: a named anonymous object) and s17 (`file` true: a
/// vnode file, msync instead of some forks, the file checked at the end).
fn storm<P: Pmap>(vm: Arc<Vm<P>>, what: &str, secs: u64, seed: u64, file: bool) {
    let (sw_, _t) = with_swap(&vm, 32);
    const N: u64 = 3 * PAGES;
    let f = TempPath::new();
    let pager = file.then(|| {
        std::fs::write(&f.0, vec![0u8; (N * PAGE) as usize]).unwrap();
        VnodePager::open(&f.0, true).unwrap()
    });
    let obj = match &pager {
        Some(p) => p.object(&vm),
        None => vm.new_anon_object(N),
    };
    let bases = [BASE, BASE + 64 * SUPER + 100 * PAGE];
    let spaces: Vec<Arc<VmSpace<P>>> = (0..2).map(|_| Arc::new(vm.new_space().unwrap())).collect();
    for (k, s) in spaces.iter().enumerate() {
        s.map(MapRequest::object(
            bases[k],
            N * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
    }
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let zeroer = vm.spawn_page_zeroer(Duration::from_millis(1));
    let mut hs = Vec::new();
    for k in 0..2u64 {
        let s = spaces[k as usize].clone();
        let base = bases[k as usize];
        {
            let (s, last, stop) = (s.clone(), last.clone(), stop.clone());
            let what = what.to_string();
            hs.push(std::thread::spawn(move || {
                let mut rng = Rng(seed * 7 + k);
                let mut r = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    r += 1;
                    let i = rng.below(N / 2) * 2 + k;
                    let t = tag(i, r) | (k << 62);
                    let mut tries = 0;
                    while wrpage(&s, base + i * PAGE, t).is_err() {
                        tries += 1;
                        assert!(tries < 100_000, "{what}: write {i} never lands");
                        std::thread::yield_now();
                    }
                    last[i as usize].store(t, Ordering::Relaxed);
                    let j = rng.below(N / 2) * 2 + k;
                    let want = last[j as usize].load(Ordering::Relaxed);
                    loop {
                        match rdpage(&s, base + j * PAGE) {
                            Ok(got) => {
                                assert_eq!(got, want, "{what}: space {k} page {j} round {r}");
                                break;
                            }
                            Err(e) => {
                                assert!(!e.contains("torn"), "{what}: space {k} page {j}: {e}");
                                std::thread::yield_now();
                            }
                        }
                    }
                }
            }));
        }
        {
            let (s, stop, obj) = (s.clone(), stop.clone(), obj.clone());
            let what = what.to_string();
            hs.push(std::thread::spawn(move || {
                let mut rng = Rng(seed * 13 + k);
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(N);
                    let len = 1 + rng.below((N - i).min(700));
                    let (va, l) = (base + i * PAGE, len * PAGE);
                    match rng.below(5) {
                        0 => {
                            s.unmap(va, l).unwrap();
                            s.map(MapRequest::object(va, l, obj.clone(), i * PAGE, Prot::RW))
                                .unwrap_or_else(|e| panic!("{what}: remap: {e}"));
                        }
                        1 => {
                            s.protect(va, l, Prot::READ).unwrap();
                            std::thread::yield_now();
                            s.protect(va, l, Prot::RW).unwrap();
                        }
                        2 => {
                            if s.wire(va, l, true).is_ok() {
                                std::thread::yield_now();
                                s.unwire(va, l, true).unwrap();
                            }
                        }
                        3 => {
                            let adv = if rng.below(2) == 0 {
                                SuperpageAdvice::NoHuge
                            } else {
                                SuperpageAdvice::Huge
                            };
                            let _ = s.advise_superpages(va, l, adv);
                        }
                        _ => {
                            if file && rng.below(2) == 0 {
                                let _ = s.msync(va, l);
                            } else if let Ok(c) = s.fork() {
                                let _ = c.read_u8(va);
                            }
                        }
                    }
                }
            }));
        }
    }
    {
        let (vm, stop) = (vm.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = Rng(seed);
            while !stop.load(Ordering::Relaxed) {
                vm.pageout(rng.below(vm.total_pages()));
                let bl = vm.inflate_balloon(rng.below(200));
                std::thread::yield_now();
                drop(bl);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    join_within(hs, 60, what);
    drop(zeroer);
    for (k, s) in spaces.iter().enumerate() {
        for i in 0..N {
            assert_eq!(
                rdpage(s, bases[k] + i * PAGE),
                Ok(last[i as usize].load(Ordering::Relaxed)),
                "{what}: end space {k} page {i}"
            );
        }
    }
    consistent(&vm, what);
    squeeze(&vm);
    for (k, s) in spaces.iter().enumerate().rev() {
        for i in 0..N {
            assert_eq!(
                rdpage(s, bases[k] + i * PAGE),
                Ok(last[i as usize].load(Ordering::Relaxed)),
                "{what}: end+swap space {k} page {i}"
            );
        }
    }
    if file {
        spaces[0].msync(bases[0], N * PAGE).unwrap();
    }
    let contents = if file {
        std::fs::read(&f.0).unwrap()
    } else {
        Vec::new()
    };
    for i in (0..N).filter(|_| file) {
        let off = (i * PAGE) as usize;
        let head = u64::from_le_bytes(contents[off..off + 8].try_into().unwrap());
        let tl = u64::from_le_bytes(
            contents[off + PAGE as usize - 8..off + PAGE as usize]
                .try_into()
                .unwrap(),
        );
        let want = last[i as usize].load(Ordering::Relaxed);
        assert_eq!((head, tl), (want, want), "{what}: file page {i}");
    }
    drop(spaces);
    drop(obj);
    squeeze(&vm);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
    drop(pager);
}

#[test]
fn s16_map_changes_race_writers_on_named_object_x86() {
    let (x, _) = machines(4 * PAGES + 100, SuperpagePolicy::Always);
    storm(x, "s16 x86 always", 5, 1, false);
    let (x, _) = machines(4 * PAGES + 100, SuperpagePolicy::Reserve);
    storm(x, "s16 x86 reserve", 4, 2, false);
}

#[test]
fn s16_map_changes_race_writers_on_named_object_ref() {
    let (_, r) = machines(4 * PAGES + 100, SuperpagePolicy::Always);
    storm(r, "s16 ref always", 5, 3, false);
    let (_, r) = machines(4 * PAGES + 100, SuperpagePolicy::Reserve);
    storm(r, "s16 ref reserve", 4, 4, false);
}
// ---------------------------------------------------------------------------
// s17: s16 on a vnode file (msync instead of some forks; the file checked
// at the end), a writer thread and a
// map-changing thread (unmap + map back, protect READ + back, wire +
// unwire, advice) race on the same ranges; the writer retries until its
// write lands. pageout + balloons + zeroer beside. Every page ends with its
// last tag in both spaces.
// ---------------------------------------------------------------------------

#[test]
fn s17_map_changes_race_writers_on_vnode_file_x86() {
    let (x, _) = machines(2 * PAGES + 100, SuperpagePolicy::Always);
    storm(x, "s17 x86 always", 4, 1, true);
}

#[test]
fn s17_map_changes_race_writers_on_vnode_file_ref() {
    let (_, r) = machines(2 * PAGES + 100, SuperpagePolicy::Reserve);
    storm(r, "s17 ref reserve", 4, 3, true);
}

// ---------------------------------------------------------------------------
// s18: a shared mapping of a named object asked to be copied at fork
// (Inheritance::Copy): parent and child become copy-on-write of the object
// (FreeBSD vm_map_copy_entry), while another space keeps sharing it.
// With whole superpages mapped writable in the parent, the parent's writes
// after the fork must go to its own copies: neither the child nor the
// object (the other space) may see them.
// ---------------------------------------------------------------------------

fn s18<P: Pmap>(vm: Arc<Vm<P>>, what: &str, squeeze_first: bool) {
    let (sw_, _t) = with_swap(&vm, 32);
    let n = 2 * PAGES;
    let obj = vm.new_anon_object(n);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    let (a0, b0) = (BASE, BASE + 16 * SUPER);
    a.map(
        MapRequest::object(a0, n * PAGE, obj.clone(), 0, Prot::RW)
            .inheritance(vm_core::Inheritance::Copy),
    )
    .unwrap();
    b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let mut shared = vec![0u64; n as usize];
    for i in 0..n {
        let t = tag(i, 1);
        wrpage(&a, a0 + i * PAGE, t).unwrap();
        shared[i as usize] = t;
    }
    if squeeze_first {
        squeeze(&vm);
        for i in (0..n).step_by(2) {
            rdpage(&a, a0 + i * PAGE).unwrap();
        }
    }
    let c = a.fork().unwrap();
    let mut pa = shared.clone();
    let mut pc = shared.clone();
    // Parent writes every third page, child every fifth, b every seventh.
    for i in (0..n).step_by(3) {
        let t = tag(i, 2) | 1 << 60;
        wrpage(&a, a0 + i * PAGE, t).unwrap();
        pa[i as usize] = t;
    }
    for i in (0..n).step_by(5) {
        let t = tag(i, 3) | 2 << 60;
        wrpage(&c, a0 + i * PAGE, t).unwrap();
        pc[i as usize] = t;
    }
    check_view(
        &b,
        b0,
        0,
        n,
        &shared,
        &format!("{what} b (the object) after parent/child writes"),
    );
    check_view(&c, a0, 0, n, &pc, &format!("{what} child"));
    check_view(&a, a0, 0, n, &pa, &format!("{what} parent"));
    squeeze(&vm);
    check_view(&b, b0, 0, n, &shared, &format!("{what} b after squeeze"));
    check_view(&c, a0, 0, n, &pc, &format!("{what} child after squeeze"));
    check_view(&a, a0, 0, n, &pa, &format!("{what} parent after squeeze"));
    drop(c);
    drop(a);
    drop(b);
    drop(obj);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
}

#[test]
fn s18_shared_named_mapping_copied_at_fork() {
    for policy in [
        SuperpagePolicy::Always,
        SuperpagePolicy::Reserve,
        SuperpagePolicy::Never,
    ] {
        for sq in [false, true] {
            let (x, r) = machines(6 * PAGES + 200, policy);
            s18(x, &format!("s18 x86 {policy:?} squeeze {sq}"), sq);
            s18(r, &format!("s18 ref {policy:?} squeeze {sq}"), sq);
        }
    }
}

// ---------------------------------------------------------------------------
// s19: DMA pins on a vnode file's pages, the file truncated under them and
// regrown: writes through the pins after the truncation reach neither the
// file nor the mappings; msync and pageout beside; the freed pinned frames
// come back free (and zeroed only when really zero) at release.
// ---------------------------------------------------------------------------

fn s19<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
    let (sw_, _t) = with_swap(&vm, 8);
    let n = 64u64;
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x33u8; (n * PAGE) as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    let a = vm.new_space().unwrap();
    let b = vm.new_space().unwrap();
    a.map(MapRequest::object(BASE, n * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    b.map(MapRequest::object(
        BASE + SUPER,
        n * PAGE,
        obj.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    // Whole-superpage anon memory beside, to put frames in held runs.
    a.map_anon(BASE + 8 * SUPER, 2 * SUPER, Prot::RW).unwrap();
    for i in 0..2 * PAGES {
        wrpage(&a, BASE + 8 * SUPER + i * PAGE, tag(i, 7)).unwrap();
    }
    let orig = u64::from_le_bytes([0x33; 8]);
    let mut model = vec![orig; n as usize];
    for i in 0..n {
        let t = tag(i, 1);
        wrpage(&a, BASE + i * PAGE, t).unwrap();
        model[i as usize] = t;
    }
    let h = b
        .hold(BASE + SUPER, n * PAGE, Prot::READ | Prot::WRITE)
        .unwrap();
    pager.set_len(&vm, &obj, 10 * PAGE + 100).unwrap();
    // DMA after the truncation into pages now wholly past the end.
    for i in 11..n {
        hold_tag(&h, i, 0xdead_0000 + i);
    }
    // Free the anon memory: its runs' frames return (held runs break).
    a.unmap(BASE + 8 * SUPER, 2 * SUPER).unwrap();
    squeeze(&vm);
    a.msync(BASE, 10 * PAGE).unwrap();
    pager.set_len(&vm, &obj, n * PAGE).unwrap();
    // Page 10 keeps its first 100 bytes, its tail was zeroed at the
    // truncation; the rest of the file is zeros.
    let mut m10 = [0u8; 8];
    a.read(BASE + 10 * PAGE, &mut m10).unwrap();
    assert_eq!(u64::from_le_bytes(m10), model[10], "{what}: page 10 head");
    let mut tail = [0u8; 8];
    a.read(BASE + 11 * PAGE - 8, &mut tail).unwrap();
    assert_eq!(
        u64::from_le_bytes(tail),
        0,
        "{what}: page 10 tail past the old end"
    );
    for i in 11..n {
        assert_eq!(
            rdpage(&a, BASE + i * PAGE),
            Ok(0),
            "{what}: regrown page {i} in a"
        );
        assert_eq!(
            rdpage(&b, BASE + SUPER + i * PAGE),
            Ok(0),
            "{what}: regrown page {i} in b"
        );
    }
    check_view(&b, BASE + SUPER, 0, 10, &model, &format!("{what} b head"));
    drop(h);
    a.msync(BASE, n * PAGE).unwrap();
    let file = std::fs::read(&f.0).unwrap();
    assert_eq!(file.len() as u64, n * PAGE);
    for i in 11..n {
        let off = (i * PAGE) as usize;
        assert!(
            file[off..off + PAGE as usize].iter().all(|&x| x == 0),
            "{what}: file page {i} not zero after regrow"
        );
    }
    drop(a);
    drop(b);
    drop(obj);
    squeeze(&vm);
    assert_eq!(sw_.stats().used, 0, "{what}: swap blocks leaked");
    quiet_checks(&vm, what);
    drop(pager);
}

#[test]
fn s19_pins_on_a_truncated_vnode_file() {
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(3 * PAGES + 200, policy);
        s19(x, &format!("s19 x86 {policy:?}"));
        s19(r, &format!("s19 ref {policy:?}"));
    }
}

// ---------------------------------------------------------------------------
// s20: bytes written through a mapping into the last page of a vnode file
// past its end (after a truncation to mid-page) reappear when the file is
// extended (POSIX: the extended area reads as zeros; the library says of
// set_object_size_bytes that the tail is zeroed "so they cannot reappear
// if the file grows").
// ---------------------------------------------------------------------------

fn s20<P: Pmap>(vm: Arc<Vm<P>>, what: &str, via_pin: bool) {
    let f = TempPath::new();
    std::fs::write(&f.0, vec![0x33u8; (4 * PAGE) as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&vm);
    let a = vm.new_space().unwrap();
    a.map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    a.read_u8(BASE + PAGE).unwrap();
    let h = via_pin.then(|| a.hold(BASE + PAGE, PAGE, Prot::READ | Prot::WRITE).unwrap());
    // Truncate to 100 bytes into page 1.
    pager.set_len(&vm, &obj, PAGE + 100).unwrap();
    // Write past the new end inside the last page.
    match &h {
        Some(h) => h.write(200, b"GARBAGE!").unwrap(),
        None => a.write(BASE + PAGE + 200, b"GARBAGE!").unwrap(),
    }
    drop(h);
    pager.set_len(&vm, &obj, 4 * PAGE).unwrap();
    let mut got = [0u8; 8];
    a.read(BASE + PAGE + 200, &mut got).unwrap();
    a.msync(BASE, 4 * PAGE).unwrap();
    let file = std::fs::read(&f.0).unwrap();
    let on_disk = &file[(PAGE + 200) as usize..(PAGE + 208) as usize];
    assert_eq!(
        (got, on_disk),
        ([0u8; 8], &[0u8; 8][..]),
        "{what}: bytes written past the end of the file reappear after it grows (mapping, file)"
    );
    drop(a);
    drop(obj);
    drop(pager);
}

#[test]
fn s20_bytes_past_eof_reappear_after_extension_mapping() {
    let (x, r) = machines(PAGES, SuperpagePolicy::Reserve);
    s20(x, "s20 x86 mapping", false);
    s20(r, "s20 ref mapping", false);
}

#[test]
fn s20_bytes_past_eof_reappear_after_extension_pin() {
    let (x, r) = machines(PAGES, SuperpagePolicy::Reserve);
    s20(x, "s20 x86 pin", true);
    s20(r, "s20 ref pin", true);
}

/// s21: after a truncation to mid-page and a write past the end inside
/// the last page, msync (and pageout) must not lengthen the file nor put
/// the bytes past the end into it.
#[test]
fn s21_write_past_eof_then_msync_keeps_the_length() {
    for (k, vm) in [machines(PAGES, SuperpagePolicy::Reserve).0]
        .into_iter()
        .enumerate()
    {
        let f = TempPath::new();
        std::fs::write(&f.0, vec![0x33u8; (4 * PAGE) as usize]).unwrap();
        let pager = VnodePager::open(&f.0, true).unwrap();
        let obj = pager.object(&vm);
        let a = vm.new_space().unwrap();
        a.map(MapRequest::object(BASE, 4 * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        a.read_u8(BASE + PAGE).unwrap();
        pager.set_len(&vm, &obj, PAGE + 100).unwrap();
        a.write(BASE + PAGE + 200, b"GARBAGE!").unwrap();
        a.write(BASE + PAGE + 10, b"inside").unwrap();
        a.msync(BASE, 4 * PAGE).unwrap();
        squeeze(&vm);
        let file = std::fs::read(&f.0).unwrap();
        assert_eq!(
            file.len() as u64,
            PAGE + 100,
            "{k}: file length after msync"
        );
        assert_eq!(&file[(PAGE + 10) as usize..(PAGE + 16) as usize], b"inside");
        // Not resident any more after the squeeze? Then growth reads zeros.
        pager.set_len(&vm, &obj, 4 * PAGE).unwrap();
        let mut got = [0u8; 8];
        a.read(BASE + PAGE + 200, &mut got).unwrap();
        eprintln!("after squeeze + growth the mapping shows {:?}", got);
    }
}

/// A pager's `grow` that panics inside `Vm::extend_object_bytes` leaves
/// the old last page unbusied (a reader does not wait on it forever), its
/// bytes past the old end zeroed and those before it kept.
#[test]
fn s20p_a_panicking_grow_leaves_the_page_unbusied() {
    let (vm, _) = machines(PAGES, SuperpagePolicy::Never);
    let obj = vm.new_anon_object(2);
    let a = vm.new_space().unwrap();
    a.map(MapRequest::object(BASE, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    a.write(BASE + PAGE + 50, b"kept").unwrap();
    a.write(BASE + PAGE + 200, b"GARBAGE!").unwrap();
    let grew = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.extend_object_bytes(&obj, PAGE + 100, 2 * PAGE, || -> Result<(), ()> {
            panic!("the pager failed hard")
        })
    }));
    assert!(grew.is_err());
    // A space that has not mapped the page yet: its read faults, and
    // would wait on a page left busy.
    let b = vm.new_space().unwrap();
    b.map(MapRequest::object(BASE, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    let (vm2, b2) = (vm.clone(), Arc::new(b));
    drop(a);
    let reader = {
        let b2 = b2.clone();
        std::thread::spawn(move || {
            let (mut kept, mut past) = ([0u8; 4], [9u8; 8]);
            b2.read(BASE + PAGE + 50, &mut kept).unwrap();
            b2.read(BASE + PAGE + 200, &mut past).unwrap();
            (kept, past)
        })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() {
        assert!(Instant::now() < until, "s20p: the page stayed busy");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (kept, past) = reader.join().unwrap();
    assert_eq!(&kept, b"kept");
    assert_eq!(past, [0; 8], "s20p: bytes past the old end zeroed");
    drop(b2);
    drop(obj);
    quiet_checks(&vm2, "s20p");
}

/// s20c: the plainest form of s20: a file of 1 page + 100 bytes, mapped
/// (2 pages), a write at byte 200 of its last page (past the end, inside
/// the mapped page), then the file grows (ftruncate up): the grown range
/// must read as zeros, in the mapping and in the file after msync.
#[test]
fn s20c_unaligned_file_scribble_past_eof_then_grow() {
    let (x, r) = machines(PAGES, SuperpagePolicy::Reserve);
    fn run<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
        let f = TempPath::new();
        std::fs::write(&f.0, vec![0x33u8; (PAGE + 100) as usize]).unwrap();
        let pager = VnodePager::open(&f.0, true).unwrap();
        let obj = pager.object(&vm);
        let a = vm.new_space().unwrap();
        a.map(MapRequest::object(BASE, 2 * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        let mut z = [9u8; 8];
        a.read(BASE + PAGE + 200, &mut z).unwrap();
        assert_eq!(z, [0; 8], "{what}: past the end reads zero");
        a.write(BASE + PAGE + 200, b"GARBAGE!").unwrap();
        pager.set_len(&vm, &obj, 2 * PAGE).unwrap();
        let mut got = [0u8; 8];
        a.read(BASE + PAGE + 200, &mut got).unwrap();
        a.msync(BASE, 2 * PAGE).unwrap();
        let file = std::fs::read(&f.0).unwrap();
        assert_eq!(
            (got, &file[(PAGE + 200) as usize..(PAGE + 208) as usize]),
            ([0u8; 8], &[0u8; 8][..]),
            "{what}: bytes written past the end reappear after the file grows (mapping, file)"
        );
    }
    run(x, "s20c x86");
    run(r, "s20c ref");
}

/// s22: a named object with whole superpages, pinned and wired pages and
/// swapped pages, terminated while mapped in two spaces and a fork:
/// accesses fail (no panic, no stale data), and every frame and swap block
/// comes back once the spaces and pins go.
#[test]
fn s22_terminate_named_object_with_superpages_pins_wires_swap() {
    fn run<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
        let (sw, _t) = with_swap(&vm, 16);
        let n = 2 * PAGES;
        let obj = vm.new_anon_object(n);
        let a = vm.new_space().unwrap();
        let b = vm.new_space().unwrap();
        a.map(MapRequest::object(BASE, n * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        b.map(MapRequest::object(
            BASE + 8 * SUPER + 5 * PAGE,
            n * PAGE,
            obj.clone(),
            0,
            Prot::RW,
        ))
        .unwrap();
        for i in (0..n).step_by(3) {
            wrpage(&a, BASE + i * PAGE, tag(i, 1)).unwrap();
        }
        squeeze(&vm);
        for i in (0..PAGES).step_by(2) {
            rdpage(&b, BASE + 8 * SUPER + 5 * PAGE + i * PAGE).unwrap();
        }
        b.wire(BASE + 8 * SUPER + 5 * PAGE, 50 * PAGE, true)
            .unwrap();
        let h = a
            .hold(BASE + 100 * PAGE, 20 * PAGE, Prot::READ | Prot::WRITE)
            .unwrap();
        let c = a.fork().unwrap();
        vm.terminate_object(&obj);
        for (s, base) in [(&a, BASE), (&b, BASE + 8 * SUPER + 5 * PAGE), (&c, BASE)] {
            for i in (0..n).step_by(37) {
                if let Ok(v) = rdpage(s, base + i * PAGE) {
                    // Still mapped pages may read; never torn.
                    let _ = v;
                }
                let _ = s.write_u8(base + i * PAGE, 1);
            }
        }
        hold_tag(&h, 3, 77);
        drop(h);
        let _ = b.unwire(BASE + 8 * SUPER + 5 * PAGE, 50 * PAGE, true);
        drop(c);
        drop(a);
        drop(b);
        drop(obj);
        squeeze(&vm);
        assert_eq!(sw.stats().used, 0, "{what}: swap blocks leaked");
        quiet_checks(&vm, what);
    }
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(4 * PAGES + 200, policy);
        run(x, &format!("s22 x86 {policy:?}"));
        run(r, &format!("s22 ref {policy:?}"));
    }
}

/// s20 on the reference pmap alone (the other s20 tests stop at x86).
#[test]
fn s20r_bytes_past_eof_reappear_after_extension_refpmap() {
    let (_, r) = machines(PAGES, SuperpagePolicy::Never);
    s20(r, "s20 ref mapping (superpages never)", false);
}

/// s23: a whole superpage of a named object in space a, protected NONE /
/// READ in parts while b writes and pageout moves pages to swap and back;
/// a, made RW again, sees every write of b, and b sees a's.
#[test]
fn s23_protect_parts_of_a_shared_whole_superpage() {
    fn run<P: Pmap>(vm: Arc<Vm<P>>, what: &str) {
        let (sw, _t) = with_swap(&vm, 16);
        let n = PAGES;
        let obj = vm.new_anon_object(n);
        let a = vm.new_space().unwrap();
        let b = vm.new_space().unwrap();
        let b0 = BASE + 8 * SUPER;
        a.map(MapRequest::object(BASE, n * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        b.map(MapRequest::object(b0, n * PAGE, obj.clone(), 0, Prot::RW))
            .unwrap();
        let mut model = vec![0u64; n as usize];
        wrpage(&a, BASE, 1).unwrap();
        model[0] = 1;
        let mut rng = Rng(3);
        for step in 1..200u64 {
            let i = rng.below(n);
            let len = 1 + rng.below((n - i).min(300));
            let prot = if rng.below(2) == 0 {
                Prot::NONE
            } else {
                Prot::READ
            };
            a.protect(BASE + i * PAGE, len * PAGE, prot).unwrap();
            for _ in 0..10 {
                let j = rng.below(n);
                let t = tag(j, step) | 1 << 62;
                wrpage(&b, b0 + j * PAGE, t).unwrap();
                model[j as usize] = t;
            }
            if step % 17 == 0 {
                squeeze(&vm);
            }
            if prot == Prot::READ {
                for j in i..i + len {
                    assert_eq!(
                        rdpage(&a, BASE + j * PAGE),
                        Ok(model[j as usize]),
                        "{what} step {step}: a read-only page {j}"
                    );
                }
            } else {
                assert!(
                    a.read_u8(BASE + i * PAGE).is_err(),
                    "{what}: read through PROT_NONE"
                );
            }
            a.protect(BASE + i * PAGE, len * PAGE, Prot::RW).unwrap();
            let j = rng.below(n);
            let t = tag(j, step) | 2 << 62;
            wrpage(&a, BASE + j * PAGE, t).unwrap();
            model[j as usize] = t;
            for j in (step % 13..n).step_by(13) {
                assert_eq!(
                    rdpage(&a, BASE + j * PAGE),
                    Ok(model[j as usize]),
                    "{what} step {step}: a page {j}"
                );
                assert_eq!(
                    rdpage(&b, b0 + j * PAGE),
                    Ok(model[j as usize]),
                    "{what} step {step}: b page {j}"
                );
            }
        }
        drop(a);
        drop(b);
        drop(obj);
        squeeze(&vm);
        assert_eq!(sw.stats().used, 0, "{what}: swap blocks leaked");
        quiet_checks(&vm, what);
    }
    for policy in [SuperpagePolicy::Always, SuperpagePolicy::Reserve] {
        let (x, r) = machines(3 * PAGES + 200, policy);
        run(x, &format!("s23 x86 {policy:?}"));
        run(r, &format!("s23 ref {policy:?}"));
    }
}
