#!/usr/bin/env bash
# Verifies a fresh machine: clones this repository's committed HEAD into a scratch folder, sets up a
# new virtual environment there with the README's set-up (under the lock, scripts/constraints.txt)
# and runs the README's test command. Catches what a kept .venv hides: a dependency released since.
#   bash scripts/check_fresh.sh [--keep] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
if [ "${1:-}" = "--keep" ]; then KEEP=1; shift; fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/visipruner-fresh.XXXXXX")
[ "$KEEP" = 1 ] || trap 'rm -rf "$dir"' EXIT
git clone --quiet . "$dir/visipruner"
# shared/ (transformers' own tests) sits beside the clone in CI; link it when this checkout has it
[ -d ../shared ] && ln -s "$(cd ../shared && pwd)" "$dir/shared"
cd "$dir/visipruner"
echo "fresh clone in $dir/visipruner ($(git rev-parse --short HEAD))"
bash scripts/setup.sh --lmms --vllm
.venv/bin/python -m pytest -q "$@"
