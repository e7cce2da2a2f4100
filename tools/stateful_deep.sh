#!/usr/bin/env bash
# The stateful tests (core against the reference model, plain and under
# allocation faults) at the "deep" budget: EXAMPLES examples (default 3200) of
# up to 100 steps per machine, which runs well over 200,000 operations per
# machine. CI runs a short slice of it.
#
#   tools/stateful_deep.sh [EXAMPLES] [SEED]
#
# The seed (default: random) is printed first; run again with it to reproduce.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-3200}
seed=${2:-$(( (RANDOM << 15) | RANDOM ))}
echo "stateful_deep: $examples examples per machine, seed $seed"
ROCMFORGE_DEEP_EXAMPLES=$examples exec pytest -q -p no:cacheprovider tests/test_stateful.py tests/test_alloc_faults.py -k runTest \
    --hypothesis-profile=deep --hypothesis-seed="$seed"
