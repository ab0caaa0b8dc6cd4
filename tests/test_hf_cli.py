"""`megavictor convert` and `megavictor eval --hf` on real checkpoints.

Tiny random HF Llama + CLIP (the `sources` fixture) -> `convert from-hf` -> loaded by the trainer
into a tp=2 x pp=2 layout and saved again (`train.max_steps=0`) -> `convert to-hf`: every tensor megavictor keeps
comes back bit for bit, and the megatron model and the export agree (logits, KV-cached greedy generation). A
short-trained digits demo checkpoint gives the same accuracy JSON from `eval --checkpoint` and `eval --hf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from megavictor.data.collate import Sample, collate_rows, expand_sample
from megavictor.hf.convert import read_safetensors
from megavictor.model.drop_plan import build_drop_plan
from tests.hf_fixtures import PROMPTS, assert_keeps_source_tensors, generate, generated_tokens, image, to_sample
from tests.runs import STAGE2, megavictor, run, train_cmd

GREEDY_STEPS = 16


@pytest.fixture(scope="module")
def resharded(sources: dict[str, Path], digits_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """HF -> megatron checkpoint -> tp=2 x pp=2 checkpoint written by the trainer -> HF dir."""
    from megavictor.checkpoint import read_config

    root = tmp_path_factory.mktemp("hf_cli")
    imported = root / "imported"
    megavictor("convert", "from-hf", "--llm", sources["llm"], "--vision", sources["clip"], "--out", imported)
    # The trainer's recipe: the shapes the import fixed; the data and run settings of the tiny demo runs.
    shapes = {k: v for k, v in read_config(imported).to_dict().items() if k in ("model", "vision", "victor")}
    recipe = root / "tiny_hf.yaml"
    shapes["data"] = {k: v for k, v in yaml.safe_load(Path(STAGE2).read_text())["data"].items()
                      if k in ("prompt_format", "system_prompt")}  # what the data set's length index was built for
    recipe.write_text(yaml.safe_dump(shapes))
    run_dir = root / "tp2pp2"
    cmd = train_cmd(4, digits_data, run_dir, f"train.init_from={imported}", "train.max_steps=0", "parallel.tp=2",
                    "parallel.pp=2")
    cmd[cmd.index(STAGE2)] = str(recipe)
    run(cmd)
    exported = root / "hf"
    megavictor("convert", "to-hf", "--checkpoint", run_dir, "--out", exported, "--tokenizer", sources["llm"])
    return {"run_dir": run_dir, "hf": exported}


def test_hf_to_tp2_pp2_to_hf_is_bit_exact(resharded: dict, sources: dict[str, Path]) -> None:
    from megavictor.checkpoint import resolve
    from megavictor.checkpoint.megatron import read_common

    saved = resolve(resharded["run_dir"])
    assert saved.name == "step_000000" and read_common(saved)["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    assert_keeps_source_tensors(read_safetensors(resharded["hf"]), sources, victor_on=True, whole_vit=True)


def test_megatron_model_and_export_agree(resharded: dict, digits_data: Path) -> None:
    """Logits within 1e-4 (fp32) and the same 16 greedy tokens: megatron VictorVLM (tp=1 x pp=1, in this process,
    no KV cache) against the exported model through transformers (remote code, KV cache)."""
    from megavictor.vqa import greedy_generate, megatron_logits_fn

    model = AutoModelForImageTextToText.from_pretrained(resharded["hf"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(resharded["hf"], trust_remote_code=True)
    inputs = processor(images=[image(20), image(21)], text=PROMPTS["two"], return_tensors="pt")
    ids = inputs["input_ids"]
    config, tokenizer = model.config, processor.tokenizer
    sample = to_sample(ids[0].tolist(), config.image_token_id, config.register_token_id, list(inputs["pixel_values"]))

    logits_fn, cfg = megatron_logits_fn(resharded["run_dir"], digits_data)
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image

    def megatron_logits(s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the slots that survive the drop, and their input positions."""
        laid = expand_sample(s, v, r, tokenizer.pad_token_id)
        batch = collate_rows([[laid]], len(laid), tokenizer.pad_token_id)
        plan = build_drop_plan(batch, cfg)
        with torch.no_grad():
            return logits_fn(batch, plan)[0], plan.keep_index[0]

    with torch.no_grad():
        out = model(**inputs)
    expected, kept = megatron_logits(sample)
    assert torch.equal(out.kept_index[0], kept)
    torch.testing.assert_close(out.logits[0], expected, atol=1e-4, rtol=0)

    sequences, step_logits = generate(model, inputs, GREEDY_STEPS)
    new = generated_tokens(sequences[0], ids.shape[1], tokenizer.pad_token_id)
    assert len(new) == GREEDY_STEPS and tokenizer.eos_token_id not in new  # 16 real tokens
    assert greedy_generate(logits_fn, cfg, [sample], GREEDY_STEPS, tokenizer.eos_token_id,
                           tokenizer.pad_token_id) == [new]
    # Every cached decode step against the full recomputation: the slots of the last prompt token and new tokens.
    full = Sample(sample.tokens + new, [False] * (len(sample.tokens) + len(new)), sample.images)
    torch.testing.assert_close(step_logits[0], megatron_logits(full)[0][-GREEDY_STEPS - 1:-1], atol=1e-4, rtol=0)


def test_eval_hf_gives_the_checkpoints_accuracy(digits_data: Path, tmp_path: Path) -> None:
    """`eval --hf` (processor + generate) on the export of a short-trained demo checkpoint: the same JSON as
    `eval --checkpoint` (megatron, no KV cache)."""
    run_dir = tmp_path / "run"
    run(train_cmd(1, digits_data, run_dir, "train.max_steps=20"))
    megavictor("convert", "to-hf", "--checkpoint", run_dir, "--out", tmp_path / "hf")  # the data set's tokenizer
    common = ["--data", digits_data, "--split", "test", "--limit", "64"]
    megatron = json.loads(megavictor("eval", "--checkpoint", run_dir, *common).strip().splitlines()[-1])
    hf = json.loads(megavictor("eval", "--hf", tmp_path / "hf", *common).strip().splitlines()[-1])
    assert megatron["n"] == 64 and megatron["accuracy"] > 0  # a model that answers: 0 == 0 would prove little
    assert hf == megatron
