//! Red team of the latest two behaviour changes:
//! cfc7089 (release_entries / collapse / COW rename / fork keep the pages
//! of an object a user holds: `VmObject::unexposed`) and e59eae5 (fork and
//! mprotect(+W) fault back pages a user-wired entry lost to a truncated and
//! regrown file: `copy_entry::refault_missing_wired`).
#![allow(clippy::unwrap_used, dead_code)]

mod common;
use common::{consistent, rd64, rdpage, ref_vm, wrpage, x86_vm};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_core::{Inheritance, MapError, MapRequest, Pmap, Prot, Vm};
use vm_pager_swap::Swap;
use vm_pager_vnode::VnodePager;
use vm_testkit::support::TempPath;

const PAGE: u64 = 4096;

fn all_free<P: Pmap>(vm: &Vm<P>, what: &str) {
    consistent(vm, what);
    assert_eq!(
        vm.free_pages(),
        vm.total_pages(),
        "{what}: frames leaked (queues {:?})",
        vm.queue_counts()
    );
}

/// Object pages that are wired (page-table pages of the x86 pmap are
/// wired too and are not counted).
fn wired_object_pages<P: Pmap>(vm: &Vm<P>) -> usize {
    vm.live_objects()
        .iter()
        .flat_map(|o| {
            o.resident_between(0, o.size())
                .into_iter()
                .filter_map(|p| o.resident_page(p))
                .collect::<Vec<_>>()
        })
        .filter(|&id| vm.page(id).wire_count() != 0)
        .count()
}

/// A file of `pages` pages of byte `fill`, its pager and object.
fn file<P: Pmap>(
    vm: &Arc<Vm<P>>,
    pages: u64,
    fill: u8,
) -> (TempPath, Arc<VnodePager>, Arc<vm_core::VmObject>) {
    let f = TempPath::new();
    std::fs::write(&f.0, vec![fill; (pages * PAGE) as usize]).unwrap();
    let pager = VnodePager::open(&f.0, true).unwrap();
    let obj = pager.object(&**vm);
    (f, pager, obj)
}

const FB: u64 = 0x4000_0000;
const FILL: u64 = 0x5a5a_5a5a_5a5a_5a5a;

macro_rules! both {
    ($name:ident, $body:ident, $pages:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn ref_pmap() {
                $body(&ref_vm($pages));
            }
            #[test]
            fn x86() {
                $body(&x86_vm($pages));
            }
        }
    };
}

// =====================================================================
// e59eae5: wired entries after truncate + regrow
// =====================================================================

/// A private file mapping, wired while readable, then made PROT_NONE
/// (FreeBSD keeps the wiring across mprotect). Truncate + regrow. Fork must
/// succeed (FreeBSD keeps wired pages through truncation; the commit says
/// "FreeBSD never fails there"); the refault reads with Prot::READ, which a
/// PROT_NONE entry refuses.
fn prot_none_wired_fork<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    s.protect(FB, 2 * PAGE, Prot::NONE).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork of a PROT_NONE wired file mapping after truncate+regrow: {:?}",
        child.as_ref().err()
    );
    let child = child.unwrap();
    child.protect(FB, 2 * PAGE, Prot::READ).unwrap();
    s.protect(FB, 2 * PAGE, Prot::READ).unwrap();
    for i in 0..2 {
        assert_eq!(rd64(&s, FB + i * PAGE), Ok(0), "parent page {i}");
        assert_eq!(rd64(&child, FB + i * PAGE), Ok(0), "child page {i}");
    }
    drop(child);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(prot_none_wired_fork_after_regrow, prot_none_wired_fork, 64);

/// The same PROT_NONE wired private file mapping, then mprotect(RW) after
/// truncate + regrow: the upgrade copies every page the entry shows.
fn prot_none_wired_upgrade<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    s.protect(FB, 2 * PAGE, Prot::NONE).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let r = s.protect(FB, 2 * PAGE, Prot::RW);
    assert!(
        r.is_ok(),
        "mprotect(RW) of a PROT_NONE wired private file mapping after truncate+regrow: {r:?}"
    );
    wrpage(&s, FB, 0x77).unwrap();
    assert_eq!(rdpage(&s, FB), Ok(0x77));
    assert_eq!(rd64(&s, FB + PAGE), Ok(0));
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(
    prot_none_wired_upgrade_after_regrow,
    prot_none_wired_upgrade,
    64
);

/// Write-only wired private file mapping: wired while readable, made
/// write-only (no upgrade copies happen: RW -> W), truncate + regrow, fork.
fn write_only_wired_fork<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    // Shared file mapping, minherit(COPY): copy_entry copies it at fork.
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    s.set_inheritance(FB, 2 * PAGE, Inheritance::Copy).unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    s.protect(FB, 2 * PAGE, Prot::WRITE).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork of a write-only wired shared file mapping (inherit copy) after truncate+regrow: {:?}",
        child.as_ref().err()
    );
    let child = child.unwrap();
    drop(child);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(
    write_only_wired_fork_after_regrow,
    write_only_wired_fork,
    64
);

