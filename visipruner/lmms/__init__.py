"""lmms-eval integration: the `visipruner` model plugin and the packaged `visipruner_scenes` task.

lmms-eval (0.7.x) finds the model through the entry point ``lmms_eval.models`` (see
``pyproject.toml``), which loads :func:`manifest`. Nothing here imports lmms-eval until lmms-eval
itself asks for the model, so ``visipruner lmms-tasks`` works without the extra installed.

    visipruner lmms-tasks                      # the folder to pass to --include_path
    python -m lmms_eval --model visipruner --model_args method=visipruner \\
        --tasks visipruner_scenes --include_path "$(visipruner lmms-tasks)" --output_path runs/lmms
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "visipruner"
TASKS_DIR = Path(__file__).parent / "tasks"


def manifest():
    """The lmms-eval model manifest (the ``lmms_eval.models`` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="visipruner.lmms.model.VisiPrunerLMM")


def tasks_dir() -> Path:
    """The folder holding the packaged lmms-eval task(s), for ``--include_path``."""
    return TASKS_DIR


def register(subparsers):
    p = subparsers.add_parser("lmms-tasks", help="print the folder of visipruner's lmms-eval tasks (for --include_path)",
                              description="Print the folder to pass to lmms-eval's --include_path. It holds the task "
                                          "visipruner_scenes (the embedded model's scene questions, test split); "
                                          "its data is generated on first use, offline.")
    p.set_defaults(func=lambda args: print(tasks_dir()) or 0)
    return p
