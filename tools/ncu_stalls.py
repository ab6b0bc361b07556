#!/usr/bin/env python3
"""Where one kernel's warps wait, instruction by instruction, from an Nsight Compute report.

Reads the CSV of `ncu -i REPORT --page source --print-source sass --csv` (a report taken with
the SourceCounters section, as scripts/ncu-kernel.sh takes it) and prints the warp-state
samples by stall reason over the whole kernel, then the most sampled instructions with their
two largest reasons, then those most stalled for instructions (`no_inst`: fetches that missed
the SM's instruction caches; benches/results/2026-11-29-h200-moe-first-copies-not-kept.md
found the one-token MoE's there). An instruction's index is its line in the SASS listing.
Usage: tools/ncu_stalls.py [--top N] SOURCE.csv
"""
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main(path, top):
    rows = list(csv.reader(open(path, errors="replace")))
    hi = next((i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r)), None)
    if hi is None:
        sys.exit(f"{path}: no 'Source' column (was the report taken with --section SourceCounters?)")
    head, data = rows[hi], [r for r in rows[hi + 1:] if len(r) == len(rows[hi])]
    src = head.index("Source")
    total = head.index("Warp Stall Sampling (All Samples)")
    reasons = [i for i, c in enumerate(head) if c.startswith("stall_") and "Not Issued" not in c]
    samples = sum(num(r[total]) for r in data)
    if not samples:
        sys.exit(f"{path}: no warp-state samples")
    print(f"{samples:.0f} samples over {len(data)} SASS instructions; by reason:")
    by = sorted(((sum(num(r[j]) for r in data), head[j][6:]) for j in reasons), reverse=True)
    print("  " + ", ".join(f"{name} {v:.0f} ({100 * v / samples:.1f}%)" for v, name in by if v > 0))

    def line(k):
        r = data[k]
        why = sorted(((num(r[j]), head[j][6:]) for j in reasons if num(r[j]) > 0), reverse=True)[:2]
        return f"  {k:6d} {num(r[total]):6.0f}  {r[src].strip()[:60]:60s} " + ", ".join(f"{n} {v:.0f}" for v, n in why)

    print(f"\nthe {top} most sampled instructions (index, samples, SASS, reasons), in program order:")
    for k in sorted(sorted(range(len(data)), key=lambda k: -num(data[k][total]))[:top]):
        print(line(k))
    ni = head.index("stall_no_inst")
    fetch = [k for k in sorted(range(len(data)), key=lambda k: -num(data[k][ni]))[:top] if num(data[k][ni]) > 0]
    print(f"\nthe {len(fetch)} instructions most stalled for instructions (no_inst), in program order:")
    for k in sorted(fetch):
        print(line(k))


if __name__ == "__main__":
    args = sys.argv[1:]
    top = 20
    if args[:1] == ["--top"]:
        top, args = int(args[1]), args[2:]
    if len(args) != 1:
        sys.exit(__doc__)
    main(args[0], top)
