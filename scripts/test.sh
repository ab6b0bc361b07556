#!/usr/bin/env bash
# The project's one test command (README, .ci/run). Works from a clean clone on a machine
# without a GPU: fetches the test assets that are too large to commit, prepares a Python venv
# with the official OpenAI SDK for the conformance test, then runs every Rust test.
# Tests whose assets could not be fetched say "skipped: ..." and pass.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-test-assets.sh || echo "note: test assets could not be fetched; tests that need them will skip"

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
    { python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.50,<3"; } \
        || echo "note: could not prepare .venv with the openai SDK; the SDK conformance test will skip"
fi

cargo test --workspace --all-targets
