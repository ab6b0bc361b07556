#!/usr/bin/env bash
# SASS of one kernel file's kernels without a GPU, to count a loop's instructions before a device
# call: the PTX compile.rs would cache (scripts/kernel-report.sh --fill-cache), ptxas 13.0, and
# cuobjdump / nvdisasm from PyPI (cached in target/cuda-tools; cuobjdump 13.0 is not on PyPI,
# 13.2's reads sm_90a cubins).
#   scripts/kernel-sass.sh moe.cu                     every kernel of moe.cu, sm_90a
#   scripts/kernel-sass.sh moe.cu 'moe_fused_acc.*'   the functions whose names match
#   scripts/kernel-sass.sh moe.cu 'moe_fused_acc.*' -DMOE_TRACE
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,8p "$0"; exit 2; }
file=$1; stem=${file%.cu}; pattern=${2:-.*}; shift $(( $# >= 2 ? 2 : 1 ))
T=target/cuda-tools
if [ ! -x "$T/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$T/nvidia/cu13/bin/nvdisasm" ]; then
    mkdir -p "$T/wheels-sass"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$T/wheels-sass" \
        "nvidia-cuda-cuobjdump==13.2.78" "nvidia-cuda-nvdisasm==13.5.37"
    for w in "$T"/wheels-sass/*.whl; do python3 -m zipfile -e "$w" "$T"; done
    rm -rf "$T/wheels-sass"
    chmod +x "$T/nvidia/cu13/bin/"*
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
defines=()
[ $# -gt 0 ] && defines=("$@" --defines-in "$stem")
scripts/kernel-report.sh --fill-cache "$tmp" "${defines[@]}" > /dev/null
# (moe.cu is cached as parts, compile.rs's MOE_PARTS: one PTX file each)
for ptx in "$tmp"/kernels/"$stem"-*.ptx; do
    "$T/nvidia/cu13/bin/ptxas" -arch=sm_90a -o "$tmp/k.cubin" "$ptx"
    PATH="$PWD/$T/nvidia/cu13/bin:$PATH" cuobjdump -sass "$tmp/k.cubin" |
        awk -v pat="^($pattern)\$" '/Function : /{keep = ($3 ~ pat)} keep'
done
