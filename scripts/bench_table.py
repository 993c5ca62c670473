#!/usr/bin/env python3
"""Writes the README's bench tables from one `cargo bench` run: each row's
figures are criterion's medians (target/criterion/*/new/estimates.json),
each ratio is computed from the two figures beside it, so every ratio
comes from the same run. Usage:

    touch /tmp/bench-start
    cargo bench -- --warm-up-time 1 --measurement-time 3 > /tmp/bench.log
    python3 scripts/bench_table.py /tmp/bench-start /tmp/bench.log [--readme]

The first argument is a file touched before the run: a result older than
it (a bench since renamed, or not run) is an error, not a stale figure.
The second is the run's output, for the lines benches print from their
untimed passes (system calls per MiB, huge pages made). Prints Markdown,
or with `--readme` replaces each table in README.md between its markers
(`<!-- bench_table:NAME -->` and `<!-- /bench_table:NAME -->`); the
README's footnotes say what each row measures. Standard library only."""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRIT = ROOT / "target" / "criterion"


class Run:
    def __init__(self, since, log):
        self.since = since
        self.log = log

    def est(self, bench):
        group, _, function = bench.partition("/")
        # criterion's directory for function "a/b" of a group is "a_b".
        d = CRIT / group / function.replace("/", "_") / "new"
        f = d / "estimates.json"
        if not f.exists() or f.stat().st_mtime < self.since:
            sys.exit(f"{bench}: no result from this run")
        meta = json.loads((d / "benchmark.json").read_text())
        return json.loads(f.read_text())["median"]["point_estimate"], meta.get("throughput") or {}

    def ns(self, bench):
        """Median time per sample, ns."""
        return self.est(bench)[0]

    def per(self, bench):
        """Median time per element (fault, page), ns."""
        t, tp = self.est(bench)
        return t / tp["Elements"]

    def gibs(self, bench):
        """Median rate, GiB/s."""
        t, tp = self.est(bench)
        return tp["Bytes"] / t * 1e9 / 2**30

    def printed(self, pattern):
        """The first group of the first log line matching `pattern`."""
        m = re.search(pattern, self.log, re.M)
        return m.group(1) if m else "?"


