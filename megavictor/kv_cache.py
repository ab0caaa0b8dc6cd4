"""Greedy decoding with a KV cache, on the plain-PyTorch twin of the model (`ReferenceVLM`).

The prompts are prefilled once, one per row, under the same drop plan as training: layers < k cache keys and
values of every prompt slot, layers >= k only of the slots that survive the drop (registers and text; FastV's kept
visual slots; under PyramidDrop each stage's layers those of their own stage), exactly as the exported HF model's
`VictorCache`. Each new token then runs through every layer as a
single slot at its row's next original position, attending the cached slots of its own prompt (not the row's
padding, not the drop's fillers; under `victor.mask: text_blind` not the visual slots) and the tokens generated
before it. Without the cache (`megavictor eval --no-kv-cache`) every step re-runs the whole prefix; both give the
same tokens (`tests/test_kv_cache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megavictor.config import Config, VictorMask
from megavictor.data.collate import Sample, collate_rows, expand_sample
from megavictor.model.batch import KIND_VISUAL
from megavictor.model.drop_plan import DropPlan, build_drop_plan, rope_angles
from megavictor.model.reference import KVSlot, ReferenceVLM


@dataclass
class _Side:
    """One side of the drop in cache coordinates: which cached slots a row's new tokens may attend."""

    attendable: torch.Tensor  # [B, cached slots] bool

    def grow(self) -> torch.Tensor:
        """Append the new token (attendable by itself and every later one); the mask for it, True = masked."""
        self.attendable = torch.cat([self.attendable, self.attendable.new_ones(self.attendable.shape[0], 1)], dim=1)
        return ~self.attendable[:, None, None, :]


def _sides(plan: DropPlan, kinds: torch.Tensor, text_blind: bool) -> list[_Side]:
    """What a generated (text) token may attend in each of the plan's views (`DropPlan.views`: before the drop, after
    each drop): its own prompt's slots (each row's first packed sample), without the visual ones under `text_blind`
    (layers < k only; after the drop none are left)."""
    prompt = plan.long.segments[:, :1]
    long = plan.long.segments == prompt
    if text_blind:
        long &= kinds != KIND_VISUAL
    return [_Side(long), *(_Side(view.segments == prompt) for view in plan.views[1:])]


@torch.no_grad()
def greedy_generate_cached(model: ReferenceVLM, cfg: Config, prompts: list[Sample], max_new_tokens: int,
                           eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy answers to `prompts` (one per row) until eos or `max_new_tokens`; the same contract as
    `megavictor.vqa.greedy_generate`."""
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    rows = [[expand_sample(p, v, r, pad_id)] for p in prompts]
    batch = collate_rows(rows, max(len(row[0]) for row in rows), pad_id)
    plan = build_drop_plan(batch, cfg)
    layers = model.decoder.layers
    cache = [KVSlot() for _ in layers]
    hidden = model.hidden_states(batch, plan, cache)  # the plan's short side is final after this (FastV)
    last = torch.tensor([len(row[0]) - 1 for row in rows])
    column = (plan.keep_index == last[:, None]).int().argmax(dim=1)
    logits = model.output_layer(hidden[torch.arange(len(rows)), column])
    text_blind = cfg.victor.enabled and cfg.victor.mask == VictorMask.TEXT_BLIND
    sides = _sides(plan, batch.kinds, text_blind)
    position = batch.position_ids[torch.arange(len(rows)), last]
    m = cfg.model

    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(max_new_tokens):
        tokens = logits.argmax(dim=-1)
        done |= tokens == eos_id
        for i in (~done).nonzero().flatten().tolist():
            generated[i].append(int(tokens[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        position = position + 1
        rope = rope_angles(position[:, None], m).transpose(0, 1)  # [B, 1, 1, head_dim]
        masks = [side.grow() for side in sides]
        x = model.embedding.word_embeddings(torch.where(done, pad_id, tokens)[:, None])
        for index, layer in enumerate(layers):
            x = layer(x, masks[plan.stage_of(index)], rope, cache[index])
        logits = model.output_layer(model.decoder.final_layernorm(x))[:, 0]
    return generated
