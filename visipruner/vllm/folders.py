"""Model folders vLLM loads: a Hugging Face model saved with the weight names vLLM's loader expects,
optionally carrying a pruning config (``settings.py``)."""

from __future__ import annotations

from pathlib import Path


def save_for_vllm(model, processor, path, *, config=None, schedule=None, record=None) -> Path:
    """``model.save_pretrained`` + ``processor.save_pretrained`` into ``path``, then a CLIP or SigLIP tower's
    weights renamed ``...vision_tower.vision_model.*`` (transformers 5 saves ``...vision_tower.*``; vLLM's
    loader, like the published llava-hf checkpoints, has the ``vision_model`` level). ``config`` (a method
    config), ``schedule`` (a VisiPruner ``Schedule``) and ``record`` (a JSONL path) go into ``config.json``."""
    import json

    from safetensors.torch import load_file, save_file

    from .settings import CONFIG_KEY, RECORD_KEY, SCHEDULE_KEY

    path = Path(path)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    vision = getattr(getattr(model.config, "vision_config", None), "model_type", None)
    # CLIP / SigLIP towers only (LLaVA's family): InternVL's tower has no vision_model level
    for f in path.glob("*.safetensors") if vision in ("clip_vision_model", "siglip_vision_model") else ():
        tensors = load_file(f)
        renamed = {}
        for k, v in tensors.items():
            head, sep, tail = k.partition("vision_tower.")
            if sep and not tail.startswith("vision_model."):
                k = f"{head}vision_tower.vision_model.{tail}"
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in ((CONFIG_KEY, None if config is None else config.to_dict()),
                       (SCHEDULE_KEY, None if schedule is None else {
                           "fusion_layer": schedule.fusion_layer, "critical_tokens": list(schedule.critical_tokens),
                           "exit_layer": schedule.exit_layer}),
                       (RECORD_KEY, None if record is None else str(record))):
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return path
