#!/usr/bin/env bash
# On a machine with a GPU (the device machine): build with the GPU compilers,
# run the whole test suite there (GPU tests included; a summary line says how
# many ran), then the K/V kernel benchmark. Logs go to $OUT when it is set.
#
#   tools/device_check.sh [tests] [bench] [ab] [core] [sanitize] [hf] [transfer] [tier] [launch]
#   (tests and bench when none is named)
#
# sanitize: the GPU tests under compute-sanitizer's memcheck (with a full leak
# check), racecheck, initcheck and synccheck; each must report zero errors.
# torch's caching allocator is off there, so that its pool is no leak report;
# API errors are not reported (tests provoke them on purpose and check them);
# tests that measure free device memory skip (the tools take memory of their own);
# backtraces are device-side only: a host backtrace takes references to the
# Python frames of every allocation site, which keeps their objects alive.
#
# hf: the transformers example at the issue's size (batch 32, 1k-token prompts of which 768
# shared, 256 new tokens; medians of 5 alternating runs), DynamicCache against rocmforge's paged and gather paths.
# transfer: benchmarks/bench_transfer.py (1 GiB of blocks against torch's copy).
# tier: benchmarks/bench_host_tier.py (host-tier offload and reload against torch's
# pinned copies, and write_kv with an offload under way). launch: benchmarks/bench_launch.py
# (write_kv's host cost per call in a fresh process).
#
# ab: the allocator's single-thread cases, this tree against the tree in
# $OLD_TREE, in alternating processes (both built in place); core: rocmforge
# bench (single thread, then threads on one manager, each on its own shard).
#
# Every step's commands run under timeout -s KILL $STEP_TIMEOUT (default 600 s),
# so a hung kernel costs one step, not the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
steps=${*:-tests bench}
status=0
limit() { timeout -s KILL "${STEP_TIMEOUT:-600}" "$@"; }
echo "device_check: ${ROCMFORGE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
python3 -m pip install --no-build-isolation -q . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
for step in $steps; do
    case $step in
        tests)
            # From tests/, so the source tree does not shadow the installed package.
            (cd tests && limit python3 -m pytest -q -p no:cacheprovider . 2>&1) | tee "$out/tests.log" | tail -15
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        bench)
            (cd "$out" && limit python3 -m rocmforge.bench_kernels 2>&1) | tee "$out/bench_kernels.log" | tail -12 ;;
        ab)
            (cd "$OLD_TREE" && python3 setup.py build_ext --inplace -j 16 > "$out/old_build.log" 2>&1) || { tail -20 "$out/old_build.log"; exit 1; }
            python3 setup.py build_ext --inplace -j 16 > "$out/new_build.log" 2>&1 || { tail -20 "$out/new_build.log"; exit 1; }
            limit python3 benchmarks/ab_allocator.py "$OLD_TREE" "$PWD" --reps "${AB_REPS:-7}" 2>&1 | tee "$out/ab.log" | head -8 ;;
        core)
            (cd "$out" && limit python3 -c "from rocmforge.bench_allocator import main; main(['--reps', '${CORE_REPS:-3}'])" 2>&1) | tee "$out/core.log" | grep -v "^  " | tail -30 ;;
        sanitize)
            # Five checks at once, one process each on the one GPU, so the gate takes the
            # time of the slowest. The kernel filter (rf_*) leaves torch's kernels unchecked:
            # racecheck reports hazards inside cuDNN's attention kernels, and the
            # transformers tests take minutes each under an unfiltered tool. Those tests
            # reach no kernel the other tests do not, and two tools cannot take them:
            # initcheck cannot take the filter (an unchecked kernel's writes look
            # uninitialized to it), and racecheck aborts inside cuBLAS's first GEMM of
            # the prompt (CUDA 13, torch 2.11), before a kernel of ours runs. Their
            # memcheck has no leak check: torch's cuBLAS and cuDNN keep workspaces for
            # the life of the process. racecheck runs one process per test file: over
            # the whole suite in one process it reports an error of its own ("failed to
            # track a kernel launch") and no hazard; file by file it reports nothing.
            mkdir -p "$out/cs"
            sanitize_one() {
                local name=$1 tool=$2 flags=$3 tests=$4
                (cd tests && PYTORCH_NO_CUDA_MEMORY_CACHING=1 ROCMFORGE_SANITIZER=$tool \
                    limit compute-sanitizer --tool "$tool" $flags --report-api-errors no \
                    --show-backtrace device --error-exitcode 86 --log-file "$out/cs/$name.log" \
                    python3 -m pytest -v -p no:cacheprovider -m gpu $tests > "$out/cs/$name.pytest.log" 2>&1
                 echo $? > "$out/cs/$name.rc")
            }
            rest="--ignore=test_transformers.py ."
            sanitize_one memcheck memcheck "--leak-check full --kernel-name kns=rf_" "$rest" &
            sanitize_one memcheck-hf memcheck "--kernel-name kns=rf_" test_transformers.py &
            (for f in $(cd tests && python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu $rest \
                        | grep -o 'test_[a-z_0-9]*\.py' | sort -u); do
                sanitize_one "racecheck-${f%.py}" racecheck "--kernel-name kns=rf_" "$f"
             done) &
            sanitize_one initcheck initcheck "" "$rest" &
            sanitize_one synccheck synccheck "--kernel-name kns=rf_" . &
            wait
            for rc_file in "$out"/cs/*.rc; do
                name=$(basename "$rc_file" .rc) rc=$(cat "$rc_file")
                echo "compute-sanitizer $name: exit $rc; $(tail -1 "$out/cs/$name.pytest.log");" \
                     "$(grep -h "ERROR SUMMARY\|LEAK SUMMARY\|RACECHECK SUMMARY" "$out/cs/$name.log" | tr -s ' =' ' ' | tr '\n' ' ')"
                [ "$rc" -eq 0 ] || status=1
            done
            tar czf "$out/cs.tgz" -C "$out" cs && rm -r "$out/cs" ;;
        hf)
            for attention in paged gather; do
                (cd "$out" && limit python3 -m rocmforge.examples.hf_generate --batch 32 --prompt-len 1024 \
                    --shared-prefix 768 --new 256 --reps 5 --attention "$attention" 2>&1) | tee "$out/hf_$attention.log" | tail -5
            done ;;
        transfer)
            limit python3 benchmarks/bench_transfer.py --gib 1 2>&1 | tee "$out/bench_transfer.log" | tail -5 ;;
        tier)
            limit python3 benchmarks/bench_host_tier.py --gib 1 2>&1 | tee "$out/bench_host_tier.log" | tail -9 ;;
        launch)
            limit python3 benchmarks/bench_launch.py 2>&1 | tee "$out/bench_launch.log" | tail -8 ;;
        *) echo "device_check: unknown step $step"; exit 2 ;;
    esac
done
exit $status
