"""The THD packed-sequence description of the drop plan (Transformer Engine path) against the local, masked path.

The TE path builds no [S, S] mask: attention is described by cu_seqlens (real lengths), padded offsets and
per-token RoPE angles. Rebuilding a mask from those boundaries must give exactly the local path's mask on every
real slot, with ghost slots (row padding, fillers) outside every sequence, and megatron's own THD RoPE must rotate
every slot by the local path's angles. Pure functions, plus megatron's RoPE in this process.
"""

from __future__ import annotations

import pytest
import torch

from megavictor.data.collate import collate_rows, expand_sample
from megavictor.model.batch import IGNORE_INDEX, KIND_VISUAL, VictorBatch
from megavictor.model.drop_plan import DropPlan, PackedView, SequenceView, build_drop_plan
from tests.fixtures import samples, tiny_config

ROWS = {
    "0-1-2 images in one row": [["one_image", "text_only", "two_images"]],
    "rows of 2 and 1 images (fillers lead row 0)": [["two_images"], ["text_only", "one_image"]],
    "rows of 1 and 2 images (fillers lead row 1)": [["text_only", "one_image"], ["two_images"]],
    "text only": [["text_only"], ["text_only", "text_only"]],
}
CONFIGS = {"victor": [], "victor k=1": ["victor.drop_layer=1"], "baseline": ["victor.enabled=false"]}


def _batch(cfg, rows: list[list[str]]) -> VictorBatch:
    s = samples()
    v, r = cfg.vision.num_visual_tokens, cfg.victor.registers_per_image
    return collate_rows([[expand_sample(s[name], v, r) for name in row] for row in rows], cfg.data.seq_length)


def rebuilt_mask(packed: PackedView, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, T] allowed-attention matrix and [T] real-slot flags that THD attention with `padding_causal` computes."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    real = torch.zeros(total, dtype=torch.bool)
    cu, padded = packed.cu_seqlens.tolist(), packed.cu_seqlens_padded.tolist()
    assert padded[0] == 0 and padded[-1] == total and cu[0] == 0
    for i in range(len(cu) - 1):
        start, n = padded[i], cu[i + 1] - cu[i]
        assert 0 <= n <= padded[i + 1] - start, f"sequence {i}: {n} real slots in {padded[i + 1] - start}"
        assert padded[i + 1] - start <= packed.max_seqlen
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        real[start:start + n] = True
    return allowed, real


def local_allowed(view: SequenceView) -> torch.Tensor:
    """The local path's [B, 1, S, S] mask as one [B*S, B*S] allowed matrix (rows never attend each other)."""
    return torch.block_diag(*[~m[0] for m in view.mask])


def _views(plan: DropPlan) -> list[tuple[str, SequenceView]]:
    return [("long", plan.long)] + ([("short", plan.short)] if plan.drop_layer is not None else [])


@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("bucket", [0, 120], ids=["exact", "bucket-120"])
def test_cu_seqlens_describe_the_local_attention(rows: list[list[str]], overrides: list[str], bucket: int) -> None:
    cfg = tiny_config(overrides)
    batch = _batch(cfg, rows)
    local = build_drop_plan(batch, cfg, min_short_length=bucket)
    packed = build_drop_plan(batch, cfg, packed=True, min_short_length=bucket)
    assert torch.equal(packed.keep_index, local.keep_index) and packed.drop_layer == local.drop_layer
    has_images = bool((batch.kinds == KIND_VISUAL).any())
    assert (local.drop_layer is not None) == (has_images and cfg.victor.enabled)
    for (name, lv), (_, pv) in zip(_views(local), _views(packed)):
        label = f"{name} view"
        assert pv.mask is None and lv.packed is None, f"{label}: the packed path must build no [S, S] mask"
        total = lv.segments.numel()
        allowed, real = rebuilt_mask(pv.packed, total)
        ghost = lv.ghost.flatten()
        assert torch.equal(real, ~ghost), f"{label}: THD sequences must cover exactly the non-ghost slots"
        expected = local_allowed(lv)
        assert torch.equal(allowed[real][:, real], expected[real][:, real]), f"{label}: attention pattern differs"
        # Ghost slots are inert on the local path too: no label, attended by no real slot.
        assert not bool(expected[real][:, ghost].any()), f"{label}: a real slot attends a ghost on the local path"
        assert bool((lv.labels.flatten()[ghost] == IGNORE_INDEX).all()), f"{label}: a ghost slot carries a label"
        # Per-token RoPE angles: the original (gapped) positions, slot for slot.
        assert torch.equal(pv.packed.rope[:, 0, 0], lv.rope.transpose(0, 1).reshape(total, -1)), label
    if local.drop_layer is not None and bucket:
        assert local.short.seq_length == bucket
        assert bool(packed.short.ghost[0, 0]), "the bucket's fillers lead row 0: a sequence of length 0 first"
        assert int(packed.short.packed.cu_seqlens[1]) == 0


