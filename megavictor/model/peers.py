"""The methods the Victor paper compares with, as switches on the same model, data and recipe (`peer.*`).

- FastV (`peer.fastv_layer: K`, with `victor.enabled: false`): layers 0..K-1 see every visual slot; in layer K-1
  each visual slot's attention probability from its sample's query (the slot predicting the first answer token:
  the last prompt token, the same slot at training and inference) is averaged over heads, and each image keeps its
  top `peer.fastv_keep` share (default half) for layers K.. (their KV cache included). The drop plan does the
  ranking (`DropPlan.rank`); this module captures the probabilities. Trained with the switch on, it is "FastV
  trained"; set only at inference on a baseline checkpoint, "FastV training-free".
- VoCo-LLaMA-style masking is Victor's `victor.mask: text_blind` (text never attends visual slots).
- A fixed compressor (`peer.avg_pool_to: R`, with `victor.num_registers: R`, `victor.drop_layer: 0`): each
  image's projected visual tokens are average-pooled over the patch grid to R tokens, which fill the register slots
  instead of learned embeddings; the drop at layer 0 removes the visual slots before the LLM. No parameters.

Only the megatron engine (and the plain-PyTorch twin behind `megavictor eval`) implements them; `config.validate`
refuses them elsewhere (DeepSpeed, pipeline parallel for FastV) and `convert to-hf` does not export them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from megavictor.config import Config
from megavictor.model.drop_plan import DropPlan

T = TypeVar("T")


def learned_registers(cfg: Config) -> int:
    """Rows of the learned register embedding: none when the average pool fills the register slots."""
    return 0 if cfg.peer.avg_pool_to is not None else cfg.victor.registers_per_image


def pool_grid(tokens: int) -> tuple[int, int]:
    """The (rows, columns) an R-token pool of the patch grid has: the most square factorisation of R."""
    rows = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return rows, tokens // rows


def average_pool(visual: torch.Tensor, tokens: int) -> torch.Tensor:
    """[N, V, H] visual tokens in raster order over a square patch grid -> [N, tokens, H] grid averages."""
    n, v, h = visual.shape
    side = math.isqrt(v)
    grid = visual.transpose(1, 2).reshape(n, h, side, side)
    return F.adaptive_avg_pool2d(grid, pool_grid(tokens)).flatten(2).transpose(1, 2)


def image_slot_fill(cfg: Config, visual: torch.Tensor | None, learned: torch.Tensor | None) -> torch.Tensor | None:
    """What goes into the register slots: the learned registers, or the images' pooled visual tokens."""
    if cfg.peer.avg_pool_to is None or visual is None:
        return learned
    return average_pool(visual, cfg.peer.avg_pool_to)


@contextmanager
def captured_attention(softmax: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities [B, heads, Sq, Sk] that `softmax` (an attention's softmax module)
    produces while the context is open."""
    probs: list[torch.Tensor] = []
    handle = softmax.register_forward_hook(lambda module, args, out: probs.append(out.detach()))
    try:
        yield probs
    finally:
        handle.remove()


def run_layer(plan: DropPlan, layer_index: int, softmax: nn.Module, forward: Callable[[], T],
              reduce_heads: Callable[[torch.Tensor], torch.Tensor] = lambda mean: mean) -> T:
    """Run one decoder layer's `forward`; in FastV's ranking layer, rank the plan's visual slots by the layer's
    attention, averaged over heads (`reduce_heads` averages that mean over tensor-parallel ranks)."""
    if not plan.ranks_in(layer_index):
        return forward()
    with captured_attention(softmax) as probs:
        out = forward()
    plan.rank(reduce_heads(probs[0].mean(dim=1)))
    return out


def removed_visual(cfg: Config, visual: int) -> int:
    """How many of `visual` visual slots (whole images) the layers after the drop no longer see."""
    if cfg.victor.enabled:
        return visual
    if cfg.peer.fastv_layer is not None:
        v = cfg.vision.num_visual_tokens
        return visual - visual // v * math.ceil(v * cfg.peer.fastv_keep)
    return 0


def shortened_from(cfg: Config) -> int | None:
    """The first decoder layer that runs on fewer slots (Victor's k, FastV's K), or None."""
    if cfg.victor.enabled:
        return cfg.victor.drop_layer
    return cfg.peer.fastv_layer