/// PROT_NONE wired shared file mapping with inheritance Copy.
fn prot_none_shared_copy_fork<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    s.set_inheritance(FB, 2 * PAGE, Inheritance::Copy).unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    s.protect(FB, 2 * PAGE, Prot::NONE).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork of a PROT_NONE wired shared file mapping (inherit copy) after truncate+regrow: {:?}",
        child.as_ref().err()
    );
    drop(child);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(
    prot_none_shared_copy_fork_after_regrow,
    prot_none_shared_copy_fork,
    64
);

/// A wired shared (RW) file mapping inherited Copy; the file is truncated
/// and regrown with new data: fork copies what the file holds at fork.
fn shared_copy_fork_regrown_data<P: Pmap>(vm: &Arc<Vm<P>>) {
    use std::os::unix::fs::FileExt;
    let (f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    s.set_inheritance(FB, 2 * PAGE, Inheritance::Copy).unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let fh = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
    fh.write_all_at(&[0x77u8; PAGE as usize], PAGE).unwrap();
    let child = s.fork().unwrap();
    fh.write_all_at(&[0x99u8; PAGE as usize], PAGE).unwrap();
    assert_eq!(rd64(&child, FB), Ok(0), "child page 0");
    assert_eq!(
        rd64(&child, FB + PAGE),
        Ok(0x7777_7777_7777_7777),
        "child page 1"
    );
    // The child's copy is private.
    wrpage(&child, FB, 0xc0c0).unwrap();
    assert_eq!(rd64(&s, FB), Ok(0), "parent sees the child's write");
    drop(child);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(shared_copy_fork_regrown, shared_copy_fork_regrown_data, 64);

/// Truncated, not regrown: pages past EOF stay "Beyond"; fork succeeds;
/// both read SIGBUS there.
fn truncated_not_regrown<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 3, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 3 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 3 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, PAGE).unwrap();
    let before = vm.counters().snapshot();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork after truncation: {:?}",
        child.as_ref().err()
    );
    let child = child.unwrap();
    assert_eq!(rd64(&child, FB), Ok(FILL), "child page 0");
    // Beyond EOF the child's copy has nothing (zeros, as FreeBSD's copy of
    // an invalidated wired page would be); the parent faults there.
    assert!(rd64(&s, FB + 2 * PAGE).is_err(), "parent page 2 beyond EOF");
    let _ = before;
    // mprotect(RW) with the pages beyond EOF.
    let r = s.protect(FB, 3 * PAGE, Prot::RW);
    assert!(r.is_ok(), "mprotect(RW) after truncation: {r:?}");
    wrpage(&s, FB, 0x33).unwrap();
    assert_eq!(rd64(&child, FB), Ok(FILL), "child sees parent's write");
    drop(child);
    s.unwire(FB, 3 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(truncated_not_regrown_fork, truncated_not_regrown, 64);

/// Truncation into the middle of a page (a partial last page) under a
/// wired private mapping, then fork: the child sees the data up to EOF and
/// zeros after it, as the parent does.
fn truncated_mid_page<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, PAGE + 100).unwrap();
    let child = s.fork();
    assert!(child.is_ok(), "fork: {:?}", child.as_ref().err());
    let child = child.unwrap();
    let mut pb = vec![0u8; PAGE as usize];
    let mut cb = vec![0u8; PAGE as usize];
    s.read(FB + PAGE, &mut pb).unwrap();
    child.read(FB + PAGE, &mut cb).unwrap();
    assert!(pb[..100].iter().all(|&b| b == 0x5a), "parent head");
    assert!(pb[100..].iter().all(|&b| b == 0), "parent tail");
    assert_eq!(pb, cb, "child page 1");
    // Regrow: the tail stays zeros.
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let child2 = s.fork().unwrap();
    child2.read(FB + PAGE, &mut cb).unwrap();
    assert_eq!(pb, cb, "second child page 1");
    drop(child);
    drop(child2);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(truncated_mid_page_fork, truncated_mid_page, 64);

/// mprotect(RW) of only the middle page of a 3-page wired private file
/// mapping after truncate + regrow.
fn partial_upgrade<P: Pmap>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 3, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 3 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 3 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 3 * PAGE).unwrap();
    let r = s.protect(FB + PAGE, PAGE, Prot::RW);
    assert!(r.is_ok(), "mprotect(RW) middle page: {r:?}");
    wrpage(&s, FB + PAGE, 0x44).unwrap();
    let child = s.fork();
    assert!(
        child.is_ok(),
        "fork after partial upgrade: {:?}",
        child.as_ref().err()
    );
    let child = child.unwrap();
    assert_eq!(rd64(&child, FB), Ok(0));
    assert_eq!(rdpage(&child, FB + PAGE), Ok(0x44));
    assert_eq!(rd64(&child, FB + 2 * PAGE), Ok(0));
    drop(child);
    s.unwire(FB, 3 * PAGE, true).unwrap();
    consistent(vm, "after unwire");
    assert_eq!(wired_object_pages(vm), 0, "wired pages after unwire");
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(partial_upgrade_after_regrow, partial_upgrade, 64);

