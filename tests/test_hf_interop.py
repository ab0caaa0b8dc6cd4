"""HF interop: HF checkpoints <-> megavictor's full state, and the exported (Victor) LLaVA and stock LLaVA-NeXT against
ReferenceVLM.

Everything is built at tiny size with random weights (`tests.hf_fixtures`); nothing is downloaded.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)

from megavictor.config import Config
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, expand_sample
from megavictor.data.images import load_image
from megavictor.data.tokenizer import ChatTokenizer, render
from megavictor.hf.convert import (
    REMOTE_CODE,
    complete_state,
    config_from_sections,
    from_hf,
    from_hf_llava,
    read_safetensors,
    to_hf,
)
from megavictor.model.batch import KIND_REGISTER, KIND_TEXT, KIND_VISUAL
from megavictor.model.reference import ReferenceVLM
from megavictor.model.weight_init import initialize
from tests.hf_fixtures import (
    ANYRES,
    ANYRES_PINPOINTS,
    CLIP_LAYERS,
    PROMPTS,
    anyres_pictures,
    anyres_sample,
    assert_keeps_source_tensors,
    check_next_export,
    generate,
    generated_tokens,
    image,
    next_inputs,
    next_text,
    placeholders,
    png,
    reference_logits,
    save_llava_next,
    to_sample,
)


def imported(sources: dict[str, Path], victor: bool, overrides: tuple[str, ...] = ()
             ) -> tuple[Config, dict[str, torch.Tensor]]:
    """from_hf + complete_state, with the fresh projector and registers scaled up so they matter."""
    sections, state = from_hf(sources["llm"], sources["clip"])
    cfg = config_from_sections(sections, None, ["data.seq_length=256", "log.wandb=false",
                                                f"victor.enabled={str(victor).lower()}", *overrides])
    state = complete_state(cfg, state)
    g = torch.Generator().manual_seed(2)
    for name in state:
        if name.startswith("projector.") or name == "registers":
            state[name] = torch.randn(state[name].shape, generator=g) * 0.1
    return cfg, state


def victor_export(sources: dict[str, Path], out: Path, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The Victor model (with `overrides`) exported with the tokenizer into `out`, loaded back through remote code,
    and its ReferenceVLM twin."""
    cfg, state = imported(sources, victor=True, overrides=overrides)
    out = to_hf(cfg, state, out, tokenizer_dir=sources["llm"])
    reference = ReferenceVLM(cfg).eval()
    reference.load_state_dict(state)
    return {"cfg": cfg, "dir": out, "reference": reference,
            "model": AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval(),
            "processor": AutoProcessor.from_pretrained(out, trust_remote_code=True)}


@pytest.fixture(scope="module")
def victor(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The Victor model exported with the tokenizer, loaded back through remote code, and its ReferenceVLM twin."""
    return victor_export(sources, tmp_path_factory.mktemp("victor_export"))


def reference_greedy(ref: ReferenceVLM, sample: Sample, steps: int, eos: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding without a cache (the whole sequence again at every step): tokens and each step's logits."""
    generated: list[int] = []
    logits = []
    for _ in range(steps):
        tokens = sample.tokens + generated
        logits.append(reference_logits(ref, dataclasses.replace(sample, tokens=tokens,
                                                                trainable=[False] * len(tokens)))[-1])
        generated.append(int(logits[-1].argmax()))
        if generated[-1] == eos:
            break
    return generated, torch.stack(logits)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("victor_on, anyres", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["baseline", "victor", "next", "victor_next"])
def test_round_trip_is_bit_exact(sources: dict[str, Path], tmp_path: Path, victor_on: bool, anyres: bool) -> None:
    """HF -> full state -> HF keeps every tensor megavictor uses; HF -> full state is recovered exactly (with anyres
    images as a (Victor) LLaVA-NeXT, `image_newline` and the grids included)."""
    cfg, state = imported(sources, victor=victor_on, overrides=ANYRES if anyres else ())
    out = to_hf(cfg, state, tmp_path / "export", max_shard_size="200KB")  # no tokenizer: tokens after the vocab
    assert (out / "model.safetensors.index.json").exists()
    exported = read_safetensors(out)
    assert_keeps_source_tensors(exported, sources, victor_on)
    assert ("model.image_newline" in exported) == anyres

    sections, back = from_hf_llava(out)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        expected = tensor if victor_on or name not in ("embedding.word_embeddings.weight", "output_layer.weight") \
            else torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])
        assert torch.equal(back[name], expected), name
    assert sections["vision"]["num_layers"] == CLIP_LAYERS - 1
    assert ("victor" in sections) == victor_on
    assert sections["vision"].get("image_grid_pinpoints") == (ANYRES_PINPOINTS if anyres else None)
    assert sections.get("data") == ({"image_aspect_ratio": "anyres"} if anyres else None)


