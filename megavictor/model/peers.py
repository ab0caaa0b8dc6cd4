"""The methods the Victor paper compares with, as switches on the same model, data and recipe (`peer.*`).

- FastV (`peer.fastv_layer: K`, with `victor.enabled: false`): layers 0..K-1 see every visual slot; in layer K-1
  each visual slot's attention probability from its sample's query (the slot predicting the first answer token:
  the last prompt token, the same slot at training and inference) is averaged over heads, and each image keeps its
  top `peer.fastv_keep` share (default half) for layers K.. (their KV cache included). The drop plan does the
  ranking (`DropPlan.rank`); this module captures the probabilities. Trained with the switch on, it is "FastV
  trained"; set only at inference on a baseline checkpoint, "FastV training-free".
- PyramidDrop (Xing et al., CVPR 2025; `peer.pyramid_layers: [K1, K2, ..]`, `peer.pyramid_keep: [N1, N2, ..]`,
  with `victor.enabled: false`): FastV's ranking at each Ki, each image keeping Ni of the visual slots the stage
  before kept, so the count shrinks with depth. The query is the paper's last instruction token: in training the slot
  before every answer of the sample (their attention averaged), at inference the last prompt token.
- VoCo-LLaMA-style masking is Victor's `victor.mask: text_blind` (text never attends visual slots).
- A fixed compressor (`peer.avg_pool_to: R`, with `victor.num_registers: R`, `victor.drop_layer: 0`): each
  image's projected visual tokens are average-pooled over the patch grid to R tokens, which fill the register slots
  instead of learned embeddings; the drop at layer 0 removes the visual slots before the LLM. No parameters.
- Training-free selections (`peer.prune: random | divprune | visionzip`, `peer.prune_to: B`): each image's visual
  tokens reduced to B by `megavictor.model.visual_select`, filling the register slots as the average pool does; set
  at evaluation on a baseline checkpoint.

Only the megatron engine (and the plain-PyTorch twin behind `megavictor eval`) implements them; `config.validate`
refuses them elsewhere (DeepSpeed, pipeline parallel for FastV) and `convert to-hf` does not export them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from megavictor.config import Config
from megavictor.model.drop_plan import DropPlan, ranked_drops
from megavictor.model.visual_select import TowerOutputs, captured_outputs, select_visual

T = TypeVar("T")


def learned_registers(cfg: Config) -> int:
    """Rows of the learned register embedding: none when the average pool or a `peer.prune` selection fills the
    register slots."""
    filled = cfg.peer.avg_pool_to is not None or cfg.peer.prune is not None
    return 0 if filled else cfg.victor.registers_per_image


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


def image_slot_fill(cfg: Config, visual: torch.Tensor | None, learned: torch.Tensor | None,
                    tower: TowerOutputs | None = None) -> torch.Tensor | None:
    """What goes into the register slots: the learned registers, the images' pooled visual tokens, or the tokens a
    `peer.prune` selection keeps (which reads the ViT forward's `tower` outputs)."""
    if visual is None:
        return learned
    if cfg.peer.avg_pool_to is not None:
        return average_pool(visual, cfg.peer.avg_pool_to)
    if cfg.peer.prune is not None:
        if tower is None:
            raise ValueError("peer.prune selects from the ViT forward's outputs: pass them as `tower`")
        return select_visual(cfg, visual, tower)
    return learned


def run_layer(plan: DropPlan, layer_index: int, softmax: nn.Module, forward: Callable[[], T],
              reduce_heads: Callable[[torch.Tensor], torch.Tensor] = lambda mean: mean) -> T:
    """Run one decoder layer's `forward`; in a ranking layer (FastV's K-1, the layer before each PyramidDrop layer),
    rank the plan's visual slots by the layer's attention, averaged over heads (`reduce_heads` averages that mean over
    tensor-parallel ranks)."""
    if not plan.ranks_in(layer_index):
        return forward()
    with captured_outputs(softmax) as probs:  # [B, heads, Sq, Sk] attention probabilities
        out = forward()
    plan.rank(reduce_heads(probs[0].mean(dim=1)))
    return out


def removed_visual(cfg: Config, visual: int) -> int:
    """How many of `visual` visual slots (whole images) the layers after the last drop no longer see."""
    if cfg.victor.enabled:
        return visual
    drops = ranked_drops(cfg)
    return visual - visual // cfg.vision.num_visual_tokens * drops[-1][1] if drops else 0


def removed_in_layer(cfg: Config, layer_index: int, removed: int) -> int:
    """How many of the `removed` slots that the layers after the last drop no longer see (`removed_visual`) layer
    `layer_index` no longer sees: none before the first drop, all from the last on, and in between (PyramidDrop's
    earlier stages) the share an image has lost by then, (V - keep_i) of the V - keep_last it loses in all."""
    first = shortened_from(cfg)
    if first is None or layer_index < first:
        return 0
    drops = ranked_drops(cfg)
    if not drops:  # Victor: one drop
        return removed
    v, keep = cfg.vision.num_visual_tokens, [kept for layer, kept in drops if layer <= layer_index][-1]
    return removed * (v - keep) // max(v - drops[-1][1], 1)


def shortened_from(cfg: Config) -> int | None:
    """The first decoder layer that runs on fewer slots (Victor's k, FastV's K, PyramidDrop's first), or None."""
    if cfg.victor.enabled:
        return cfg.victor.drop_layer
    drops = ranked_drops(cfg)
    return drops[0][0] if drops else None
