"""GPU K/V kernel benchmarks: write_kv and copy_blocks against copy bandwidth and torch.

Run on a machine with a GPU and torch: python benchmarks/bench_kernels.py
"""

from rocmforge.bench_kernels import main

if __name__ == "__main__":
    main()
