#!/usr/bin/env python3
"""Whether the same SMs are slow in every call of the fused MoE kernel.

Reads the CSVs `cuda-bench` writes with PEREGRINE_TRACE_DUMP=DIR in a trace build
(PEREGRINE_KERNEL_DEFINES=-DMOE_TRACE): per call, block and SM the block's %globaltimer stamps
(kernels/moe.cu, MOE_TRACE). For each SM it takes the time its gate_up item spent streaming
(slot 5 -> 6) and, where it has one, its down item (slot 10 -> 11), and prints how those times
correlate between calls, between the two SMs of a TPC (ids 2k, 2k + 1) and between
neighbouring TPCs, and between an SM's gate_up and its later down streaming in one call.
Usage: tools/moe_trace_sms.py [--gate-up-items N] DIR/trace-*.csv (N: expert slots x gate_up
groups, 8 x 32 = 256 for both MiMo shapes at one token, the default)
"""
import collections
import csv
import statistics as st
import sys


def corr(a, b):
    ma, mb = st.mean(a), st.mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den if den else float("nan")


def main(paths, gu_items):
    for path in paths:
        per = collections.defaultdict(lambda: collections.defaultdict(dict))
        rows = list(csv.reader(open(path)))[1:]
        for r in rows:
            call, block, sm, s = int(r[0]), int(r[1]), int(r[2]), r[3:]

            def g(k):
                return float(s[k - 1]) if s[k - 1] else None

            d = per[call][sm]
            # Blocks below the number of gate_up items start with one (block b takes item b).
            if block < gu_items and g(5) is not None and g(6) is not None:
                d.setdefault("gu", []).append(g(6) - g(5))
            if g(10) is not None and g(11) is not None:
                d.setdefault("dn", []).append(g(11) - g(10))
        calls = sorted(per)
        means = {c: {sm: st.mean(v["gu"]) for sm, v in per[c].items() if "gu" in v} for c in calls}
        common = sorted(set.intersection(*(set(m) for m in means.values())))
        across = [corr([means[a][s] for s in common], [means[b][s] for s in common]) for i, a in enumerate(calls) for b in calls[i + 1:]]
        tpc, nbr, later = [], [], []
        for c in calls:
            m = means[c]
            pairs = [s for s in m if s % 2 == 0 and s + 1 in m]
            tpc.append(corr([m[s] for s in pairs], [m[s + 1] for s in pairs]))
            pairs = [s for s in m if s % 2 == 0 and s + 2 in m]
            nbr.append(corr([m[s] for s in pairs], [m[s + 2] for s in pairs]))
            both = [s for s in m if "dn" in per[c][s]]
            later.append(corr([m[s] for s in both], [st.mean(per[c][s]["dn"]) for s in both]))
        spread = [(min(means[c].values()), st.median(means[c].values()), max(means[c].values())) for c in calls]
        print(f"{path}: {len(calls)} calls, {len(common)} SMs in every call")
        print("  an SM's gate_up streaming time (us), min / median / max over SMs, per call: " + ", ".join("%.1f / %.1f / %.1f" % t for t in spread))
        print("  correlation of SMs' times: between calls median %.2f (min %.2f, max %.2f); the two SMs of a TPC %.2f; neighbouring TPCs %.2f; an SM's gate_up and its later down %.2f (medians over calls)"
              % (st.median(across), min(across), max(across), st.median(tpc), st.median(nbr), st.median(later)))


if __name__ == "__main__":
    args = sys.argv[1:]
    n = 256
    if args[:1] == ["--gate-up-items"]:
        n, args = int(args[1]), args[2:]
    main(args, n)
