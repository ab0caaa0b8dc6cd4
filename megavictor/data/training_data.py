"""Per-rank training data: each rank decodes only the samples of its own rows of the global row order.

Every rank computes the same row order (`row_order.py`) from the length index. A step consumes `global_batch_size` rows;
data-parallel rank r trains on micro-batches [r * per_rank, (r + 1) * per_rank) of them and decodes only those
samples. What the loss and the metrics need of the whole global batch (its loss tokens: the loss normaliser; its
real tokens, samples and FLOPs) comes from the row order, so no rank materialises the global batch.

As in Megatron-LM, tensor-parallel rank 0 loads and broadcasts to its tensor-parallel peers, and only the pipeline
stages that use data read it: the first stage decodes text and images, the last stage only the text (its labels),
and middle stages read nothing, building their micro-batches' structure (kinds, positions, `cu_seqlens`) from the
index. Under LLaVA-NeXT's anyres each image's visual slots and ViT views follow from its size, which the index
holds, so every stage builds the same structure (and the row order the same slot counts) without decoding an image;
the first stage checks each decoded image against its indexed size. Decoding runs in `data.num_workers` worker
processes (by default 4 on CUDA, none on the CPU), each `data.prefetch` micro-batches ahead, so that the next
micro-batches decode while the current ones compute; on CUDA the loader pins them for asynchronous copies to the
GPU. A data error met while decoding reaches the user as its one line, from a worker too.

The position in the data is the number of rows consumed: the same number on every rank, independent of the
layout, saved in the checkpoint's common state (which every rank reads) and restored exactly under any tp/pp/dp.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from megavictor.config import Config, ConfigError
from megavictor.data.collate import IMAGE_PLACEHOLDER, Sample, collate_rows, expand_sample, truncate_sample
from megavictor.data.images import load_anyres, load_image
from megavictor.data.index import IMAGE_RUN, SplitIndex, load_index, runs_of, truncate
from megavictor.data.manifest import DataError, ShardEntry, load_manifest
from megavictor.data.row_order import RowOrder, RowOrderSpec, Row
from megavictor.data.reader import ShardReader
from megavictor.data.tokenizer import ChatTokenizer, TemplateError, load_tokenizer
from megavictor.distributed import ParallelDims
from megavictor.hf_model.anyres import AnyresLayout, AnyresSpec
from megavictor.model.batch import VictorBatch
from megavictor.model.flops import rows_train_flops

log = logging.getLogger(__name__)
STATE_VERSION = 2
GPU_DECODING_WORKERS = 4  # data.num_workers: null on CUDA
T = TypeVar("T")


class Reads(enum.Enum):
    """What a pipeline stage needs of a sample."""

    ALL = "all"  # first stage: tokens and images
    TEXT = "text"  # last stage (not first): tokens for the labels; images stay unread
    NOTHING = "nothing"  # middle stages: the structure only, from the index


def stage_reads(dims: ParallelDims) -> Reads:
    if dims.is_first_stage:
        return Reads.ALL
    return Reads.TEXT if dims.is_last_stage else Reads.NOTHING


@dataclass
class StepBatches:
    """One optimizer step's data as this rank sees it, with what the loss and metrics need of the global batch."""

    mine: list[VictorBatch]  # this data-parallel rank's micro-batches
    loss_tokens: int  # loss tokens of the whole global batch: the loss normaliser
    real_tokens: int  # text + visual slots of the global batch (not Victor's registers: comparable with a baseline)
    samples: int  # packed samples of the global batch
    flops: float  # training FLOPs of the global batch (analytic, for MFU)
    images: int  # images this rank decoded for the step (under anyres each is several ViT views)


@dataclass(frozen=True)
class DecodeSettings:
    """What a (worker) process needs to turn rows of the order into a micro-batch."""

    root: str
    split: str
    shards: tuple[ShardEntry, ...]
    tokenizer: str
    prompt_format: str
    system: str
    seq_length: int
    visual_tokens: int
    registers: int
    image_size: int
    aspect: str
    reads: Reads
    anyres: AnyresSpec | None = None  # LLaVA-NeXT tiling: each image's views and visual slots from its size


