#!/usr/bin/env bash
# Runs `ksi-host bench executor --json` several times and prints the medians, the way the
# README's numbers were taken. With two binaries it interleaves them (A B A B ...), which is
# the only fair way to compare two versions on a machine whose speed drifts.
#
#   tests/bench-executor.sh [RUNS] [KSI_HOST_A [KSI_HOST_B]]
#
# Defaults: 8 runs of target/release/ksi-host. Each run gets a fresh data dir under a temporary
# directory, removed at the end, not between runs: on ext4 without a journal, inodes freed in
# the last ~30 s make new files slow to create, and each run creates about a thousand. Each
# output goes to a file (nothing else starts while a run measures). A binary finds fake-claude
# next to itself.
set -euo pipefail
runs="${1:-8}"
cd "$(dirname "$0")/.."
a="${2:-target/release/ksi-host}"
b="${3:-}"
command -v python3 >/dev/null || { echo "python3 is needed to compute the medians" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
for i in $(seq 1 "$runs"); do
  for v in A B; do
    bin="$a"; [ "$v" = B ] && bin="$b"
    [ -n "$bin" ] || continue
    "$bin" --data-dir "$work/data.$v.$i" bench executor --json 2>/dev/null > "$work/out/$v.$i.json"
  done
done
python3 - "$work/out" "$a" "$b" <<'PY'
import json, os, statistics, sys
out, names = sys.argv[1], {"A": sys.argv[2], "B": sys.argv[3]}
keys = ["overhead_p50_ms", "overhead_p90_ms", "before_spawn_p50_ms", "after_exit_p50_ms",
        "sequential_overhead_p50_ms", "calls_per_s", "ksi_cpu_ms_per_call", "rss_mb"]
for v in "AB":
    rs = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith(v + ".")]
    if not rs:
        continue
    print(f"{names[v]}: medians of {len(rs)} runs")
    for k in keys:
        vals = [r[k] for r in rs]
        print(f"  {k:28} {statistics.median(vals):9.2f}   runs {' '.join(f'{x:.1f}' for x in vals)}")
PY
