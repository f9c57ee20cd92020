"""Per-patch probe of the embedded model's vision tower: what do its visual tokens encode?

    python -m visipruner.models.probe [--weights DIR] [--heads FILE] [--images 64]

Runs the vision tower + projector on generated dev-split scenes and scores the per-patch
heads used in training (``vision_heads.safetensors``, shipped next to the weights): colour,
shape, size and word read from the projector output against the LM's word embeddings, and
linear probes on the ViT features. Accuracy is over foreground patches (label > 0), the ones a
question needs. The LM cannot answer what these do not encode, so this is the first thing to
check when accuracy is low.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..data import scenes
from . import organism

HEADS_FILE = "vision_heads.safetensors"


@torch.no_grad()
def probe(model, processor, heads_path: str | Path, images: int = 64, seed: int = 0, batch: int = 16) -> dict:
    """Foreground-patch accuracy per head: ``{head: {"accuracy": a, "patches": n}}``."""
    from .train import VisionHeads, _image_tensor, scene_patch_labels, vision_features

    heads = VisionHeads(processor.tokenizer, model.get_input_embeddings().weight.detach().float(),
                        model.config.vision_config.hidden_size)
    heads.load_state_dict(load_file(str(heads_path)), strict=False)
    heads.eval()
    dtype = next(model.model.vision_tower.parameters()).dtype
    hits: dict[str, list[int]] = {}
    for start in range(0, images, batch):
        scs = [scenes.random_scene(seed, "dev", i) for i in range(start, min(images, start + batch))]
        labs = [scene_patch_labels(s) for s in scs]
        feat, proj = vision_features(model, _image_tensor(processor, [s.render() for s in scs]).to(dtype))
        for g, logits in heads(proj.float(), feat.float()).items():
            t = torch.from_numpy(np.stack([x[g.replace("lin_", "")] for x in labs]))
            fg = t > 0
            h = hits.setdefault(g, [0, 0])
            h[0] += int((logits.argmax(-1)[fg] == t[fg]).sum())
            h[1] += int(fg.sum())
    return {g: {"accuracy": a / n if n else float("nan"), "patches": n} for g, (a, n) in hits.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="organism weights dir (default: the shipped ones)")
    p.add_argument("--heads", help=f"per-patch heads (default: {HEADS_FILE} in the weights dir or the shipped one)")
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args(argv)
    model, processor = organism.load_organism(weights_dir=args.weights) if args.weights else organism.load_organism()
    model.eval()
    heads = args.heads
    if heads is None:
        for d in filter(None, (args.weights, organism.WEIGHTS_DIR)):
            if (Path(d) / HEADS_FILE).exists():
                heads = Path(d) / HEADS_FILE
                break
    if heads is None:
        print(f"no {HEADS_FILE} found; pass --heads", file=sys.stderr)
        return 2
    res = probe(model, processor, heads, args.images)
    for g, r in res.items():
        print(f"{g:<10} {r['accuracy']:.3f}  ({r['patches']} foreground patches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
