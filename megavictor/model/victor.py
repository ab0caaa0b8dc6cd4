"""The Victor drop: which slots survive layer k, and the attention masks / positions on both sides of it.

One `DropPlan` is built per micro-batch from slot metadata alone (kinds, positions, packed boundaries), so every
pipeline stage can build it without receiving activations' metadata, and the reference model uses the very same
plan. Layers < k see the `long` view (all slots); layers >= k see the `short` view (registers, text, padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megavictor.model.batch import IGNORE_INDEX, KIND_PAD, KIND_REGISTER, KIND_TEXT, KIND_VISUAL, VictorBatch


@dataclass
class SequenceView:
    """Attention inputs for one sequence length. Masks follow megatron: True means "may not attend"."""

    mask: torch.Tensor  # [B, 1, S, S] bool
    position_ids: torch.Tensor  # [B, S] original (pre-drop) positions
    labels: torch.Tensor  # [B, S]
    rope: torch.Tensor | None = None  # [S, B, 1, D], filled in by the model that owns the rotary embedding

    @property
    def seq_length(self) -> int:
        return self.position_ids.shape[1]


@dataclass
class DropPlan:
    """Per-micro-batch Victor plan; `drop_layer` is None when nothing is dropped (baseline or no visual slots)."""

    long: SequenceView
    short: SequenceView
    keep_index: torch.Tensor  # [B, S'] indices into the long sequence of the slots that survive
    drop_layer: int | None

    def view_for_layer(self, layer_index: int) -> SequenceView:
        if self.drop_layer is not None and layer_index >= self.drop_layer:
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


def attention_mask(segment_ids: torch.Tensor, kinds: torch.Tensor, text_blind: bool) -> torch.Tensor:
    """Block-diagonal causal mask over packed samples, [B, 1, S, S], True = masked.

    Slots are in sequence order, so causality is index order. With `text_blind`, text slots may not attend
    visual slots (registers still can): the VoCo-LLaMA-style ablation for layers < k.
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    if text_blind:
        allowed &= ~((kinds[:, :, None] == KIND_TEXT) & (kinds[:, None, :] == KIND_VISUAL))
    return (~allowed).unsqueeze(1)


def build_drop_plan(batch: VictorBatch, enabled: bool, drop_layer: int, text_blind: bool = False,
                    align: int = 1) -> DropPlan:
    """Plan the drop for `batch`. `align` pads the short length to a multiple (FP8 GEMMs need 16).

    Rows keep different numbers of slots when they hold different numbers of images; shorter rows are filled
    up to the common length with some of their own dropped visual slots turned into isolated padding
    ("ghost" slots: their own segment, no label, attended by nobody), so the gather stays rectangular.
    """
    kinds, positions, labels = batch.kinds, batch.position_ids, batch.labels
    segments = batch.segment_ids()
    long = SequenceView(attention_mask(segments, kinds, text_blind and enabled), positions, labels)
    visual = kinds == KIND_VISUAL
    if not enabled or not bool(visual.any()):
        if align > 1 and positions.shape[1] % align:
            raise ValueError(f"sequence length {positions.shape[1]} is not a multiple of {align}")
        identity = torch.arange(positions.shape[1], device=kinds.device).expand_as(kinds)
        return DropPlan(long=long, short=long, keep_index=identity, drop_layer=None)

    b, s = kinds.shape
    kept_counts = (~visual).sum(dim=1)
    short_len = int(kept_counts.max())
    short_len = -(-short_len // align) * align
    if short_len > s:
        raise ValueError(f"sequence length {s} cannot be aligned to a multiple of {align} after the drop")
    order = torch.arange(s, device=kinds.device)
    # Sort key puts kept slots first (in sequence order), then dropped visual slots as ghost candidates.
    key = visual.long() * s + order
    keep_index = key.argsort(dim=1)[:, :short_len]
    is_ghost = torch.arange(short_len, device=kinds.device)[None, :] >= kept_counts[:, None]

    short_kinds = torch.where(is_ghost, KIND_PAD, kinds.gather(1, keep_index))
    ghost_segments = segments.max() + 1 + torch.arange(b * short_len, device=kinds.device).view(b, short_len)
    short_segments = torch.where(is_ghost, ghost_segments, segments.gather(1, keep_index))
    short = SequenceView(
        mask=attention_mask(short_segments, short_kinds, text_blind=False),
        position_ids=positions.gather(1, keep_index),
        labels=torch.where(is_ghost, IGNORE_INDEX, labels.gather(1, keep_index)),
    )
    return DropPlan(long=long, short=short, keep_index=keep_index, drop_layer=drop_layer)


def scatter_image_slots(embeddings: torch.Tensor, kinds: torch.Tensor, visual: torch.Tensor | None,
                        registers: torch.Tensor | None) -> torch.Tensor:
    """Place projected visual tokens and register embeddings into their slots.

    `embeddings` is batch-first [B, S, H]; `visual` is [N_images, V, H] in row-major slot order, `registers`
    [R, H] (the same R registers after every image).
    """
    if visual is not None and visual.numel():
        mask = (kinds == KIND_VISUAL).unsqueeze(-1)
        embeddings = embeddings.masked_scatter(mask, visual.to(embeddings.dtype))
    register_slots = kinds == KIND_REGISTER
    if registers is not None and bool(register_slots.any()):
        n = int(register_slots.sum())
        index = torch.arange(n, device=kinds.device) % registers.shape[0]
        embeddings = embeddings.masked_scatter(register_slots.unsqueeze(-1), registers[index].to(embeddings.dtype))
    return embeddings