class RowDecoder(Dataset):
    """Map-style dataset whose index is a micro-batch's rows (tuples of sample indices): the DataLoader's sampler
    hands each worker the rows to decode."""

    def __init__(self, settings: DecodeSettings, index: SplitIndex) -> None:
        self.settings, self.index = settings, index
        self._chat: ChatTokenizer | None = None
        self._reader: ShardReader | None = None  # opened in the (worker) process that reads

    def __getitem__(self, rows: tuple[Row, ...]) -> VictorBatch | DataError:  # type: ignore[override]
        """The micro-batch, or the DataError that stopped it: returned, not raised, so that from a worker process
        it reaches the user as its one line (the DataLoader would re-raise it wrapped in the worker's traceback)."""
        s = self.settings
        try:
            expanded = [[expand_sample(self.sample(i), s.visual_tokens, s.registers, self.pad_id) for i in row]
                        for row in rows]
        except DataError as exc:
            return exc
        return collate_rows(expanded, s.seq_length, self.pad_id, image_shape=(3, s.image_size, s.image_size))

    def batch(self, rows: tuple[Row, ...]) -> VictorBatch:
        """The micro-batch of `rows`, decoded in this process (raises its DataError)."""
        return _raised(self[rows])

    @property
    def chat(self) -> ChatTokenizer:
        if self._chat is None:  # loaded in the worker that uses it
            s = self.settings
            self._chat = ChatTokenizer(load_tokenizer(s.tokenizer), s.prompt_format, s.system)
        return self._chat

    @property
    def pad_id(self) -> int:
        return 0 if self.settings.reads == Reads.NOTHING else self.chat.pad_id

    def sample(self, i: int) -> Sample:
        """Sample i as this stage needs it, truncated to seq_length as the row order decided."""
        s = self.settings
        sizes = self.index.image_sizes(i) if s.anyres is not None else None
        layouts = None if s.anyres is None or sizes is None else [s.anyres.layout(h, w) for h, w in sizes]
        image_slots = (s.visual_tokens + s.registers if layouts is None
                       else [layout.tokens + s.registers for layout in layouts])
        code = truncate(self.index.shape(s.prompt_format, i), s.seq_length, image_slots)
        if s.reads == Reads.NOTHING:
            return _shape_sample(code, sizes, layouts)
        raw = self._raw(i)
        path = Path(s.root) / s.shards[int(self.index.shard[i])].name
        try:
            record = json.loads(raw["json"])
            images = self._images(i, path, raw, record["images"], sizes, layouts)
            sample = self.chat.sample(record["conversations"], images)
            if layouts is not None:
                sample = replace(sample, image_sizes=sizes, image_tokens=[layout.tokens for layout in layouts])
        except DataError:
            raise  # already the one line naming the image
        except (KeyError, ValueError, OSError, TemplateError) as exc:
            raise DataError(f"{path}: sample {self.index.record_id(i)!r} cannot be loaded ({exc!r}); re-run "
                            "megavictor prep on its source") from exc
        sample = truncate_sample(sample, s.seq_length, s.visual_tokens, s.registers)
        if runs_of(sample.tokens, sample.trainable, IMAGE_PLACEHOLDER) != code:
            raise DataError(f"{s.root}/index.npz does not match sample {self.index.record_id(i)!r} of {path} "
                            "(tokenizer or prompt changed?): run `megavictor prep index` again")
        return sample

    def _images(self, i: int, path: Path, raw: dict[str, Any], members: list[str],
                sizes: list[tuple[int, int]] | None, layouts: list[AnyresLayout] | None) -> list[torch.Tensor]:
        """The sample's images as this stage needs them: decoded (first stage) or pixel-less stand-ins (last). An
        anyres image must decode to its indexed size, else its visual slots are not the ones the row order (and every
        other stage) counted for it."""
        s = self.settings
        if s.reads == Reads.TEXT:
            return _unread_images(len(members), layouts)
        if s.anyres is None or sizes is None:
            return [load_image(raw[member], s.image_size, s.aspect) for member in members]
        images = []
        for member, indexed in zip(members, sizes, strict=True):
            views, decoded = load_anyres(raw[member], s.anyres)
            if decoded != indexed:
                raise DataError(f"{path}: image {member!r} of sample {self.index.record_id(i)!r} is "
                                f"{decoded[0]}x{decoded[1]} (height x width) but {s.root}/index.npz says "
                                f"{indexed[0]}x{indexed[1]}: the shard or the index changed after indexing; run "
                                f"`megavictor prep index --data {s.root}` (or re-run megavictor prep if the shard "
                                "is damaged)")
            images.append(views)
        return images

    def _raw(self, i: int) -> dict[str, Any]:
        if self._reader is None:
            self._reader = ShardReader(self.settings.root, self.settings.shards)
        return self._reader.at(int(self.index.shard[i]), int(self.index.start[i]), int(self.index.end[i]))


