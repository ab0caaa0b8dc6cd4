"""Analytic FLOP counts of the model: the bound benchmarks compare speedups with, and the numerator of MFU.

They know Victor: layers < k run on every slot, layers >= k only on the slots that survive the drop (FastV: the
kept share; PyramidDrop: each stage its own count), and a frozen ViT runs forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

from megavictor.config import Config
from megavictor.model.batch import KIND_VISUAL, VictorBatch
from megavictor.model.peers import removed_in_layer, removed_visual

TRAIN_FACTOR = 3.0  # forward + backward ~ 3 forwards


def transformer_layer_flops(seq: float, hidden: int, ffn: int, heads: int, groups: int, gated: bool,
                            context: float | None = None) -> float:
    """Forward FLOPs of one transformer layer on `seq` tokens (GEMMs + attention scores and weighted sum).

    `context` is the number of keys each query attends over (default `seq`, full-square attention as the dense
    masks compute it); decoding with a KV cache passes the cache length. Both may be means (the pipeline cost
    model's mean sample).
    """
    context = seq if context is None else context
    kv = hidden * groups // heads
    qkv_proj = 2 * seq * hidden * (hidden + 2 * kv) + 2 * seq * hidden * hidden
    mlp = 2 * seq * hidden * ffn * (3 if gated else 2)
    attention = 2 * 2 * seq * context * hidden
    return float(qkv_proj + mlp + attention)


def decoder_flops(cfg: Config, long: int, short: int, factor: float = TRAIN_FACTOR, head_tokens: int | None = None,
                  context_long: int | None = None, context_short: int | None = None) -> float:
    """FLOPs of the decoder and output layer for one row: layers < k on `long` slots, layers >= k on `short`
    slots (the baseline passes short == long), times `factor` (3 for training, 1 for a forward). Under PyramidDrop
    `short` is what the last stage sees; the earlier stages see their share of the drop (`removed_in_layer`).

    `head_tokens` is how many slots reach the output layer (default `short`; generation computes only the last);
    `context_long` / `context_short` are the attention key counts (default: the row itself, full-square; decoding
    passes the KV cache length of each side of the drop).
    """
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    total = 0.0
    for i in range(m.num_layers):
        seq = long - removed_in_layer(cfg, i, long - short)
        context = (None if context_long is None
                   else context_long - removed_in_layer(cfg, i, context_long - context_short))
        total += factor * transformer_layer_flops(seq, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                                  groups, gated=True, context=context)
    head = short if head_tokens is None else head_tokens
    return total + factor * 2.0 * head * m.hidden_size * m.vocab_size


def vision_flops(cfg: Config, images: int, train: bool = True) -> float:
    """ViT (+ class token) and projector for `images` images; a frozen ViT (or inference) runs forward only."""
    v, m = cfg.vision, cfg.model
    vit = v.num_layers * transformer_layer_flops(v.num_visual_tokens + 1, v.hidden_size, v.ffn_hidden_size,
                                                 v.num_attention_heads, v.num_attention_heads, gated=False)
    projector = 2.0 * v.num_visual_tokens * (v.hidden_size * m.hidden_size + m.hidden_size * m.hidden_size)
    vit_factor = TRAIN_FACTOR if (train and not v.freeze) else 1.0
    return images * (vit_factor * vit + (TRAIN_FACTOR if train else 1.0) * projector)


def batch_train_flops(cfg: Config, batch: VictorBatch) -> float:
    """Training FLOPs of one micro-batch for the whole model (all tp/pp ranks together)."""
    visual_per_row = (batch.kinds == KIND_VISUAL).sum(dim=1).tolist()
    return rows_train_flops(cfg, batch.shape[1], visual_per_row, batch.images.shape[0])


def rows_train_flops(cfg: Config, long: int, visual_per_row: list[int], images: int) -> float:
    """Training FLOPs of rows of `long` slots holding these visual slots and images (what the row order
    knows of a global batch)."""
    total = sum(decoder_flops(cfg, long, long - removed_visual(cfg, visual)) for visual in visual_per_row)
    return total + vision_flops(cfg, images, train=True)


def generate_flops(cfg: Config, visual: Sequence[int], prompt: int, new_tokens: int, views: int | None = None) -> float:
    """Forward FLOPs of batched `generate` with a KV cache: one row per prompt, each padded to `prompt` slots and
    holding `visual[i]` visual slots (one image per prompt: V each, or under anyres each image's own count), a
    prefill that computes logits for the last slot only, then `new_tokens - 1` single-token decode steps. `views`:
    the ViT inputs (anyres: each image's tiles and base view; default one per prompt).

    After the drop every row is as long as the one that keeps the most slots (the exported model's `keep_index`
    right-aligns them: the prompt with the fewest visual slots keeps the most padding), so a mix of visual counts
    costs more than their mean."""
    rows = len(visual)
    short = max(prompt - removed_visual(cfg, v) for v in visual)
    total = rows * decoder_flops(cfg, prompt, short, factor=1.0, head_tokens=1)
    for t in range(1, new_tokens):
        total += rows * decoder_flops(cfg, 1, 1, factor=1.0, context_long=prompt + t, context_short=short + t)
    return total + vision_flops(cfg, rows if views is None else views, train=False)
