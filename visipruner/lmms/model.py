"""The lmms-eval model `visipruner`: a supported Llava with any pruning method applied.

    python -m lmms_eval --model visipruner \\
        --model_args pretrained=DIR,method=visipruner,config=CFG.json,batch_size=1,dtype=float32,device=cpu \\
        --tasks visipruner_scenes --include_path "$(visipruner lmms-tasks)" --output_path runs/lmms

``--model_args`` (all optional):

- ``pretrained``: a saved Llava directory (``save_pretrained`` output); default: the embedded model.
- ``method``: ``unpruned`` or a method name (``visipruner``, ``fastv``, ``pdrop``, ``vtw``, ``dart``,
  ``visionzip``, ``sparsevlm``, ``random``, ``attention``); default ``visipruner``.
- ``config``: a saved method config (JSON, ``cfg.to_json()``); default: ``recommended_config(model)``
  for visipruner, the published default for the peers. ``method`` may be left out with it.
- ``batch_size``: prompts per ``generate`` call, for every method: requests with the same
  generation settings are sorted by length, left-padded into batches and answered in one call,
  each row pruned as if alone (the runtime's ``handle.batch_stats`` gives each row's statistics),
  and the answers come back in the requests' order. Where the runtime refuses to prune a batch
  (a ``ValueError``: some methods or families), the plugin warns once and answers one prompt at
  a time. ``--batch_size`` on the command line sets it too (``--model_args`` wins).
- ``dtype``: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's; float32
  for the embedded model).
- ``device``: default ``cuda`` when available, else ``cpu``; under ``accelerate launch`` each
  process takes its own (``cuda:<local rank>``, or ``cpu``).

Prompts are built as ``visipruner eval`` builds them (the processor's chat template, images
first) and decoded greedily unless the task asks to sample. Per prompt the plugin records the
prefill FLOPs ratio, visual tokens per layer, the time to the first generated token (prefill
latency: vision encoder and the prompt's forward; for a prompt answered in a batch of several,
``batch_prefill_ms`` holds the batch's instead) and the method's fusion/exit layers. When the
evaluation ends (lmms-eval's ``clean()``, reached by every rank), the records are gathered to
rank 0, which writes ``visipruner_stats.json`` beside lmms-eval's results (``--output_path``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm.auto import tqdm

from .. import CONFIGS, recommended_config
from ..bench import _gen_kwargs, default_configs
from ..evaluate import build_prompt, collate_prompts, generate_rows, to_model
from ..inputs import method_config as read_method_config
from ..runtime import apply

STATS_FILE = "visipruner_stats.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
DEFAULT_MAX_NEW_TOKENS = 256
METHODS = ("unpruned",) + tuple(CONFIGS)

# Per-prompt statistics of this process, by the document's "id" field, for tasks whose
# process_results log them per sample (visipruner_scenes does).
_STATS_BY_DOC_ID: dict[str, dict] = {}


def sample_stats(doc) -> dict | None:
    """This process's statistics for the prompt built from ``doc`` (by its ``id``), if it ran here."""
    key = doc.get("id") if hasattr(doc, "get") else None
    return _STATS_BY_DOC_ID.get(str(key)) if key is not None else None


def method_config(model, method: str | None, config: str | None):
    """The method config to apply (None: unpruned) from the ``method`` / ``config`` model args."""
    if config:
        cfg = read_method_config("config", config)
        if method not in (None, "", cfg.method):
            raise ValueError(f"method={method} but config={config} holds a {cfg.method!r} config")
        return cfg
    method = method or "visipruner"
    if method not in METHODS:
        raise ValueError(f"unknown method={method}; choose from {', '.join(METHODS)}")
    if method == "unpruned":
        return None
    if method in ("visipruner", "attention"):  # the attention baseline takes VisiPruner's thresholds
        return default_configs(recommended_config(model))[method]
    return CONFIGS[method]()  # the published default


