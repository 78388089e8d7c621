#!/usr/bin/env bash
# A short fuzzing run of the request parser, for CI-style checks:
#
#     scripts/fuzz.sh [seconds]        # default 60
#
# Runs fuzz/fuzz_targets/parse_request.rs (see fuzz/README.md) from the committed seeds in
# fuzz/seeds/parse_request, keeping what it learns in fuzz/corpus/parse_request (ignored by git)
# so that repeated runs go deeper. Exits non-zero on a crash or failed check; the input is left
# in fuzz/artifacts/parse_request/.
#
# Installs cargo-fuzz if it is missing. Needs no nightly toolchain: RUSTC_BOOTSTRAP=1 lets the
# stable compiler accept the -Z flags cargo-fuzz passes (AddressSanitizer, coverage
# instrumentation). Set CARGO_TARGET_DIR to build elsewhere than fuzz/target.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [seconds]" >&2; exit 2 ;;
esac
target=parse_request

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
target_dir_args=()
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    target_dir_args=(--target-dir "$CARGO_TARGET_DIR")
fi

# New inputs go to the first corpus directory; the seeds are only read.
mkdir -p "fuzz/corpus/$target"
cargo fuzz run "${target_dir_args[@]}" "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -dict="fuzz/$target.dict" \
    -max_len=4096 \
    -timeout=10 \
    -max_total_time="$seconds" \
    -print_final_stats=1
