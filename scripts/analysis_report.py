"""Rewrite an analysis folder's summary, verdicts, plots and report from its stored per-example results.

    python scripts/analysis_report.py --analysis docs/results/analysis --data runs/calib/heldout.jsonl \
        --model runs/organism_hf

For when the summary or verdict code changes but the measurements (model, data, measurement
code) do not: `visipruner analyze` runs every forward pass again (hundreds per example); this
reads `analysis.json`'s examples and calls the same `write_report` the command ends with.
``--data`` (the question file the analysis ran on) supplies the heatmaps' images and
``--model`` the tokenizer for token strings; both are optional.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visipruner.analyze import write_report
from visipruner.config import VisiPrunerConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analysis", required=True, help="folder holding analysis.json (rewritten in place)")
    p.add_argument("--data", help="the question file the analysis ran on (heatmap images)")
    p.add_argument("--model", help="a saved Llava directory (its tokenizer decodes token strings)")
    a = p.parse_args()
    stored = json.loads((Path(a.analysis) / "analysis.json").read_text())
    s, results = stored["summary"], stored["examples"]
    heat = sum(bool(r["heat"]) for r in results)
    images = [None] * heat
    if a.data:
        from visipruner.inputs import read_questions

        by_id = {q.id: q for q in read_questions(a.data)}
        images = [by_id[str(r["id"])].load_image() for r in results[:heat]]
    decode = lambda i: f"<{i}>"  # noqa: E731
    if a.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        decode = lambda i: tok.decode([i])  # noqa: E731
    summary = write_report(results, VisiPrunerConfig.from_dict(s["config"]), s["num_layers"], s["window"],
                           s["tolerance_nats"], a.analysis, decode, images)
    for k, v in summary["verdicts"].items():
        print(f"[{k}] {v}")


if __name__ == "__main__":
    main()
