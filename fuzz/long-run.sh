#!/usr/bin/env bash
# Runs one fuzz target for a while on a copy of its seed corpus and prints libFuzzer's final
# stats: the figures for the "Long runs" table in README.md.
#
#   fuzz/long-run.sh TARGET SECONDS
#
# The grown corpus is thrown away; a crash input lands in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -ne 2 ]; then
  echo "usage: $0 TARGET SECONDS" >&2
  exit 2
fi
target="$1"
seconds="$2"
export RUSTC_BOOTSTRAP=1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus"
if [ -d "corpus/$target" ]; then
  cp -R "corpus/$target/." "$work/corpus/"
fi

status=0
cargo fuzz run --sanitizer none "$target" "$work/corpus" -- \
  -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2> >(tee "$work/log" >&2) || status=$?
wait # for tee

echo
echo "== $target, ${seconds}s"
# The last status line ("#N DONE cov: .. ft: .. corp: ..") and the final stats.
grep -E '^#[0-9]+[[:space:]]+DONE' "$work/log" | tail -n 1 || true
grep -E '^(Done [0-9]+ runs|stat::)' "$work/log" || true
if [ "$status" -ne 0 ]; then
  echo "failed (crash, timeout or out of memory): exit status $status; input in fuzz/artifacts/$target/"
else
  echo "crashes: 0"
fi
exit "$status"
