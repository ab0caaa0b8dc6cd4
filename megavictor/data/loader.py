"""The training data loader: tar shards -> shuffled, tokenised, packed `VictorBatch`es, resumable exactly.

Each data-parallel rank builds one `VictorLoader` with its dp rank and size (from megatron's parallel_state:
tensor- and pipeline-parallel peers share a dp rank and so get identical batches). Its torch DataLoader workers
are the consumers of `order.py`: (rank, worker) reads one contiguous range of each epoch's stream, so every sample
of an epoch is used exactly once across ranks and workers. A worker turns samples into `Sample`s (chat template,
image decode), truncates over-long ones (counted, logged), packs them (`packing.py`) and collates micro-batches.

Resumption: every batch travels with its worker's state after producing it (epoch, position in the epoch order,
the packing buffer as sample indices); the loader keeps the state of the last batch it handed out per worker and
takes batches from the workers strictly round robin. `state_dict()` is plain JSON; after `load_state_dict()` the
workers re-read the buffered samples and continue, so the batch sequence is exactly the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megavictor.config import ConfigError
from megavictor.data.images import load_image
from megavictor.data.manifest import DataError, ShardEntry, load_manifest
from megavictor.data.order import epoch_order
from megavictor.data.packing import Packer, PackItem
from megavictor.data.reader import ShardReader
from megavictor.data.tokenizer import PROMPT_FORMATS, ChatTokenizer, TemplateError, load_tokenizer
from megavictor.model.batch import VictorBatch, collate_rows, expand_sample, truncate_sample

log = logging.getLogger(__name__)
STATE_VERSION = 1
_LOGGED_TRUNCATIONS = 10  # per worker; the rest are only counted


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that determines the batch sequence (besides the shards' contents)."""

    root: str
    split: str
    shards: tuple[ShardEntry, ...]
    tokenizer: str
    prompt_format: str
    system: str
    seq_length: int
    micro_batch_size: int
    visual_tokens: int
    registers: int
    image_size: int
    dp_rank: int
    dp_size: int
    num_workers: int
    shuffle: bool
    shuffle_buffer: int
    pack_buffer: int
    seed: int
    epochs: int | None

    def fingerprint(self) -> dict[str, Any]:
        """The order-defining fields, as stored in (and checked against) a state dict."""
        data = {k: v for k, v in asdict(self).items() if k not in ("root", "tokenizer", "shards", "system")}
        data["shards"] = hashlib.sha256(json.dumps([[s.name, s.samples, s.sha256] for s in self.shards])
                                        .encode()).hexdigest()[:16]
        data["system"] = hashlib.sha256(self.system.encode()).hexdigest()[:16]
        return data


def _new_worker_state() -> dict[str, Any]:
    return {"epoch": 0, "cursor": 0, "pending": [], "truncated": 0, "batches": 0, "finished": False}


