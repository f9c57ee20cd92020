"""Fails when an installed package's version differs from the test environment's lock.

Run by scripts/setup.sh after installing: packages the lock names but that are not installed (an
extra that was not asked for) are fine; a different version means the set-up did not take the lock.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

lock = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("constraints.txt"))
wrong = []
for line in lock.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line, maxsplit=1)
    try:
        have = version(name)
    except PackageNotFoundError:
        continue
    if have.split("+", 1)[0] != want.split("+", 1)[0]:
        wrong.append(f"{name} {have} (lock: {want})")
if wrong:
    sys.exit(f"{lock}: installed versions differ from the lock: " + ", ".join(wrong)
             + ". Run scripts/setup.sh again, or update the lock on purpose (README: Pinned test environment).")