/// Inheritance Share and None on wired file mappings after truncate +
/// regrow: fork succeeds, Share child sees the file, None child has no
/// mapping; unwire leaves no wired page.
fn share_none_inheritance<P: Pmap>(vm: &Arc<Vm<P>>) {
    use std::os::unix::fs::FileExt;
    let (f, pager, obj) = file(vm, 2, 0x5a);
    let s = vm.new_space().unwrap();
    s.map(MapRequest::object(FB, 2 * PAGE, obj.clone(), 0, Prot::RW))
        .unwrap();
    s.map(MapRequest::object(FB + 0x10_0000, 2 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.set_inheritance(FB + 0x10_0000, 2 * PAGE, Inheritance::None)
        .unwrap();
    s.wire(FB, 2 * PAGE, true).unwrap();
    s.wire(FB + 0x10_0000, 2 * PAGE, true).unwrap();
    pager.set_len(&**vm, &obj, 0).unwrap();
    pager.set_len(&**vm, &obj, 2 * PAGE).unwrap();
    let fh = std::fs::OpenOptions::new().write(true).open(&f.0).unwrap();
    fh.write_all_at(&[0x11u8; 8], 0).unwrap();
    let child = s.fork().unwrap();
    assert_eq!(rd64(&child, FB), Ok(0x1111_1111_1111_1111), "shared child");
    assert!(rd64(&child, FB + 0x10_0000).is_err(), "None not inherited");
    wrpage(&child, FB + PAGE, 0x66).unwrap();
    assert_eq!(rdpage(&s, FB + PAGE), Ok(0x66), "shared write");
    drop(child);
    s.unwire(FB, 2 * PAGE, true).unwrap();
    s.unwire(FB + 0x10_0000, 2 * PAGE, true).unwrap();
    consistent(vm, "after unwire");
    assert_eq!(wired_object_pages(vm), 0, "wired pages after unwire");
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(
    share_none_inheritance_after_regrow,
    share_none_inheritance,
    64
);

/// Wired anonymous memory (no file): fork and mprotect still cost nothing
/// extra and work; the child gets a copy.
fn wired_anon<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        wrpage(&s, b + i * PAGE, 0x100 + i).unwrap();
    }
    s.wire(b, 4 * PAGE, true).unwrap();
    s.protect(b, 4 * PAGE, Prot::READ).unwrap();
    let c = s.fork().unwrap();
    s.protect(b, 4 * PAGE, Prot::RW).unwrap();
    wrpage(&s, b, 0x999).unwrap();
    for i in 0..4 {
        assert_eq!(rdpage(&c, b + i * PAGE), Ok(0x100 + i), "child page {i}");
    }
    s.protect(b + PAGE, PAGE, Prot::NONE).unwrap();
    let c2 = s.fork().unwrap();
    assert_eq!(rdpage(&c2, b), Ok(0x999));
    drop(c);
    drop(c2);
    s.unwire(b, 4 * PAGE, true).unwrap();
    assert_eq!(wired_object_pages(vm), 0, "wired pages after unwire");
    drop(s);
    all_free(vm, "end");
}
both!(wired_anon_fork_protect, wired_anon, 64);

/// Truncation racing fork from another thread: fork may fail with
/// MissingPage (documented) but must not hang, corrupt or leak.
fn truncate_races_fork<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 4, 0x5a);
    let s = Arc::new(vm.new_space().unwrap());
    s.map(MapRequest::object(FB, 4 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.wire(FB, 4 * PAGE, true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (vm, pager, obj, stop) = (vm.clone(), pager.clone(), obj.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = [0, PAGE, 2 * PAGE + 7, 4 * PAGE][(k % 4) as usize];
                pager.set_len(&*vm, &obj, len).unwrap();
                k += 1;
                std::thread::yield_now();
            }
            pager.set_len(&*vm, &obj, 4 * PAGE).unwrap();
        })
    };
    let deadline = Instant::now() + Duration::from_millis(1500);
    let (mut ok, mut missing) = (0, 0);
    while Instant::now() < deadline {
        match s.fork() {
            Ok(c) => {
                ok += 1;
                for i in 0..4 {
                    let _ = rd64(&c, FB + i * PAGE);
                }
            }
            Err(MapError::MissingPage { .. }) => missing += 1,
            Err(e) => panic!("fork: {e:?}"),
        }
        if ok % 8 == 1 {
            let _ = s.protect(FB, 4 * PAGE, Prot::READ);
        }
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    eprintln!("forks ok {ok} missing {missing}");
    assert!(ok > 0);
    let c = s.fork().unwrap();
    for i in 0..4 {
        assert_eq!(rd64(&c, FB + i * PAGE), rd64(&s, FB + i * PAGE), "page {i}");
    }
    drop(c);
    consistent(vm, "before unwire");
    s.unwire(FB, 4 * PAGE, true).unwrap();
    assert_eq!(wired_object_pages(vm), 0, "wired pages after unwire");
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(truncate_races_fork_t, truncate_races_fork, 96);

// =====================================================================
// cfc7089: handles keep pages; optimisations still happen without them
// =====================================================================

/// Fork, child exits, parent writes: the COW rename (v_cow_optim) happens.
fn cow_rename_still_happens<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        wrpage(&s, b + i * PAGE, i + 1).unwrap();
    }
    let c = s.fork().unwrap();
    drop(c);
    let before = vm.counters().snapshot();
    for i in 0..4 {
        wrpage(&s, b + i * PAGE, 0x10 + i).unwrap();
    }
    let d = vm.counters().snapshot().since(&before);
    assert!(
        d.v_cow_optim + d.v_collapses >= 1,
        "no COW rename nor collapse after the child exited: {d:?}"
    );
    assert!(d.v_cow_optim >= 1, "COW renames: {d:?}");
    assert!(d.v_collapses >= 1, "collapse: {d:?}");
    let (o, _) = s.object_at(b).unwrap();
    assert_eq!(o.chain_depth(), 1, "chain after the child exited");
    drop(o);
    drop(s);
    all_free(vm, "end");
}
both!(cow_rename_without_handles, cow_rename_still_happens, 64);

