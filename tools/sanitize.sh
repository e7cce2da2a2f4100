#!/usr/bin/env bash
# AddressSanitizer and UndefinedBehaviorSanitizer over the whole test suite:
# builds a scratch copy of the tracked files with ROCMFORGE_SANITIZE=address,undefined
# (setup.py adds -fsanitize, -g, -O1) and runs pytest with libasan preloaded into
# the interpreter, Python's allocator switched to malloc so that ASan sees every
# object, and every report written to a log. Exits non-zero on any report.
#
#   tools/sanitize.sh [pytest arguments]     # default: the whole suite
#
# Leak checking is off: CPython keeps interned objects and module state until
# the process dies, which LeakSanitizer would report as leaks on every run.
# Leaks of ours are caught by the tests instead (check_invariants, the
# allocation counters, the DeviceBuffer census of tests/test_leaks.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
work=$scratch/rocmforge                 # beside a link to ../shared, which some tests read
mkdir "$work"
[ -d "$root/../shared" ] && ln -s "$root/../shared" "$scratch/shared"
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
export ROCMFORGE_KERNELS=0          # a host-only build: no GPU kernel images (and tests know it)
echo "sanitize: building in $work"
ROCMFORGE_SANITIZE=address,undefined python setup.py build_ext --inplace > build.log 2>&1 \
    || { tail -20 build.log; exit 1; }
lib=$(gcc -print-file-name=libasan.so)
# libstdc++ is preloaded too, so that ASan's __cxa_throw interceptor finds the
# real one at start-up; C++ extensions loaded later (matplotlib's ft2font) throw
# through it, and ASan aborts with "CHECK failed: real___cxa_throw" otherwise.
cxx=$(g++ -print-file-name=libstdc++.so.6)
py=$(python -c "import sys; print(sys.executable)")   # the interpreter itself, not a wrapper script
export LD_PRELOAD="$lib $cxx" PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0 halt_on_error=0 log_path=$work/asan"
export UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=0 log_path=$work/asan"
set +e
"$py" -m pytest -q -p no:cacheprovider ${*:-tests}
status=$?
set -e
unset LD_PRELOAD
reports=$(cat "$work"/asan.* 2>/dev/null | grep -cE "ERROR: AddressSanitizer|AddressSanitizer: CHECK failed|runtime error:" || true)
if [ "$reports" != "0" ]; then
    cat "$work"/asan.* | head -120
fi
echo "sanitize: $reports reports, pytest exit $status"
[ "$reports" = "0" ] && [ "$status" = "0" ]
