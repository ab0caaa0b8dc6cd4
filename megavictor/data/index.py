"""The per-sample length index (`index.npz` beside the manifest): what packing needs, without decoding anything.

Packing needs each sample's slot count, which depends only on its text tokens and its number of images. The index
stores, per split and per prompt format, each sample's *shape* as a run-length code of its token sequence:
a positive n is n untrained text tokens, a negative -n is n trained (answer) text tokens, 0 is one image. From
that code and the model's slots per image follow the sample's slots, its loss tokens, and what a truncation to
`seq_length` keeps (`slots`, `truncate`, `loss_tokens`), so the global row order and the loss normaliser are
computed by every rank from the index alone. The index also stores where each sample lies in its shard (byte
span of its tar members), so a rank reads only the samples of its own rows, and (since version 2) each image's
(height, width) from its header: under LLaVA-NeXT's anyres an image's visual slots follow from its size
(`megavictor.hf_model.anyres`), so the per-sample slot counts stay known without decoding. A version-1 index (no
sizes) still serves fixed-resolution runs; an anyres run asks for `prep index`.

`megavictor prep` writes it; `megavictor prep index --data DIR` indexes any prepared data set (e.g. with another
tokenizer). It is tied to the shards (names and sha256), the tokenizer's files and the v1 system prompt; a run
whose settings differ stops at start-up with one line saying which `prep index` command to run. Building it is a
separate, explicit step rather than automatic at start-up because it tokenises every sample of every split (hours
for LLaVA-665k on one core) and a multi-rank job would otherwise have every rank race to write it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megavictor.data.manifest import DataError, Manifest, ShardEntry, load_manifest
from megavictor.data.reader import read_span, sample_spans

INDEX_NAME = "index.npz"
INDEX_VERSION = 2  # 2: per-image sizes (`image_hw`, `image_offsets`)
READABLE_VERSIONS = (1, INDEX_VERSION)  # version 1 lacks the sizes, which only anyres needs
IMAGE_RUN = 0
NO_IMAGE_SIDE = 2**62  # the shortest image side of a text-only sample: passes any minimum


def runs_of(tokens: list[int], trainable: list[bool], image_placeholder: int) -> list[int]:
    """The run-length shape code of a tokenised sample (see the module docstring)."""
    runs: list[int] = []
    for tok, train in zip(tokens, trainable):
        if tok == image_placeholder:
            runs.append(IMAGE_RUN)
            continue
        sign = -1 if train else 1
        if runs and runs[-1] != IMAGE_RUN and (runs[-1] < 0) == train:
            runs[-1] += sign
        else:
            runs.append(sign)
    return runs


# Visual + register slots of every image alike, or of each of a sample's images in order (anyres: they differ); a
# truncated code's images are the sample's first ones.
ImageSlots = int | Sequence[int]


def _per_image(runs: list[int], image_slots: ImageSlots) -> list[int]:
    n = runs.count(IMAGE_RUN)
    return [image_slots] * n if isinstance(image_slots, int) else list(image_slots)[:n]


def slots(runs: list[int], image_slots: ImageSlots) -> int:
    """Slots of a sample once its images are expanded to `image_slots` (visual + register) slots."""
    return sum(abs(r) for r in runs) + sum(_per_image(runs, image_slots))


def truncate(runs: list[int], max_slots: int, image_slots: ImageSlots) -> list[int]:
    """The code of the sample cut from its end to `max_slots` (an image kept whole or not at all), as
    `data.collate.truncate_sample` cuts it."""
    out: list[int] = []
    used = 0
    per_image = iter(_per_image(runs, image_slots))
    for r in runs:
        if r == IMAGE_RUN:
            need = next(per_image)
            if used + need > max_slots:
                break
            out.append(r)
            used += need
            continue
        keep = min(abs(r), max_slots - used)
        if keep <= 0:
            break
        out.append(keep if r > 0 else -keep)
        used += keep
        if keep < abs(r):
            break
    return out


def loss_tokens(runs: list[int], registers: int) -> int:
    """Slots carrying a label once expanded (`model.batch.expand_sample`): every trained token except one at the
    sample's first slot or right after a visual slot (an image without registers)."""
    total, first = 0, True
    previous = None
    for r in runs:
        if r < 0:
            lost = first or (previous == IMAGE_RUN and registers == 0)
            total += -r - lost
        first = False
        previous = r
    return total


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the tokenizer dir's files (names and bytes): the index holds token counts of this tokenizer."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _shards_fingerprint(shards: list[ShardEntry]) -> str:
    return hashlib.sha256(json.dumps([[s.name, s.samples, s.sha256] for s in shards]).encode()).hexdigest()


def _system_fingerprint(system: str) -> str:
    return hashlib.sha256(system.encode()).hexdigest()[:16]