/// Repeated fork / child write / child exit / parent write keeps the chain
/// short (collapse) without handles.
fn collapse_still_happens<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        wrpage(&s, b + i * PAGE, i + 1).unwrap();
    }
    let before = vm.counters().snapshot();
    for k in 0..50 {
        let c = s.fork().unwrap();
        wrpage(&c, b, 0xc000 + k).unwrap();
        wrpage(&s, b + PAGE, 0xa000 + k).unwrap();
        drop(c);
    }
    let d = vm.counters().snapshot().since(&before);
    let (o, _) = s.object_at(b).unwrap();
    let depth = o.chain_depth();
    drop(o);
    assert!(depth <= 3, "chain depth {depth} after 50 forks: {d:?}");
    assert!(d.v_collapses + d.v_bypasses + d.v_cow_optim > 0, "{d:?}");
    assert_eq!(rdpage(&s, b), Ok(1));
    assert_eq!(rdpage(&s, b + PAGE), Ok(0xa000 + 49));
    drop(s);
    all_free(vm, "end");
}
both!(collapse_without_handles, collapse_still_happens, 96);

/// A handle on the backing object taken before fork; the child exits, the
/// parent writes: no rename may take the page out of the handle's object.
fn handle_blocks_rename<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 2 * PAGE, Prot::RW).unwrap();
    wrpage(&s, b, 0xaaaa).unwrap();
    wrpage(&s, b + PAGE, 0xbbbb).unwrap();
    let (h, _) = s.object_at(b).unwrap();
    let c = s.fork().unwrap();
    drop(c);
    wrpage(&s, b, 0x1).unwrap();
    wrpage(&s, b + PAGE, 0x2).unwrap();
    // Collapse through the parent's object (a user call).
    let (top, _) = s.object_at(b).unwrap();
    vm.collapse(&top);
    drop(top);
    let o = vm.new_space().unwrap();
    o.map(MapRequest::object(
        0x2000_0000,
        2 * PAGE,
        h.clone(),
        0,
        Prot::READ,
    ))
    .unwrap();
    assert_eq!(rdpage(&o, 0x2000_0000), Ok(0xaaaa), "handle page 0");
    assert_eq!(rdpage(&o, 0x2000_1000), Ok(0xbbbb), "handle page 1");
    assert_eq!(rdpage(&s, b), Ok(0x1));
    drop(h);
    drop(o);
    drop(s);
    all_free(vm, "end");
}
both!(handle_blocks_rename_t, handle_blocks_rename, 64);