def test_megatron_thd_rope_rotates_by_the_local_angles() -> None:
    """megatron's `apply_rotary_pos_emb` on THD with our padded cu_seqlens (what Attention passes it) and per-token
    angles rotates every slot exactly as the local path's per-row angles do (non-fused RoPE: the fused THD kernel
    takes no per-token angles)."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megavictor.distributed import init_from_config
    from megavictor.model.specs import language_config, rotate_thd, thd_params
    from tests.host_syncs import HostSyncCounter

    cfg = tiny_config()
    init_from_config(cfg)
    config = language_config(cfg, [cfg.model.num_layers])
    te = tiny_config(["train.attention_backend=te"])
    assert not language_config(te, [te.model.num_layers]).apply_rope_fusion, "the THD path needs unfused RoPE"
    batch = _batch(cfg, ROWS["rows of 2 and 1 images (fillers lead row 0)"])
    local = build_drop_plan(batch, cfg, min_short_length=120)
    packed = build_drop_plan(batch, cfg, packed=True, min_short_length=120)
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    for lv, pv in ((local.long, packed.long), (local.short, packed.short)):
        b, s = lv.position_ids.shape
        x = torch.randn(s, b, cfg.model.num_attention_heads, head_dim)  # [S, B, heads, d]
        expected = apply_rotary_pos_emb(x, lv.rope, config=config)
        thd = packed.sequence_first(x.transpose(0, 1)).squeeze(1)  # [B*S, heads, d]
        rotated = apply_rotary_pos_emb(thd, pv.packed.rope, config=config, cu_seqlens=pv.packed.cu_seqlens_padded,
                                       cp_group=parallel_state.get_context_parallel_group())
        assert torch.allclose(packed.batch_first(rotated.unsqueeze(1)), expected.transpose(0, 1), atol=1e-6)
        # What our core attention applies instead (`ThdParams`): the same values, without megatron's split of the
        # tokens per sequence (`.tolist()` and an `.item()` per sequence, in every layer).
        counter = HostSyncCounter()
        with counter.counting():
            ours = rotate_thd(thd, thd_params(pv).rope, config)
        assert torch.equal(ours, rotated) and not counter.events, counter.events


def test_packed_dimension_order_drops_the_same_slots() -> None:
    """The decoder's packed order ([B*S, 1, H], rows one after the other) drops exactly the local order's slots."""
    cfg = tiny_config()
    batch = _batch(cfg, ROWS["rows of 2 and 1 images (fillers lead row 0)"])
    local, packed = build_drop_plan(batch, cfg), build_drop_plan(batch, cfg, packed=True)
    hidden = torch.randn(*batch.shape, 8)  # [B, S, H]
    assert packed.sequence_first(hidden).shape == (hidden.shape[0] * hidden.shape[1], 1, 8)
    assert torch.equal(packed.batch_first(packed.sequence_first(hidden)), hidden)
    dropped = packed.batch_first(packed.drop(packed.sequence_first(hidden)))
    assert torch.equal(dropped, local.drop(hidden, seq_dim=1))
    assert torch.equal(local.batch_first(local.drop(local.sequence_first(hidden))), dropped)
