#!/usr/bin/env bash
# On a machine with a GPU (the device machine): build with the GPU compilers,
# run the whole test suite there (GPU tests included; a summary line says how
# many ran), then the K/V kernel benchmark. Logs go to $OUT when it is set.
#
#   tools/device_check.sh [tests] [bench]      # both when no step is named
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
steps=${*:-tests bench}
status=0
echo "device_check: ${ROCMFORGE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
python3 -m pip install --no-build-isolation -q . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
for step in $steps; do
    case $step in
        tests)
            # From tests/, so the source tree does not shadow the installed package.
            (cd tests && python3 -m pytest -q -p no:cacheprovider . 2>&1) | tee "$out/tests.log" | tail -15
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        bench)
            (cd "$out" && python3 -m rocmforge.bench_kernels 2>&1) | tee "$out/bench_kernels.log" | tail -12 ;;
        *) echo "device_check: unknown step $step"; exit 2 ;;
    esac
done
exit $status