/// A handle of the backing object from VmObject::backing() across fork,
/// child exit and parent writes.
fn backing_handle<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 2 * PAGE, Prot::RW).unwrap();
    wrpage(&s, b, 0xaaaa).unwrap();
    wrpage(&s, b + PAGE, 0xbbbb).unwrap();
    let c = s.fork().unwrap();
    wrpage(&c, b, 0xcccc).unwrap();
    let (top, _) = c.object_at(b).unwrap();
    let (bk, off) = top.backing().unwrap();
    drop(top);
    drop(c);
    wrpage(&s, b, 0x1).unwrap();
    wrpage(&s, b + PAGE, 0x2).unwrap();
    let c2 = s.fork().unwrap();
    drop(c2);
    wrpage(&s, b, 0x3).unwrap();
    let o = vm.new_space().unwrap();
    o.map(MapRequest::object(
        0x2000_0000,
        2 * PAGE,
        bk.clone(),
        off * PAGE,
        Prot::READ,
    ))
    .unwrap();
    assert_eq!(rdpage(&o, 0x2000_0000), Ok(0xaaaa), "backing handle page 0");
    assert_eq!(rdpage(&o, 0x2000_1000), Ok(0xbbbb), "backing handle page 1");
    drop(bk);
    drop(o);
    drop(s);
    all_free(vm, "end");
}
both!(backing_handle_t, backing_handle, 64);

/// Handle held across unmap, then pageout to swap while nothing maps the
/// object, then remapped: data intact; after dropping all: no leaks.
fn handle_unmap_swap<P: Pmap>(vm: &Arc<Vm<P>>) {
    let sw = TempPath::new();
    let swap = Swap::create(&sw.0, 4 << 20).unwrap();
    vm.set_swap(swap.provider());
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    let n = 24;
    s.map_anon(b, n * PAGE, Prot::RW).unwrap();
    for i in 0..n {
        wrpage(&s, b + i * PAGE, 0x700 + i).unwrap();
    }
    let (h, _) = s.object_at(b).unwrap();
    s.unmap(b, n * PAGE).unwrap();
    consistent(vm, "after unmap");
    // Fill memory with another space to push the held object out.
    s.map_anon(0x3000_0000, 40 * PAGE, Prot::RW).unwrap();
    for i in 0..40 {
        wrpage(&s, 0x3000_0000 + i * PAGE, i).unwrap();
    }
    vm.pageout(vm.total_pages());
    consistent(vm, "after pageout");
    let o = vm.new_space().unwrap();
    o.map(MapRequest::object(
        0x2000_0000,
        n * PAGE,
        h.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    for i in 0..n {
        assert_eq!(
            rdpage(&o, 0x2000_0000 + i * PAGE),
            Ok(0x700 + i),
            "page {i}"
        );
    }
    drop(h);
    drop(o);
    drop(s);
    all_free(vm, "end");
    assert_eq!(swap.stats().used, 0, "swap leaked");
}
both!(handle_unmap_swap_t, handle_unmap_swap, 48);

/// Handle + user wiring + unmap: the unmap unwires; the handle keeps the
/// pages (unwired, queued); dropping the handle frees them.
fn handle_wired_unmap<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 4 * PAGE, Prot::RW).unwrap();
    for i in 0..4 {
        wrpage(&s, b + i * PAGE, 0x40 + i).unwrap();
    }
    s.wire(b, 4 * PAGE, true).unwrap();
    let (h, _) = s.object_at(b + PAGE).unwrap();
    s.unmap(b + PAGE, 2 * PAGE).unwrap();
    consistent(vm, "after partial unmap");
    assert_eq!(h.resident_count(), 4, "handle object resident pages");
    assert_eq!(wired_object_pages(vm), 2, "wired pages left");
    drop(s);
    consistent(vm, "after exit");
    assert_eq!(wired_object_pages(vm), 0, "wired pages after exit");
    let o = vm.new_space().unwrap();
    o.map(MapRequest::object(
        0x2000_0000,
        4 * PAGE,
        h.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    for i in 0..4 {
        assert_eq!(rdpage(&o, 0x2000_0000 + i * PAGE), Ok(0x40 + i), "page {i}");
    }
    drop(o);
    consistent(vm, "handle only");
    drop(h);
    all_free(vm, "end");
}
both!(handle_wired_unmap_t, handle_wired_unmap, 64);

/// Handle dropped after unmap without remapping: no leak.
fn handle_drop_no_leak<P: Pmap>(vm: &Arc<Vm<P>>) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 8 * PAGE, Prot::RW).unwrap();
    for i in 0..8 {
        wrpage(&s, b + i * PAGE, i).unwrap();
    }
    let c = s.fork().unwrap();
    let (h1, _) = s.object_at(b).unwrap();
    let objs = vm.live_objects();
    s.unmap(b, 4 * PAGE).unwrap();
    drop(c);
    s.unmap(b + 4 * PAGE, 4 * PAGE).unwrap();
    consistent(vm, "held");
    drop(objs);
    drop(h1);
    consistent(vm, "dropped");
    drop(s);
    all_free(vm, "end");
}
both!(handle_drop_no_leak_t, handle_drop_no_leak, 64);

