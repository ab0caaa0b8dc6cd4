"""`megavictor eval` on LLaVA-NeXT anyres models: the mix's questions (`mix_data`: images of five tile grids, none
to three per prompt) as eval builds them, answered by a checkpoint's KV-cached decoding and by its HF exports through
`eval --hf`. tests/test_kv_cache.py checks the cached decoding against the uncached one. Random weights with a large
init std (sharp logits: greedy choices are not decided by rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavictor.config import Config
from megavictor.kv_cache import greedy_generate_cached
from megavictor.model.reference import ReferenceVLM
from megavictor.vqa import check_hf_export, hf_answers, hf_config, load_questions
from tests.fixtures import ANYRES, tiny_config

QUESTIONS = 24  # the first test records: grids 1x2, 2x1, 2x2, 3x1 and 1x3, one to three images, text-only ones
NEW_TOKENS = 4


def anyres_model(data: Path, *overrides: str) -> tuple[Config, ReferenceVLM]:
    """The tiny model with anyres images (16 visual tokens per tile) on `data`'s tokenizer, random weights."""
    cfg = tiny_config([*ANYRES, f"data.path={data}", "data.test_split=test", 'data.system_prompt=""',
                       "model.init_method_std=0.3", *overrides])
    torch.manual_seed(0)
    return cfg, ReferenceVLM(cfg).eval()


def test_anyres_questions_carry_each_images_views_and_count(mix_data: Path) -> None:
    """`load_questions` under anyres: each image's views, size and visual count are its layout's; the prompt stops
    where the answer starts."""
    cfg, _ = anyres_model(mix_data)
    spec = cfg.vision.anyres()
    questions, _ = load_questions(cfg, mix_data, "test", QUESTIONS)
    layouts = [spec.layout(*size) for q in questions for size in q.prompt.image_sizes]
    assert {(layout.rows, layout.cols) for layout in layouts} == {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}
    assert {len(q.prompt.images) for q in questions} == {0, 1, 2, 3}
    for q in questions:
        views = [spec.layout(*size) for size in q.prompt.image_sizes]
        assert [v.shape for v in q.prompt.images] == [(layout.tiles, 3, 32, 32) for layout in views]
        assert q.prompt.image_tokens == [layout.tokens for layout in views]
        assert not any(q.prompt.trainable)


@pytest.mark.parametrize("victor", [True, False], ids=["victor_next", "stock_next"])
def test_eval_hf_on_a_next_export_answers_as_the_checkpoint(mix_data: Path, tmp_path: Path, victor: bool) -> None:
    """`eval --hf` on an anyres model's export (`VictorLlavaNextForConditionalGeneration`, or the baseline's stock
    `LlavaNextForConditionalGeneration`): the processor's tiles and the model's `generate()` give the answers of the
    checkpoint's KV-cached eval, question by question."""
    from megavictor.hf.convert import to_hf

    cfg, model = anyres_model(mix_data, f"victor.enabled={str(victor).lower()}")
    out = to_hf(cfg, model.state_dict(), tmp_path / "hf", tokenizer_dir=mix_data / "tokenizer")
    check_hf_export(out)  # a LLaVA-NeXT export is one eval --hf takes
    questions, chat = load_questions(cfg, mix_data, "test", QUESTIONS)
    expected = [chat.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in greedy_generate_cached(model, cfg, [q.prompt for q in questions], NEW_TOKENS,
                                                  chat.tokenizer.eos_token_id, chat.pad_id)]
    hf_questions, _ = load_questions(hf_config(out, mix_data), mix_data, "test", QUESTIONS)
    answers = hf_answers(out, hf_questions, batch_size=8, max_new_tokens=NEW_TOKENS)
    assert answers == expected
    assert len(set(expected)) >= 8, "control: the random model answers the questions differently"
