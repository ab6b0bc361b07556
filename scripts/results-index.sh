#!/usr/bin/env bash
# Writes benches/results/README.md: every record in benches/results with its title, newest
# first, so what was measured (and what was tried and not kept) is found before it is tried
# again. Run it after adding a record; `--check` only says whether README.md is current (exit 1
# if not).
set -euo pipefail
cd "$(dirname "$0")/../benches/results"
out=README.md
[[ "${1:-}" == "--check" ]] && out=$(mktemp)
{
    echo "# Measurement records"
    echo
    echo "Every record in this folder with its title (its first line), newest first. Titles say"
    echo "\"not kept\" where a change was measured and reverted; the record names the commits that hold"
    echo "its code. Regenerate with \`scripts/results-index.sh\`."
    day=""
    for f in $(ls -1 2*.md | sort -r); do
        d=${f:0:10}
        if [[ "$d" != "$day" ]]; then
            day=$d
            echo
            echo "## $d"
            echo
        fi
        title=$(head -1 "$f" | sed 's/^# *//')
        echo "- [$f]($f): $title"
    done
} > "$out"
if [[ "$out" != README.md ]]; then
    trap 'rm -f "$out"' EXIT
    cmp -s "$out" README.md || { echo "benches/results/README.md is out of date: run scripts/results-index.sh"; exit 1; }
fi
