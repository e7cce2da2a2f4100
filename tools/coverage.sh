#!/usr/bin/env bash
# Line coverage of the default test suite: the Python modules through coverage.py,
# the Cython modules through Cython's coverage plugin over a linetrace build.
# Builds in a scratch copy of the tracked files, so the normal build is untouched.
#
#   tools/coverage.sh          # prints the per-file report and the two totals
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
python -m pip install -q coverage
echo "coverage: building with linetrace in $work"
ROCMFORGE_KERNELS=0 ROCMFORGE_LINETRACE=1 python setup.py build_ext --inplace -j 2 > build.log 2>&1 || { tail -20 build.log; exit 1; }
cat > .coveragerc <<'RC'
[run]
plugins = Cython.Coverage
source = rocmforge
[report]
omit = rocmforge/_bench_capi.pyx
RC
python -m coverage run -m pytest -q -p no:cacheprovider tests
python -m coverage report
python - <<'PY'
import coverage
cov = coverage.Coverage()
cov.load()
data = cov.get_data()
totals = {"python": [0, 0], "cython": [0, 0]}
for path in data.measured_files():
    kind = "cython" if path.endswith(".pyx") else "python" if path.endswith(".py") else None
    if kind is None or path.endswith("_bench_capi.pyx"):
        continue
    _, statements, _, missing, _ = cov.analysis2(path)
    totals[kind][0] += len(statements) - len(missing)
    totals[kind][1] += len(statements)
for kind, (hit, total) in totals.items():
    print(f"coverage: {kind} modules {100 * hit / max(total, 1):.1f}% of {total} lines")
PY