def _raised(item: T | DataError) -> T:
    """A decoded micro-batch, or the DataError its decoding returned raised here, in the training process."""
    if isinstance(item, DataError):
        raise item
    return item


def _unread_images(count: int, layouts: list[AnyresLayout] | None) -> list[torch.Tensor]:
    """Pixel-less stand-ins for the first `count` images (stages that do not run the ViT): one [3, 0, 0] each, or
    under anyres [views, 3, 0, 0], so the batch's view count is the first stage's."""
    if layouts is None:
        return [torch.empty(3, 0, 0) for _ in range(count)]
    return [torch.empty(layout.tiles, 3, 0, 0) for layout in layouts[:count]]


def _shape_sample(code: list[int], sizes: list[tuple[int, int]] | None, layouts: list[AnyresLayout] | None
                  ) -> Sample:
    """A stand-in sample with the structure of `code` (pad tokens, unread images; under anyres each kept image's
    indexed size and visual slots): what middle stages run on."""
    tokens: list[int] = []
    trainable: list[bool] = []
    for r in code:
        if r == IMAGE_RUN:
            tokens.append(IMAGE_PLACEHOLDER)
            trainable.append(False)
        else:
            tokens += [0] * abs(r)
            trainable += [r < 0] * abs(r)
    n = code.count(IMAGE_RUN)
    if sizes is None or layouts is None:
        return Sample(tokens, trainable, _unread_images(n, None))
    return Sample(tokens, trainable, _unread_images(n, layouts), sizes[:n], [layout.tokens for layout in layouts[:n]])


class SplitData:
    """One split's index, row order and decoding settings, as this rank sees them."""

    def __init__(self, cfg: Config, split: str, dims: ParallelDims, shuffle: bool, epochs: int | None) -> None:
        d, v = cfg.data, cfg.vision
        manifest = load_manifest(d.path)
        tokenizer = Path(d.tokenizer) if d.tokenizer else (Path(d.path) / manifest.tokenizer
                                                           if manifest.tokenizer else None)
        if tokenizer is None:
            raise DataError(f"data.path={d.path} stores no tokenizer: pass data.tokenizer=<your LLM's HF tokenizer "
                            "dir>")
        anyres = v.anyres()
        index = load_index(d.path, d.tokenizer, d.prompt_format.value, d.system_prompt, need_sizes=anyres is not None)
        self.index = index.split(split)
        self.cfg, self.dims = cfg, dims
        spec = RowOrderSpec(prompt_format=d.prompt_format.value, seq_length=d.seq_length,
                            micro_batch_size=d.micro_batch_size,
                            image_slots=v.num_visual_tokens + cfg.victor.registers_per_image,
                            registers=cfg.victor.registers_per_image, pack_buffer=d.pack_buffer, seed=d.seed,
                            min_image_side=d.min_image_side, max_image_pixels=d.max_image_pixels, shuffle=shuffle,
                            epochs=epochs, anyres=anyres)
        try:
            self.order = RowOrder(self.index, spec)
        except ValueError as exc:
            raise DataError(f"data.path={d.path} split {split!r}: {exc}") from None
        self.settings = DecodeSettings(
            root=str(d.path), split=split, shards=tuple(manifest.split_shards(split)),
            tokenizer=str(tokenizer), prompt_format=d.prompt_format.value, system=d.system_prompt,
            seq_length=d.seq_length, visual_tokens=v.num_visual_tokens, registers=cfg.victor.registers_per_image,
            image_size=v.image_size, aspect=d.image_aspect_ratio.value, reads=stage_reads(dims), anyres=anyres)
        self.decoder = RowDecoder(self.settings, self.index)
        # Middle stages build their structure locally on every tp rank; otherwise tp rank 0 reads and broadcasts.
        self.broadcast = dims.tp > 1 and self.settings.reads != Reads.NOTHING
        self.loads = not self.broadcast or dims.tp_rank == 0

    def check_vocab(self) -> None:
        """The tokenizer fits the model's embedding (checked where the data is built, before the model)."""
        vocab = len(load_tokenizer(self.settings.tokenizer))
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {self.settings.tokenizer} has {vocab} tokens but model.vocab_size="
                              f"{self.cfg.model.vocab_size}; raise model.vocab_size to at least {vocab}")

    def receive(self, batch: VictorBatch | None) -> VictorBatch:
        """This rank's copy of a micro-batch: tp rank 0's, broadcast to its peers when they need it."""
        if not self.broadcast:
            assert batch is not None
            return batch
        return broadcast_batch(batch, self.cfg.data.micro_batch_size, self.cfg.data.seq_length)


