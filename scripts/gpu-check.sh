#!/usr/bin/env bash
# The GPU checks (CI has no GPU). Two halves:
#   scripts/gpu-check.sh --build   here: builds the GPU test binary and the bench into .bin/
#   scripts/gpu-check.sh           on the GPU machine: runs them, logs under $OUT (or target/gpu-check)
# With the device tool: build here, then run `scripts/gpu-check.sh` with carry [".bin"].
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--build" ]]; then
    mkdir -p .bin
    exe=$(cargo test --release -p peregrine-cuda --test kernels --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/cuda-kernels
    cargo build --release -p peregrine-cuda --example bench
    cp target/release/examples/bench .bin/cuda-bench
    ls -la .bin
    exit 0
fi
LOG=${OUT:-target/gpu-check}
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/device.txt"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$LOG/device.txt"
status=0
.bin/cuda-kernels --nocapture --test-threads 1 2>&1 | tee "$LOG/kernels.log" || status=1
.bin/cuda-bench 2>&1 | tee "$LOG/bench.log" || status=1
exit $status
