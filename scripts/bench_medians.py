#!/usr/bin/env python3
"""Prints every criterion result under target/criterion as a Markdown
table: the median time per sample (iteration) and, where the bench
declares a throughput, per element (fault or page) or in GiB/s. The
README's bench table quotes these figures from one `cargo bench` run;
`docs/bench-run.md` keeps the whole table of that run. Usage:

    cargo bench -- --warm-up-time 1 --measurement-time 3
    python3 scripts/bench_medians.py [--newer-than FILE]

`--newer-than FILE` keeps only results written after FILE was (touch one
before the run: criterion leaves older results of benches since renamed
or not run). Standard library only."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRIT = ROOT / "target" / "criterion"


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_table import t as fmt  # noqa: E402  (one formatter for both)


def rows(since):
    for bench in sorted(CRIT.glob("**/new/benchmark.json")):
        if bench.parent.joinpath("estimates.json").stat().st_mtime < since:
            continue
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        median = est["median"]["point_estimate"]
        lo = est["median"]["confidence_interval"]["lower_bound"]
        hi = est["median"]["confidence_interval"]["upper_bound"]
        per = ""
        tp = meta.get("throughput") or {}
        n = tp.get("Elements")
        if n:
            per = fmt(median / n)
        elif tp.get("Bytes"):
            per = f"{tp['Bytes'] / median * 1e9 / 2**30:.3g} GiB/s"
        yield meta["full_id"], fmt(median), f"{fmt(lo)} – {fmt(hi)}", per


def main():
    since = 0.0
    if len(sys.argv) == 3 and sys.argv[1] == "--newer-than":
        since = pathlib.Path(sys.argv[2]).stat().st_mtime
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    print("| bench | median per sample | 95 % interval of the median | per element or rate |")
    print("|---|---|---|---|")
    count = 0
    for r in rows(since):
        print("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |")
        count += 1
    if count == 0:
        sys.exit("no criterion results under target/criterion: run cargo bench first")


if __name__ == "__main__":
    main()