@dataclass
class SplitIndex:
    """One split of the index: where each sample lies, and its shape code per prompt format."""

    shard: np.ndarray  # [N] int32: position of the sample's shard in the split's shard list
    start: np.ndarray  # [N] int64: byte span [start, end) of its tar members
    end: np.ndarray
    ids: np.ndarray  # [N] str: the record id of each sample (what messages name)
    min_side: np.ndarray  # [N] int64: the shortest side over its images (NO_IMAGE_SIDE without images)
    max_pixels: np.ndarray  # [N] int64: the largest pixel count over its images (0 without images)
    runs: dict[str, tuple[np.ndarray, np.ndarray]]  # prompt format -> (flat codes, [N + 1] offsets)
    # Version 2 (None in a version-1 index): each image's (height, width), sample after sample in placeholder
    # order; sample i's are image_hw[image_offsets[i]:image_offsets[i + 1]].
    image_hw: np.ndarray | None = None  # [M, 2] int32
    image_offsets: np.ndarray | None = None  # [N + 1] int64

    def __len__(self) -> int:
        return len(self.shard)

    def shape(self, prompt_format: str, sample: int) -> list[int]:
        flat, offsets = self.runs[prompt_format]
        return flat[offsets[sample]:offsets[sample + 1]].tolist()

    def record_id(self, sample: int) -> str:
        """The sample's record id as messages name it (a plain str: numpy's repr would read `np.str_('...')`)."""
        return str(self.ids[sample])

    def image_sizes(self, sample: int) -> list[tuple[int, int]]:
        """(height, width) of each image of the sample, in placeholder order (version 2: `load_index` with
        `need_sizes` guarantees them)."""
        assert self.image_hw is not None and self.image_offsets is not None
        start, end = self.image_offsets[sample], self.image_offsets[sample + 1]
        return [(int(h), int(w)) for h, w in self.image_hw[start:end]]


@dataclass
class DataIndex:
    meta: dict[str, Any]
    splits: dict[str, SplitIndex]

    def split(self, name: str) -> SplitIndex:
        if name not in self.splits:
            raise DataError(f"{INDEX_NAME} has no split {name!r} (splits: {', '.join(sorted(self.splits))}); "
                            "run `megavictor prep index` again")
        return self.splits[name]


def index_command(root: str | Path, tokenizer: str | Path | None, system: str) -> str:
    parts = [f"megavictor prep index --data {root}"]
    if tokenizer is not None:
        parts.append(f"--tokenizer {tokenizer}")
    if system:
        parts.append(f"--system-prompt {json.dumps(system)}")
    return " ".join(parts)


