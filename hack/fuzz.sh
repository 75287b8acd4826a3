#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each (libFuzzer, nightly),
# starting from the committed seed corpus, and prints the executions and coverage
# libFuzzer reports per target. Installs cargo-fuzz when it is absent.
#
# Usage: hack/fuzz.sh [SECONDS_PER_TARGET]   (default 60; `make fuzz FUZZ_SECONDS=…`)
# A crash leaves its input in fuzz/artifacts/TARGET/: add it to fuzz/corpus/TARGET/
# so the stable replay tests (`*/tests/fuzz_corpus.rs`) keep it as a regular test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --locked
fi

work="target/fuzz-corpus"
summary=()
for t in $(cd fuzz && cargo +nightly fuzz list); do
  # The committed corpus stays small: libFuzzer grows a working copy instead.
  rm -rf "$work/$t" && mkdir -p "$work/$t"
  cp fuzz/corpus/"$t"/* "$work/$t"/
  log="$work/$t.log"
  (cd fuzz && cargo +nightly fuzz run "$t" "../$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1) 2>&1 | tee "$log" | grep -E '^#[0-9]+.*(DONE|pulse)|ERROR|panicked' || true
  execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)"
  cov="$(grep -Eo '^#[0-9]+.*cov: [0-9]+' "$log" | grep -Eo 'cov: [0-9]+' | tail -1 | grep -Eo '[0-9]+')"
  ft="$(grep -Eo '^#[0-9]+.*ft: [0-9]+' "$log" | grep -Eo 'ft: [0-9]+' | tail -1 | grep -Eo '[0-9]+')"
  summary+=("$(printf '%-14s %12s execs  cov %6s  ft %6s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}")")
  if grep -q 'ERROR: libFuzzer\|panicked' "$log"; then
    echo "fuzz target $t crashed; its input is in fuzz/artifacts/$t/ (see $log)" >&2
    printf '%s\n' "${summary[@]}"
    exit 1
  fi
done
printf '%s\n' "${summary[@]}"
