"""The `rocmforge` command: `rocmforge bench ...` and `rocmforge replay ...`."""

import argparse
import sys

COMMANDS = {
    "bench": "allocator benchmarks (table, then one JSON line)",
    "replay": "replay a request trace through the engine (report, then one JSON line)",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:            # the command parses (and documents) its own options
        if argv[0] == "bench":
            from rocmforge.bench_allocator import main as command
        else:
            from rocmforge.replay import main as command
        return command(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="rocmforge", description="rocmforge: a paged KV-cache manager",
                                     epilog="`rocmforge COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text)
    parser.parse_args(argv)                     # prints help, or an error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