/// Held page + fork (Linux rule, space/fork.rs module docs: the parent
/// keeps the held page, so the holder goes on seeing what the parent
/// writes; the child gets a copy). With a user's object_at handle on the
/// object, held_pages() returns nothing (unexposed(0) is false), the plain
/// COW path runs, and the parent's next write copies the page away from
/// the holder.
fn held_fork<P: Pmap>(vm: &Arc<Vm<P>>, with_handle: bool) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    s.map_anon(b, 2 * PAGE, Prot::RW).unwrap();
    wrpage(&s, b, 0x10).unwrap();
    wrpage(&s, b + PAGE, 0x20).unwrap();
    let held = s.hold(b, PAGE, Prot::RW).unwrap();
    let h = with_handle.then(|| s.object_at(b).unwrap());
    let c = s.fork().unwrap();
    wrpage(&s, b, 0x11).unwrap();
    assert_eq!(rd64(&c, b), Ok(0x10), "child page 0");
    wrpage(&c, b + PAGE, 0x21).unwrap();
    assert_eq!(rdpage(&s, b + PAGE), Ok(0x20), "parent page 1");
    let mut buf = [0u8; 8];
    held.read(0, &mut buf).unwrap();
    assert_eq!(
        u64::from_le_bytes(buf),
        0x11,
        "holder no longer sees the parent's write after fork (handle held: {with_handle})"
    );
    held.write(0, &0x12u64.to_le_bytes()).unwrap();
    assert_eq!(rd64(&s, b), Ok(0x12), "parent sees the holder's write");
    assert_eq!(rd64(&c, b), Ok(0x10), "child sees the holder's write");
    drop(held);
    drop(h);
    drop(c);
    drop(s);
    all_free(vm, "end");
}
fn held_fork_handle<P: Pmap>(vm: &Arc<Vm<P>>) {
    held_fork(vm, true);
}
fn held_fork_no_handle<P: Pmap>(vm: &Arc<Vm<P>>) {
    held_fork(vm, false);
}
both!(held_fork_with_handle, held_fork_handle, 64);
both!(held_fork_without_handle, held_fork_no_handle, 64);

/// Another thread takes and drops handles (object_at, live_objects,
/// backing) while the owner forks, writes, unmaps and remaps. A transient
/// handle may only put optimisations off: data stays right, nothing leaks.
fn concurrent_handles<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    let s = Arc::new(vm.new_space().unwrap());
    let b = 0x1000_0000;
    let n = 8u64;
    let stop = Arc::new(AtomicBool::new(false));
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = {
        let (s, vm, stop, kept) = (s.clone(), vm.clone(), stop.clone(), kept.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some((o, _)) = s.object_at(b + (k % n) * PAGE) {
                    if let Some((bk, _)) = o.backing() {
                        std::hint::black_box(&bk);
                    }
                    let mut kept = kept.lock().unwrap();
                    if k.is_multiple_of(997) && kept.len() < 3 {
                        kept.push(o);
                    }
                }
                if k.is_multiple_of(13) {
                    let all = vm.live_objects();
                    std::hint::black_box(&all);
                }
                k += 1;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_millis(2000);
    let mut round = 0u64;
    while Instant::now() < deadline {
        s.map_anon(b, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            wrpage(&s, b + i * PAGE, round * 100 + i).unwrap();
        }
        let c = s.fork().unwrap();
        for i in (0..n).step_by(2) {
            wrpage(&s, b + i * PAGE, round * 100 + 50 + i).unwrap();
        }
        for i in 0..n {
            assert_eq!(
                rdpage(&c, b + i * PAGE),
                Ok(round * 100 + i),
                "child r{round} p{i}"
            );
        }
        drop(c);
        for i in 0..n {
            let want = if i % 2 == 0 {
                round * 100 + 50 + i
            } else {
                round * 100 + i
            };
            assert_eq!(rdpage(&s, b + i * PAGE), Ok(want), "parent r{round} p{i}");
        }
        s.unmap(b, n * PAGE).unwrap();
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    // Every kept handle still shows pages that were there when taken
    // (they were written), and remapping one gives readable pages.
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    eprintln!("rounds {round}, kept handles {}", kept.len());
    consistent(vm, "with kept handles");
    drop(kept);
    drop(s);
    all_free(vm, "end");
}
both!(concurrent_handles_t, concurrent_handles, 96);

/// The held-page rule at fork (Linux's, space/fork.rs module docs) is
/// decided by `held_pages`, which asks `unexposed(0)`: any transient `Arc`
/// of the object elsewhere (the pageout scan, a consistency check, another
/// thread's `live_objects`) turns the rule off for that fork, and the
/// parent's next write then copies the page away from its holder. Here a
/// second thread only runs the page daemon's scan (no user handle at all).
fn held_fork_vs_scan<P: Pmap + 'static>(vm: &Arc<Vm<P>>, scan: fn(&Vm<P>)) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                scan(&vm);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_millis(2000);
    let (mut rounds, mut diverged) = (0u64, 0u64);
    while Instant::now() < deadline {
        s.map_anon(b, 4 * PAGE, Prot::RW).unwrap();
        for i in 0..4 {
            wrpage(&s, b + i * PAGE, 0x100 + i).unwrap();
        }
        let held = s.hold(b, PAGE, Prot::RW).unwrap();
        let c = s.fork().unwrap();
        wrpage(&s, b, 0x200 + rounds).unwrap();
        let mut buf = [0u8; 8];
        held.read(0, &mut buf).unwrap();
        if u64::from_le_bytes(buf) != 0x200 + rounds {
            diverged += 1;
        }
        drop(held);
        drop(c);
        s.unmap(b, 4 * PAGE).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    drop(s);
    all_free(vm, "end");
    assert_eq!(
        diverged, 0,
        "{diverged} of {rounds} forks: the holder of a page no longer sees the parent's write \
         (held-page rule skipped because a concurrent scan held the object)"
    );
}
fn scan_pageout<P: Pmap>(vm: &Vm<P>) {
    vm.pageout(vm.total_pages());
}
fn scan_check<P: Pmap>(vm: &Vm<P>) {
    let _ = vm.check_consistency();
}
fn held_fork_vs_pageout<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    held_fork_vs_scan(vm, scan_pageout::<P>);
}
fn held_fork_vs_check<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    held_fork_vs_scan(vm, scan_check::<P>);
}
both!(held_fork_races_pageout, held_fork_vs_pageout, 64);
both!(held_fork_races_check, held_fork_vs_check, 64);
fn scan_nothing<P: Pmap>(_vm: &Vm<P>) {
    std::thread::yield_now();
}
fn held_fork_vs_nothing<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    held_fork_vs_scan(vm, scan_nothing::<P>);
}
// Control: the same loop with an idle second thread never diverges.
both!(held_fork_races_nothing, held_fork_vs_nothing, 64);

