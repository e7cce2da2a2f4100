#!/usr/bin/env bash
# Coverage-guided fuzzing with atheris (pip install atheris) of the four
# targets in fuzz/: BlockManager operation sequences against the reference
# model, the trace parsers, config and size strings, and KV event batches. Builds a scratch copy
# of the tracked files with clang's -fsanitize=fuzzer-no-link,address, so that
# libFuzzer sees the coverage of the native core as well as of the Python, and
# AddressSanitizer checks every access (without clang: an ordinary build and
# Python coverage only). Each target runs SECONDS from the seeds in
# fuzz/seeds/TARGET; a crash leaves its input in fuzz/crashes/ and fails the
# script. Replay one with: python fuzz/fuzz_TARGET.py fuzz/crashes/FILE
#
#   tools/fuzz.sh [SECONDS per target, default 600] [SEED, default random] [TARGET ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-600}
seed=${2:-$(( (RANDOM << 15) | RANDOM ))}
shift $(( $# < 2 ? $# : 2 ))
targets=${*:-manager traces config events}
python -c "import atheris" 2>/dev/null || { echo "fuzz: needs atheris (pip install atheris)"; exit 2; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
work=$scratch/rocmforge
mkdir "$work"
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cp -r "$root/fuzz/." "$work/fuzz/"
cd "$work"
clang=$(command -v clang || ls /usr/bin/clang-[0-9]* 2>/dev/null | sort -V | tail -1 || true)
atheris_dir=$(python -c "import atheris; print(atheris.path())")
if [ -n "$clang" ]; then
    echo "fuzz: building with $clang (native coverage and AddressSanitizer), seed $seed"
    CC=$clang CXX=${clang/clang/clang++} LDSHARED="$clang -shared" ROCMFORGE_SANITIZE=fuzzer-no-link,address \
        ROCMFORGE_KERNELS=0 python setup.py build_ext --inplace > build.log 2>&1 || { tail -20 build.log; exit 1; }
    export LD_PRELOAD="$atheris_dir/asan_with_fuzzer.so" ASAN_OPTIONS="detect_leaks=0"
else
    echo "fuzz: no clang, so Python coverage only, seed $seed"
    ROCMFORGE_KERNELS=0 python setup.py build_ext --inplace > build.log 2>&1 || { tail -20 build.log; exit 1; }
fi
export PYTHONPATH="$work"
python -c "import rocmforge, sys; assert rocmforge.__file__.startswith('$work'), rocmforge.__file__"
mkdir -p "$root/fuzz/crashes"
status=0
for target in $targets; do
    corpus=$scratch/corpus-$target
    mkdir -p "$corpus"
    [ -d "fuzz/seeds/$target" ] && cp fuzz/seeds/"$target"/* "$corpus"/
    echo "fuzz: $target for $seconds s"
    if ! python "fuzz/fuzz_$target.py" -max_total_time="$seconds" -seed="$seed" -rss_limit_mb=6144 \
            -max_len=4096 -print_final_stats=1 -artifact_prefix="$root/fuzz/crashes/$target-" \
            "$corpus" > "$scratch/$target.log" 2>&1; then
        status=1
        tail -40 "$scratch/$target.log"
    fi
    grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|Done [0-9]+ runs)" "$scratch/$target.log" | tail -2 \
        | sed "s/^/fuzz: $target: /"
done
[ "$status" = "0" ] && echo "fuzz: no findings" || echo "fuzz: findings in $root/fuzz/crashes/"
exit $status
