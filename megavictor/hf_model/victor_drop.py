"""The Victor drop's one gather convention (standalone: imports only torch, so it ships with HF exports).

Used by megavictor's megatron and reference models (`megavictor.model.drop_plan`) and by the exported HF model
(`modeling_victor_llava.py`), so that all of them keep the same slots in the same order after layer k: in each row,
the surviving slots (registers, text, padding) keep their order and are right-aligned; a row with fewer survivors
than the longest row is filled on the LEFT with some of its own dropped visual slots, the "fillers", which the
models isolate (own segment, no label, attended by nothing). Right alignment keeps each row's last input slot last,
which `generate()` relies on.
"""

from __future__ import annotations

import torch


def keep_index(visual: torch.Tensor, min_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, L] of the slots that survive the drop, right-aligned per row, and which of them are fillers.

    L is the largest number of non-visual slots in a row, raised to `min_length` (e.g. to align the short length
    for FP8 GEMMs); a row with fewer is filled on the left with its own last dropped visual slots.
    """
    s = visual.shape[1]
    kept = (~visual).sum(dim=1)
    length = max(int(kept.max()), min_length)
    if length > s:
        raise ValueError(f"cannot keep {length} slots of a {s}-slot row")
    order = torch.arange(s, device=visual.device)
    # Ascending sort puts visual slots first, then kept slots, each in sequence order; keep the last `length`.
    index = ((~visual).long() * s + order).argsort(dim=1)[:, s - length:]
    filler = torch.arange(length, device=visual.device)[None, :] < (length - kept)[:, None]
    return index, filler


def segment_ids(cu_seqlens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[B, S] index of the packed sample each slot belongs to, from boundaries over the flattened B*S slots."""
    flat = torch.arange(shape[0] * shape[1], device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.long(), flat, right=True) - 1).view(shape)


def runs_of(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries (int32, flash-attn varlen's `cu_seqlens`) of the runs of equal ids in the flattened `segments`, and
    the longest run."""
    flat = segments.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    cu = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
