"""Prefix-cache hit rates per eviction policy on a Mooncake trace (with Belady's optimum).

Run: python benchmarks/bench_prefix.py --trace ../shared/data/conversation_trace.jsonl
"""

from rocmforge.bench_prefix import main

if __name__ == "__main__":
    main()
