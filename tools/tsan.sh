#!/usr/bin/env bash
# ThreadSanitizer over the thread tests: builds a scratch copy of the tracked
# files with -fsanitize=thread and runs the tests that share managers and
# caches between threads, with libtsan preloaded into the (uninstrumented)
# interpreter so it sees every lock, the GIL's included. Exits non-zero on any
# report.
#
#   tools/tsan.sh [pytest arguments]     # default: the thread tests
#
# Suppressions (tools/tsan.supp) cover only CPython's own code, which is not
# built for TSan; none covers rocmforge.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
export ROCMFORGE_KERNELS=0          # a host-only build: no GPU kernel images (and tests know it)
echo "tsan: building in $work"
ROCMFORGE_SANITIZE=thread python setup.py build_ext --inplace > build.log 2>&1 || { tail -20 build.log; exit 1; }
lib=$(gcc -print-file-name=libtsan.so)
py=$(python -c "import sys; print(sys.executable)")   # the interpreter itself, not a wrapper script
tests=${*:-tests/test_threads.py tests/test_shards.py tests/test_prefix.py::test_threads_share_prefixes_without_losing_blocks tests/test_kvcache.py::test_compact_grow_and_close_are_serialized_with_writes_and_gathers tests/test_host_tier.py::test_threads_share_a_tiered_cache_and_every_row_stays_right tests/test_alloc_faults.py::test_threads_meet_allocation_faults_without_deadlock_or_loss}
export LD_PRELOAD="$lib" TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1 suppressions=$root/tools/tsan.supp log_path=$work/tsan"
set +e
"$py" -m pytest -q -p no:cacheprovider $tests
status=$?
# Whether threads meet inside the core depends on scheduling: run the test
# made for it a few more times (a lock removed from append_batch is caught
# in about one run of three).
if [ $# -eq 0 ]; then
    for round in 1 2 3 4 5; do
        if ! "$py" -m pytest -q -p no:cacheprovider tests/test_threads.py -k meet_inside > "$work/round.log" 2>&1; then
            echo "tsan: round $round of the meeting test failed:"
            tail -40 "$work/round.log"
            status=1
        fi
    done
fi
set -e
unset LD_PRELOAD
reports=$(cat "$work"/tsan.* 2>/dev/null | grep -c "WARNING: ThreadSanitizer" || true)
if [ "$reports" != "0" ]; then
    cat "$work"/tsan.* | head -80
fi
echo "tsan: $reports reports, pytest exit $status"
[ "$reports" = "0" ] && [ "$status" = "0" ]
