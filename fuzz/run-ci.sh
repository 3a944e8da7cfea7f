#!/usr/bin/env bash
# CI: runs every fuzz target for a short fixed time, each on a copy of its committed seed corpus
# (so CI never grows corpus/), and fails if any target crashes. Crash inputs are kept in
# fuzz/artifacts/<target>/ (ignored by git); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
#
# FUZZ_SECONDS overrides the time per target (default 15).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-15}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz passes nightly-only flags to rustc; RUSTC_BOOTSTRAP lets the stable toolchain take
# them. No sanitizer: the code has no unsafe, and the build is much faster.
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz run --sanitizer none)

cargo fuzz build --sanitizer none
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for target in $(cargo fuzz list); do
  echo "== fuzz $target (${seconds}s)"
  mkdir -p "$work/$target"
  if [ -d "corpus/$target" ]; then
    cp -R "corpus/$target/." "$work/$target/"
  fi
  if ! "${fuzz[@]}" "$target" "$work/$target" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "all fuzz targets ran ${seconds}s without a crash"