class _Worker:
    """One consumer's deterministic batch stream, starting from a saved worker state."""

    def __init__(self, spec: LoaderSpec, consumer: int, num_consumers: int, state: dict[str, Any]) -> None:
        self.spec, self.consumer, self.num_consumers = spec, consumer, num_consumers
        self.reader = ShardReader(spec.root, list(spec.shards))
        self.chat = ChatTokenizer(load_tokenizer(spec.tokenizer), spec.prompt_format, spec.system)
        self.packer = Packer(spec.seq_length, spec.pack_buffer)
        self.state = dict(state)
        self.rows: list[list[PackItem]] = []
        pending = self.state["pending"]
        fetched = dict(self.reader.read(sorted(key for key, _ in pending)))
        for key, age in pending:
            item = self._item(key, fetched[key], count_truncation=False)
            item.age = age
            self.packer.add(item)

    def _item(self, index: int, raw: dict[str, Any], count_truncation: bool = True) -> PackItem:
        spec, name = self.spec, raw.get("__key__")
        try:
            record = json.loads(raw["json"])
            images = [load_image(raw[member], spec.image_size) for member in record["images"]]
            sample = self.chat.sample(record["conversations"], images)
        except (KeyError, ValueError, TemplateError) as exc:
            shard, _ = self.reader.locate(index)
            raise DataError(f"{self.reader.paths[shard]}: sample {name!r} cannot be loaded ({exc!r}); "
                            "re-run megavictor prep on its source") from exc
        slots = sample.num_slots(spec.visual_tokens, spec.registers)
        if slots > spec.seq_length:
            sample = truncate_sample(sample, spec.seq_length, spec.visual_tokens, spec.registers)
            if count_truncation:
                self.state["truncated"] += 1
                if self.state["truncated"] <= _LOGGED_TRUNCATIONS:
                    log.warning("sample %r of split %s has %d slots > seq_length=%d: truncated (%d so far in "
                                "this worker)", name, spec.split, slots, spec.seq_length, self.state["truncated"])
            slots = sample.num_slots(spec.visual_tokens, spec.registers)
        return PackItem(key=index, size=slots, payload=(name, sample))

    def batches(self) -> Iterator[tuple[dict[str, Any], VictorBatch | None, list[list[str]] | None]]:
        """(state after this batch, batch, sample keys per row); a final (state, None, None) in finite mode."""
        spec, state = self.spec, self.state
        if not state["finished"]:
            yield from self._drain(final=False)
            while spec.epochs is None or state["epoch"] < spec.epochs:
                stream, order = epoch_order(self.reader.sizes, spec.seed, state["epoch"], self.consumer,
                                            self.num_consumers, spec.shuffle, spec.shuffle_buffer)
                for index, raw in self.reader.read_in_order(stream, order[state["cursor"]:]):
                    state["cursor"] += 1
                    self.packer.add(self._item(index, raw))
                    yield from self._drain(final=False)
                state["epoch"] += 1
                state["cursor"] = 0
            yield from self._drain(final=True)
            state["finished"] = True
        yield self._snapshot(), None, None

    def _drain(self, final: bool) -> Iterator[tuple[dict[str, Any], VictorBatch, list[list[str]]]]:
        while self.packer.full() or (final and len(self.packer)):
            self.rows.append(self.packer.pop_row())
            if len(self.rows) == self.spec.micro_batch_size:
                yield self._batch()
        if final and self.rows:  # the last micro-batch of a finite run: fill up with empty (all-pad) rows
            self.rows += [[] for _ in range(self.spec.micro_batch_size - len(self.rows))]
            yield self._batch()

    def _batch(self) -> tuple[dict[str, Any], VictorBatch, list[list[str]]]:
        spec, pad = self.spec, self.chat.pad_id
        expanded = [[expand_sample(item.payload[1], spec.visual_tokens, spec.registers, pad) for item in row]
                for row in self.rows]
        keys = [[item.payload[0] for item in row] for row in self.rows]
        batch = collate_rows(expanded, spec.seq_length, pad, image_shape=(3, spec.image_size, spec.image_size))
        self.rows = []
        self.state["batches"] += 1
        return self._snapshot(), batch, keys

    def _snapshot(self) -> dict[str, Any]:
        return {**self.state, "pending": self.packer.state()}


class _WorkerStreams(IterableDataset):
    """What each DataLoader worker iterates: its own consumer's batch stream, tagged with its worker id."""

    def __init__(self, spec: LoaderSpec, states: list[dict[str, Any]]) -> None:
        self.spec, self.states = spec, states

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any], VictorBatch | None, list[list[str]] | None]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = max(1, self.spec.num_workers)
        consumer = self.spec.dp_rank * workers + worker
        run = _Worker(self.spec, consumer, self.spec.dp_size * workers, self.states[worker])
        for state, batch, keys in run.batches():
            yield worker, state, batch, keys


def _identity(item: Any) -> Any:
    return item