def t(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def x(r):
    return f"{r:.2f}×"


def main_table(r):
    rows = []
    zf, cold, warm = r.per("zero_fill/x86_64_256m"), r.per("zero_fill/memset_cold"), r.per("zero_fill/memset")
    zf4k, zf16 = r.per("zero_fill/x86_64_256m_4k"), r.per("zero_fill/x86_64")
    rows.append(("zero-fill write fault, x86_64 pmap (`fault`)⁴",
                 f"{t(zf)} (256 MiB machine; {t(zf4k)} without superpage reservations; {t(zf16)} on 16 MiB)",
                 f"`memset` 4 KiB of a 256 MiB working set (every page cold): {t(cold)}; of 16 MiB: {t(warm)}",
                 f"{x(zf / cold)} cold / {x(zf / warm)} 16 MiB", "≤ 1.3× cold"))
    zr = r.per("zero_fill/ref_pmap")
    rows.append(("zero-fill write fault, reference pmap (`fault`)⁴", f"{t(zr)} (16 MiB machine)",
                 f"`memset` of the 256 MiB working set: {t(cold)}", f"{x(zr / cold)} cold", "—"))
    ours, kern = r.per("anon_fault/ours"), r.per("anon_fault/kernel")
    rows.append(("zero-fill, 16 MiB (`peers`)", t(ours), f"Linux `mmap` + touch: {t(kern)}",
                 f"{x(kern / ours)} faster", "≥ 5× faster"))
    pre, idle = r.per("anon_fault/ours_prezeroed"), r.per("anon_fault/ours_idle_zeroing")
    rows.append(("the same, the page-zeroing thread on the other core / the free frames zeroed before each sample (`peers`)⁴",
                 f"{t(idle)} / {t(pre)}", "same", f"{x(kern / idle)} / {x(kern / pre)} faster", "—"))
    kern = r.per("soft_fault/kernel")
    for id_, what in (("off", "fault-around off"), ("outward_4", "seed's prefault ±4"),
                      ("window_16", "16-page fault-around window, the default")):
        ours = r.per(f"soft_fault/ours/{id_}")
        rows.append((f"resident soft fault, {what} (`peers`)¹", f"{t(ours)} / page",
                     f"Linux private file mapping, page cache hot, fault-around: {t(kern)} / page",
                     f"{ours / kern:.0f}× slower", "≤ the kernel"))
    cw, cw16 = r.per("cow/x86_64_256m"), r.per("cow/x86_64")
    mc, mw = r.per("cow/memcpy_cold"), r.per("cow/memcpy")
    rows.append(("COW write fault after fork, x86_64 (`fault`)⁴", f"{t(cw)} (256 MiB machine; {t(cw16)} on 16 MiB)",
                 f"`memcpy` 4 KiB, 256 MiB source and destination (cold): {t(mc)}; the same 4 MiB each sample (warm): {t(mw)}",
                 f"{x(cw / mc)} cold / {x(cw / mw)} warm", "≤ 1.3× cold"))
    ours, kern = r.per("fork_cow/ours"), r.per("fork_cow/kernel")
    rows.append(("COW after fork, 4 MiB (`peers`)", t(ours), f"Linux fork + child write: {t(kern)}",
                 f"{x(kern / ours)} faster", "≥ 6× faster"))
    ours, crate = r.per("pmap/ours"), r.per("pmap/x86_64_crate")
    rows.append(("map + translate, random pages (`mapper`)⁶", t(ours), f"`x86_64` crate `OffsetPageTable`: {t(crate)}",
                 x(ours / crate), "≤ 1.0×"))
    sw, ex, crate = r.per("translate/ours_software_mmu"), r.per("translate/ours_extract"), r.per("translate/x86_64_crate")
    rows.append(("translate alone, the same 4096 random pages (`mapper`)⁶", f"software MMU {t(sw)}; `extract` {t(ex)}",
                 f"`x86_64` crate `translate_addr`: {t(crate)}", f"{x(sw / crate)} / {x(ex / crate)}", "—"))
    a, s_ = r.gibs("file_seq/ours"), r.gibs("file_seq/ours_sync")
    p64, p1m = r.gibs("file_seq/pread_64k"), r.gibs("file_seq/pread_1m")
    rows.append(("sequential fault-in, cached 64 MiB file, read-ahead asynchronous / synchronous (`peers`)²",
                 f"{a:.3g} / {s_:.3g} GiB/s",
                 f"`pread` into 64 MiB of distinct memory, 64 KiB / 1 MiB requests: {p64:.3g} / {p1m:.3g} GiB/s",
                 f"async {a / p64:.2f}× / {a / p1m:.2f}×, sync {s_ / p64:.2f}× / {s_ / p1m:.2f}×", "≥ 0.8×"))
    a, s_, p1m = r.gibs("file_cold/ours"), r.gibs("file_cold/ours_sync"), r.gibs("file_cold/pread_1m")
    rows.append(("sequential fault-in, 64 MiB file dropped from the page cache, async / sync (`peers`)²",
                 f"{a:.3g} / {s_:.3g} GiB/s", f"`pread` 1 MiB requests into distinct memory: {p1m:.3g} GiB/s",
                 f"{a / p1m:.2f}× / {s_ / p1m:.2f}×", "≥ 0.8×"))
    a, s_ = r.ns("file_slow/ours"), r.ns("file_slow/ours_sync")
    rows.append(("sequential read of every byte, pager taking 100 µs a call, async vs sync (`peers`)²", t(a),
                 f"synchronous read-ahead: {t(s_)}", f"{x(s_ / a)} faster", "—"))
    ours, p4k = r.per("file_random/ours"), r.per("file_random/pread_4k")
    rows.append(("random page reads, cached 64 MiB file, 4096 pages (`peers`)²", f"{t(ours)} / page",
                 f"`pread` 4 KiB into cold memory: {t(p4k)}", f"{x(ours / p4k)}", "≤ 1.0× (`pread` + a soft fault)"))
    ours, raw = r.gibs("swap/ours"), r.gibs("swap/raw")
    rows.append(("64 MiB out and back through 16 MiB RAM (`peers`)²", f"{ours:.3g} GiB/s",
                 f"raw file write from and read back into 64 MiB of distinct memory, 64 KiB requests: {raw:.3g} GiB/s",
                 f"{ours / raw:.2f}×", "≥ 0.7×"))
    for kind, what, kernel in (("disjoint", "zero-fill, 2 threads, disjoint mappings", "kernel_disjoint"),
                               ("shared", "zero-fill, 2 threads, one shared mapping", "kernel_shared"),
                               ("soft", "soft fault, 2 threads, disjoint mappings", None)):
        one, two = r.ns(f"parallel/{kind}/1"), r.ns(f"parallel/{kind}/2")
        peer = f"1 thread: {t(one)}"
        if kernel:
            k1, k2 = r.ns(f"parallel/{kernel}/1"), r.ns(f"parallel/{kernel}/2")
            peer += f"; the kernel's faults in the same shape, 1 / 2 threads: {t(k1)} / {t(k2)} ({x(k1 / k2)})"
        rows.append((f"{what} (`peers`)³", f"{t(two)} / 16 MiB", peer, f"{x(one / two)}", "≥ 1.8×"))
    mixed, reader, alone = r.ns("parallel/mixed/1"), r.ns("parallel/beside_reader/1"), r.ns("parallel/disjoint/1")
    rows.append(("zero-fill, 1 thread beside a map/unmap loop (`peers`)³", t(mixed),
                 f"beside a thread that only faults: {t(reader)}; alone: {t(alone)}",
                 f"{x(mixed / reader)} / {x(mixed / alone)}", "—"))
    always, thp = r.ns("superpage/ours_always"), r.ns("superpage/kernel_thp")
    huge = r.printed(r"kernel_thp\D*?(\d+ of \d+)")
    rows.append(("64 MiB aligned anonymous fill, one fault per 2 MiB (`SuperpagePolicy::Always`; `superpage`)⁷", t(always),
                 f"Linux `MADV_HUGEPAGE` + touch (transparent huge pages, {huge} huge): {t(thp)}",
                 f"{x(thp / always)} faster" if thp >= always else f"{x(thp / always)} (kernel {x(always / thp)} faster)",
                 "≥ 1.2× faster"))
    pre = r.ns("superpage/ours_always_prezeroed")
    idle = r.ns("superpage/ours_always_idle_zeroing")
    rows.append(("the same, the page-zeroing thread running on the other core (`Vm::spawn_page_zeroer`)⁷", t(idle), "same",
                 f"{x(thp / idle)} faster" if thp >= idle else f"{x(thp / idle)} (kernel {x(idle / thp)} faster)", "—"))
    rows.append(("the same, free frames zeroed before each sample, outside the timing (`Vm::zero_free_pages`)⁷", t(pre), "same",
                 f"{x(thp / pre)} faster", "—"))
    ours, k4, o4 = r.ns("superpage/ours"), r.ns("superpage/kernel_4k"), r.ns("superpage/ours_4k")
    rows.append(("64 MiB aligned anonymous fill, a fault per page, reservations + promotion (the default)⁷", t(ours),
                 f"Linux `MADV_NOHUGEPAGE` + touch: {t(k4)}; ours with 4 KiB pages only (`SuperpagePolicy::Never`, promotion off): {t(o4)}",
                 f"{x(k4 / ours)} faster than the kernel; {x(o4 / ours)} faster than our 4 KiB", "≥ 5× faster"))
    pr, npr = r.ns("superpage_pmap/promote"), r.ns("superpage_pmap/no_promote")
    rows.append(("promotion: the `enter` that fills a leaf table in line (`superpage_pmap`)⁷", t(pr),
                 f"the same `enter` with promotion off: {t(npr)}", f"+{t(pr - npr)} per 2 MiB", "—"))
    de, nde = r.ns("superpage_pmap/demote"), r.ns("superpage_pmap/no_demote")
    rows.append(("demotion: a wiring change inside a superpage⁷", t(de), f"the same in a 4 KiB table: {t(nde)}",
                 f"+{t(de - nde)} per split", "—"))
    rs, r4 = r.ns("superpage_pmap/remove_superpage"), r.ns("superpage_pmap/remove_4k")
    rows.append(("unmapping a superpage whole: one entry removed (`superpage_pmap`)⁷", t(rs),
                 f"the same 2 MiB in 512 4 KiB entries: {t(r4)}", f"{x(r4 / rs)} faster", "—"))
    es, e5 = r.ns("superpage_pmap/enter_superpage"), r.ns("superpage_pmap/enter_512")
    rows.append(("mapping 2 MiB at once (`enter_superpage`; `superpage_pmap`)⁷", t(es),
                 f"512 `enter`s, promotion off: {t(e5)}", f"{x(e5 / es)} faster", "—"))
    rt, bare = r.ns("kvm/fault_round_trip"), r.ns("kvm/bare_exit")
    rows.append(("KVM guest #PF → host `fault()` → resume (`kvm`)", f"{t(rt - bare)} ({t(rt)} − {t(bare)})",
                 f"bare guest exit: {t(bare)}", x((rt - bare) / bare), "≤ 2×"))
    out = ["| bench | ours | floor / peer (same run) | ratio | goal |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def parallel_table(r):
    kinds = ["disjoint", "shared", "shared_halves", "soft", "mixed", "beside_reader", "memset_floor",
             "kernel_disjoint", "kernel_shared"]
    out = ["| threads | disjoint | shared | shared, each thread its part | soft "
           "| mixed (disjoint + a thread mapping, faulting, unmapping) "
           "| beside a reader (disjoint + a thread faulting one page) | `memset` floor (same pages, same threads) "
           "| kernel, disjoint | kernel, shared |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for n in (1, 2, 4, 8):
        out.append(f"| {n} | " + " | ".join(t(r.ns(f"parallel/{k}/{n}")) for k in kinds) + " |")
    return out


def growth_table(r):
    e = [r.per(f"map_entries/{n}") for n in (1, 1000, 100000)]
    d = [r.per(f"shadow_depth/covered/{n}") for n in (1, 8, 64)]
    kept = r.per("shadow_depth/kept/64")
    s1, s64 = r.per("address_spread/1MiB"), r.per("address_spread/64GiB")
    s64n = r.per("address_spread/64GiB_nohuge")
    k1, k64 = r.per("address_spread/kernel_1MiB"), r.per("address_spread/kernel_64GiB")
    comb = lambda p: " / ".join(t(r.per(f"combinations/{p}/{k}")) for k in ("anon", "swap", "vnode"))
    rows = [
        ("map entries 1 / 1 000 / 100 000", " / ".join(t(v) for v in e), " / ".join(f"{v / e[0]:.2f}" for v in e) + "×"),
        ("shadow depth 1 / 8 / 64 (children alive, nothing can collapse; the parent rewrites what each object below holds)⁵",
         " / ".join(t(v) for v in d), " / ".join(f"{v / d[0]:.2f}" for v in d) + "×"),
        ("shadow depth 64, each object below keeping a page the parent reads through it⁵", t(kept), x(kept / d[0])),
        ("address spread 1 MiB / 64 GiB⁵", f"{t(s1)} / {t(s64)}", f"1.0 / {s64 / s1:.2f}×"),
        ("the 64 GiB spread advised `SuperpageAdvice::NoHuge` (no reservations)⁵", t(s64n), x(s64n / s1)),
        ("the kernel's faults, spread 1 MiB / 64 GiB (`MADV_NOHUGEPAGE`)⁵", f"{t(k1)} / {t(k64)}", f"1.0 / {k64 / k1:.2f}×"),
        ("{reference, x86_64} pmap × {anonymous, swap-in, file}", f"{comb('ref_pmap')}; {comb('x86_64')}", "—"),
    ]
    out = ["| what grows | per fault | vs baseline (goal: flat within 1.5×) |", "|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def region_table(r):
    sizes = [1, 4, 16, 64, 256, 1024]
    ours = [r.per(f"region_size/ours/{m}") for m in sizes]
    kern = [r.per(f"region_size/kernel/{m}") for m in sizes]
    out = ["| region | " + " | ".join(f"{m} MiB" for m in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    out.append("| ours, per fault | " + " | ".join(t(v) for v in ours) + " |")
    out.append("| kernel, per fault | " + " | ".join(t(v) for v in kern) + " |")
    out.append("| kernel ÷ ours | " + " | ".join(f"{k / o:.2f}×" for o, k in zip(ours, kern)) + " |")
    out.append("| ours ÷ `memset_cold` (`fault` bench) | " + " | ".join(
        f"{o / r.per('zero_fill/memset_cold'):.2f}×" for o in ours) + " |")
    return out


def goals_table(r):
    """Issues #13 and #16's goals, each with this run's figure."""
    rows = []

    def goal(issue, what, ratio, text, met):
        rows.append((issue, what, ratio, text, "met" if met else "not met"))

    zf, cold = r.per("zero_fill/x86_64_256m"), r.per("zero_fill/memset_cold")
    goal("#13", "zero-fill fault per page vs cold `memset` (`fault`)", f"{x(zf / cold)}", "≤ 1.3×", zf / cold <= 1.3)
    worst = max(r.per(f"region_size/ours/{m}") / cold for m in (1, 4, 16, 64, 256, 1024))
    goal("#13", "the same at every region size, 1 MiB to 1 GiB (`region_size`), worst", x(worst), "≤ 1.3×", worst <= 1.3)
    k64, o64 = r.per("region_size/kernel/64"), r.per("region_size/ours/64")
    goal("#13", "zero-fill of 64 MiB vs the kernel (`region_size`)", f"kernel ÷ ours {x(k64 / o64)}", "≥ 5×", k64 / o64 >= 5)
    soft, kern = r.per("soft_fault/ours/window_16"), r.per("soft_fault/kernel")
    goal("#13", "soft fault per page vs the kernel (default window)", f"ours ÷ kernel {soft / kern:.0f}×", "≤ 1.0×", soft <= kern)
    always, thp = r.ns("superpage/ours_always"), r.ns("superpage/kernel_thp")
    goal("#13", "superpage zero-fill vs the kernel's THP", f"kernel ÷ ours {x(thp / always)}", "≥ 1.2×", thp / always >= 1.2)
    cw, mc = r.per("cow/x86_64_256m"), r.per("cow/memcpy_cold")
    goal("#13", "COW fault vs cold `memcpy`", x(cw / mc), "≤ 1.3×", cw / mc <= 1.3)
    ours, kfc = r.per("fork_cow/ours"), r.per("fork_cow/kernel")
    goal("#13", "COW after fork vs the kernel's fork + write", f"kernel ÷ ours {x(kfc / ours)}", "≥ 6×", kfc / ours >= 6)
    mp, crate = r.per("pmap/ours"), r.per("pmap/x86_64_crate")
    goal("#13", "map + translate vs the `x86_64` crate", x(mp / crate), "≤ 1.0×", mp <= crate)
    for kind in ("disjoint", "shared", "soft"):
        one, two = r.ns(f"parallel/{kind}/1"), r.ns(f"parallel/{kind}/2")
        goal("#16", f"2 threads vs 1, {kind}", x(one / two), "≥ 1.8×", one / two >= 1.8)
        worst = max(r.ns(f"parallel/{kind}/{n}") for n in (4, 8)) / two
        goal("#16", f"4 and 8 threads vs 2, {kind} (time, the slower)", x(worst), "≤ 1.10×", worst <= 1.10)
    d1, d64 = r.per("shadow_depth/covered/1"), r.per("shadow_depth/covered/64")
    goal("#16", "shadow depth 64 vs 1", x(d64 / d1), "≤ 2×", d64 / d1 <= 2)
    s1, s64 = r.per("address_spread/1MiB"), r.per("address_spread/64GiB")
    goal("#16", "address spread 64 GiB vs 1 MiB", x(s64 / s1), "≤ 1.5×", s64 / s1 <= 1.5)
    out = ["| issue | goal | this run | wanted | |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def run_line(r):
    """When the run started and how fast the machine was then."""
    import datetime
    when = datetime.datetime.fromtimestamp(r.since, datetime.timezone.utc)
    return [f"One run of every group, {when:%Y-%m-%d %H:%M} UTC (`cargo bench -- --warm-up-time 1 "
            f"--measurement-time 3`); this machine's speed drifts by a third over minutes, so the "
            f"run's own floor says how fast it was: `memset` of a cold 4 KiB page "
            f"{t(r.per('zero_fill/memset_cold'))}, of a warm one {t(r.per('zero_fill/memset'))}."]


TABLES = (("run", run_line), ("goals", goals_table), ("main", main_table), ("parallel", parallel_table),
          ("growth", growth_table), ("region", region_table))


def main():
    args = [a for a in sys.argv[1:] if a != "--readme"]
    if len(args) != 2:
        sys.exit(__doc__)
    run = Run(pathlib.Path(args[0]).stat().st_mtime, pathlib.Path(args[1]).read_text())
    if "--readme" not in sys.argv:
        for name, table in TABLES:
            print(f"<!-- {name} -->")
            print("\n".join(table(run)))
            print()
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, table in TABLES:
        start, end = f"<!-- bench_table:{name} -->", f"<!-- /bench_table:{name} -->"
        a, b = text.find(start), text.find(end)
        if a < 0 or b < a:
            sys.exit(f"README.md has no {start} ... {end}")
        text = text[: a + len(start)] + "\n" + "\n".join(table(run)) + "\n" + text[b:]
    readme.write_text(text)


if __name__ == "__main__":
    main()
