"""`--model DIR`: a saved folder of a supported family loads with its own processor and template."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visipruner.cli import main
from visipruner.models import load_model_dir
from visipruner.testing import tiny_llava_with_processor, tiny_qwen_vl


def _questions(tmp_path, n=3):
    rows = []
    for i in range(n):
        img = tmp_path / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(img)
        rows.append({"image": str(img), "question": "what color is the shape ?", "answer": "red", "id": str(i)})
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def test_llava_folder_loads_and_evaluates(tmp_path, capsys):
    model, proc = tiny_llava_with_processor(0)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    loaded, lproc = load_model_dir(tmp_path / "m")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert loaded.config.text_config._attn_implementation == "sdpa"
    # the folder's chat template and image expansion, through the processor
    from visipruner.evaluate import prepare_batch
    from visipruner.data.questions import load_questions

    qs = load_questions(str(_questions(tmp_path)))
    batch = prepare_batch(lproc, qs[:1])
    n_img = int((batch["input_ids"] == loaded.config.image_token_id).sum())
    assert n_img == (loaded.config.vision_config.image_size // loaded.config.vision_config.patch_size) ** 2
    text = lproc.tokenizer.decode(batch["input_ids"][0]).replace(" ", "")  # word-level: spaces between tokens
    assert text.startswith("<|im_start|>user<image>") and text.endswith("?<|im_end|><|im_start|>assistant")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "q.jsonl"), "--json", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["overall"]["n"] == 3


def test_unsupported_folder_names_the_supported_classes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration"):
        load_model_dir(tmp_path / "lm")


def test_qwen_folder_loads_its_model_class(tmp_path):
    """The model half of a Qwen2-VL folder (its processor needs torchvision in transformers 5.x)."""
    from visipruner.models.hf import model_class_for

    model = tiny_qwen_vl(0, layers=2)
    model.save_pretrained(tmp_path / "q")
    cls, _ = model_class_for(tmp_path / "q")
    assert cls.__name__ == "Qwen2VLForConditionalGeneration"


def test_a_folder_whose_processor_needs_torchvision_is_one_line(tmp_path, capsys):
    """Qwen2-VL's processor has a video processor that needs torchvision: a clear line, exit 2."""
    import importlib.util

    from transformers import Qwen2VLImageProcessor

    from visipruner.testing import tiny_tokenizer

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the processor builds")
    d = tmp_path / "q"
    tiny_qwen_vl(0, layers=2).save_pretrained(d)
    tiny_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]).save_pretrained(d)
    Qwen2VLImageProcessor(patch_size=4, merge_size=2).save_pretrained(d)
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    data = _questions(tmp_path, 1)
    assert main(["eval", "--model", str(d), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "torchvision" in err[-1] and "Traceback" not in "\n".join(err)


def test_llava_next_folder_builds_prompts_with_its_processor(tmp_path):
    """A LLaVA-NeXT folder (any-resolution processor assembled in-process): the processor's image
    expansion matches the model's features, and pruning finds one image span per image."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    import visipruner
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import prepare_batch
    from visipruner.testing import CHATML_TEMPLATE, tiny_llava_next, tiny_tokenizer

    tok = tiny_tokenizer(["<image>"])
    model = tiny_llava_next(0, layers=4)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=model.config.image_grid_pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              chat_template=CHATML_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    loaded, lproc = load_model_dir(tmp_path / "m")
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    qs = load_questions(str(_questions(tmp_path, 2)))
    batch = prepare_batch(lproc, qs[:1])
    n_img = int((batch["input_ids"] == loaded.config.image_token_id).sum())
    assert n_img > 16  # base tile + any-resolution tiles + newline tokens
    with torch.no_grad():
        dense = loaded(**batch).logits  # features and placeholders agree, or transformers raises
        with visipruner.apply(loaded, visipruner.FastVConfig(layer=1, keep_ratio=0.5)) as h:
            loaded(**batch)
    assert dense.shape[1] == batch["input_ids"].shape[1]
    assert h.last_stats.num_images == 1 and h.last_stats.num_visual_tokens == n_img
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "q.jsonl"), "--no-progress"]) == 0


def test_gemma3_prompts_with_its_processor(tmp_path):
    """Gemma3's own processor (assembled in-process): <start_of_image> expands to the image's tokens
    and token_type_ids mark them; the eval path answers, and pruning sees one image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    import visipruner
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import evaluate, prepare_batch
    from visipruner.testing import tiny_gemma3, tiny_tokenizer

    tok = tiny_tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    for name, t in (("boi", "<start_of_image>"), ("eoi", "<end_of_image>"), ("image", "<image_soft_token>")):
        setattr(tok, f"{name}_token", t)
        setattr(tok, f"{name}_token_id", tok.convert_tokens_to_ids(t))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                           chat_template=template, image_seq_length=16)
    model = tiny_gemma3(0, layers=4)
    model.config.image_token_id = tok.image_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    qs = load_questions(str(_questions(tmp_path, 2)))
    batch = prepare_batch(proc, qs[:1])
    is_img = batch["input_ids"] == tok.image_token_id
    assert int(is_img.sum()) == 16 and torch.equal(batch["token_type_ids"].bool(), is_img)
    cfg = visipruner.VisiPrunerConfig(shallow_layers=1, layer_threshold=1.0, tokens_threshold=0.0, exit_threshold=0.0)
    with torch.no_grad(), visipruner.apply(model, cfg) as h:
        model(**batch)
    assert h.last_stats.num_images == 1 and h.last_stats.fusion_layer == 2
    res = evaluate(model, proc, qs, batch_size=1, max_new_tokens=2, progress=False)
    assert res["overall"]["n"] == 2


def test_idefics3_prompts_with_its_processor(tmp_path):
    """Idefics3's own processor (assembled in-process) splits an image into sub-images plus the global
    one: pruning sees one span per sub-image, and the eval path answers."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    import visipruner
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import evaluate, prepare_batch
    from visipruner.testing import tiny_idefics3, tiny_tokenizer

    grid_tokens = [f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5)]
    tok = tiny_tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *grid_tokens])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ip = Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16, chat_template=template)
    model = tiny_idefics3(0, layers=4)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    img = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((40, 90, 3)) * 255).astype("uint8")).save(img)
    (tmp_path / "w.jsonl").write_text(json.dumps({"image": str(img), "question": "what color ?", "answer": "red"}) + "\n")
    qs = load_questions(str(tmp_path / "w.jsonl"))
    batch = prepare_batch(proc, qs)
    n_img = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_img == 3 * 16  # a 1 x 2 grid of sub-images and the global image
    with torch.no_grad(), visipruner.apply(model, visipruner.FastVConfig(layer=1, keep_ratio=0.5)) as h:
        model(**batch)
    assert h.last_stats.num_images == 3 and h.last_stats.visual_tokens_per_layer[-1] == n_img // 2
    res = evaluate(model, proc, qs, batch_size=1, max_new_tokens=2, progress=False)
    assert res["overall"]["n"] == 1


def test_bench_calibrate_analyze_take_a_llava_next_folder(tmp_path):
    """The other commands on a folder of another family, through the CLI as a user types it."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from visipruner.testing import CHATML_TEMPLATE, tiny_llava_next, tiny_tokenizer

    tok = tiny_tokenizer(["<image>"])
    model = tiny_llava_next(0, layers=4)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=model.config.image_grid_pinpoints)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                       chat_template=CHATML_TEMPLATE, image_token="<image>",
                       num_additional_image_tokens=1).save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    data, m = str(_questions(tmp_path, 4)), str(tmp_path / "m")
    assert main(["bench", "--model", m, "--data", data, "--methods", "visipruner,fastv", "--timing-prompts", "1",
                 "--repeats", "1", "--decode-steps", "1", "--batch-size", "2", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {r["method"] for r in rows} >= {"unpruned", "visipruner", "fastv"}
    assert main(["calibrate", "--model", m, "--data", data, "--target", "agreement=0.5", "--rerun-limit", "4",
                 "--out", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.json").exists()
    assert main(["analyze", "--model", m, "--data", data, "--limit", "2", "--out", str(tmp_path / "an")]) == 0
    assert (tmp_path / "an" / "analysis.json").exists()


def test_eval_with_a_pruning_config_answers_like_batch_one(tmp_path, capsys):
    """`eval --config`: the pruned model's answers and per-question pruning figures at --batch-size 3
    equal those at batch size 1 (prompts of different lengths), and pruning did happen."""
    model, proc = tiny_llava_with_processor(0, layers=6)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    rows = [json.loads(line) for line in _questions(tmp_path, n=4).read_text().splitlines()]
    for r, q in zip(rows, ["what color is the shape ?", "how many ?", "is there a red circle in the image ?", "yes ?"]):
        r["question"] = q
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = json.dumps({"method": "visipruner", "shallow_layers": 2, "layer_threshold": 1.0, "tokens_threshold": 1e9})
    out = {}
    for b in (1, 3):
        path = tmp_path / f"eval{b}.json"
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--config", cfg,
                     "--batch-size", str(b), "--json", str(path), "--no-progress"]) == 0
        out[b] = json.loads(path.read_text())
    drop = ("padding_flops",)  # the padding a batch adds is counted apart
    one, three = ([{k: v for k, v in r.items() if k not in drop} for r in out[b]["predictions"]] for b in (1, 3))
    assert one == three and len(one) == 4
    assert all(r["pruning_applied"] and r["prefill_flops_ratio"] < 1 for r in one)
    assert out[3]["mean_prefill_flops_ratio"] == pytest.approx(out[1]["mean_prefill_flops_ratio"])
    assert out[1]["method"]["method"] == "visipruner"
    assert "visipruner: prefill FLOPs" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--config", "nope.json"]) == 2
