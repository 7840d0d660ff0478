#!/usr/bin/env bash
# bench/fuzz.sh - runs every fuzz target in fuzz/ (cargo fuzz, libFuzzer)
# for SECONDS each, one after the other.
#
# Targets: relay_head (the proxy's request head parser, against httparse and
# hyper), relay_chunks (its chunked body follower, against a reference
# decoder), framing (the hyper path's framing watcher), control (the control
# protocol's NDJSON request decoding), config (the config loader).
#
# Each target starts from the seeds committed in fuzz/corpus/TARGET and keeps
# what it finds in fuzz/work/TARGET (not committed), so a later run goes on
# from there. A crash stops that target: its input is saved under
# fuzz/artifacts/TARGET/ and the script exits 1 after the other targets ran.
# Replay one with: cd fuzz && cargo fuzz run -s none TARGET FILE
#
# Needs cargo-fuzz (cargo install cargo-fuzz --locked). Built without a
# sanitizer (-s none): the stable toolchain builds that (AddressSanitizer
# would need nightly's -Zsanitizer), and the code under test is safe Rust;
# debug assertions and overflow checks are on. The build goes to
# fuzz/target, apart from the main crate's.
# Usage: bench/fuzz.sh [SECONDS] [TARGET...]   (default: 600 s, every target)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-600}
shift || true
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "usage: bench/fuzz.sh [SECONDS] [TARGET...]" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "bench/fuzz.sh: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
# CARGO_TARGET_DIR would mix the instrumented build with the main crate's.
unset CARGO_TARGET_DIR

cargo fuzz build -s none
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
  mkdir -p "work/$t"
  # Longer inputs where the limits under test are long (chunk extensions
  # and trailers).
  max_len=4096
  [ "$t" = relay_chunks ] && max_len=20000
  log="work/$t.log"
  start=$(date +%s)
  if cargo fuzz run -s none "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len="$max_len" -timeout=20 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz $t: ${runs:-?} inputs in $(($(date +%s) - start)) s, no crash"
  else
    echo "fuzz $t: FAILED after $(($(date +%s) - start)) s; the end of $PWD/$log:"
    tail -n 40 "$log"
    failed+=("$t")
  fi
done
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in $PWD/artifacts/)" >&2
  exit 1
fi
