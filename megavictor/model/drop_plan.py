"""The Victor drop plan: which slots survive layer k, and each layer's attention inputs on both sides of it.

One `DropPlan` is built per micro-batch by one pure function, `build_drop_plan`, from slot metadata alone (kinds,
positions, labels, packed boundaries) and the config, so every pipeline stage builds the same plan without
receiving activations' metadata, and the megatron model, its reference twin and greedy evaluation share it.
FastV (`peer.fastv_layer`) and PyramidDrop (`peer.pyramid_layers`) are the exception: which visual slots survive
a drop at layer K depends on layer K-1's attention, so their plan leaves each drop's view open (`ranking`) until the
model calls `DropPlan.rank` with those probabilities. Layers < k see the `long` view (all slots); from each drop
(`DropStage`: Victor's and FastV's one, PyramidDrop's several) on, the layers see the view of the previous one's
survivors (Victor: registers, text, padding), gathered with the convention shared with the exported HF model
(`megavictor.hf_model.victor_drop.keep_index`: survivors right-aligned, fillers on the left); `short` is the last.
Every view carries its complete attention inputs: the mask, the original (pre-drop) positions and their RoPE angles,
the packed-sample segments, and the labels of the slots it holds.

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


# (the previous view's dropped slots [B, S_prev], its indices into the long view) -> (view, index, keep_index)
NextView = Callable[[torch.Tensor, torch.Tensor], tuple[SequenceView, torch.Tensor, torch.Tensor]]


@dataclass
class DropStage:
    """One drop: from decoder layer `layer` on, the decoder runs on `view`, the slots `index` of the previous stage's
    view (of the long view for the first stage), which are the long view's slots `keep_index`.

    Victor's stage is complete when the plan is built; a ranked stage (FastV, PyramidDrop) has only `keep` until
    `DropPlan.rank`, called in layer `layer` - 1, fills in the rest.
    """

    layer: int
    keep: int | None = None  # visual slots each image keeps from `layer` on (ranked stages)
    view: SequenceView | None = None
    index: torch.Tensor | None = None  # [B, S_i] indices into the previous stage's view
    keep_index: torch.Tensor | None = None  # [B, S_i] indices into the long view


@dataclass
class AttentionRanking:
    """What the ranked drops (FastV, PyramidDrop) need to choose each image's surviving visual slots once the
    attention of the layer before a drop is known."""

    visual: torch.Tensor  # [B, S] bool: the long view's visual slots
    visual_tokens: int  # per image, in the long view
    every_turn: bool  # rank by every turn's last instruction slot (PyramidDrop), not only the first turn's (FastV)
    next_view: NextView


@dataclass
class DropPlan:
    """Per-micro-batch Victor plan: the long view and the drops (`stages`, by ascending layer; none for the baseline
    or a micro-batch without visual slots). Under FastV and PyramidDrop a stage's view is None until `rank` is
    called in the layer before it."""

    long: SequenceView
    stages: tuple[DropStage, ...] = ()
    image_slots: ImageSlots | None = None  # where the first stage puts visual tokens and registers
    ranking: AttentionRanking | None = None
    packed: bool = False  # THD attention: the decoder's hidden states are [B*S, 1, H] instead of [S, B, H]

    @property
    def drop_layer(self) -> int | None:
        """The first layer that runs on fewer slots; None when nothing is dropped."""
        return self.stages[0].layer if self.stages else None

    @property
    def short(self) -> SequenceView | None:
        """The view of the layers after the last drop (the long view when nothing is dropped; None until ranked)."""
        return self.stages[-1].view if self.stages else self.long

    @property
    def keep_index(self) -> torch.Tensor | None:
        """[B, S'] indices into the long sequence of the slots of `short`."""
        return self.stages[-1].keep_index if self.stages else _identity(self.long)

    @property
    def views(self) -> list[SequenceView | None]:
        """The long view, then each drop's: layer `i` runs on `views[stage_of(i)]`."""
        return [self.long, *(stage.view for stage in self.stages)]

    def stage_of(self, layer_index: int) -> int:
        """How many drops happen at or before layer `layer_index`."""
        return sum(stage.layer <= layer_index for stage in self.stages)

    def drops_in(self, layer_index: int) -> bool:
        """Whether layer `layer_index` gathers the survivors of a drop (`drop`) before it attends."""
        return any(stage.layer == layer_index for stage in self.stages)

    def to(self, device: torch.device | str) -> "DropPlan":
        """The plan on `device`, every tensor copied without blocking the host (from pinned memory when the target
        is a GPU): the plan is built on the host, where its data-dependent sizes cost no device synchronisation."""
        return _on_device(self, torch.device(device))

    def ranks_in(self, layer_index: int) -> bool:
        """Whether `layer_index` is a layer whose attention probabilities `rank` needs (the layer before a ranked
        drop that is still open)."""
        return self.ranking is not None and any(stage.layer == layer_index + 1 and stage.view is None
                                                for stage in self.stages)

    def rank(self, head_mean_probs: torch.Tensor) -> None:
        """Close the next open drop: of the visual slots the previous view holds, each image keeps the stage's `keep`
        that receive the most attention from their sample's query slots (`ranking_queries`; several: their mean) in
        `head_mean_probs` [B, S, S] (the layer's attention probabilities averaged over heads)."""
        r = self.ranking
        n = next(i for i, stage in enumerate(self.stages) if stage.view is None)
        view, before = self.views[n], self.stages[n - 1].keep_index if n else _identity(self.long)
        held = r.visual.gather(1, before)  # the images' visual slots in this view, and the previous drop's fillers
        visual = held & ~view.ghost
        weights = (view.segments[:, :, None] == view.segments[:, None, :]) & ranking_queries(
            view.segments, view.labels, r.every_turn)[:, :, None]  # [B, query, key]
        received = (head_mean_probs.detach() * weights).sum(dim=1) / weights.sum(dim=1)  # [B, S]
        scores = received[visual].view(-1, self.stages[n - 1].keep if n else r.visual_tokens)
        stage = self.stages[n]
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(stage.keep, dim=1).indices, True)
        dropped = held & view.ghost
        dropped[visual] = ~kept.flatten()
        stage.view, stage.index, stage.keep_index = r.next_view(dropped, before)

    def view_for_layer(self, layer_index: int) -> SequenceView:
        n = self.stage_of(layer_index)
        view = self.views[n]
        if view is None:
            raise RuntimeError(f"layer {layer_index} runs before layer {self.stages[n - 1].layer - 1} ranked the "
                               "visual slots (DropPlan.rank)")
        return view

    def drop(self, hidden_states: torch.Tensor, seq_dim: int = 0, layer_index: int | None = None) -> torch.Tensor:
        """Gather the slots that survive the drop at layer `layer_index` (default: the first drop) along `seq_dim` of
        the decoder's hidden states ([S, B, H], or [B*S, 1, H] when packed) or of batch-first [B, S, H] ones
        (`seq_dim=1`), which hold the previous view.

        The result is a fresh tensor, not a view (megatron's pipeline schedule frees stage outputs in place).
        """
        n = 0 if layer_index is None else self.stage_of(layer_index) - 1
        index = self.stages[n].index
        if self.packed and seq_dim == 0:
            rows = torch.arange(index.shape[0], device=index.device)[:, None]
            index = (index + rows * self.views[n].seq_length).reshape(1, -1)
        index = index.t() if seq_dim == 0 else index
        index = index.unsqueeze(-1).expand(*index.shape, hidden_states.shape[-1])
        return torch.gather(hidden_states, seq_dim, index)

    @property
    def output_view(self) -> SequenceView:
        """The view of the last layer's output (what the loss sees)."""
        return self.short

    def loss_mask(self) -> torch.Tensor:
        return self.output_view.labels != IGNORE_INDEX

    def sequence_first(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-first [B, S, ...] -> the decoder's dimension order: [S, B, ...], or [B*S, 1, ...] when packed."""
        return x.reshape(1, -1, *x.shape[2:]).transpose(0, 1) if self.packed else x.transpose(0, 1)

    def batch_first(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's dimension order -> batch-first [B, S, ...] (the inverse of `sequence_first`)."""
        x = x.transpose(0, 1)
        return x.reshape(self.long.position_ids.shape[0], -1, *x.shape[2:]) if self.packed else x


def _identity(view: SequenceView) -> torch.Tensor:
    """[B, S] indices of a view's own slots."""
    b, s = view.position_ids.shape
    return torch.arange(s, device=view.position_ids.device).expand(b, s)


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




def ranking_queries(segments: torch.Tensor, labels: torch.Tensor, every_turn: bool = False) -> torch.Tensor:
    """[B, S] bool: the slots whose attention ranks the visual slots of their packed sample. FastV: the slot that
    predicts the sample's first target (the last prompt token, as at inference). `every_turn` (PyramidDrop's "last
    instruction tokens" in training): also the slot before each later answer, the last token of its turn's question.
    A sample without targets: its last slot."""
    b, s = segments.shape
    labelled = labels != IGNORE_INDEX
    answer_starts = labelled.clone()
    answer_starts[:, 1:] &= ~labelled[:, :-1] | (segments[:, 1:] != segments[:, :-1])
    flat_segments, flat = segments.flatten(), torch.arange(b * s, device=segments.device)
    n = int(flat_segments.max()) + 1
    last = torch.full((n,), -1, device=segments.device).scatter_reduce(0, flat_segments, flat, reduce="amax")
    first = torch.full((n,), b * s, device=segments.device).scatter_reduce(
        0, flat_segments[labelled.flatten()], flat[labelled.flatten()], reduce="amin")
    queries = answer_starts.flatten() if every_turn else torch.zeros_like(flat, dtype=torch.bool)
    queries[torch.where(first < b * s, first, last)] = True
    return queries.view(b, s)


def _next_view(dropped: torch.Tensor, before: torch.Tensor, segments: torch.Tensor, kinds: torch.Tensor,
               positions: torch.Tensor, labels: torch.Tensor, align: int, min_length: int, m: ModelConfig,
               packed: bool) -> tuple[SequenceView, torch.Tensor, torch.Tensor]:
    """The view of the slots of a view (`before` [B, S_prev]: its slots' indices in the long view, whose segments,
    kinds, positions and labels are given) that survive when its `dropped` [B, S_prev] slots go; their indices in that
    view and in the long view. A view's fillers are among its dropped slots: the next drop's fillers come from them
    and the slots it drops, so every filler is a slot of the view before."""
    short_len = max(-(-int((~dropped).sum(dim=1).max()) // align) * align, min_length)
    index, filler = keep_index(dropped, min_length=short_len)
    kept = before.gather(1, index)
    b, length = index.shape
    lone = segments.max() + 1 + torch.arange(b * length, device=kinds.device).view(b, length)
    short_kinds = torch.where(filler, KIND_PAD, kinds.gather(1, kept))
    short = _view(segments=torch.where(filler, lone, segments.gather(1, kept)), kinds=short_kinds,
                  positions=positions.gather(1, kept),
                  labels=torch.where(filler, IGNORE_INDEX, labels.gather(1, kept)), ghost=short_kinds == KIND_PAD,
                  m=m, packed=packed)
    return short, index, kept


def ranked_drops(cfg: Config) -> list[tuple[int, int]]:
    """The attention-ranked drops of `cfg` as (layer, visual slots each image keeps from it on): FastV's one (its
    `fastv_keep` share, rounded up), PyramidDrop's stages; none for Victor and the baseline."""
    pe = cfg.peer
    if pe.fastv_layer is not None:
        return [(pe.fastv_layer, math.ceil(cfg.vision.num_visual_tokens * pe.fastv_keep))]
    return list(zip(pe.pyramid_layers, pe.pyramid_keep)) if pe.pyramid_layers is not None else []


def build_drop_plan(batch: VictorBatch, cfg: Config, packed: bool = False,
                    min_short_length: int = 0) -> DropPlan:
    """Plan the drop for `batch` under `cfg` (Victor, FastV or PyramidDrop settings, RoPE base and head size,
    short-length alignment).

    Rows keep different numbers of slots when they hold different numbers of images; shorter rows are filled up
    to the common length with some of their own dropped visual slots (fillers: their own segment, no label,
    attended by nobody), so the gather stays rectangular. The short length is aligned the same way (16 under FP8,
    tp under sequence parallelism) and raised to `min_short_length` (a pipeline length bucket). `packed` builds the
    THD description of both views (`PackedView`) instead of masks.
    """
    victor, drops, m = cfg.victor, ranked_drops(cfg), cfg.model
    align = short_alignment(cfg)
    kinds, positions, labels = batch.kinds, batch.position_ids, batch.labels
    segments = batch.segment_ids()
    visual = kinds == KIND_VISUAL
    text_blind = victor.enabled and victor.mask == VictorMask.TEXT_BLIND
    long = _view(segments, kinds, positions, labels, kinds == KIND_PAD, m, packed, text_blind)
    slots = image_slots(batch, victor.registers_per_image, cfg.vision.anyres())
    if (not victor.enabled and not drops) or not bool(visual.any()):
        if positions.shape[1] % align:
            raise ValueError(f"sequence length {positions.shape[1]} is not a multiple of {align}")
        return DropPlan(long=long, image_slots=slots, packed=packed)
    next_view = partial(_next_view, segments=segments, kinds=kinds, positions=positions, labels=labels, align=align,
                        min_length=min_short_length, m=m, packed=packed)
    if victor.enabled:
        short, index, kept = next_view(visual, _identity(long))
        return DropPlan(long=long, stages=(DropStage(victor.drop_layer, view=short, index=index, keep_index=kept),),
                        image_slots=slots, packed=packed)
    ranking = AttentionRanking(visual=visual, visual_tokens=cfg.vision.num_visual_tokens,
                               every_turn=cfg.peer.pyramid_layers is not None, next_view=next_view)
    return DropPlan(long=long, stages=tuple(DropStage(layer, keep=keep) for layer, keep in drops), image_slots=slots,
                    ranking=ranking, packed=packed)


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
