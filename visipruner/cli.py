"""The `visipruner` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visipruner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, calibrate, evaluate

    evaluate.register(sub)
    bench.register(sub)
    calibrate.register(sub)
    __import__(f"{__package__}.analyze", fromlist=["register"]).register(sub)
    __import__(f"{__package__}.lmms", fromlist=["register"]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
