#!/usr/bin/env bash
# Fuzzes coremq with cargo-fuzz (libFuzzer): scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: decode, then connection) for SECONDS (default 30) on its corpus in
# fuzz/corpus/<target>, which is seeded first with valid packets and sessions (fuzz/seeds) and keeps
# growing across runs. Exits 1 when a target crashes, leaks, times out or runs out of memory, after
# printing the input that did it (fuzz/artifacts/<target>/...) and how to replay it; 2 when the targets
# do not build. For a long campaign: scripts/fuzz.sh 3600.
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sanitizer coverage). With only a stable
# toolchain they are unlocked by RUSTC_BOOTSTRAP=1, which is what this script does; AddressSanitizer
# works that way on x86_64 Linux (the runtime ships in rust-std). Should the sanitizer build ever fail,
# the script falls back to `-s none`: coverage-guided fuzzing with panics and Rust's own checks only.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: $0 [SECONDS] [TARGET...]   (SECONDS per target, default 30)" >&2
  exit 2
fi
shift $(($# > 0 ? 1 : 0))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode connection)

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# A panic prints its own backtrace before libFuzzer aborts: readable even without llvm-symbolizer.
export RUST_BACKTRACE=1
# cargo-fuzz looks for its binaries under fuzz/target; a target dir set for the main workspace would
# send them elsewhere.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  start=$SECONDS
  cargo install cargo-fuzz --locked --quiet
  echo "   installed in $((SECONDS - start)) s"
fi

echo "== seed corpus"
cargo build --quiet --release --manifest-path fuzz/seeds/Cargo.toml --target-dir fuzz/target/seeds
fuzz/target/seeds/release/coremq-fuzz-seeds fuzz/corpus

host="$(rustc -vV | sed -n 's/^host: //p')"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

echo "== building fuzz targets (AddressSanitizer)"
sanitizer=address
if ! cargo fuzz build -s address >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "== the AddressSanitizer build failed; building without a sanitizer (-s none)" >&2
  sanitizer=none
  if ! cargo fuzz build -s none >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: the fuzz targets do not build" >&2
    exit 2
  fi
fi

# -malloc_limit_mb: any single allocation over 64 MiB is a bug here (the decoder must never size a
# buffer from a length field before the bytes arrive); it needs a sanitizer's allocator hooks, so with
# -s none only the RSS limit applies. -max_len: packets and sessions that matter fit in 4 KiB.
# -dict: MQTT tokens (protocol names, headers, wildcards, broken UTF-8) for the mutator to splice in.
libfuzzer_args=(
  -max_total_time="$seconds"
  -malloc_limit_mb=64
  -rss_limit_mb=2048
  -max_len=4096
  -timeout=10
  -print_final_stats=1
  -dict=fuzz/mqtt.dict
)

failed=0
for target in "${targets[@]}"; do
  echo "== fuzzing $target for $seconds s (sanitizer: $sanitizer)"
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  marker="$(mktemp)"
  status=0
  cargo fuzz run -s "$sanitizer" "$target" "fuzz/corpus/$target" -- "${libfuzzer_args[@]}" >"$log" 2>&1 ||
    status=$?
  # libFuzzer's DONE line is "#<runs>", a TAB, then "DONE" and spaces.
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$status" -ne 0 ]; then
    failed=1
    # libFuzzer's report from its first line: the panic message or sanitizer error, the stack, the
    # input. Anything else (a build or start-up failure): the end of the output.
    report_start='panicked at|==[0-9]+== ?ERROR|ERROR: libFuzzer|SUMMARY: '
    if grep -q -E "$report_start" "$log"; then
      # Up to cargo-fuzz's own error line: its backtrace is about cargo-fuzz, not the crash.
      awk -v re="$report_start" '/^Error: / && found { print; exit } found || $0 ~ re { found = 1; print }' \
        "$log" | head -n 200 >&2
    else
      tail -n 60 "$log" >&2
    fi
    mapfile -t artifacts < <(find "fuzz/artifacts/$target" -type f -newer "$marker" 2>/dev/null)
    if [ ${#artifacts[@]} -eq 0 ]; then
      echo "fuzz.sh: $target failed (exit $status) without leaving an input; see the output above" >&2
    fi
    for a in "${artifacts[@]}"; do
      echo "fuzz.sh: $target: crashing input saved as $a" >&2
      echo "  hex: $(head -c 512 "$a" | od -An -v -tx1 | tr -d ' \n')" >&2
      echo "  replay: RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $target $a" >&2
      echo "  trace:  COREMQ_FUZZ_TRACE=1 fuzz/target/$host/release/$target $a" >&2
    done
  fi
  rm -f "$marker"
done

if [ "$failed" -ne 0 ]; then
  echo "fuzz.sh: FAILED" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, $seconds s each, no crash"
