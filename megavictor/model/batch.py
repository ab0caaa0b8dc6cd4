"""The model's input format: packed rows of text, visual and register slots.

A row of `seq_length` slots holds one or more samples back to back (packing). Every image occupies
`V` visual slots followed directly by `R` register slots (R = 0 for the plain LLaVA baseline). Under LLaVA-NeXT's
anyres an image's visual slots are its base view's patches then its tiles' (unpadded, each row closed by a
newline), so their count varies per image (`megavictor.hf_model.anyres`). Per-sample boundaries are `cu_seqlens`
over the flattened [B * S] slot stream (the THD convention of Transformer Engine and flash-attn varlen); a row's
tail padding is a segment of its own, so no row boundary is ever inside a segment.

Labels are already shifted: `labels[i]` is the token that the output at slot i must predict, or IGNORE_INDEX.
Visual slots never carry a label (they are dropped before the loss under Victor).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megavictor.hf_model.anyres import AnyresSpec
from megavictor.hf_model.victor_drop import segment_ids

IGNORE_INDEX = -100

KIND_TEXT, KIND_VISUAL, KIND_REGISTER, KIND_PAD = 0, 1, 2, 3


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU goes through pinned memory and does not block the host
    (the copy is ordered on the current stream before any kernel that reads it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class VictorBatch:
    """One micro-batch in the model's input format ([B, S] tensors, slot-major images)."""

    tokens: torch.Tensor  # [B, S] int64 text ids (pad id at non-text slots)
    kinds: torch.Tensor  # [B, S] int64 KIND_* per slot
    position_ids: torch.Tensor  # [B, S] int64, restarting at 0 for every packed sample
    labels: torch.Tensor  # [B, S] int64 shifted targets, IGNORE_INDEX where no loss
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32 boundaries over the flattened B*S slots
    # [T, C, H, W] float: the ViT's views, in order of their images' visual blocks (row-major): one per image (T = N),
    # or under anyres each image's base view then its tiles
    images: torch.Tensor
    image_segments: torch.Tensor  # [N] int64 index of the segment (packed sample) holding each image
    image_sizes: torch.Tensor  # [N, 2] int64 each image's original (height, width) under anyres; zeros otherwise

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def segment_ids(self) -> torch.Tensor:
        """[B, S] index of the packed sample each slot belongs to (global over the batch)."""
        return segment_ids(self.cu_seqlens.to(self.tokens.device), self.tokens.shape)

    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> "VictorBatch":
        """The batch on `device`, copied as `to_device` copies (without blocking the host, for a GPU)."""
        device = torch.device(device)
        return VictorBatch(**{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def pin_memory(self) -> "VictorBatch":
        """The batch in pinned host memory (called by the DataLoader's pinning thread, `pin_memory=True`), so that
        `to` copies it to the GPU asynchronously without pinning it on the training thread."""
        return VictorBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def num_images(self) -> int:
        return self.image_segments.shape[0]

    def validate(self, visual_tokens: int, registers: int, anyres: AnyresSpec | None = None) -> None:
        """Check the slot invariants the model relies on; raises ValueError naming the broken one."""
        b, s = self.shape
        for name in ("kinds", "position_ids", "labels"):
            if tuple(getattr(self, name).shape) != (b, s):
                raise ValueError(f"VictorBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected {(b, s)}")
        layouts = [anyres.layout(h, w) for h, w in self.image_sizes.tolist()] if anyres else []
        views = sum(layout.tiles for layout in layouts) if anyres else self.num_images
        if self.images.shape[0] != views:
            raise ValueError(f"VictorBatch: {self.images.shape[0]} image views for {self.num_images} images that "
                             f"need {views}")
        n_visual = int((self.kinds == KIND_VISUAL).sum())
        expected = sum(layout.tokens for layout in layouts) if anyres else self.num_images * visual_tokens
        if n_visual != expected:
            raise ValueError(f"VictorBatch: {n_visual} visual slots for {self.num_images} images that take {expected}")
        if int((self.kinds == KIND_REGISTER).sum()) != self.num_images * registers:
            raise ValueError(f"VictorBatch: register slots do not match {registers} per image")
        if bool((self.labels[self.kinds == KIND_VISUAL] != IGNORE_INDEX).any()):
            raise ValueError("VictorBatch: visual slots must not carry labels")
        cu = self.cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != b * s or any(x >= y for x, y in zip(cu, cu[1:])):
            raise ValueError(f"VictorBatch.cu_seqlens {cu} is not strictly increasing from 0 to {b * s}")
        row_starts = set(range(0, b * s, s))
        if not row_starts.issubset(set(cu)):
            raise ValueError("VictorBatch.cu_seqlens must start a new segment at every row")
