#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/fuzz_targets for a bounded time.
# Usage: tools/fuzz.sh [seconds-per-target]   (default 30)
# Installs cargo-fuzz if missing. Stable Rust only: nightly flags are
# enabled with RUSTC_BOOTSTRAP=1. Exits non-zero if any target crashes
# (crash inputs are left in fuzz/artifacts/<target>/).
set -euo pipefail

secs="${1:-30}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz || cargo install cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1

# AddressSanitizer needs its runtime from the toolchain; fall back to no
# sanitizer (panics are still caught) when it cannot link.
sanitizer="address"
first="$(ls fuzz/fuzz_targets/*.rs | head -n1)"
if ! cargo fuzz build --sanitizer "$sanitizer" "$(basename "$first" .rs)" >/dev/null 2>&1; then
    echo "fuzz.sh: address sanitizer build failed; using --sanitizer none" >&2
    sanitizer="none"
fi

failed=()
for src in fuzz/fuzz_targets/*.rs; do
    target="$(basename "$src" .rs)"
    mkdir -p "fuzz/corpus/$target"
    echo "fuzz.sh: $target for ${secs}s (sanitizer: $sanitizer)" >&2
    # -max_total_time bounds the run; timeout is a backstop for the build too.
    if ! timeout --signal=KILL "$((secs + 600))" \
        cargo fuzz run --sanitizer "$sanitizer" "$target" -- \
            -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10; then
        echo "fuzz.sh: $target FAILED (see fuzz/artifacts/$target/)" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: all targets ran ${secs}s without a crash" >&2
