"""The Victor drop plan: which slots survive layer k, and each layer's attention inputs on both sides of it.

One `DropPlan` is built per micro-batch by one pure function, `build_drop_plan`, from slot metadata alone (kinds,
positions, labels, packed boundaries) and the config, so every pipeline stage builds the same plan without
receiving activations' metadata, and the megatron model, its reference twin and greedy evaluation share it.
FastV (`peer.fastv_layer`) is the one exception: which visual slots survive depends on layer K-1's attention, so
its plan leaves the short side open (`ranking`) until the model calls `DropPlan.rank` with those probabilities. Layers
< k see the `long` view (all slots); layers >= k the `short` view (registers, text, padding), gathered with the
convention shared with the exported HF model (`megavictor.hf_model.victor_drop.keep_index`: survivors right-aligned,
fillers on the left). Every view carries its complete attention inputs: the mask, the original (pre-drop)
positions and their RoPE angles, the packed-sample segments, and the labels of the slots it holds.

A plan built `packed` (Transformer Engine's THD attention, `uses_packed_attention`) describes each view by
sequence boundaries instead of a mask (`PackedView`: cu_seqlens, per-token RoPE angles) and builds no [S, S] mask:
the decoder then runs on the batch flattened to [B*S, 1, H], rows one after the other, and the "ghost" slots (row
padding, fillers) are padding inside those boundaries, which attention skips.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megavictor.config import AttentionBackend, Config, ModelConfig, RopeScaling, VictorMask
from megavictor.hf_model.anyres import AnyresSpec, feature_index
from megavictor.hf_model.victor_drop import keep_index
from megavictor.model.batch import (IGNORE_INDEX, KIND_PAD, KIND_REGISTER, KIND_TEXT, KIND_VISUAL, VictorBatch,
                                    to_device)

FP8_ALIGNMENT = 16  # FP8 GEMMs need token counts that are multiples of 16
MAX_SEQLEN_ROUNDING = 64  # Transformer Engine rounds an unknown max_seqlen up to 64 (fewer cuDNN graph builds)


@dataclass
class PackedView:
    """One view as Transformer Engine's THD attention takes it, over the flattened [B*S] slots (row-major).

    Sequence i holds `cu_seqlens[i+1] - cu_seqlens[i]` real slots starting at `cu_seqlens_padded[i]`; the rest of
    its padded extent is ghost slots (row padding, fillers), which attention neither computes nor attends. Leading
    ghosts of the first row make a sequence of length 0.
    """

    cu_seqlens: torch.Tensor  # [N + 1] int32 cumulative real lengths
    cu_seqlens_padded: torch.Tensor  # [N + 1] int32 offsets of the sequences in the flattened slots
    max_seqlen: int  # longest padded sequence, rounded up to MAX_SEQLEN_ROUNDING
    rope: torch.Tensor  # [B*S, 1, 1, head_dim] per-token RoPE angles (megatron's THD RoPE maps them 1:1)


@dataclass
class ImageSlots:
    """Where a micro-batch's image slots are, as indices into its flattened [B*S] slots (row-major), found on the host
    with the rest of the plan: filling them on the GPU is then an index copy, where a mask (masked_scatter, boolean
    indexing, a count of register slots) would make the host wait for the device."""

    visual: torch.Tensor  # [N*V] the visual slots, image after image
    registers: torch.Tensor  # [N*R] the register slots, image after image
    register_rows: torch.Tensor  # [N*R] the learned register each register slot takes (an image's i-th: row i)
    # Anyres: the row of `cat([view features flattened, image_newline])` each visual slot takes (`gather_visual`);
    # None at fixed resolution, where the views' features fill the visual slots in order.
    visual_source: torch.Tensor | None = None


@dataclass
class SequenceView:
    """Attention inputs for one sequence length. Masks follow megatron: True means "may not attend"."""

    mask: torch.Tensor | None  # [B, 1, S, S] bool: block-diagonal causal over packed samples; None when packed
    segments: torch.Tensor  # [B, S] packed sample of each slot (fillers and row padding: segments of their own)
    position_ids: torch.Tensor  # [B, S] original (pre-drop) positions
    rope: torch.Tensor  # [S, B, 1, head_dim] RoPE angles of `position_ids` (megatron's sequence-first order)
    labels: torch.Tensor  # [B, S]
    ghost: torch.Tensor  # [B, S] bool: row padding and fillers (no label, attended by no other slot)
    packed: PackedView | None = None  # set when the plan is built for THD attention

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
    image_slots: ImageSlots | None = None  # where the first stage puts visual tokens and registers
    ranking: FastVRanking | None = None
    packed: bool = False  # THD attention: the decoder's hidden states are [B*S, 1, H] instead of [S, B, H]

    def to(self, device: torch.device | str) -> "DropPlan":
        """The plan on `device`, every tensor copied without blocking the host (from pinned memory when the target
        is a GPU): the plan is built on the host, where its data-dependent sizes cost no device synchronisation."""
        return _on_device(self, torch.device(device))

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
        """Gather the surviving slots along `seq_dim` of the decoder's hidden states ([S, B, H], or [B*S, 1, H]
        when packed) or of batch-first [B, S, H] ones (`seq_dim=1`).

        The result is a fresh tensor, not a view (megatron's pipeline schedule frees stage outputs in place).
        """
        index = self.keep_index
        if self.packed and seq_dim == 0:
            rows = torch.arange(index.shape[0], device=index.device)[:, None]
            index = (index + rows * self.long.seq_length).reshape(1, -1)
        index = index.t() if seq_dim == 0 else index
        index = index.unsqueeze(-1).expand(*index.shape, hidden_states.shape[-1])
        return torch.gather(hidden_states, seq_dim, index)

    @property
    def output_view(self) -> SequenceView:
        """The view of the last layer's output (what the loss sees)."""
        return self.short if self.drop_layer is not None else self.long

    def loss_mask(self) -> torch.Tensor:
        return self.output_view.labels != IGNORE_INDEX

    def sequence_first(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-first [B, S, ...] -> the decoder's dimension order: [S, B, ...], or [B*S, 1, ...] when packed."""
        return x.reshape(1, -1, *x.shape[2:]).transpose(0, 1) if self.packed else x.transpose(0, 1)

    def batch_first(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's dimension order -> batch-first [B, S, ...] (the inverse of `sequence_first`)."""
        x = x.transpose(0, 1)
        return x.reshape(self.long.position_ids.shape[0], -1, *x.shape[2:]) if self.packed else x


def _on_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside it (dataclass fields, tuples, partial arguments) on `device`."""
    if isinstance(value, torch.Tensor):
        return to_device(value, device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _on_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, partial):
        return partial(value.func, *_on_device(value.args, device),
                       **{k: _on_device(v, device) for k, v in value.keywords.items()})
    if isinstance(value, tuple):
        return tuple(_on_device(v, device) for v in value)
    return value


def uses_packed_attention(cfg: Config) -> bool:
    """Whether the megatron model attends through THD packed sequences: on Transformer Engine, unless a real mask
    is needed (`victor.mask: text_blind` blinds text to visual slots inside a sample)."""
    text_blind = cfg.victor.enabled and cfg.victor.mask == VictorMask.TEXT_BLIND
    return cfg.train.attention_backend == AttentionBackend.TE and not text_blind


def short_alignment(cfg: Config) -> int:
    """What the short length must be a multiple of: 16 under FP8, tp under sequence parallelism (each tensor-
    parallel rank holds an equal slice of it)."""
    fp8 = FP8_ALIGNMENT if cfg.train.fp8 else 1
    tp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    return math.lcm(fp8, tp)


def short_length(batch: VictorBatch, cfg: Config) -> int:
    """The sequence length after the drop that `build_drop_plan` chooses for `batch` (the whole length when
    nothing is dropped): the longest row's survivors, aligned (`short_alignment`)."""
    visual = batch.kinds == KIND_VISUAL
    if not cfg.victor.enabled or not bool(visual.any()):
        return batch.shape[1]
    align = short_alignment(cfg)
    return -(-int((~visual).sum(dim=1).max()) // align) * align


def rope_frequencies(m: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The decoder's RoPE inverse frequencies, base^(-2i/head_dim); with `model.rope_scaling=llama3` scaled as
    Llama 3.1 does (transformers' `_compute_llama3_parameters`): low frequencies divided by the factor, high ones
    kept, a smooth blend between."""
    head_dim = m.hidden_size // m.num_attention_heads
    inv_freq = 1.0 / (m.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if m.rope_scaling != RopeScaling.LLAMA3:
        return inv_freq
    factor, low, high = m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor
    context = m.rope_original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_angles(position_ids: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """[B, S] positions -> [S, B, 1, head_dim] angles, halves duplicated (non-interleaved RoPE), as megatron's
    `RotaryEmbedding` computes them for positions 0..S-1, but for the given (gapped, restarting) positions."""
    freqs = position_ids.t().float()[..., None] * rope_frequencies(m, position_ids.device)
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


def packed_view(segments: torch.Tensor, ghost: torch.Tensor, rope: torch.Tensor) -> PackedView:
    """THD boundaries of a view: one sequence per run of a packed sample's slots in the flattened rows, each
    padded with the ghost slots that follow it (a row's padding, the next row's leading fillers)."""
    seg, ghost_flat = segments.flatten(), ghost.flatten()
    real = ~ghost_flat
    before = torch.ones_like(ghost_flat)
    before[1:] = ghost_flat[:-1] | (seg[1:] != seg[:-1])
    starts = (real & before).nonzero().flatten()
    if bool(ghost_flat[0]):  # leading ghosts: padding of a sequence of length 0
        starts = torch.cat([starts.new_zeros(1), starts])
    padded = torch.cat([starts, starts.new_tensor([seg.numel()])])
    real_before = torch.cat([real.new_zeros(1, dtype=torch.long), real.long().cumsum(0)])
    lengths = real_before[padded[1:]] - real_before[padded[:-1]]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    longest = int((padded[1:] - padded[:-1]).max())
    return PackedView(cu_seqlens=cu.to(torch.int32), cu_seqlens_padded=padded.to(torch.int32),
                      max_seqlen=-(-longest // MAX_SEQLEN_ROUNDING) * MAX_SEQLEN_ROUNDING,
                      rope=rope.transpose(0, 1).reshape(-1, 1, 1, rope.shape[-1]))


def image_slots(batch: VictorBatch, registers_per_image: int, anyres: AnyresSpec | None = None) -> ImageSlots:
    """The flat indices of the batch's visual and register slots, and under anyres where each visual slot's feature
    comes from (built on the host, see `ImageSlots`)."""
    flat = batch.kinds.flatten()
    registers = (flat == KIND_REGISTER).nonzero().flatten()
    rows = torch.arange(registers.numel(), device=flat.device) % max(registers_per_image, 1)
    visual = (flat == KIND_VISUAL).nonzero().flatten()
    source = None
    if anyres is not None and batch.num_images:
        layouts = [anyres.layout(h, w) for h, w in batch.image_sizes.tolist()]
        views = sum(layout.tiles for layout in layouts)
        source = feature_index(layouts, newline=views * (anyres.tile // anyres.patch) ** 2).to(flat.device)
        if source.numel() != visual.numel():
            raise ValueError(f"the batch has {visual.numel()} visual slots, but its images' sizes "
                             f"{batch.image_sizes.tolist()} take {source.numel()}")
    return ImageSlots(visual=visual, registers=registers, register_rows=rows, visual_source=source)


def gather_visual(features: torch.Tensor, newline: torch.Tensor | None, slots: ImageSlots) -> torch.Tensor:
    """The visual slots' embeddings ([visual slots, H]; [N, V, H] at fixed resolution) from the views' projected
    features [views, side^2, H]: under anyres in LLaVA-NeXT's order (each image's base view, then its unpadded tile
    grid row by row, every row closed by `newline`), as one index gather whose index the host built; at fixed
    resolution the features as they are."""
    if slots.visual_source is None:
        return features
    flat = features.reshape(-1, features.shape[-1])
    return torch.cat([flat, newline[None].to(flat.dtype)]).index_select(0, slots.visual_source)


def _view(segments: torch.Tensor, kinds: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
          ghost: torch.Tensor, m: ModelConfig, packed: bool, text_blind: bool = False) -> SequenceView:
    rope = rope_angles(positions, m)
    if packed:
        return SequenceView(mask=None, segments=segments, position_ids=positions, rope=rope, labels=labels,
                            ghost=ghost, packed=packed_view(segments, ghost, rope))
    return SequenceView(mask=attention_mask(segments, kinds, text_blind), segments=segments, position_ids=positions,
                        rope=rope, labels=labels, ghost=ghost)




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
                labels: torch.Tensor, align: int, min_length: int, m: ModelConfig,
                packed: bool) -> tuple[SequenceView, torch.Tensor]:
    """The view of the slots that survive when `dropped` [B, S] slots go, and their indices in the long view."""
    short_len = max(-(-int((~dropped).sum(dim=1).max()) // align) * align, min_length)
    index, filler = keep_index(dropped, min_length=short_len)
    b, length = index.shape
    lone = segments.max() + 1 + torch.arange(b * length, device=kinds.device).view(b, length)
    short_kinds = torch.where(filler, KIND_PAD, kinds.gather(1, index))
    short = _view(segments=torch.where(filler, lone, segments.gather(1, index)), kinds=short_kinds,
                  positions=positions.gather(1, index),
                  labels=torch.where(filler, IGNORE_INDEX, labels.gather(1, index)), ghost=short_kinds == KIND_PAD,
                  m=m, packed=packed)
    return short, index


def build_drop_plan(batch: VictorBatch, cfg: Config, packed: bool = False,
                    min_short_length: int = 0) -> DropPlan:
    """Plan the drop for `batch` under `cfg` (victor or FastV settings, RoPE base and head size, short-length
    alignment).

    Rows keep different numbers of slots when they hold different numbers of images; shorter rows are filled up
    to the common length with some of their own dropped visual slots (fillers: their own segment, no label,
    attended by nobody), so the gather stays rectangular. The short length is aligned the same way (16 under FP8,
    tp under sequence parallelism) and raised to `min_short_length` (a pipeline length bucket). `packed` builds the
    THD description of both views (`PackedView`) instead of masks.
    """
    victor, fastv_layer, m = cfg.victor, cfg.peer.fastv_layer, cfg.model
    align = short_alignment(cfg)
    kinds, positions, labels = batch.kinds, batch.position_ids, batch.labels
    segments = batch.segment_ids()
    visual = kinds == KIND_VISUAL
    text_blind = victor.enabled and victor.mask == VictorMask.TEXT_BLIND
    long = _view(segments, kinds, positions, labels, kinds == KIND_PAD, m, packed, text_blind)
    slots = image_slots(batch, victor.registers_per_image, cfg.vision.anyres())
    if (not victor.enabled and fastv_layer is None) or not bool(visual.any()):
        if positions.shape[1] % align:
            raise ValueError(f"sequence length {positions.shape[1]} is not a multiple of {align}")
        identity = torch.arange(positions.shape[1], device=kinds.device).expand_as(kinds)
        return DropPlan(long=long, short=long, keep_index=identity, drop_layer=None, image_slots=slots, packed=packed)
    short_side = partial(_short_side, segments=segments, kinds=kinds, positions=positions, labels=labels, align=align,
                         min_length=min_short_length, m=m, packed=packed)
    if victor.enabled:
        short, index = short_side(visual)
        return DropPlan(long=long, short=short, keep_index=index, drop_layer=victor.drop_layer, image_slots=slots,
                        packed=packed)
    v = cfg.vision.num_visual_tokens
    ranking = FastVRanking(queries=ranking_queries(segments, labels), visual=visual, visual_tokens=v,
                           keep=math.ceil(v * cfg.peer.fastv_keep), short_side=short_side)
    return DropPlan(long=long, short=None, keep_index=None, drop_layer=fastv_layer, image_slots=slots, ranking=ranking,
                    packed=packed)


def scatter_image_slots(embeddings: torch.Tensor, slots: ImageSlots, visual: torch.Tensor | None,
                        registers: torch.Tensor | None) -> torch.Tensor:
    """Place projected visual tokens and register embeddings into their slots (`DropPlan.image_slots`).

    `embeddings` is batch-first [B, S, H]; `visual` is [N_images, V, H] in row-major slot order, `registers`
    [R, H] (the same R registers after every image) or [N_images, R, H] (each image's own, e.g. pooled). Index
    copies, whose sizes the host knows: no device synchronisation.
    """
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    if visual is not None and visual.numel():
        flat = flat.index_copy(0, slots.visual, visual.reshape(-1, flat.shape[-1]).to(flat.dtype))
    if registers is not None and slots.registers.numel():
        rows = registers.flatten(0, 1) if registers.dim() == 3 else registers[slots.register_rows]
        flat = flat.index_copy(0, slots.registers, rows.to(flat.dtype))
    return flat.view_as(embeddings)
