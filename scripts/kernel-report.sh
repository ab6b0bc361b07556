#!/usr/bin/env bash
# Registers, stack, spills and static shared memory of every kernel, without a GPU: NVRTC and
# ptxas of CUDA 13 from PyPI (cached in target/cuda-tools), then tools/kernel_report.py.
#   scripts/kernel-report.sh                       every kernel, sm_90a
#   scripts/kernel-report.sh --base HEAD moe.cu    only moe.cu's kernels that differ from HEAD
#   scripts/kernel-report.sh -DMOE_TRACE           with a measurement define
#   scripts/kernel-report.sh --fill-cache DIR [-D..] [--defines-in ops,gemv]
#                                                  PTX and CUBIN as compile.rs caches them, for
#                                                  PEREGRINE_CACHE_DIR=DIR on a GPU machine
#   scripts/kernel-report.sh --check-moe-parts     moe.cu's parts (compile.rs MOE_PARTS): each kernel in one,
#                                                  compiled as in the whole file
set -euo pipefail
cd "$(dirname "$0")/.."
T=target/cuda-tools
if [ ! -x "$T/nvidia/cu13/bin/ptxas" ] || [ ! -e "$T/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    mkdir -p "$T/wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$T/wheels" \
        "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*"
    for w in "$T"/wheels/*.whl; do python3 -m zipfile -e "$w" "$T"; done
    rm -rf "$T/wheels"
    chmod +x "$T/nvidia/cu13/bin/"*
fi
LD_LIBRARY_PATH="$PWD/$T/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec python3 tools/kernel_report.py "$@"
