"""The `visipruner` command line.

Bad input (a missing or malformed file, an out-of-range argument) is reported in one line,
before any model loads, with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .inputs import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visipruner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, calibrate, evaluate

    evaluate.register(sub)
    bench.register(sub)
    calibrate.register(sub)
    __import__(f"{__package__}.analyze", fromlist=["register"]).register(sub)
    __import__(f"{__package__}.lmms", fromlist=["register"]).register(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="on bad input, show the traceback instead of a one-line error")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        if args.debug:
            raise
        print(f"visipruner {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
