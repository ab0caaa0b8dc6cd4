"""The model's input format: packed rows of text, visual and register slots.

A row of `seq_length` slots holds one or more samples back to back (packing). Every image occupies
`V` visual slots followed directly by `R` register slots (R = 0 for the plain LLaVA baseline). Per-sample
boundaries are `cu_seqlens` over the flattened [B * S] slot stream (the THD convention of Transformer Engine and
flash-attn varlen); a row's tail padding is a segment of its own, so no row boundary is ever inside a segment.

Labels are already shifted: `labels[i]` is the token that the output at slot i must predict, or IGNORE_INDEX.
Visual slots never carry a label (they are dropped before the loss under Victor).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megavictor.hf.victor_drop import segment_ids

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = -1  # stands for one image in `Sample.tokens`

KIND_TEXT, KIND_VISUAL, KIND_REGISTER, KIND_PAD = 0, 1, 2, 3


@dataclass
class Sample:
    """One example before slot expansion: text token ids with IMAGE_PLACEHOLDER where each image goes.

    `trainable[i]` says whether text token i is a target (assistant tokens in LLaVA's chat formats).
    """

    tokens: list[int]
    trainable: list[bool]
    images: list[torch.Tensor]  # [C, H, W] each, one per placeholder, already normalised

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.trainable):
            raise ValueError(f"Sample: {len(self.tokens)} tokens but {len(self.trainable)} trainable flags")
        n_placeholders = sum(t == IMAGE_PLACEHOLDER for t in self.tokens)
        if n_placeholders != len(self.images):
            raise ValueError(f"Sample: {n_placeholders} image placeholders but {len(self.images)} images")

    def num_slots(self, visual_tokens: int, registers: int) -> int:
        """Slots this sample occupies once each image is expanded to visual + register slots."""
        n_images = len(self.images)
        return len(self.tokens) - n_images + n_images * (visual_tokens + registers)


@dataclass
class ExpandedSample:
    """A sample expanded to slots; all lists have the same length."""

    tokens: list[int]
    kinds: list[int]
    labels: list[int]
    images: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.tokens)


def expand_sample(sample: Sample, visual_tokens: int, registers: int, pad_id: int = 0) -> ExpandedSample:
    """Expand image placeholders into V visual + R register slots and shift targets into per-slot labels."""
    tokens: list[int] = []
    kinds: list[int] = []
    trainable: list[bool] = []
    for tok, train in zip(sample.tokens, sample.trainable):
        if tok == IMAGE_PLACEHOLDER:
            tokens += [pad_id] * (visual_tokens + registers)
            kinds += [KIND_VISUAL] * visual_tokens + [KIND_REGISTER] * registers
            trainable += [False] * (visual_tokens + registers)
        else:
            tokens.append(tok)
            kinds.append(KIND_TEXT)
            trainable.append(train)
    labels = [IGNORE_INDEX] * len(tokens)
    for i in range(len(tokens) - 1):
        if trainable[i + 1] and kinds[i] != KIND_VISUAL:
            labels[i] = tokens[i + 1]
    return ExpandedSample(tokens=tokens, kinds=kinds, labels=labels, images=list(sample.images))


def truncate_sample(sample: Sample, max_slots: int, visual_tokens: int, registers: int) -> Sample:
    """Drop tokens from the end until the sample fits in `max_slots`; an image is kept whole or not at all."""
    image_slots = visual_tokens + registers
    used, keep, n_images = 0, 0, 0
    for tok in sample.tokens:
        need = image_slots if tok == IMAGE_PLACEHOLDER else 1
        if used + need > max_slots:
            break
        used += need
        keep += 1
        n_images += tok == IMAGE_PLACEHOLDER
    return Sample(sample.tokens[:keep], sample.trainable[:keep], sample.images[:n_images])


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
    images: torch.Tensor  # [N, C, H, W] float, in order of their visual blocks (row-major)
    image_segments: torch.Tensor  # [N] int64 index of the segment (packed sample) holding each image

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

    def validate(self, visual_tokens: int, registers: int) -> None:
        """Check the slot invariants the model relies on; raises ValueError naming the broken one."""
        b, s = self.shape
        for name in ("kinds", "position_ids", "labels"):
            if tuple(getattr(self, name).shape) != (b, s):
                raise ValueError(f"VictorBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected {(b, s)}")
        n_visual = int((self.kinds == KIND_VISUAL).sum())
        if n_visual != self.images.shape[0] * visual_tokens:
            raise ValueError(f"VictorBatch: {n_visual} visual slots for {self.images.shape[0]} images of "
                             f"{visual_tokens} tokens")
        if int((self.kinds == KIND_REGISTER).sum()) != self.images.shape[0] * registers:
            raise ValueError(f"VictorBatch: register slots do not match {registers} per image")
        if bool((self.labels[self.kinds == KIND_VISUAL] != IGNORE_INDEX).any()):
            raise ValueError("VictorBatch: visual slots must not carry labels")
        cu = self.cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != b * s or any(x >= y for x, y in zip(cu, cu[1:])):
            raise ValueError(f"VictorBatch.cu_seqlens {cu} is not strictly increasing from 0 to {b * s}")
        row_starts = set(range(0, b * s, s))
        if not row_starts.issubset(set(cu)):
            raise ValueError("VictorBatch.cu_seqlens must start a new segment at every row")


def collate_rows(rows: list[list[ExpandedSample]], seq_length: int, pad_id: int = 0,
                 image_shape: tuple[int, int, int] | None = None) -> VictorBatch:
    """Pack rows of expanded samples into one VictorBatch of shape [len(rows), seq_length]."""
    tokens, kinds, positions, labels, images, image_segments = [], [], [], [], [], []
    cu = [0]
    for r, row in enumerate(rows):
        used = sum(len(s) for s in row)
        if used > seq_length:
            raise ValueError(f"row {r} holds {used} slots, more than seq_length={seq_length}")
        row_tokens, row_kinds, row_pos, row_labels = [], [], [], []
        for sample in row:
            segment = len(cu) - 1
            row_tokens += sample.tokens
            row_kinds += sample.kinds
            row_pos += list(range(len(sample)))
            row_labels += sample.labels
            images += sample.images
            image_segments += [segment] * len(sample.images)
            cu.append(cu[-1] + len(sample))
        pad = seq_length - used
        if pad:
            row_tokens += [pad_id] * pad
            row_kinds += [KIND_PAD] * pad
            row_pos += list(range(pad))
            row_labels += [IGNORE_INDEX] * pad
            cu.append(cu[-1] + pad)
        tokens.append(row_tokens)
        kinds.append(row_kinds)
        positions.append(row_pos)
        labels.append(row_labels)
    if images:
        image_tensor = torch.stack(images)
    else:
        c, h, w = image_shape if image_shape is not None else (3, 1, 1)
        image_tensor = torch.zeros(0, c, h, w)
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return VictorBatch(tokens=as_long(tokens), kinds=as_long(kinds), position_ids=as_long(positions),
                       labels=as_long(labels), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                       images=image_tensor, image_segments=as_long(image_segments))
