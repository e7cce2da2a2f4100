"""Prefix-aware routing against round-robin across engine instances (host backend).

    python benchmarks/bench_router.py [--trace FILE] [--limit N] [--instances 2] [--blocks 16384]
"""

import sys

from rocmforge.bench_router import main

if __name__ == "__main__":
    sys.exit(main())
