#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/fuzz_targets for a bounded time.
# Usage: tools/fuzz.sh [seconds-per-target]   (default $FUZZ_SECONDS, else 30)
#
# Installs cargo-fuzz if missing. Works on stable Rust: the nightly-only
# flags cargo-fuzz passes are enabled with RUSTC_BOOTSTRAP=1. Builds with
# AddressSanitizer, or without a sanitizer if the ASan build fails while a
# plain one works (panics are caught either way).
# Exit status: 0 no crash; 1 a target crashed (inputs are kept in
# fuzz/artifacts/<target>/); 2 usage or build error.
set -euo pipefail

secs="${1:-${FUZZ_SECONDS:-30}}"
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: $0 [seconds-per-target]" >&2
        exit 2
        ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz || cargo install cargo-fuzz
fi

# Toolchain: $FUZZ_TOOLCHAIN if set, else nightly when rustup has it (so
# builds are shared with anyone else fuzzing here), else stable with
# RUSTC_BOOTSTRAP=1 for the nightly-only flags.
toolchain="${FUZZ_TOOLCHAIN:-}"
if [ -z "$toolchain" ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain="nightly"
fi
if [ -n "$toolchain" ]; then
    fuzz=(cargo "+$toolchain" fuzz)
else
    fuzz=(cargo fuzz)
fi
export RUSTC_BOOTSTRAP=1

targets=()
for src in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$src" .rs)")
done
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz.sh: no targets in fuzz/fuzz_targets" >&2
    exit 2
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# Building every target at once; bounded in time as a backstop.
build() {
    timeout --signal=KILL 1800 "${fuzz[@]}" build --sanitizer "$1" >"$log" 2>&1
}

sanitizer="address"
if ! build address; then
    if build none; then
        echo "fuzz.sh: AddressSanitizer build failed, using --sanitizer none" >&2
        sanitizer="none"
    else
        tail -n 40 "$log" >&2
        echo "fuzz.sh: fuzz targets do not build" >&2
        exit 2
    fi
fi

failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "fuzz.sh: $target for ${secs}s (toolchain: ${toolchain:-default}, sanitizer: $sanitizer)" >&2
    # -max_total_time bounds the run; timeout is a backstop.
    if ! timeout --signal=KILL "$((secs + 300))" \
        "${fuzz[@]}" run --sanitizer "$sanitizer" "$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10; then
        echo "fuzz.sh: $target FAILED (see fuzz/artifacts/$target/)" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran ${secs}s each without a crash" >&2
