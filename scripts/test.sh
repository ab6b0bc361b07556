#!/usr/bin/env bash
# The project's one test command (README, .ci/run). Works from a clean clone on a machine
# without a GPU: fetches the test assets that are too large to commit, prepares a Python venv
# with the official OpenAI SDK and schemathesis for the conformance tests, then runs every Rust test.
# Tests whose assets could not be fetched say "skipped: ..." and pass.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean build, its test assets and the venv take ~3.6 GB; with less free, cargo stops with
# "No space left on device" part way through. Say so up front rather than after minutes.
free_kb="$(df -Pk . | awk 'NR == 2 { print $4 }')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((5 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024)) MB free on this disk; a clean build and its test assets need ~3.6 GB" >&2
fi

scripts/fetch-test-assets.sh || echo "note: test assets could not be fetched; tests that need them will skip"

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, anthropic, schemathesis" 2>/dev/null; then
    { python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.50,<3" "anthropic>=0.40,<1" "schemathesis>=4,<5"; } \
        || echo "note: could not prepare .venv (openai and anthropic SDKs, schemathesis); the tests that use it will skip"
fi

cargo test --workspace --all-targets
