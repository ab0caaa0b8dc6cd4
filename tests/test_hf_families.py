"""`convert from-hf` of the decoder families transformers' LLaVA supports and the paper's experiments use: Llama
(Vicuna), Llama 3 (GQA, llama3 RoPE scaling), Mistral (GQA), Qwen2 (QKV biases).

For each, a tiny random stock LLaVA -> `convert from-hf --llava` -> the tp=2 x pp=2 megatron model (logits computed
and checkpoint saved again in that layout, all families in one torchrun job: tests/families_payload.py) -> HF.
The megatron model and the export both give the source's logits within 1e-5. A plain LLaVA (no registers) keeps
the comparison direct: the same model on both sides.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from megavictor.checkpoint import load_full_state
from megavictor.checkpoint.hf_source import read_source
from megavictor.cli import main as megavictor_main
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.hf.convert import current_llava_name, read_safetensors, to_hf
from megavictor.model.batch import KIND_VISUAL
from tests.hf_fixtures import randomise
from tests.runs import ROOT

VOCAB, IMAGE_ID = 128, 127
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False)
# Llama 3's scaling over a context of 64 positions, so that 4-dim heads have a kept, a blended and a scaled frequency.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILIES: dict[str, PretrainedConfig] = {
    "vicuna": LlamaConfig(**TEXT),
    "llama3": LlamaConfig(**TEXT, num_key_value_heads=2, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE),
    "mistral": MistralConfig(**TEXT, num_key_value_heads=2, sliding_window=None),
    "qwen2": Qwen2Config(**TEXT, num_key_value_heads=2, rope_theta=1e6),
}
TOKENS = [5, 6, 7, IMAGE_PLACEHOLDER, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def convert(*args: str | Path) -> int:
    return megavictor_main(["convert", *map(str, args)])


def inputs(image_id: int, image: torch.Tensor) -> dict[str, torch.Tensor]:
    laid = expand_sample(Sample(TOKENS, [False] * len(TOKENS), [image]), 4, 0)
    ids = [image_id if k == KIND_VISUAL else t for t, k in zip(laid.tokens, laid.kinds)]
    return {"input_ids": torch.tensor([ids]), "pixel_values": image[None]}


def hf_logits(model_dir: Path, image: torch.Tensor) -> torch.Tensor:
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**inputs(model.config.image_token_index, image)).logits[..., :VOCAB]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: the source LLaVA, and what the tp=2 x pp=2 job wrote (logits, checkpoint)."""
    root = tmp_path_factory.mktemp("families")
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = root / "batch.pt"
    torch.save(collate_rows([[expand_sample(Sample(TOKENS, [True] * len(TOKENS), [image]), 4, 0)]],
                            len(TOKENS) + 3), batch)
    torch.save(image, root / "image.pt")
    runs, jobs = {}, []
    for seed, (name, text) in enumerate(FAMILIES.items()):
        source = root / name / "source"
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=8, projection_dim=16)
        model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                          image_token_index=IMAGE_ID, image_seq_length=4,
                                                          tie_word_embeddings=False))
        randomise(model, seed)
        model.save_pretrained(source)
        assert convert("from-hf", "--llava", source, "--out", root / name / "imported", "victor.enabled=false",
                       "log.wandb=false") == 0
        runs[name] = {"source": source, "checkpoint": root / name / "tp2pp2", "logits": root / name / "logits.pt"}
        jobs.append({"checkpoint": str(root / name / "imported"), "out": str(runs[name]["checkpoint"]),
                     "batch": str(batch), "logits": str(runs[name]["logits"])})
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           "-m", "tests.families_payload", str(root / "jobs.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for run in runs.values():
        run["image"] = root / "image.pt"
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip_through_tp2_pp2(family: str, round_trips: dict, tmp_path: Path) -> None:
    run = round_trips[family]
    image = torch.load(run["image"])
    expected = hf_logits(run["source"], image)

    megatron = torch.load(run["logits"])  # the tp=2 x pp=2 model (no drop: every slot has its logits)
    torch.testing.assert_close(megatron, expected, atol=1e-5, rtol=0)

    cfg, state = load_full_state(run["checkpoint"])
    recorded = read_source(run["checkpoint"] / "step_000000")
    out = to_hf(cfg, state, tmp_path / "hf", source=recorded.config, vision_tail=recorded.vision_tail)
    torch.testing.assert_close(hf_logits(out, image), expected, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == FAMILIES[family].model_type
    exported = read_safetensors(out)
    for name, tensor in read_safetensors(run["source"]).items():  # bit for bit, the ViT's unused layer included
        name = current_llava_name(name)
        got = exported[name][:VOCAB] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else exported[name]
        assert torch.equal(got, tensor), name