/// munmap of part of a private anonymous mapping while some other thread
/// transiently holds the object (the page daemon's scan, a consistency
/// check): release_entries' `unexposed(0)` is false, the unmapped pages are
/// not freed, and since the object lives on (its other part is mapped)
/// they stay resident, unreachable, until the whole object dies — munmap
/// no longer gives the memory back (FreeBSD vm_map_delete frees them).
fn unmap_vs_scan<P: Pmap + 'static>(vm: &Arc<Vm<P>>, scan: fn(&Vm<P>)) {
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    let n = 8u64;
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                scan(&vm);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_millis(2000);
    let (mut rounds, mut stranded) = (0u64, 0u64);
    let mut worst = 0;
    while Instant::now() < deadline {
        s.map_anon(b, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            wrpage(&s, b + i * PAGE, i).unwrap();
        }
        s.unmap(b + PAGE, (n - 1) * PAGE).unwrap();
        let (o, _) = s.object_at(b).unwrap();
        let r = o.resident_count();
        drop(o);
        if r != 1 {
            stranded += 1;
            worst = worst.max(r);
        }
        s.unmap(b, PAGE).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    drop(s);
    all_free(vm, "end");
    assert_eq!(
        stranded, 0,
        "{stranded} of {rounds} munmaps left the unmapped pages resident in the still-mapped \
         object (up to {worst} resident, 1 mapped)"
    );
}
fn unmap_vs_pageout<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    unmap_vs_scan(vm, scan_pageout::<P>);
}
fn unmap_vs_nothing<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    unmap_vs_scan(vm, scan_nothing::<P>);
}
both!(unmap_races_pageout, unmap_vs_pageout, 64);
both!(unmap_races_nothing, unmap_vs_nothing, 64);

/// `release_entries` asks `unexposed(0)` and only then frees the pages, with
/// nothing stopping a handle from appearing in between: the removed entry's
/// object is still in the machine's registry, and `Vm::live_objects` hands
/// it out. A handle taken in that window sees the object's pages vanish
/// while it holds it (the promise: "while one lives they stay in it").
/// No swap, no fork, no collapse: nothing else can take pages out.
fn live_objects_vs_unmap<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    let s = Arc::new(vm.new_space().unwrap());
    let b = 0x1000_0000;
    let n = 8u64;
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut lost, mut looks) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let objs = vm.live_objects();
                let r1: Vec<usize> = objs.iter().map(|o| o.resident_count()).collect();
                for _ in 0..50 {
                    std::hint::spin_loop();
                }
                for (o, r) in objs.iter().zip(r1) {
                    looks += 1;
                    if o.resident_count() < r {
                        lost += 1;
                    }
                }
            }
            (lost, looks)
        })
    };
    let deadline = Instant::now() + Duration::from_millis(2500);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        s.map_anon(b, n * PAGE, Prot::RW).unwrap();
        for i in 0..n {
            s.write_u8(b + i * PAGE, 1).unwrap();
        }
        s.unmap(b, n * PAGE).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (lost, looks) = t.join().unwrap();
    drop(s);
    all_free(vm, "end");
    assert_eq!(
        lost, 0,
        "{lost} times (of {looks} looks, {rounds} unmaps) an object held through \
         Vm::live_objects lost resident pages while held"
    );
}
both!(live_objects_races_unmap, live_objects_vs_unmap, 64);