def _output_path_from_argv() -> str | None:
    """lmms-eval's --output_path, read from this process's command line (the model is not told it)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--output_path", default=None)
    return p.parse_known_args(sys.argv[1:])[0].output_path


class _FirstTokenTimer:
    """A generate() streamer noting when the prompt goes in and when the first new token comes out."""

    def __init__(self):
        self.times = []

    def put(self, value):
        if len(self.times) < 2:
            self.times.append(time.perf_counter())

    def end(self):
        pass

    @property
    def seconds(self) -> float | None:
        return self.times[1] - self.times[0] if len(self.times) == 2 else None


class VisiPrunerLMM(lmms):
    """lmms-eval model running a Llava with a visipruner method applied (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str | None = None, config: str | None = None,
                 batch_size: int | str = 1, dtype: str = "float32", device: str | None = None,
                 output_path: str | None = None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)}; the visipruner model takes pretrained, method, "
                             "config, batch_size, dtype, device, output_path")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the visipruner model; give a number")
        self.batch_size_per_process = int(batch_size)
        if self.batch_size_per_process < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype}; choose from {', '.join(DTYPES)}")

        self.accelerator = Accelerator()
        # the process group launched by `accelerate launch` (on CPU accelerate may report a single
        # process while torch.distributed holds the gloo group; lmms-eval splits by the latter)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._rank = torch.distributed.get_rank() if dist else self.accelerator.process_index
        self._world_size = torch.distributed.get_world_size() if dist else self.accelerator.num_processes
        cuda = torch.cuda.is_available()
        if self._world_size > 1 and cuda and device in (None, "", "cuda"):
            local = int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))
            self._device = torch.device(f"cuda:{local}")  # one GPU per process
        else:
            self._device = torch.device(device or ("cuda" if cuda else "cpu"))

        torch_dtype = DTYPES[dtype]
        if pretrained in (None, "", "embedded"):
            from ..models import load_organism

            model, processor = load_organism(device=self._device, dtype=torch_dtype or torch.float32)
        else:
            from ..models.organism import load_model_dir

            model, processor = load_model_dir(pretrained, device=self._device, dtype=torch_dtype or "auto")
        self._model, self.processor = model.eval(), processor
        self.pretrained = pretrained or ""
        self.method_config = method_config(model, method, config)
        self.method = self.method_config.method if self.method_config is not None else "unpruned"
        self.handle = apply(model, self.method_config) if self.method_config is not None else None
        self.output_path = output_path or _output_path_from_argv()
        self.records: list[dict] = []
        self.batch_refusal: str | None = None  # why the runtime refused a batch (then: one prompt at a time)
        if self.rank == 0:
            logger.info(f"visipruner: method {self.method}, config "
                        f"{self.method_config.to_json() if self.method_config is not None else None}, {self._world_size} process(es)")

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_process

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """As lmms-eval's, except that ``--model_args`` win over the CLI's defaults (batch_size, device)."""
        from lmms_eval.utils import simple_parse_args_string

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(simple_parse_args_string(arg_string))
        return cls(**args)

    # ---------------------------------------------------------------------------- inputs
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(visuals) -> list:
        from PIL import Image

        out = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if isinstance(v, (list, tuple)):
                out.extend(VisiPrunerLMM._images(v))
            elif isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
            elif v is not None:
                raise ValueError(f"the visipruner model takes images only; the task gave a {type(v).__name__}")
        return out

    def _encode(self, images, text) -> dict:
        prompt = build_prompt(self.processor, text, num_images=len(images))
        return to_model(self.model, self.processor(images=images or None, text=[prompt], return_tensors="pt"))

    def _generation(self, gen_kwargs: dict | None) -> tuple[dict, list[str]]:
        """HF generate() kwargs and stop strings from a task's generation_kwargs."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        out = _gen_kwargs(self.processor, int(kw.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))
        temperature = float(kw.pop("temperature", 0) or 0)
        top_p = kw.pop("top_p", None)
        num_beams = int(kw.pop("num_beams", 1) or 1)
        if kw.pop("do_sample", False) or temperature > 0:
            out.update(do_sample=True, temperature=temperature or 1.0)
            if top_p is not None:
                out["top_p"] = float(top_p)
        if num_beams > 1:
            out["num_beams"] = num_beams
        if kw:
            logger.debug(f"visipruner: ignoring generation kwargs {sorted(kw)}")
        return out, until

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for u in until:
            text = text.split(u, 1)[0]
        return text.strip()

    # ---------------------------------------------------------------------------- statistics
    def _record(self, req: Instance, doc, inputs: dict, s, prefill_s: float | None, rows: int = 1) -> None:
        """One request's record: ``s`` is its row's PruneStats (None: unpruned), ``prefill_s`` the time to
        the first generated token of the ``generate`` call that answered it together with ``rows - 1`` others."""
        if req.metadata.get("__padding_only__"):  # lmms-eval's filler to even out ranks
            return
        layers = self.model.config.get_text_config().num_hidden_layers
        n_vis = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        rec = {"task": req.task_name, "doc_id": req.doc_id, "request_type": req.request_type,
               "prompt_tokens": int(inputs["input_ids"].shape[1]), "visual_tokens": n_vis}
        if s is not None and s.pruning_applied:
            rec.update(prefill_flops_ratio=s.prefill_flops_ratio, avg_visual_tokens=s.avg_visual_tokens,
                       visual_tokens_per_layer=list(s.visual_tokens_per_layer), fusion_layer=s.fusion_layer,
                       exit_layer=s.exit_layer)
        else:
            rec.update(prefill_flops_ratio=1.0, avg_visual_tokens=float(n_vis), visual_tokens_per_layer=[n_vis] * layers)
        ms = prefill_s * 1e3 if prefill_s is not None else None
        rec["prefill_ms"] = ms if rows == 1 else None  # a batch's latency is not one prompt's
        if rows > 1:
            rec.update(batch_rows=rows, batch_prefill_ms=ms)
        self.records.append(rec)
        if hasattr(doc, "get") and doc.get("id") is not None:
            _STATS_BY_DOC_ID[str(doc["id"])] = rec

    def summary(self, records: list[dict]) -> dict:
        n = len(records)
        lat = [r["prefill_ms"] for r in records if r["prefill_ms"] is not None]
        per_layer = [sum(col) / n for col in zip(*(r["visual_tokens_per_layer"] for r in records))] if n else []
        return {
            "method": self.method,
            "config": self.method_config.to_dict() if self.method_config is not None else None,
            "model": self.pretrained or "embedded",
            "processes": self._world_size,
            "num_prompts": n,
            "mean_prefill_flops_ratio": sum(r["prefill_flops_ratio"] for r in records) / n if n else None,
            "mean_visual_tokens_per_layer": sum(r["avg_visual_tokens"] for r in records) / n if n else None,
            "mean_visual_tokens_by_layer": per_layer,
            "mean_prefill_ms": sum(lat) / len(lat) if lat else None,
            "prefill_ms_prompts": len(lat),
            "samples": records,
        }

    def stats_path(self) -> Path | None:
        """Where lmms-eval writes this run's results (``--output_path``, then the sanitised ``pretrained``)."""
        if not self.output_path:
            return None
        from lmms_eval.utils import sanitize_model_name

        return Path(self.output_path) / sanitize_model_name(self.pretrained) / STATS_FILE

    def clean(self):
        """Gather every rank's records to rank 0 and write the statistics; then lmms-eval's clean-up."""
        records = self.records
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self.world_size if self.rank == 0 else None
            torch.distributed.gather_object(records, gathered, dst=0)
            records = [r for part in gathered for r in part] if self.rank == 0 else []
        if self.rank == 0:
            records = sorted(records, key=lambda r: (r["task"], r["request_type"], r["doc_id"]))
            summary = self.summary(records)
            path = self.stats_path()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(summary, indent=1))
                logger.info(f"visipruner: wrote {path}")
            logger.info("visipruner: {} prompts, mean prefill FLOPs ratio {}, mean visual tokens per layer {}",
                        summary["num_prompts"], summary["mean_prefill_flops_ratio"],
                        summary["mean_visual_tokens_per_layer"])
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        super().clean()

    # ---------------------------------------------------------------------------- requests
    def _bar(self, n, desc):
        return tqdm(total=n, desc=desc, disable=self.rank != 0, file=sys.stderr)

    def _prompt(self, req: Instance, doc, visuals, text) -> tuple[Instance, object, dict]:
        return req, doc, self._encode(self._images(visuals), text)

    @torch.no_grad()
    def _generate(self, prompts: list[tuple[Instance, object, dict]], gen_kwargs) -> list[str]:
        """Answers to prompts sharing ``gen_kwargs``, in one left-padded ``generate`` call; records each."""
        kw, until = self._generation(gen_kwargs)
        ins = [inputs for _, _, inputs in prompts]
        batch = collate_prompts(ins, self.tokenizer.pad_token_id)
        timer = _FirstTokenTimer() if kw.get("num_beams", 1) == 1 else None
        if timer is not None:
            kw["streamer"] = timer
        answers = generate_rows(self.model, self.processor, batch, kw)
        if self.handle is not None:
            stats = self.handle.batch_stats
            step = len(stats) // len(prompts)  # beam search expands each row into num_beams rows
            if step < 1 or len(stats) != step * len(prompts):
                raise RuntimeError(f"the runtime gave {len(stats)} row statistics for a batch of {len(prompts)}")
            stats = stats[::step]
        else:
            stats = [None] * len(prompts)
        seconds = timer.seconds if timer is not None else None
        for (req, doc, inputs), s in zip(prompts, stats):
            self._record(req, doc, inputs, s, seconds, rows=len(prompts))
        return [self._cut(a, until) for a in answers]

    def _generate_batch(self, prompts: list[tuple[Instance, object, dict]], gen_kwargs) -> list[str]:
        """As :meth:`_generate`; where the runtime refuses the batch (ValueError), warns once and
        answers this and every later batch one prompt at a time."""
        if len(prompts) > 1 and self.batch_refusal is None:
            try:
                return self._generate(prompts, gen_kwargs)
            except ValueError as e:
                self.batch_refusal = str(e)
                logger.warning(f"visipruner: {self.method} cannot run a batch here ({e}); answering one prompt "
                               "at a time from now on")
        return [a for p in prompts for a in self._generate([p], gen_kwargs)]

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Request indices in batches of at most ``batch_size``: requests with the same generation
        settings together (in order of first appearance), longest context first within them."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw, until = self._generation(req.args[1])
            groups.setdefault((tuple(sorted(kw.items())), tuple(until)), []).append(i)
        n = self.batch_size
        out = []
        for idx in groups.values():
            if n > 1:
                lengths = {i: len(self.tokenizer(requests[i].args[0], add_special_tokens=False)["input_ids"]) for i in idx}
                idx = sorted(idx, key=lambda i: -lengths[i])  # stable: ties keep the requests' order
            out.extend(idx[k:k + n] for k in range(0, len(idx), n))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "visipruner generate")
        for idx in self._batches(requests):
            prompts = []
            for i in idx:
                ctx, _, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self._doc(task, split, doc_id)
                prompts.append(self._prompt(requests[i], doc, doc_to_visual(doc), ctx))
            for i, answer in zip(idx, self._generate_batch(prompts, requests[idx[0]].args[1])):
                out[i] = answer
            bar.update(len(idx))
        bar.close()
        return out

    @torch.no_grad()
    def continuation_logprob(self, inputs: dict, continuation_ids: list[int]) -> tuple[float, bool, float]:
        """Sum of log p(continuation | prompt), whether greedy decoding would produce it, prefill seconds.

        The prompt is prefilled (the pruning method decides there, as in generation), then the
        continuation is fed one token at a time through the cache, as generate() would.
        """
        t = time.perf_counter()
        out = self.model(**inputs, use_cache=True)
        prefill_s = time.perf_counter() - t
        if not continuation_ids:
            return 0.0, True, prefill_s
        cache, logits = out.past_key_values, out.logits[0, -1]
        total, greedy = 0.0, True
        for k, tok in enumerate(continuation_ids):
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += float(logp[tok])
            greedy &= int(logp.argmax()) == tok
            if k + 1 < len(continuation_ids):
                step = torch.tensor([[tok]], device=self.device)
                out = self.model(input_ids=step, past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[0, -1]
        return total, bool(greedy), prefill_s

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        bar = self._bar(len(requests), "visipruner loglikelihood")
        for req in requests:
            ctx, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            inputs = self._encode(self._images(doc_to_visual(doc)), ctx)
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            logp, greedy, prefill_s = self.continuation_logprob(inputs, ids)
            out.append((logp, greedy))
            self._record(req, doc, inputs, self.handle.last_stats if self.handle is not None else None, prefill_s)
            bar.update(1)
        bar.close()
        return out

    @torch.no_grad()
    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each round is one prompt; the task's doc_to_text gives the next round's images and text.

        Round 0 uses the request's context; then ``doc_to_text(doc, previous_output=...,
        round_idx=k, previous_round_info=...)`` returns ``(visuals, context, stop, outputs, info)``
        (lmms-eval's multi-round protocol) until ``stop`` is true.
        """
        out = []
        bar = self._bar(len(requests), "visipruner multi-round")
        for req in requests:
            ctx, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals, outputs, info, k = doc_to_visual(doc), [], None, 0
            while True:
                if k > 0:
                    visuals, ctx, stop, outputs, info = doc_to_text(doc, previous_output=list(outputs), round_idx=k,
                                                                    previous_round_info=info)
                    outputs = list(outputs)
                    if stop:
                        break
                outputs += self._generate([self._prompt(req, doc, visuals, ctx)], gen_kwargs)
                k += 1
            out.append(outputs)
            bar.update(1)
        bar.close()
        return out
