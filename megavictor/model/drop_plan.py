"""The Victor drop plan: which slots survive layer k, and each layer's attention inputs on both sides of it.

One `DropPlan` is built per micro-batch by one pure function, `build_drop_plan`, from slot metadata alone (kinds,
positions, labels, packed boundaries) and the config, so every pipeline stage builds the same plan without
receiving activations' metadata, and the megatron model, its reference twin and greedy evaluation share it.
FastV (`peer.fastv_layer`) is the one exception: which visual slots survive depends on layer K-1's attention, so
its plan leaves the short side open (`ranking`) until the model calls `DropPlan.rank` with those probabilities. Layers
< k see the `long` view (all slots); layers >= k the `short` view (registers, text, padding), gathered with the
convention shared with the exported HF model (`megavictor.hf.victor_drop.keep_index`: survivors right-aligned,
fillers on the left). Every view carries its complete attention inputs: the mask, the original (pre-drop)
positions and their RoPE angles, the packed-sample segments, and the labels of the slots it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from megavictor.config import Config, VictorMask
from megavictor.hf.victor_drop import keep_index
from megavictor.model.batch import IGNORE_INDEX, KIND_PAD, KIND_REGISTER, KIND_TEXT, KIND_VISUAL, VictorBatch

FP8_ALIGNMENT = 16  # FP8 GEMMs need token counts that are multiples of 16


@dataclass
class SequenceView:
    """Attention inputs for one sequence length. Masks follow megatron: True means "may not attend"."""

    mask: torch.Tensor  # [B, 1, S, S] bool: block-diagonal causal over packed samples
    segments: torch.Tensor  # [B, S] packed sample of each slot (fillers and row padding: segments of their own)
    position_ids: torch.Tensor  # [B, S] original (pre-drop) positions
    rope: torch.Tensor  # [S, B, 1, head_dim] RoPE angles of `position_ids` (megatron's sequence-first layout)
    labels: torch.Tensor  # [B, S]

    @property
    def seq_length(self) -> int:
        return self.position_ids.shape[1]


@dataclass
class FastVRanking:
    """What FastV needs to choose each image's surviving visual slots once layer K-1's attention is known."""

    queries: torch.Tensor  # [B, S] column of the slot whose attention ranks each slot (its sample's query)
    visual: torch.Tensor  # [B, S] bool
    visual_tokens: int  # per image
    keep: int  # visual slots kept per image
    short_side: Callable[[torch.Tensor], tuple[SequenceView, torch.Tensor]]  # dropped [B, S] -> (short, keep_index)


@dataclass
class DropPlan:
    """Per-micro-batch Victor plan; `drop_layer` is None when nothing is dropped (baseline or no visual slots).

    Under FastV, `drop_layer` is K and `short` / `keep_index` are None until `rank` is called (in layer K-1).
    """

    long: SequenceView
    short: SequenceView | None
    keep_index: torch.Tensor | None  # [B, S'] indices into the long sequence of the slots that survive
    drop_layer: int | None
    ranking: FastVRanking | None = None

    def ranks_in(self, layer_index: int) -> bool:
        """Whether `layer_index` is the layer whose attention probabilities `rank` needs (FastV's K-1)."""
        return self.ranking is not None and layer_index == self.drop_layer - 1

    def rank(self, head_mean_probs: torch.Tensor) -> None:
        """FastV: keep each image's `keep` visual slots that receive the most attention from their sample's query
        in `head_mean_probs` [B, S, S] (attention probabilities averaged over heads), and close the short side."""
        r = self.ranking
        received = head_mean_probs.detach().gather(1, r.queries[:, None, :]).squeeze(1)  # [B, S]
        scores = received[r.visual].view(-1, r.visual_tokens)
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(r.keep, dim=1).indices, True)
        dropped = torch.zeros_like(r.visual)
        dropped[r.visual] = ~kept.flatten()
        self.short, self.keep_index = r.short_side(dropped)
        self.ranking = None

    def view_for_layer(self, layer_index: int) -> SequenceView:
        if self.drop_layer is not None and layer_index >= self.drop_layer:
            if self.short is None:
                raise RuntimeError(f"FastV: layer {layer_index} runs before layer {self.drop_layer - 1} ranked the "
                                   "visual slots (DropPlan.rank)")
            return self.short
        return self.long

    def drop(self, hidden_states: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """Gather the surviving slots along `seq_dim` of [S, B, H] (megatron) or [B, S, H] hidden states.

        The result is a fresh tensor, not a view (megatron's pipeline schedule frees stage outputs in place).
        """
        index = self.keep_index.t() if seq_dim == 0 else self.keep_index
        index = index.unsqueeze(-1).expand(*index.shape, hidden_states.shape[-1])
        return torch.gather(hidden_states, seq_dim, index)

    @property
    def output_view(self) -> SequenceView:
        """The view of the last layer's output (what the loss sees)."""
        return self.short if self.drop_layer is not None else self.long

    def loss_mask(self) -> torch.Tensor:
        return self.output_view.labels != IGNORE_INDEX


def rope_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """[B, S] positions -> [S, B, 1, head_dim] angles, halves duplicated (non-interleaved RoPE), as megatron's
    `RotaryEmbedding` computes them for positions 0..S-1, but for the given (gapped, restarting) positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                               / head_dim))
    freqs = position_ids.t().float()[..., None] * inv_freq
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


def attention_mask(segments: torch.Tensor, kinds: torch.Tensor, text_blind: bool) -> torch.Tensor:
    """Block-diagonal causal mask over packed samples, [B, 1, S, S], True = masked.

    Slots are in sequence order, so causality is index order. With `text_blind`, text slots may not attend
    visual slots (registers still can): the VoCo-LLaMA-style ablation for layers < k.
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    if text_blind:
        allowed &= ~((kinds[:, :, None] == KIND_TEXT) & (kinds[:, None, :] == KIND_VISUAL))
    return (~allowed).unsqueeze(1)


def _view(segments: torch.Tensor, kinds: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
          head_dim: int, base: float, text_blind: bool = False) -> SequenceView:
    return SequenceView(mask=attention_mask(segments, kinds, text_blind), segments=segments, position_ids=positions,
                        rope=rope_angles(positions, head_dim, base), labels=labels)


def ranking_queries(segments: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, S] column of each slot's FastV query: the slot of its packed sample that predicts the sample's first
    target (the last prompt token, as at inference), or the sample's last slot if it has no target."""
    b, s = segments.shape
    flat_segments, flat = segments.flatten(), torch.arange(b * s, device=segments.device)
    labelled = labels.flatten() != IGNORE_INDEX
    n = int(flat_segments.max()) + 1
    first = torch.full((n,), b * s, device=segments.device).scatter_reduce(
        0, flat_segments[labelled], flat[labelled], reduce="amin")
    last = torch.full((n,), -1, device=segments.device).scatter_reduce(0, flat_segments, flat, reduce="amax")
    query = torch.where(first < b * s, first, last)
    return (query[flat_segments] % s).view(b, s)


def _short_side(dropped: torch.Tensor, segments: torch.Tensor, kinds: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor, align: int, head_dim: int, base: float) -> tuple[SequenceView, torch.Tensor]:
    """The view of the slots that survive when `dropped` [B, S] slots go, and their indices in the long view."""
    short_len = -(-int((~dropped).sum(dim=1).max()) // align) * align
    index, filler = keep_index(dropped, min_length=short_len)
    b, length = index.shape
    lone = segments.max() + 1 + torch.arange(b * length, device=kinds.device).view(b, length)
    short = _view(segments=torch.where(filler, lone, segments.gather(1, index)),
                  kinds=torch.where(filler, KIND_PAD, kinds.gather(1, index)),
                  positions=positions.gather(1, index),
                  labels=torch.where(filler, IGNORE_INDEX, labels.gather(1, index)), head_dim=head_dim, base=base)
    return short, index


def build_drop_plan(batch: VictorBatch, cfg: Config) -> DropPlan:
    """Plan the drop for `batch` under `cfg` (victor or FastV settings, RoPE base and head size, FP8 alignment).

    Rows keep different numbers of slots when they hold different numbers of images; shorter rows are filled up
    to the common length with some of their own dropped visual slots (fillers: their own segment, no label,
    attended by nobody), so the gather stays rectangular. Under FP8 the short length is aligned to 16 the same way.
    """
    victor, fastv_layer, m = cfg.victor, cfg.peer.fastv_layer, cfg.model
    head_dim, base = m.hidden_size // m.num_attention_heads, m.rotary_base
    align = FP8_ALIGNMENT if cfg.train.fp8 else 1
    kinds, positions, labels = batch.kinds, batch.position_ids, batch.labels
    segments = batch.segment_ids()
    visual = kinds == KIND_VISUAL
    text_blind = victor.enabled and victor.mask == VictorMask.TEXT_BLIND
    long = _view(segments, kinds, positions, labels, head_dim, base, text_blind)
    if (not victor.enabled and fastv_layer is None) or not bool(visual.any()):
        if positions.shape[1] % align:
            raise ValueError(f"sequence length {positions.shape[1]} is not a multiple of {align}")
        identity = torch.arange(positions.shape[1], device=kinds.device).expand_as(kinds)
        return DropPlan(long=long, short=long, keep_index=identity, drop_layer=None)
    short_side = partial(_short_side, segments=segments, kinds=kinds, positions=positions, labels=labels, align=align,
                         head_dim=head_dim, base=base)
    if victor.enabled:
        short, index = short_side(visual)
        return DropPlan(long=long, short=short, keep_index=index, drop_layer=victor.drop_layer)
    v = cfg.vision.num_visual_tokens
    ranking = FastVRanking(queries=ranking_queries(segments, labels), visual=visual, visual_tokens=v,
                           keep=math.ceil(v * cfg.peer.fastv_keep), short_side=short_side)
    return DropPlan(long=long, short=None, keep_index=None, drop_layer=fastv_layer, ranking=ranking)


def scatter_image_slots(embeddings: torch.Tensor, kinds: torch.Tensor, visual: torch.Tensor | None,
                        registers: torch.Tensor | None) -> torch.Tensor:
    """Place projected visual tokens and register embeddings into their slots.

    `embeddings` is batch-first [B, S, H]; `visual` is [N_images, V, H] in row-major slot order, `registers`
    [R, H] (the same R registers after every image) or [N_images, R, H] (each image's own, e.g. pooled).
    """
    if visual is not None and visual.numel():
        mask = (kinds == KIND_VISUAL).unsqueeze(-1)
        embeddings = embeddings.masked_scatter(mask, visual.to(embeddings.dtype))
    register_slots = kinds == KIND_REGISTER
    if registers is not None and bool(register_slots.any()):
        n = int(register_slots.sum())
        rows = registers.flatten(0, 1) if registers.dim() == 3 else \
            registers[torch.arange(n, device=kinds.device) % registers.shape[0]]
        embeddings = embeddings.masked_scatter(register_slots.unsqueeze(-1), rows.to(embeddings.dtype))
    return embeddings
