"""The `rocmforge` command."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rocmforge", description="rocmforge: a paged KV-cache manager")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="allocator benchmarks (table, then one JSON line)", add_help=False)
    sub.add_parser("replay", help="replay a request trace through the engine (report, then one JSON line)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from rocmforge.bench_allocator import main as bench_main
        bench_main(rest)
    elif args.command == "replay":
        from rocmforge.replay import main as replay_main
        return replay_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
