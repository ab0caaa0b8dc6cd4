"""From samples to the model's input: image placeholders expanded to visual and register slots, targets shifted into
per-slot labels, samples truncated to a row and packed rows collated into a `VictorBatch` (`megavictor.model.batch`
defines that format; this is the data side that produces it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megavictor.model.batch import IGNORE_INDEX, KIND_PAD, KIND_REGISTER, KIND_TEXT, KIND_VISUAL, VictorBatch

IMAGE_PLACEHOLDER = -1  # stands for one image in `Sample.tokens`


@dataclass
class Sample:
    """One example before slot expansion: text token ids with IMAGE_PLACEHOLDER where each image goes.

    `trainable[i]` says whether text token i is a target (assistant tokens in LLaVA's chat formats).
    """

    tokens: list[int]
    trainable: list[bool]
    images: list[torch.Tensor]  # one per placeholder, normalised: [C, H, W], or under anyres its views [T_i, C, H, W]
    # Anyres only (None at fixed resolution), set together by whoever tiled the images: each image's original
    # (height, width), which the model's feature gather needs, and its visual tokens (`AnyresLayout.tokens`).
    image_sizes: list[tuple[int, int]] | None = None
    image_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.trainable):
            raise ValueError(f"Sample: {len(self.tokens)} tokens but {len(self.trainable)} trainable flags")
        n_placeholders = sum(t == IMAGE_PLACEHOLDER for t in self.tokens)
        if n_placeholders != len(self.images):
            raise ValueError(f"Sample: {n_placeholders} image placeholders but {len(self.images)} images")
        if (self.image_sizes is None) != (self.image_tokens is None) or (
                self.image_sizes is not None and not len(self.image_sizes) == len(self.image_tokens) == n_placeholders):
            raise ValueError("Sample: image_sizes and image_tokens go together, one of each per image")

    def visual_counts(self, visual_tokens: int) -> list[int]:
        """Each image's visual slots: its own count under anyres, else `visual_tokens`."""
        return list(self.image_tokens) if self.image_tokens is not None else [visual_tokens] * len(self.images)

    def num_slots(self, visual_tokens: int, registers: int) -> int:
        """Slots this sample occupies once each image is expanded to visual + register slots."""
        counts = self.visual_counts(visual_tokens)
        return len(self.tokens) - len(counts) + sum(counts) + len(counts) * registers


@dataclass
class ExpandedSample:
    """A sample expanded to slots; all lists have the same length."""

    tokens: list[int]
    kinds: list[int]
    labels: list[int]
    images: list[torch.Tensor]
    image_sizes: list[tuple[int, int]] | None = None  # anyres only, as `Sample.image_sizes`

    def __len__(self) -> int:
        return len(self.tokens)


def expand_sample(sample: Sample, visual_tokens: int, registers: int, pad_id: int = 0) -> ExpandedSample:
    """Expand image placeholders into visual slots (V each, or each anyres image's own count) + R register slots and
    shift targets into per-slot labels."""
    tokens: list[int] = []
    kinds: list[int] = []
    trainable: list[bool] = []
    counts = iter(sample.visual_counts(visual_tokens))
    for tok, train in zip(sample.tokens, sample.trainable):
        if tok == IMAGE_PLACEHOLDER:
            visual = next(counts)
            tokens += [pad_id] * (visual + registers)
            kinds += [KIND_VISUAL] * visual + [KIND_REGISTER] * registers
            trainable += [False] * (visual + registers)
        else:
            tokens.append(tok)
            kinds.append(KIND_TEXT)
            trainable.append(train)
    labels = [IGNORE_INDEX] * len(tokens)
    for i in range(len(tokens) - 1):
        if trainable[i + 1] and kinds[i] != KIND_VISUAL:
            labels[i] = tokens[i + 1]
    return ExpandedSample(tokens=tokens, kinds=kinds, labels=labels, images=list(sample.images),
                          image_sizes=sample.image_sizes)


def truncate_sample(sample: Sample, max_slots: int, visual_tokens: int, registers: int) -> Sample:
    """Drop tokens from the end until the sample fits in `max_slots`; an image is kept whole or not at all."""
    counts = sample.visual_counts(visual_tokens)
    used, keep, n_images = 0, 0, 0
    for tok in sample.tokens:
        need = counts[n_images] + registers if tok == IMAGE_PLACEHOLDER else 1
        if used + need > max_slots:
            break
        used += need
        keep += 1
        n_images += tok == IMAGE_PLACEHOLDER
    cut = (lambda values: None if values is None else values[:n_images])  # noqa: E731
    return Sample(sample.tokens[:keep], sample.trainable[:keep], sample.images[:n_images],
                  cut(sample.image_sizes), cut(sample.image_tokens))


def collate_rows(rows: list[list[ExpandedSample]], seq_length: int, pad_id: int = 0,
                 image_shape: tuple[int, int, int] | None = None) -> VictorBatch:
    """Pack rows of expanded samples into one VictorBatch of shape [len(rows), seq_length]; anyres images' views
    are concatenated, image after image."""
    tokens, kinds, positions, labels, images, image_segments, image_sizes = [], [], [], [], [], [], []
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
            image_sizes += sample.image_sizes or [(0, 0)] * len(sample.images)
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
        image_tensor = torch.cat(images) if images[0].dim() == 4 else torch.stack(images)
    else:
        c, h, w = image_shape if image_shape is not None else (3, 1, 1)
        image_tensor = torch.zeros(0, c, h, w)
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return VictorBatch(tokens=as_long(tokens), kinds=as_long(kinds), position_ids=as_long(positions),
                       labels=as_long(labels), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                       images=image_tensor, image_segments=as_long(image_segments),
                       image_sizes=as_long(image_sizes).view(-1, 2))