def test_complete_state_rejects_a_config_the_weights_do_not_fit(sources: dict[str, Path]) -> None:
    sections, state = from_hf(sources["llm"], sources["clip"])
    cfg = config_from_sections(sections, None, ["data.seq_length=256", "model.ffn_hidden_size=128"])
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight has shape \(352, 64\)"):
        complete_state(cfg, state)


def test_baseline_matches_stock_llava(sources: dict[str, Path], tmp_path: Path) -> None:
    """The mapping itself: ReferenceVLM on the imported state == transformers' own LLaVA on the exported dir."""
    cfg, state = imported(sources, victor=False)
    out = to_hf(cfg, state, tmp_path / "export")
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    reference = ReferenceVLM(cfg).eval()
    reference.load_state_dict(state)
    images = [load_image(png(image(s, (32, 32))), 32) for s in (3, 4)]
    sample = Sample([1, 5, IMAGE_PLACEHOLDER, 6, 7, IMAGE_PLACEHOLDER, 8, 9, 10], [False] * 9, images)
    image_id, v = model.config.image_token_id, cfg.vision.num_visual_tokens
    ids = [t for tok in sample.tokens for t in ([image_id] * v if tok == IMAGE_PLACEHOLDER else [tok])]
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids]), pixel_values=torch.stack(images)).logits[0]
    expected = reference_logits(reference, sample)
    assert logits.shape[0] == expected.shape[0] == len(ids)
    torch.testing.assert_close(logits[:, :cfg.model.vocab_size], expected, atol=1e-4, rtol=0)

    # With the tokenizer, the stock processor's output goes straight into generate (V image tokens, no registers).
    with_tokenizer = to_hf(cfg, state, tmp_path / "with_tokenizer", tokenizer_dir=sources["llm"])
    processor = AutoProcessor.from_pretrained(with_tokenizer)
    model = LlavaForConditionalGeneration.from_pretrained(with_tokenizer).eval()
    inputs = processor(images=[image(3)], text=PROMPTS["one"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == cfg.vision.num_visual_tokens
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


# --------------------------------------------------------------------------- LLaVA-NeXT (anyres)


def test_next_baseline_matches_reference(sources: dict[str, Path], tmp_path: Path) -> None:
    """An anyres baseline imported from LLM + CLIP (its `image_newline` fresh, as a run from scratch starts it) ->
    stock `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`, every weight loaded: for images of three grids
    the processor gives training's ids, pixels and sizes, and the model ReferenceVLM's logits (`check_next_export`,
    1e-5); `generate` runs on the processor's output."""
    cfg, state = imported(sources, victor=False, overrides=ANYRES)
    fresh = ReferenceVLM(cfg)
    initialize(fresh, cfg.model.init_method_std, cfg.model.num_layers, seed=0)
    assert torch.equal(state["image_newline"], fresh.image_newline.detach())
    out = to_hf(cfg, state, tmp_path / "export", tokenizer_dir=sources["llm"])
    model, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaNextProcessor)
    reference = ReferenceVLM(cfg).eval()
    reference.load_state_dict(state)

    pictures = anyres_pictures(20)
    inputs = processor(images=pictures, text=next_text(processor.tokenizer), return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    check_next_export(cfg, reference, processor.tokenizer, pictures, {**inputs, "logits": logits},
                      model.config.image_token_id)
    inputs = processor(images=pictures[:1], text=PROMPTS["one"], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


# A tiny decoder for the LLaVA-NeXT sources; Mistral's window is set, as long as the context (so it is accepted).
NEXT_TEXT = dict(vocab_size=520, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=4096, tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_from_hf_llava_next_computes_its_logits(family: str, tmp_path: Path) -> None:
    """A LLaVA-NeXT in llava-hf v1.6's layout (legacy names, a top-level `image_newline`) -> `from_hf_llava`: an
    anyres config with the source's grids, and ReferenceVLM on the imported weights gives the source's logits on
    `load_anyres` views of three grids (1e-5)."""
    image_id = NEXT_TEXT["vocab_size"] - 1
    text = LlamaConfig(**NEXT_TEXT) if family == "llama" else MistralConfig(sliding_window=4096, **NEXT_TEXT)
    source = save_llava_next(tmp_path, text, image_id, seed=4)
    sections, state = from_hf_llava(tmp_path)
    assert sections["vision"]["image_grid_pinpoints"] == ANYRES_PINPOINTS
    assert sections["data"] == {"image_aspect_ratio": "anyres"}
    cfg = config_from_sections(sections, None, ["log.wandb=false", "victor.enabled=false"])
    assert torch.equal(state["image_newline"], source.model.image_newline.detach())
    reference = ReferenceVLM(cfg).eval()
    reference.load_state_dict(complete_state(cfg, state))
    tokens = [1, 5, IMAGE_PLACEHOLDER, 6, 7, IMAGE_PLACEHOLDER, 8, 9, IMAGE_PLACEHOLDER, 10, 11]
    sample = anyres_sample(cfg.vision.anyres(), tokens, anyres_pictures(30))
    with torch.no_grad():
        logits = source(**next_inputs(sample, image_id)).logits[0]
    difference = float((logits - reference_logits(reference, sample)).abs().max())
    assert difference <= 1e-5, difference


# --------------------------------------------------------------------------- the exported Victor model


def test_processor_matches_the_training_slots(victor: dict) -> None:
    """Same slots (text ids, V visual then R register slots per image) and pixels as megavictor's data pipeline."""
    cfg, processor = victor["cfg"], victor["processor"]
    tokenizer = processor.tokenizer
    conversation = [{"from": "human", "value": PROMPTS["two"].split("USER: ")[1].split(" ASSISTANT:")[0]},
                    {"from": "gpt", "value": "it is a seven"}]
    text, _ = render(conversation, "v1", tokenizer.eos_token)
    pictures = [image(5), image(6, (50, 36))]
    inputs = processor(images=pictures, text=text, return_tensors="pt")

    images = [load_image(png(p), cfg.vision.image_size) for p in pictures]
    laid = expand_sample(ChatTokenizer(tokenizer, "v1").sample(conversation, images),
                         cfg.vision.num_visual_tokens, cfg.victor.num_registers)
    ids = inputs["input_ids"][0].tolist()
    config = victor["model"].config
    kinds = [KIND_VISUAL if t == config.image_token_id else KIND_REGISTER if t == config.register_token_id
             else KIND_TEXT for t in ids]
    assert kinds == laid.kinds
    assert [t for t, k in zip(ids, kinds) if k == KIND_TEXT] == [t for t, k in zip(laid.tokens, laid.kinds)
                                                                 if k == KIND_TEXT]
    torch.testing.assert_close(inputs["pixel_values"], torch.stack(images), atol=1e-5, rtol=0)


def test_victor_matches_reference(victor: dict) -> None:
    """Logits, loss, KV cache lengths and 16 greedy tokens of the HF model against ReferenceVLM (no cache)."""
    cfg, model, processor = victor["cfg"], victor["model"], victor["processor"]
    config = model.config
    assert config.text_config._attn_implementation == "sdpa"
    pictures = [image(7), image(8)]
    inputs = processor(images=pictures, text=PROMPTS["two"], return_tensors="pt")
    ids = inputs["input_ids"]
    sample = to_sample(ids[0].tolist(), config.image_token_id, config.register_token_id,
                       list(inputs["pixel_values"]))
    expected = reference_logits(victor["reference"], sample)

    labels = ids.clone()
    labels[:, :-4] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels, use_cache=True)
    torch.testing.assert_close(out.logits[0], expected, atol=1e-4, rtol=0)
    kept = out.kept_index[0]
    assert bool((ids[0, kept] != config.image_token_id).all())
    # HF labels are unshifted: the last four tokens are predicted by the logits of the four slots before them.
    targets = ids[0, -4:]
    positions = [int((kept == p).nonzero()) for p in range(ids.shape[1] - 5, ids.shape[1] - 1)]
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected[positions], targets),
                               atol=1e-5, rtol=0)

    v, r, n_images = cfg.vision.num_visual_tokens, cfg.victor.num_registers, 2
    text = ids.shape[1] - n_images * (v + r)
    lengths = [out.past_key_values.get_seq_length(i) for i in range(cfg.model.num_layers)]
    k = cfg.victor.drop_layer
    assert lengths == [text + n_images * (v + r)] * k + [text + n_images * r] * (cfg.model.num_layers - k)

    sequences, step_logits = generate(model, inputs, 16)
    new = generated_tokens(sequences[0], ids.shape[1], processor.tokenizer.pad_token_id)
    assert len(new) >= 8  # a real continuation, not an immediate eos
    expected_tokens, expected_logits = reference_greedy(victor["reference"], sample, 16,
                                                        processor.tokenizer.eos_token_id)
    assert new == expected_tokens
    # Every decode step through the cache (positions, short-layer mask) matches the full recomputation.
    torch.testing.assert_close(step_logits[0, :len(new)], expected_logits, atol=1e-4, rtol=0)


def test_batched_left_padded_generation_equals_one_by_one(victor: dict) -> None:
    """Rows with 1, 2 and 0 images (so different lengths before and after the drop) in one left-padded batch."""
    model, processor = victor["model"], victor["processor"]
    pad = processor.tokenizer.pad_token_id
    order = ["one", "two", "none"]
    pictures = {"one": [image(9)], "two": [image(10), image(11)], "none": []}
    batch = processor(images=[p for name in order for p in pictures[name]], text=[PROMPTS[n] for n in order],
                      padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(dim=1).tolist() == [True, False, True]
    together, together_logits = generate(model, batch, 10)
    for row, name in enumerate(order):
        alone = processor(images=pictures[name] or None, text=PROMPTS[name], return_tensors="pt")
        single, single_logits = generate(model, alone, 10)
        expected = generated_tokens(single[0], alone["input_ids"].shape[1], pad)
        assert len(expected) >= 4, name
        assert generated_tokens(together[row], batch["input_ids"].shape[1], pad) == expected, name
        steps = len(expected)
        torch.testing.assert_close(together_logits[row, :steps], single_logits[0, :steps], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def victor_next(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The Victor model with anyres images exported with the tokenizer (`VictorLlavaNextForConditionalGeneration`),
    loaded back through remote code, and its ReferenceVLM twin."""
    return victor_export(sources, tmp_path_factory.mktemp("victor_next_export"), ANYRES)


def test_victor_next_processor_and_logits_match_training(victor_next: dict) -> None:
    """Images of three grids: the processor gives training's slots (each image's visual run, then its R
    registers), pixels and sizes; the model ReferenceVLM's logits over the slots kept after the drop
    (`check_next_export`, 1e-5)."""
    model, processor = victor_next["model"], victor_next["processor"]
    assert type(model).__name__ == "VictorLlavaNextForConditionalGeneration"
    pictures = anyres_pictures(70)
    inputs = processor(images=pictures, text=next_text(processor.tokenizer), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    config = model.config
    check_next_export(victor_next["cfg"], victor_next["reference"], processor.tokenizer, pictures,
                      {**inputs, "logits": logits}, config.image_token_id, config.register_token_id)


def test_victor_next_cache_and_greedy_tokens_match_reference(victor_next: dict) -> None:
    """KV cache lengths (layers >= k hold registers + text only) and 16 greedy tokens through the cache against
    ReferenceVLM without one, for images of three grids."""
    cfg, model, processor = victor_next["cfg"], victor_next["model"], victor_next["processor"]
    config = model.config
    pictures = anyres_pictures(50)  # images for which these random weights continue with varied tokens
    inputs = processor(images=pictures, text=PROMPTS["three"], return_tensors="pt")
    ids = inputs["input_ids"]
    sample = anyres_sample(cfg.vision.anyres(), placeholders(ids[0].tolist(), config.image_token_id,
                                                             config.register_token_id), pictures)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    r, k = cfg.victor.num_registers, cfg.victor.drop_layer
    short = ids.shape[1] - sum(sample.image_tokens)
    lengths = [out.past_key_values.get_seq_length(i) for i in range(cfg.model.num_layers)]
    assert lengths == [ids.shape[1]] * k + [short] * (cfg.model.num_layers - k) and short > len(pictures) * r

    sequences, step_logits = generate(model, inputs, 16)
    new = generated_tokens(sequences[0], ids.shape[1], processor.tokenizer.pad_token_id)
    assert len(new) >= 8 and len(set(new)) > 2  # a real continuation: no immediate eos, not one repeated token
    expected_tokens, expected_logits = reference_greedy(victor_next["reference"], sample, 16,
                                                        processor.tokenizer.eos_token_id)
    assert new == expected_tokens
    torch.testing.assert_close(step_logits[0, :len(new)], expected_logits, atol=1e-5, rtol=0)


def test_exported_code_imports_only_torch_and_transformers(victor: dict) -> None:
    """The remote-code files must run where megavictor is not installed."""
    for name in REMOTE_CODE:
        tree = ast.parse((victor["dir"] / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: a sibling shipped alongside
                assert f"{node.module}.py" in REMOTE_CODE, (name, node.module)
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                assert module.split(".")[0] in {"torch", "transformers", "typing", "dataclasses", "inspect", "__future__"}, \
                    (name, module)


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_flash_attention_without_flash_attn_is_a_clear_error(victor: dict) -> None:
    with pytest.raises(ImportError, match="flash_attn|FlashAttention2"):
        AutoModelForImageTextToText.from_pretrained(victor["dir"], trust_remote_code=True,
                                                    attn_implementation="flash_attention_2")