def broadcast_batch(batch: VictorBatch | None, rows: int, seq_length: int) -> VictorBatch:
    """tp rank 0's micro-batch on every tensor-parallel rank (sizes first, then the tensors)."""
    from megatron.core import parallel_state

    from megavictor.distributed import collective_device

    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    device = collective_device(group)
    if batch is not None:
        header = torch.tensor([batch.cu_seqlens.numel(), batch.num_images, *batch.images.shape], dtype=torch.int64)
    else:
        header = torch.zeros(6, dtype=torch.int64)
    header = header.to(device)
    dist.broadcast(header, src, group=group)
    n_cu, n_images, n_views, c, h, w = header.tolist()
    shapes = {"tokens": ((rows, seq_length), torch.int64), "kinds": ((rows, seq_length), torch.int64),
              "position_ids": ((rows, seq_length), torch.int64), "labels": ((rows, seq_length), torch.int64),
              "cu_seqlens": ((n_cu,), torch.int32), "images": ((n_views, c, h, w), torch.float32),
              "image_segments": ((n_images,), torch.int64), "image_sizes": ((n_images, 2), torch.int64)}
    out = {}
    for name, (shape, dtype) in shapes.items():
        tensor = getattr(batch, name).to(device) if batch is not None else torch.empty(shape, dtype=dtype,
                                                                                       device=device)
        if tensor.numel():  # both sides know the shape; nothing to send for no images
            dist.broadcast(tensor, src, group=group)
        out[name] = tensor.cpu()
    return VictorBatch(**out)


