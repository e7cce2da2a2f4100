#!/usr/bin/env bash
# On the two-GPU machine (nvidia-h200-x2): build, then the runs of the two-GPU
# issue. NVLink multicast stays off (the machine's environment sets it; this
# script sets it again for every process it starts). Logs go to $OUT when set.
#   1. the tensor-parallel cache with a rank on each GPU against one cache with every head;
#   2. a sequence prefilled on GPU 0 and adopted on GPU 1 over NCCL (two processes);
#   3. block transfer bandwidth GPU 0 -> GPU 1 against torch's peer copy of the same bytes.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0
out=${OUT:-$(mktemp -d)}
status=0
python3 -m pip install --no-build-isolation -q . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=index,name --format=csv,noheader
(cd tests && python3 -m pytest -q -p no:cacheprovider -rs \
    "test_tensor_parallel.py::test_two_gpu_ranks_equal_one_cache" \
    "test_transfer.py::test_a_sequence_moves_between_processes_over_torch_distributed" 2>&1) \
    | tee "$out/two_gpu_tests.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 benchmarks/bench_transfer.py --gib 1 2>&1 | tee "$out/bench_transfer.log" | tail -6
exit $status
