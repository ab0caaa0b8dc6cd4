"""One global row order, computed from the length index alike by every rank: which samples form each row.

The order depends only on the index and the order-defining settings (seed, sequence length, slots per image or the
anyres grids that give each image its slots from its indexed size, packing buffer), never on tp/pp/dp or the number
of workers. Each epoch is a seeded permutation of the split; samples flow through the streaming
first-fit-decreasing packer (`packing.py`) into rows of `seq_length` slots, and consecutive rows form the
micro-batches and global batches. A position in the data is therefore one number, the rows consumed,
which restores exactly under any layout. Every rank derives from the order the rows it must decode (its own
micro-batches) and the global batch's loss tokens (the loss normaliser) without decoding the rest.

Samples longer than `seq_length` are truncated from the end when at least one answer token survives, and skipped
otherwise; both are decided here, once per sample of the split (not per epoch), and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import count

import numpy as np

from megavictor.data.index import IMAGE_RUN, SplitIndex, loss_tokens, slots, truncate
from megavictor.data.packing import Packer, PackItem
from megavictor.hf_model.anyres import AnyresSpec
from megavictor.model.pipeline_split import SampleShape

SKIP_KINDS = ("too_long", "image_too_small", "image_too_large")
Row = tuple[int, ...]  # sample indices of the split, in packing order; () is an all-padding row


@dataclass(frozen=True)
class RowOrderSpec:
    """Everything that fixes the row sequence besides the index."""

    prompt_format: str
    seq_length: int
    micro_batch_size: int
    image_slots: int  # visual + register slots per image (under anyres one view's; each image's come from its size)
    registers: int  # register slots per image (a trained token right after a visual slot has no label when 0)
    pack_buffer: int
    seed: int
    min_image_side: int = 1  # samples with a smaller image side are skipped
    max_image_pixels: int = 2**62  # samples with a larger image are skipped
    shuffle: bool = True
    epochs: int | None = None  # None: forever (training); n: n epochs, the last micro-batch padded with empty rows
    anyres: AnyresSpec | None = None  # LLaVA-NeXT's grids: each image's visual slots follow from its size

    def fingerprint(self) -> str:
        """Names the order in a checkpoint's data position (a resume under other order settings is refused);
        a fixed-resolution spec hashes as before anyres existed, so its checkpoints still resume."""
        fields = asdict(self)
        if self.anyres is None:
            del fields["anyres"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def image_costs(split: SplitIndex, spec: RowOrderSpec, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(visual slots, ViT views) of each of the split's `n_images` images, sample after sample: at fixed resolution
    the same for all; under anyres from each image's size in the index (one layout per distinct size)."""
    if spec.anyres is None:
        return (np.full(n_images, spec.image_slots - spec.registers, dtype=np.int64),
                np.ones(n_images, dtype=np.int64))
    assert split.image_hw is not None and len(split.image_hw) == n_images
    sizes, inverse = np.unique(split.image_hw, axis=0, return_inverse=True)
    layouts = [spec.anyres.layout(int(h), int(w)) for h, w in sizes]
    per_size = np.array([[layout.tokens, layout.tiles] for layout in layouts], dtype=np.int64).reshape(-1, 2)
    chosen = per_size[inverse.reshape(-1)]
    return chosen[:, 0], chosen[:, 1]


