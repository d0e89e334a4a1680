#!/usr/bin/env bash
# Fuzzes the core's parsers with libFuzzer, on the stable toolchain: each target in core/fuzz is built with
# the coverage instrumentation cargo fuzz passes (without its sanitizer, which needs nightly), with
# overflow checks and debug assertions on, then run for SECONDS (default 60) from its corpus,
# core/fuzz/corpus/TARGET, which grows as it finds new paths. Exits 1 if a target crashed; the input that
# did is left in core/fuzz/artifacts/TARGET/ beside the run's log (a run clears its target's old ones), to
# replay with `core/fuzz/target/HOST/release/TARGET INPUT`.
#
#     bash scripts/fuzz.sh [SECONDS] [TARGET...]      (all targets by default)
set -euo pipefail
cd "$(dirname "$0")/../core/fuzz"
seconds="${1:-60}"
shift || true
triple="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# --target: the flags then reach the targets and the core, not the build scripts
cargo build -q --release --target "$triple" --bins
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^agent-core-fuzz$')
fi
crashed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    rm -f "artifacts/$target"/crash-* "artifacts/$target"/oom-* "artifacts/$target"/timeout-*
    echo "== $target, ${seconds} s"
    "target/$triple/release/$target" "corpus/$target" -max_total_time="$seconds" -max_len=8192 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 > "artifacts/$target/log" 2>&1 || true
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|SUMMARY)|panicked" "artifacts/$target/log" || true
    if compgen -G "artifacts/$target/*-*" > /dev/null; then
        crashed+=("$target")
    fi
done
if [ ${#crashed[@]} -gt 0 ]; then
    echo "crashed: ${crashed[*]} (inputs in core/fuzz/artifacts/)" >&2
    exit 1
fi
echo "no target crashed"