/// Fork (with its refault of wired entries before the write lock) while
/// another thread wires/unwires and protects the same file mapping and a
/// third truncates and regrows the file: no hang, fork fails only with
/// MissingPage, nothing leaks.
fn fork_wire_truncate_storm<P: Pmap + 'static>(vm: &Arc<Vm<P>>) {
    let (_f, pager, obj) = file(vm, 4, 0x5a);
    let s = Arc::new(vm.new_space().unwrap());
    s.map(MapRequest::object(FB, 4 * PAGE, obj.clone(), 0, Prot::READ).private())
        .unwrap();
    s.map(MapRequest::object(
        FB + 0x10_0000,
        4 * PAGE,
        obj.clone(),
        0,
        Prot::RW,
    ))
    .unwrap();
    s.set_inheritance(FB + 0x10_0000, 4 * PAGE, Inheritance::Copy)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    {
        let (s, stop) = (s.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let base = if k.is_multiple_of(2) {
                    FB
                } else {
                    FB + 0x10_0000
                };
                if s.wire(base, 4 * PAGE, true).is_ok() {
                    let _ = s.protect(base + (k % 4) * PAGE, PAGE, Prot::READ);
                    let _ = s.protect(
                        base,
                        4 * PAGE,
                        if k.is_multiple_of(2) {
                            Prot::READ
                        } else {
                            Prot::RW
                        },
                    );
                    s.unwire(base, 4 * PAGE, true).unwrap();
                }
                k += 1;
            }
        }));
    }
    {
        let (vm, pager, obj, stop) = (vm.clone(), pager.clone(), obj.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let len = [0, 4 * PAGE, PAGE + 9, 4 * PAGE][(k % 4) as usize];
                pager.set_len(&*vm, &obj, len).unwrap();
                k += 1;
            }
            pager.set_len(&*vm, &obj, 4 * PAGE).unwrap();
        }));
    }
    {
        let (s, stop) = (s.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let (mut ok, mut missing) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match s.fork() {
                    Ok(c) => {
                        ok += 1;
                        let _ = rd64(&c, FB);
                    }
                    Err(MapError::MissingPage { .. }) => missing += 1,
                    Err(e) => panic!("fork: {e:?}"),
                }
            }
            eprintln!("forks ok {ok} missing {missing}");
        }));
    }
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    for h in hs {
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "threads hang");
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().unwrap();
    }
    consistent(vm, "after storm");
    assert_eq!(wired_object_pages(vm), 0, "wired pages after the storm");
    drop(s);
    drop(obj);
    all_free(vm, "end");
}
both!(fork_wire_truncate_storm_t, fork_wire_truncate_storm, 96);

/// handle_blocks_rename with the backing object's pages on swap: the COW
/// fault pages them in from the backing object first.
fn handle_blocks_rename_swapped<P: Pmap>(vm: &Arc<Vm<P>>) {
    let sw = TempPath::new();
    let swap = Swap::create(&sw.0, 4 << 20).unwrap();
    vm.set_swap(swap.provider());
    let s = vm.new_space().unwrap();
    let b = 0x1000_0000;
    let n = 8u64;
    s.map_anon(b, n * PAGE, Prot::RW).unwrap();
    for i in 0..n {
        wrpage(&s, b + i * PAGE, 0xa00 + i).unwrap();
    }
    let (h, _) = s.object_at(b).unwrap();
    let c = s.fork().unwrap();
    drop(c);
    // Push everything out.
    s.map_anon(0x3000_0000, 40 * PAGE, Prot::RW).unwrap();
    for i in 0..40 {
        wrpage(&s, 0x3000_0000 + i * PAGE, i).unwrap();
    }
    vm.pageout(vm.total_pages());
    for i in 0..n {
        wrpage(&s, b + i * PAGE, 0xb00 + i).unwrap();
    }
    let o = vm.new_space().unwrap();
    o.map(MapRequest::object(
        0x2000_0000,
        n * PAGE,
        h.clone(),
        0,
        Prot::READ,
    ))
    .unwrap();
    for i in 0..n {
        assert_eq!(
            rdpage(&o, 0x2000_0000 + i * PAGE),
            Ok(0xa00 + i),
            "handle page {i}"
        );
        assert_eq!(rdpage(&s, b + i * PAGE), Ok(0xb00 + i), "parent page {i}");
    }
    drop(h);
    drop(o);
    drop(s);
    all_free(vm, "end");
    assert_eq!(swap.stats().used, 0, "swap leaked");
}
both!(
    handle_blocks_rename_swapped_t,
    handle_blocks_rename_swapped,
    48
);
