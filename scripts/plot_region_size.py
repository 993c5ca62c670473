#!/usr/bin/env python3
"""Draws docs/region_size.svg from criterion's results of the
`region_size` group: per-fault zero-fill cost against region size, ours
and the kernel's. Regenerate with:

    cargo bench --bench peers -- region_size
    python3 scripts/plot_region_size.py

Standard library only; writes the SVG by hand."""
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRIT = ROOT / "target" / "criterion" / "region_size"
SIZES = [1, 4, 16, 64, 256, 1024]
SERIES = [("ours", "vm-core + x86_64 pmap", "#1f77b4"), ("kernel", "Linux mmap + touch", "#d62728")]


def per_fault_ns(who, mib):
    est = json.loads((CRIT / f"{who}_{mib}" / "new" / "estimates.json").read_text())
    pages = mib * 256
    return est["median"]["point_estimate"] / pages


def main():
    data = {who: [per_fault_ns(who, m) for m in SIZES] for who, _, _ in SERIES}
    w, h, left, right, top, bottom = 660, 400, 80, 40, 30, 60
    ymax = max(max(v) for v in data.values()) * 1.15
    x = lambda i: left + (w - left - right) * i / (len(SIZES) - 1)
    y = lambda v: top + (h - top - bottom) * (1 - v / ymax)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">Zero-fill write fault: cost per fault against region size</text>']
    step = 10 ** math.floor(math.log10(ymax / 4))
    tick = 0
    while tick <= ymax:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step * (2 if ymax / step > 10 else 1)
    for i, m in enumerate(SIZES):
        out.append(f'<text x="{x(i):.1f}" y="{h - bottom + 18}" text-anchor="middle">{m} MiB</text>')
    out.append(f'<text x="{w / 2}" y="{h - 18}" text-anchor="middle">region size (log scale)</text>')
    out.append(f'<text x="24" y="{h / 2}" transform="rotate(-90 24 {h / 2})" text-anchor="middle">ns per fault (median)</text>')
    for k, (who, label, colour) in enumerate(SERIES):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(data[who]))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in enumerate(data[who]):
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<rect x="{left + 10}" y="{top + 8 + 18 * k}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{left + 28}" y="{top + 18 + 18 * k}">{label}</text>')
    out.append("</svg>")
    dest = ROOT / "docs" / "region_size.svg"
    dest.write_text("\n".join(out) + "\n")
    print(f"wrote {dest}: " + ", ".join(f"{who} {[round(v) for v in data[who]]} ns" for who, _, _ in SERIES))


if __name__ == "__main__":
    main()
