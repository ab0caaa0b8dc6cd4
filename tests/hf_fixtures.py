"""Tiny random HF sources and helpers shared by the HF interop tests (the `sources` fixture is in conftest.py).

Every tensor is randomised (norms and biases too, so a swapped or dropped tensor shows); nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from megavictor.data.word_tokenizer import build_word_tokenizer
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample
from megavictor.hf.convert import clip_name, read_safetensors

CLIP_LAYERS = 3  # the import keeps 2 (LLaVA reads the penultimate layer)
WORDS = "USER ASSISTANT : ? . what digit is this it a seven three and which one bigger hello there the left"
PROMPTS = {
    "one": "USER: <image>\nwhat digit is this ? ASSISTANT:",
    "two": "USER: <image> and <image>\nwhich one is bigger ? ASSISTANT:",
    "none": "USER: hello there ASSISTANT:",
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1), biases too: every tensor matters to the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)


def image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def build_sources(root: Path) -> dict[str, Path]:
    """A GQA Llama (with a word tokenizer beside it, as in a real LLM dir) and a CLIP vision tower, under `root`."""
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                         tie_word_embeddings=False))
    randomise(llama, 0)
    llama.save_pretrained(root / "llm")
    build_word_tokenizer([WORDS], root / "llm", max_vocab=512)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=CLIP_LAYERS,
                                            num_attention_heads=4, image_size=32, patch_size=8))
    randomise(clip, 1)
    clip.save_pretrained(root / "clip")
    return {"llm": root / "llm", "clip": root / "clip"}


def to_sample(input_ids: list[int], image_id: int, register_id: int, images: list[torch.Tensor]) -> Sample:
    """Processor ids -> megavictor Sample: each image's run of image + register tokens becomes one placeholder."""
    tokens: list[int] = []
    for i, tok in enumerate(input_ids):
        if tok == image_id and (i == 0 or input_ids[i - 1] != image_id):
            tokens.append(IMAGE_PLACEHOLDER)
        elif tok not in (image_id, register_id):
            tokens.append(tok)
    return Sample(tokens, [False] * len(tokens), images)


def generate(model: torch.nn.Module, inputs: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` with the KV cache: sequences [B, S + steps] and each step's logits [B, steps, V]."""
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def generated_tokens(row: torch.Tensor, prompt_length: int, pad: int) -> list[int]:
    """New tokens of one `generate` output row, without the padding after an early eos."""
    new = row[prompt_length:].tolist()
    while new and new[-1] == pad:
        new.pop()
    return new


def assert_keeps_source_tensors(exported: dict[str, torch.Tensor], sources: dict[str, Path], victor_on: bool,
                                whole_vit: bool = False) -> None:
    """Every Llama and CLIP tensor of `sources` that megavictor keeps is in the export, bit for bit; with
    `whole_vit` (a checkpoint that recorded its source) also the CLIP layer past LLaVA's feature layer and
    `post_layernorm`."""
    for name, tensor in read_safetensors(sources["llm"]).items():
        hf_name = "lm_head.weight" if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)
        got = exported[hf_name]
        if not victor_on and name in ("lm_head.weight", "model.embed_tokens.weight"):
            # The stock model must embed <image> (id 512): one zero row is appended.
            assert got.shape[0] == 513 and not got[512].any()
            got = got[:512]
        assert torch.equal(got, tensor), name
    dropped = f"vision_model.encoder.layers.{CLIP_LAYERS - 1}."
    for name, tensor in read_safetensors(sources["clip"]).items():
        name = clip_name(name)  # transformers 5 writes CLIP tensors without `vision_model.`
        hf_name = "model.vision_tower." + name
        if whole_vit:
            assert torch.equal(exported[hf_name], tensor), name
        elif name.startswith(dropped):
            assert hf_name not in exported, name
        elif "post_layernorm" not in name:  # unused by LLaVA; exported as identity
            assert torch.equal(exported[hf_name], tensor), name
    assert ("model.registers" in exported) == victor_on
