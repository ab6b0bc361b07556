#!/usr/bin/env bash
# One kernel launch under Nsight Compute on the GPU machine, and where its warps wait:
#   scripts/ncu-kernel.sh OUT_DIR KERNEL_REGEX LAUNCH_SKIP COMMAND [ARGS...]
# e.g. PEREGRINE_MOE_KERNEL=fused:2x4 scripts/ncu-kernel.sh $OUT/ncu moe_fused_acc 20 \
#        .bin/step-bench --config configs/mimo-v2-flash.json --draft-layers 0 --layers 4 --batches 1 --steps 3
# profiles the 21st launch whose name matches (graph kernel nodes included) with the warp-state
# and source-counter sections, and writes OUT_DIR/report.ncu-rep, details.txt (the sections),
# source.csv (per SASS instruction) and stalls.txt (tools/ncu_stalls.py). The GPU's clocks are
# left as they are (--clock-control none) and caches are not flushed (--cache-control none), so
# the launch runs as it does in the step, apart from ncu replaying it. NCU_SECTIONS adds sections
# (e.g. NCU_SECTIONS="MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables" for where the bytes go).
# ncu is taken from PATH, else from /usr/local/cuda/bin (where the GPU machine has it).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n 2,12p "$0" >&2; exit 2; fi
out=$1 regex=$2 skip=$3
shift 3
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
[ -x "$ncu" ] || { echo "ncu (Nsight Compute) is neither on PATH nor in /usr/local/cuda/bin" >&2; exit 1; }
extra=()
for s in ${NCU_SECTIONS:-}; do extra+=(--section "$s"); done
mkdir -p "$out"
"$ncu" --clock-control none --cache-control none --graph-profiling node -k "regex:$regex" --launch-skip "$skip" --launch-count 1 \
    --section WarpStateStats --section SourceCounters --section LaunchStats "${extra[@]}" -o "$out/report" -f "$@"
"$ncu" -i "$out/report.ncu-rep" --page details > "$out/details.txt"
"$ncu" -i "$out/report.ncu-rep" --page source --print-source sass --csv > "$out/source.csv"
python3 "$(dirname "$0")/../tools/ncu_stalls.py" "$out/source.csv" | tee "$out/stalls.txt"
