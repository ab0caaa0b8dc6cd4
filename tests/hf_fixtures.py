"""Tiny random HF sources and helpers shared by the HF interop tests (the `sources` fixture is in conftest.py).

Every tensor is randomised (norms and biases too, so a swapped or dropped tensor shows); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from megavictor.config import Config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample
from megavictor.data.images import load_anyres
from megavictor.data.tokenizer import ChatTokenizer, render
from megavictor.data.word_tokenizer import build_word_tokenizer
from megavictor.hf.convert import clip_name, hf_named_parameters, read_safetensors
from megavictor.hf_model.anyres import AnyresSpec
from megavictor.model.batch import KIND_REGISTER, KIND_TEXT, KIND_VISUAL
from megavictor.model.reference import ReferenceVLM

CLIP_LAYERS = 3  # the import keeps 2 (LLaVA reads the penultimate layer)
WORDS = "USER ASSISTANT : ? . what digit is this it a seven three and which one bigger hello there the left"
PROMPTS = {
    "one": "USER: <image>\nwhat digit is this ? ASSISTANT:",
    "two": "USER: <image> and <image>\nwhich one is bigger ? ASSISTANT:",
    "three": "USER: <image> and <image> and <image>\nwhich one is bigger ? ASSISTANT:",
    "none": "USER: hello there ASSISTANT:",
}

# LLaVA-NeXT (anyres): its default grids ([height, width]) at the sources' 32-pixel tile instead of 336.
ANYRES_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
ANYRES = [f"vision.image_grid_pinpoints={json.dumps(ANYRES_PINPOINTS)}", "data.image_aspect_ratio=anyres"]
# (width, height) of images whose best grids (rows, cols) differ; each is padded to its grid, so its tokens are
# unpadded, and every grid row ends with the newline.
ANYRES_IMAGES = {(3, 1): (20, 100), (1, 3): (100, 20), (2, 2): (64, 50)}
NEXT_CONVERSATION = [{"from": "human", "value": "<image> and <image> and <image>\nwhich one is bigger ?"},
                     {"from": "gpt", "value": "the left one"}]
# llava-hf v1.6's tensor names (transformers' legacy ones): transformers' current name prefix -> v1.6's.
V16_NAMES = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
             "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
             "model.image_newline": "image_newline"}


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


def anyres_pictures(seed: int) -> list[Image.Image]:
    """One random image of each size in `ANYRES_IMAGES`."""
    return [image(seed + i, size) for i, size in enumerate(ANYRES_IMAGES.values())]


def anyres_sample(spec: AnyresSpec, tokens: list[int], pictures: list[Image.Image],
                  trainable: list[bool] | None = None) -> Sample:
    """What training makes of `pictures` at the placeholders of `tokens`: `load_anyres`'s views, sizes and token
    counts (asserting that the pictures take the grids `ANYRES_IMAGES` names)."""
    loaded = [load_anyres(png(p), spec) for p in pictures]
    sizes = [size for _, size in loaded]
    layouts = [spec.layout(*size) for size in sizes]
    assert [(layout.rows, layout.cols) for layout in layouts] == list(ANYRES_IMAGES)
    return Sample(tokens, [False] * len(tokens) if trainable is None else trainable, [views for views, _ in loaded],
                  sizes, [layout.tokens for layout in layouts])


def next_inputs(sample: Sample, image_id: int) -> dict[str, torch.Tensor]:
    """A stock `LlavaNextForConditionalGeneration`'s inputs for an anyres Sample: each placeholder as its image's
    tokens of `image_id`, the views padded to the most tiles (the processor's batch padding), the sizes."""
    counts = iter(sample.image_tokens)
    ids = [t for tok in sample.tokens for t in ([image_id] * next(counts) if tok == IMAGE_PLACEHOLDER else [tok])]
    return {"input_ids": torch.tensor([ids]),
            "pixel_values": torch.nn.utils.rnn.pad_sequence(sample.images, batch_first=True),
            "image_sizes": torch.tensor(sample.image_sizes)}


def reference_logits(ref: ReferenceVLM, sample: Sample) -> torch.Tensor:
    cfg = ref.cfg
    laid = expand_sample(sample, cfg.vision.num_visual_tokens, cfg.victor.registers_per_image)
    with torch.no_grad():
        return ref(collate_rows([[laid]], len(laid)), return_logits=True)[0]


def check_next_export(cfg: Config, reference: ReferenceVLM, tokenizer: PreTrainedTokenizerBase,
                      pictures: list[Image.Image], outputs: dict[str, torch.Tensor], image_id: int,
                      register_id: int | None = None) -> float:
    """An exported (Victor) LLaVA-NeXT's processor and model on `NEXT_CONVERSATION` (rendered as training renders
    it) with `pictures` (`outputs`: input_ids [1, S], pixel_values, image_sizes, and the model's logits [1, S', vocab]
    on them) against training's side: ChatTokenizer's ids with each image's visual slots (then its register slots)
    in place, `load_anyres`'s views bit for bit (the batch padding zero) and sizes, ReferenceVLM's logits on that
    training sample, over the slots that survive the drop (max abs difference at most 1e-5, returned)."""
    tokens, trainable = ChatTokenizer(tokenizer, "v1").encode(NEXT_CONVERSATION)
    sample = anyres_sample(cfg.vision.anyres(), tokens, pictures, trainable)
    laid = expand_sample(sample, cfg.vision.num_visual_tokens, cfg.victor.registers_per_image)
    ids = outputs["input_ids"][0].tolist()
    kinds = {image_id: KIND_VISUAL, register_id: KIND_REGISTER}
    assert [kinds.get(t, KIND_TEXT) for t in ids] == laid.kinds
    assert [t for t in ids if t not in kinds] == [t for t, k in zip(laid.tokens, laid.kinds) if k == KIND_TEXT]
    assert outputs["image_sizes"].tolist() == [list(size) for size in sample.image_sizes]
    pixels = outputs["pixel_values"]
    for views, padded in zip(sample.images, pixels):
        assert torch.equal(padded[:len(views)], views)
        assert not padded[len(views):].any()
    expected = reference_logits(reference, sample)
    difference = float((outputs["logits"][0, :, :cfg.model.vocab_size] - expected).abs().max())
    assert difference <= 1e-5, difference
    return difference


def save_llava_next(out: Path, text: PretrainedConfig, image_id: int, seed: int) -> LlavaNextForConditionalGeneration:
    """A random stock LLaVA-NeXT on the `text` decoder and the 3-layer CLIP (read at layer -2), `ANYRES_PINPOINTS`,
    saved in llava-hf v1.6's layout (`V16_NAMES`: `language_model.model.*`, a top-level `image_newline`) at `out`;
    returned in eval mode."""
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=CLIP_LAYERS,
                              num_attention_heads=4, image_size=32, patch_size=8)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(
        text_config=text, vision_config=vision, image_token_index=image_id, vision_feature_layer=-2,
        image_grid_pinpoints=ANYRES_PINPOINTS, image_seq_length=16, tie_word_embeddings=False))
    randomise(model, seed)
    model.config.save_pretrained(out)
    tensors = {}
    for name, param in hf_named_parameters(model):
        prefix = next(p for p in V16_NAMES if name.startswith(p))
        tensors[V16_NAMES[prefix] + name[len(prefix):]] = param.detach().contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return model.eval()


def next_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """`NEXT_CONVERSATION` as training renders it (v1), what the exported processor is given."""
    return render(NEXT_CONVERSATION, "v1", tokenizer.eos_token)[0]


def placeholders(input_ids: list[int], image_id: int, register_id: int) -> list[int]:
    """Processor ids -> megavictor's tokens: each image's run of image + register tokens becomes one placeholder."""
    tokens: list[int] = []
    for i, tok in enumerate(input_ids):
        if tok == image_id and (i == 0 or input_ids[i - 1] != image_id):
            tokens.append(IMAGE_PLACEHOLDER)
        elif tok not in (image_id, register_id):
            tokens.append(tok)
    return tokens


def to_sample(input_ids: list[int], image_id: int, register_id: int, images: list[torch.Tensor]) -> Sample:
    """Processor ids and pixels -> megavictor Sample (fixed resolution)."""
    tokens = placeholders(input_ids, image_id, register_id)
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
