"""Allocator benchmarks; the same as `rocmforge bench`. Run: python benchmarks/bench_allocator.py --help"""

from rocmforge.bench_allocator import main

if __name__ == "__main__":
    main()
