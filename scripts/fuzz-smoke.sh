#!/usr/bin/env bash
# A short libFuzzer run of each fuzz target (default 20 s each), built with the stable toolchain and the
# same coverage instrumentation cargo-fuzz uses (no sanitizer: ringcast-wire has no unsafe code).
# For long runs with AddressSanitizer use cargo-fuzz on nightly: `cargo +nightly fuzz run frame_decoder`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation flags off build scripts (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --bins --target "$host"
for target in frame_decoder handshake tcp_decoder; do
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "fuzz $target for ${seconds}s"
    "target/$host/release/$target" -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" "corpus/$target" 2>&1 | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY|.*panicked)" || true
    if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "fuzz $target found a crash: $(ls artifacts/$target/crash-*)" >&2
        exit 1
    fi
done
echo "fuzz smoke: ok"