class VictorLoader:
    """Packed `VictorBatch`es of one split for one data-parallel rank; infinite unless `epochs` is given.

    Iterating continues from the current position (a new `iter()` does not restart the data). `epochs=None`
    iterates forever (training asks for batches by step); `epochs=n` stops after n epochs, flushing the packing
    buffer and padding the last micro-batch with empty rows.
    """

    def __init__(self, path: str | Path, split: str, *, seq_length: int, micro_batch_size: int,
                 visual_tokens: int, registers: int, image_size: int, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 0, tokenizer: str | Path | None = None, prompt_format: str = "v1",
                 system: str = "", shuffle: bool = True, shuffle_buffer: int = 256, pack_buffer: int = 64,
                 seed: int = 1234, epochs: int | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seq_length < visual_tokens + registers + 1:
            raise ValueError(f"seq_length={seq_length} cannot hold one image ({visual_tokens} visual + "
                             f"{registers} register slots) and a text token")
        for name, value in [("micro_batch_size", micro_batch_size), ("pack_buffer", pack_buffer),
                            ("shuffle_buffer", shuffle_buffer)]:
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if num_workers < 0 or seed < 0 or (epochs is not None and epochs < 1):
            raise ValueError(f"num_workers={num_workers} and seed={seed} must be >= 0, epochs={epochs} >= 1 or None")
        manifest = load_manifest(path)
        shards = manifest.split_shards(split)
        if tokenizer is None:
            if manifest.tokenizer is None:
                raise DataError(f"{path} stores no tokenizer: pass data.tokenizer=<your LLM's HF tokenizer dir>")
            tokenizer = Path(path) / manifest.tokenizer
        if not Path(tokenizer).is_dir():
            raise DataError(f"tokenizer dir {tokenizer} does not exist (pass data.tokenizer=<your LLM's HF tokenizer "
                            "dir>, or re-run the prep that stores one)")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r} must be one of {PROMPT_FORMATS}")
        self.spec = LoaderSpec(
            root=str(path), split=split, shards=tuple(shards), tokenizer=str(tokenizer), prompt_format=prompt_format,
            system=system, seq_length=seq_length, micro_batch_size=micro_batch_size, visual_tokens=visual_tokens,
            registers=registers, image_size=image_size, dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers,
            shuffle=shuffle, shuffle_buffer=shuffle_buffer, pack_buffer=pack_buffer, seed=seed, epochs=epochs)
        self.num_samples = sum(s.samples for s in shards)
        consumers = dp_size * max(1, num_workers)
        if self.num_samples < consumers:
            raise DataError(f"split {split!r} of {path} has {self.num_samples} samples, fewer than dp_size x "
                            f"num_workers = {consumers} readers; use fewer workers")
        self._states = [_new_worker_state() for _ in range(max(1, num_workers))]
        self._next_worker = 0
        self._batches = 0

    @classmethod
    def from_config(cls, cfg: Any, split: str, dp_rank: int = 0, dp_size: int = 1, **overrides: Any
                    ) -> VictorLoader:
        """A loader from a `megavictor.config.Config` (data, vision and victor sections); checks the vocab fits."""
        d = cfg.data
        kwargs: dict[str, Any] = dict(
            seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
            visual_tokens=cfg.vision.num_visual_tokens, registers=cfg.victor.registers_per_image,
            image_size=cfg.vision.image_size, dp_rank=dp_rank, dp_size=dp_size, num_workers=d.num_workers,
            tokenizer=d.tokenizer, prompt_format=d.prompt_format.value, shuffle_buffer=d.shuffle_buffer,
            pack_buffer=d.pack_buffer, seed=d.seed, system=d.system_prompt)
        loader = cls(d.path, split, **{**kwargs, **overrides})
        vocab = len(loader.tokenizer)
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {loader.spec.tokenizer} has {vocab} tokens but model.vocab_size="
                             f"{cfg.model.vocab_size}; raise model.vocab_size to at least {vocab}")
        return loader

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.spec.tokenizer)

    @property
    def epoch(self) -> int:
        """Epochs completed by the slowest worker."""
        return min(s["epoch"] for s in self._states)

    @property
    def truncated(self) -> int:
        """Samples truncated to seq_length so far (each also logged, up to a limit)."""
        return sum(s["truncated"] for s in self._states)

    def __iter__(self) -> Iterator[VictorBatch]:
        return (batch for batch, _ in self.iter_with_keys())

    def iter_with_keys(self) -> Iterator[tuple[VictorBatch, list[list[str]]]]:
        """Batches with the `__key__` of every packed sample, per row (for tests and debugging)."""
        if all(s["finished"] for s in self._states):
            return
        workers = self.spec.num_workers
        loader = DataLoader(_WorkerStreams(self.spec, list(self._states)), batch_size=None, num_workers=workers,
                            collate_fn=_identity, prefetch_factor=2 if workers else None)
        held: dict[int, deque] = {w: deque() for w in range(len(self._states))}
        items = iter(loader)
        while not all(s["finished"] for s in self._states):
            worker = self._next_worker
            while not held[worker]:
                got = next(items, None)
                if got is None:
                    raise RuntimeError(f"loader worker {worker} stopped without finishing its data")
                held[got[0]].append(got)
            _, state, batch, keys = held[worker].popleft()
            self._states[worker] = state
            self._advance()
            if batch is not None:
                self._batches += 1
                yield batch, keys

    def _advance(self) -> None:
        """Round robin over the workers that still have data."""
        n = len(self._states)
        for step in range(1, n + 1):
            candidate = (self._next_worker + step) % n
            if not self._states[candidate]["finished"]:
                self._next_worker = candidate
                return

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON position after the last batch handed out; save one per data-parallel rank."""
        return {"version": STATE_VERSION, "spec": self.spec.fingerprint(), "batches": self._batches,
                "next_worker": self._next_worker, "workers": json.loads(json.dumps(self._states))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; refuses (ValueError) if the order would differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        saved, now = state["spec"], self.spec.fingerprint()
        diff = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if diff:
            raise ValueError("loader state does not match this loader, resuming would repeat or skip samples ("
                             + "; ".join(diff) + "). Resume with the saved data-parallel size, workers and data "
                             "settings, or start the data order afresh")
        self._states = [dict(s) for s in state["workers"]]
        self._next_worker = state["next_worker"]
        self._batches = state["batches"]