def whole_sample_costs(split: SplitIndex, prompt_format: str, image_slots: np.ndarray, registers: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, loss tokens, images) of every sample uncut, vectorised over the flat shape codes (what
    `index.slots` / `index.loss_tokens` compute one sample at a time); `image_slots` holds each image's visual +
    register slots, sample after sample."""
    flat, offsets = split.runs[prompt_format]
    lengths = np.diff(offsets)
    sample_of = np.repeat(np.arange(len(split)), lengths)
    image = flat == IMAGE_RUN
    first = np.zeros(len(flat), dtype=bool)
    first[offsets[:-1][lengths > 0]] = True
    after_image = np.zeros(len(flat), dtype=bool)
    after_image[1:] = image[:-1] & ~first[1:]
    trained = flat < 0
    lost = trained & (first | (after_image & (registers == 0)))

    def per_sample(values: np.ndarray) -> np.ndarray:
        return np.bincount(sample_of, weights=values, minlength=len(split)).astype(np.int64)

    cost = np.abs(flat).astype(np.int64)
    cost[image] = image_slots
    return per_sample(cost), per_sample(np.where(trained, -flat, 0) - lost), per_sample(image)


class RowOrder:
    """The row stream of one split; cheap to recompute from the start (no decoding), so resuming is a skip."""

    def __init__(self, split: SplitIndex, spec: RowOrderSpec) -> None:
        self.spec = spec
        flat, _ = split.runs[spec.prompt_format]
        visual, views = image_costs(split, spec, int((flat == IMAGE_RUN).sum()))
        self.image_slots = visual + spec.registers  # of every image of the split, sample after sample
        self.slots, self.loss, self.images = whole_sample_costs(split, spec.prompt_format, self.image_slots,
                                                                spec.registers)
        self.first_image = np.concatenate([[0], np.cumsum(self.images)])  # sample i's images start here
        self.usable = np.ones(len(split), dtype=bool)
        self.skipped: dict[str, list[int]] = {
            "image_too_small": np.flatnonzero(split.min_side < spec.min_image_side).tolist(),
            "image_too_large": np.flatnonzero((split.min_side >= spec.min_image_side)
                                              & (split.max_pixels > spec.max_image_pixels)).tolist(),
            "too_long": []}
        self.truncated: list[int] = []
        for i in self.skipped["image_too_small"] + self.skipped["image_too_large"]:
            self.usable[i] = False
        for i in np.flatnonzero(self.usable & (self.slots > spec.seq_length)).tolist():
            code = truncate(split.shape(spec.prompt_format, i), spec.seq_length, self.sample_image_slots(i))
            if loss_tokens(code, spec.registers) == 0:
                self.skipped["too_long"].append(i)
                self.usable[i] = False
                continue
            self.truncated.append(i)
            self.slots[i] = slots(code, self.sample_image_slots(i))
            self.loss[i], self.images[i] = loss_tokens(code, spec.registers), code.count(IMAGE_RUN)
        if not self.usable.any():
            raise ValueError(f"no sample of the split is usable: {self.counts()}")
        self.ids = split.ids
        # Each sample's visual slots and ViT views (the images a truncation kept): what its FLOPs depend on.
        self.visual, self.views = (self._first_images(values) for values in (visual, views))

    def sample_shape(self) -> SampleShape:
        """The usable samples' slot moments and ViT views: what `parallel.pp_split: balanced` weighs stages by (the
        same on every rank: a function of the index and the config)."""
        usable = self.usable
        registers = self.images[usable] * self.spec.registers
        visual = self.visual[usable]
        return SampleShape.of_samples(visual.tolist(), registers.tolist(),
                                      (self.slots[usable] - visual - registers).tolist(), self.views[usable].tolist())

    def sample_image_slots(self, sample: int) -> list[int]:
        """Visual + register slots of each of the sample's images (uncut), in placeholder order."""
        return self.image_slots[self.first_image[sample]:self.first_image[sample + 1]].tolist()

    def _first_images(self, per_image: np.ndarray) -> np.ndarray:
        """Per sample, the sum of `per_image` over the images it keeps (its first `self.images`)."""
        total = np.concatenate([[0], np.cumsum(per_image)])
        start = self.first_image[:-1]
        return total[start + self.images] - total[start]

    def epoch_order(self, epoch: int) -> list[int]:
        n = len(self.usable)
        order = np.random.default_rng([self.spec.seed, epoch]).permutation(n) if self.spec.shuffle else np.arange(n)
        return order[self.usable[order]].tolist()

    def rows(self) -> Iterator[Row]:
        """The global row sequence from the start; finite orders end with a whole micro-batch (padding rows)."""
        spec = self.spec
        packer = Packer(spec.seq_length, spec.pack_buffer)
        emitted = 0
        epochs = count() if spec.epochs is None else range(spec.epochs)
        for epoch in epochs:
            for sample in self.epoch_order(epoch):
                packer.add(PackItem(key=sample, size=int(self.slots[sample]), payload=None))
                while packer.full():
                    emitted += 1
                    yield tuple(item.key for item in packer.pop_row())
        while len(packer):
            emitted += 1
            yield tuple(item.key for item in packer.pop_row())
        while emitted % spec.micro_batch_size:
            emitted += 1
            yield ()

    def row_loss_tokens(self, row: Row) -> int:
        return int(sum(self.loss[s] for s in row))

    def row_slots(self, row: Row) -> int:
        return int(sum(self.slots[s] for s in row))

    def row_images(self, row: Row) -> int:
        return int(sum(self.images[s] for s in row))

    def row_visual(self, row: Row) -> int:
        return int(sum(self.visual[s] for s in row))

    def row_views(self, row: Row) -> int:
        return int(sum(self.views[s] for s in row))

    def counts(self) -> dict[str, int]:
        """Samples of the split truncated or skipped, by kind, each counted once (not per epoch)."""
        return {"truncated": len(self.truncated), **{f"skipped_{k}": len(v) for k, v in self.skipped.items()}}

    def examples(self, limit: int = 5) -> dict[str, list[str]]:
        """The record ids of the first few samples of each kind, for the start-up message."""
        kinds = {"truncated": self.truncated, **{f"skipped_{k}": v for k, v in self.skipped.items()}}
        return {kind: [str(self.ids[i]) for i in found[:limit]] for kind, found in kinds.items() if found}