def micro_batches_per_rank(cfg: Config, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    return cfg.train.global_batch_size // dp // cfg.data.micro_batch_size


def decoding_workers(cfg: Config) -> int:
    """`data.num_workers`, or for null what a GPU job wants: 4 processes decoding ahead of the step, so that image
    decoding never holds up the GPU (Megatron-LM's data loaders use workers too); on the CPU, where the workers would
    take cores from training, 0."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return GPU_DECODING_WORKERS if torch.cuda.is_available() else 0


def _identity(item: Any) -> Any:
    return item


class TrainData:
    """The training split's micro-batches for this rank, step by step, from the global row order."""

    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        self.data = SplitData(cfg, cfg.data.train_split, dims, shuffle=True, epochs=None)
        self.data.check_vocab()
        self.per_rank = micro_batches_per_rank(cfg, dims.dp)
        self.rows_per_step = self.per_rank * dims.dp * cfg.data.micro_batch_size
        self.consumed = 0  # rows of the steps handed out
        self._batches: Iterator[VictorBatch | DataError | None] | None = None
        self._steps: deque[dict[str, Any]] = deque()
        counts, examples = self.data.order.counts(), self.data.order.examples()
        if any(counts.values()) and dims.rank == 0:
            log.warning("split %s: %s (first record ids: %s)", cfg.data.train_split, counts, examples)

    @property
    def counts(self) -> dict[str, int]:
        """Samples of the training split truncated or skipped at load time, by kind, each counted once."""
        return self.data.order.counts()

    def _jobs(self) -> Iterator[tuple[Row, ...]]:
        """This rank's micro-batches (as rows), step after step; records each step's global figures."""
        order, mbs, cfg = self.data.order, self.cfg.data.micro_batch_size, self.cfg
        rows = islice(order.rows(), self.consumed, None)
        first = self.dims.dp_rank * self.per_rank * mbs
        while True:
            step = list(islice(rows, self.rows_per_step))
            mine = step[first:first + self.per_rank * mbs]
            self._steps.append({
                "loss_tokens": sum(order.row_loss_tokens(r) for r in step),
                "real_tokens": sum(order.row_slots(r) - order.row_images(r) * cfg.victor.registers_per_image
                                   for r in step),
                "samples": sum(len(r) for r in step),
                "flops": rows_train_flops(cfg, cfg.data.seq_length, [order.row_visual(r) for r in step],
                                          sum(order.row_views(r) for r in step)),
                "images": sum(order.row_images(r) for r in mine) if self.data.settings.reads == Reads.ALL else 0})
            for m in range(self.per_rank):
                yield tuple(mine[m * mbs:(m + 1) * mbs])

    def _start(self) -> Iterator[VictorBatch | DataError | None]:
        self._steps.clear()
        jobs = self._jobs()
        if not self.data.loads:
            return (None for _ in jobs)
        workers, cuda = decoding_workers(self.cfg), torch.cuda.is_available()
        return iter(DataLoader(self.data.decoder, sampler=jobs, batch_size=None, num_workers=workers,
                               collate_fn=_identity, prefetch_factor=self.cfg.data.prefetch if workers else None,
                               pin_memory=cuda))

    def next_step(self) -> StepBatches:
        if self._batches is None:
            self._batches = self._start()
        mine = [self.data.receive(_raised(next(self._batches))) for _ in range(self.per_rank)]
        self.consumed += self.rows_per_step
        return StepBatches(mine=mine, **self._steps.popleft())

    def state_dict(self) -> dict[str, Any]:
        """The same on every rank and for every layout: rows consumed, and the row order they index."""
        return {"version": STATE_VERSION, "order": self.data.order.spec.fingerprint(), "rows": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after `state`'s rows; refuses a state of another row order (data settings changed).
        Checkpoints written before the rename name the order's fingerprint "plan"."""
        fingerprint = self.data.order.spec.fingerprint()
        saved = state.get("order", state.get("plan"))
        if state.get("version") != STATE_VERSION or saved != fingerprint:
            raise DataError(f"the checkpoint's data position (loader state version {state.get('version')}, order "
                            f"{saved}) is not for this data order (version {STATE_VERSION}, order "
                            f"{fingerprint}): the data.* order settings or the model's slots per image changed, or "
                            "it was saved by an older megavictor; resume with the saved settings")
        self.consumed = int(state["rows"])
        self._batches = None


def validation_batches(cfg: Config, dims: ParallelDims) -> tuple[list[VictorBatch], int]:
    """This data-parallel rank's share of the first `train.eval_batches` micro-batches of the val split (in
    order, unshuffled), decoded by this rank only; and how many there are over all ranks."""
    data = SplitData(cfg, cfg.data.val_split, dims, shuffle=False, epochs=1)
    mbs = cfg.data.micro_batch_size
    rows = list(islice(data.order.rows(), cfg.train.eval_batches * mbs))
    micro = [tuple(rows[i:i + mbs]) for i in range(0, len(rows), mbs)]
    return [data.receive(data.decoder.batch(m) if data.loads else None) for m in micro[dims.dp_rank::dims.dp]], \
        len(micro)
