"""Pick a config from a calibration front: the lowest-risk point in a predicted-FLOPs window.

    python scripts/front_config.py docs/results/calibrate.json --flops 0.46 0.50 \
        --out docs/results/cfg_front050.json

Reads the ``front`` (per threshold family) that ``visipruner calibrate --json`` writes, keeps the
points whose predicted prefill FLOPs ratio lies in ``[lo, hi]``, and writes the config of the one
with the lowest risk (the search's own ranking). Nothing is rerun: the config is as predicted.
"""

from __future__ import annotations

import argparse
import json
import sys


def pick(calibration: dict, lo: float, hi: float) -> dict:
    points = [p for family in calibration["front"].values() for p in family
              if lo <= p["predicted_flops_ratio"] <= hi]
    if not points:
        raise ValueError(f"no point of the front has predicted FLOPs in [{lo}, {hi}]")
    return min(points, key=lambda p: p["risk"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("calibration", help="JSON written by visipruner calibrate --json")
    p.add_argument("--flops", nargs=2, type=float, metavar=("LO", "HI"), required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with open(a.calibration) as f:
        cal = json.load(f)
    try:
        point = pick(cal, *a.flops)
    except (ValueError, KeyError) as e:
        print(f"front_config: {a.calibration}: {e}", file=sys.stderr)
        return 2
    with open(a.out, "w") as f:
        json.dump(point["config"], f, indent=2)
    print(f"{a.out}: predicted FLOPs {point['predicted_flops_ratio']:.3f}, risk {point['risk']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