def build_index(root: str | Path, tokenizer: str | Path | None = None, system: str = "") -> Path:
    """Tokenise every sample of every split (json members only, no image decoding) and write `index.npz`."""
    from megavictor.data.collate import IMAGE_PLACEHOLDER
    from megavictor.data.tokenizer import PROMPT_FORMATS, ChatTokenizer, TemplateError, load_tokenizer

    root = Path(root)
    manifest = load_manifest(root)
    tokenizer_dir = _tokenizer_dir(root, manifest, tokenizer)
    hf = load_tokenizer(tokenizer_dir)
    chats = {fmt: ChatTokenizer(hf, fmt, system) for fmt in PROMPT_FORMATS}
    arrays: dict[str, np.ndarray] = {}
    for split in sorted({s.split for s in manifest.shards}):
        shards = manifest.split_shards(split)
        where: list[tuple[int, int, int]] = []
        ids: list[str] = []
        sizes: list[list[tuple[int, int]]] = []  # per sample, (height, width) per image
        codes: dict[str, list[list[int]]] = {fmt: [] for fmt in PROMPT_FORMATS}
        for position, entry in enumerate(shards):
            path = root / entry.name
            with open(path, "rb") as f:
                for key, start, end in sample_spans(path):
                    f.seek(start)
                    raw = read_span(f.read(end - start))
                    record = json.loads(raw["json"])
                    for fmt, chat in chats.items():
                        try:
                            tokens, trainable = chat.encode(record["conversations"])
                        except (KeyError, TemplateError) as exc:
                            raise DataError(f"{path}: sample {key!r} cannot be tokenised ({exc}); re-run "
                                            "megavictor prep on its source") from exc
                        codes[fmt].append(runs_of(tokens, trainable, IMAGE_PLACEHOLDER))
                    hw = _image_sizes(path, key, [raw[m] for m in record["images"]])
                    markers = {code[-1].count(IMAGE_RUN) for code in codes.values()}
                    if markers != {len(hw)}:  # the sizes are stored in placeholder order: one per marker
                        raise DataError(f"{path}: sample {key!r} has {max(markers)} <image> markers but {len(hw)} "
                                        "images; re-run megavictor prep on its source")
                    where.append((position, start, end))
                    ids.append(str(record.get("id", key)))
                    sizes.append(hw)
            if len(where) != sum(s.samples for s in shards[:position + 1]):
                raise DataError(f"{path} holds a different number of samples than {root}/manifest.json says; "
                                "re-run megavictor prep")
        table = np.array(where, dtype=np.int64).reshape(-1, 3)
        arrays[f"{split}/shard"] = table[:, 0].astype(np.int32)
        arrays[f"{split}/start"], arrays[f"{split}/end"] = table[:, 1], table[:, 2]
        arrays[f"{split}/id"] = np.array(ids, dtype=str)
        arrays[f"{split}/min_side"] = np.array([min((min(hw) for hw in per), default=NO_IMAGE_SIDE)
                                                for per in sizes], dtype=np.int64)
        arrays[f"{split}/max_pixels"] = np.array([max((h * w for h, w in per), default=0) for per in sizes],
                                                 dtype=np.int64)
        arrays[f"{split}/image_hw"] = np.array([hw for per in sizes for hw in per], dtype=np.int32).reshape(-1, 2)
        arrays[f"{split}/image_offsets"] = np.cumsum([0] + [len(per) for per in sizes], dtype=np.int64)
        for fmt, per_sample in codes.items():
            arrays[f"{split}/{fmt}/runs"] = np.array([c for code in per_sample for c in code], dtype=np.int32)
            arrays[f"{split}/{fmt}/offsets"] = np.cumsum([0] + [len(code) for code in per_sample], dtype=np.int64)
    meta = {"version": INDEX_VERSION, "shards": _shards_fingerprint(manifest.shards),
            "tokenizer": tokenizer_fingerprint(tokenizer_dir), "system": _system_fingerprint(system),
            "formats": list(PROMPT_FORMATS)}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = root / (INDEX_NAME + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(root / INDEX_NAME)
    return root / INDEX_NAME


def _image_sizes(path: Path, key: str, images: list[bytes]) -> list[tuple[int, int]]:
    """(height, width) of each of a sample's images, from their headers (nothing decoded)."""
    sizes = []
    for data in images:
        try:
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
        except (OSError, SyntaxError) as exc:
            raise DataError(f"{path}: an image of sample {key!r} cannot be read ({exc}); re-run megavictor prep") \
                from exc
        sizes.append((h, w))
    return sizes


def _tokenizer_dir(root: Path, manifest: Manifest, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    if manifest.tokenizer is None:
        raise DataError(f"{root} stores no tokenizer: pass --tokenizer <your LLM's HF tokenizer dir>")
    return root / manifest.tokenizer


def load_index(root: str | Path, tokenizer: str | Path | None, prompt_format: str, system: str,
               need_sizes: bool = False) -> DataIndex:
    """The index of `root`, checked against the shards, the tokenizer and (for v1) the system prompt; with
    `need_sizes` (anyres runs), it must hold the images' sizes (version 2)."""
    root = Path(root)
    manifest = load_manifest(root)
    path = root / INDEX_NAME
    command = index_command(root, tokenizer, system if prompt_format == "v1" else "")
    if not path.is_file():
        raise DataError(f"{path} does not exist (data prepared before the length index): run `{command}`")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}): truncated or overwritten; run "
                        f"`{command}`") from None
    stale = [what for what, ok in [
        ("version", meta.get("version") in READABLE_VERSIONS),
        ("shards", meta.get("shards") == _shards_fingerprint(manifest.shards)),
        ("tokenizer", meta.get("tokenizer") == tokenizer_fingerprint(_tokenizer_dir(root, manifest, tokenizer))),
        ("system prompt", prompt_format != "v1" or meta.get("system") == _system_fingerprint(system))] if not ok]
    if stale:
        raise DataError(f"{path} was built for another {' and '.join(stale)}: run `{command}`")
    sized = meta["version"] >= 2
    if need_sizes and not sized:
        raise DataError(f"{path} holds no image sizes (index version {meta['version']}), which anyres images "
                        f"(vision.image_grid_pinpoints) need: run `{command}`")
    splits = {}
    for split in sorted({name.split("/", 1)[0] for name in arrays}):
        splits[split] = SplitIndex(
            shard=arrays[f"{split}/shard"], start=arrays[f"{split}/start"], end=arrays[f"{split}/end"],
            ids=arrays[f"{split}/id"], min_side=arrays[f"{split}/min_side"],
            max_pixels=arrays[f"{split}/max_pixels"],
            runs={fmt: (arrays[f"{split}/{fmt}/runs"], arrays[f"{split}/{fmt}/offsets"]) for fmt in meta["formats"]},
            image_hw=arrays[f"{split}/image_hw"] if sized else None,
            image_offsets=arrays[f"{split}/image_offsets"] if sized else None)
    return DataIndex(meta=meta, splits=splits)
