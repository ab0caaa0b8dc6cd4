"""The checks a run makes of its data set before building anything, each failure one line naming the key or file."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from megavictor.config import Config
from megavictor.data.index import SplitIndex, load_index
from megavictor.data.manifest import DataError, ShardEntry, load_manifest, sha256_file
from megavictor.data.reader import ShardReader


def check_shard(root: Path, entry: ShardEntry, verify_sha256: bool) -> None:
    """The shard exists with the manifest's size (and sha256): a truncated or replaced shard stops the run here,
    before step 1, instead of as a tar error mid-run."""
    path = root / entry.name
    if not path.is_file():
        raise DataError(f"shard {path} listed in {root}/manifest.json is missing; re-run megavictor prep")
    size = path.stat().st_size
    if size != entry.bytes:
        raise DataError(f"shard {path} has {size} bytes but {root}/manifest.json says {entry.bytes} (truncated or "
                        "replaced); re-run megavictor prep")
    if verify_sha256 and sha256_file(path) != entry.sha256:
        raise DataError(f"shard {path} does not match its sha256 in {root}/manifest.json; re-run megavictor prep")


def check_data_set(cfg: Config) -> None:
    """`data.path` holds a finished prep run with the configured splits, intact shards (sizes; sha256 with
    `data.verify_sha256`), a tokenizer to read them and a length index matching both (with the images' sizes under
    anyres)."""
    d = cfg.data
    try:
        manifest = load_manifest(d.path)
        shards = [s for split in (d.train_split, d.val_split) for s in manifest.split_shards(split)]
    except DataError as exc:
        raise DataError(f"data.path={d.path}: {exc}") from None
    if d.tokenizer is None and manifest.tokenizer is None:
        raise DataError(f"data.path={d.path} stores no tokenizer: pass data.tokenizer=<your LLM's HF tokenizer dir>")
    tokenizer = Path(d.tokenizer) if d.tokenizer else Path(d.path) / manifest.tokenizer
    if not tokenizer.is_dir():
        key = "data.tokenizer" if d.tokenizer else "data.path"
        raise DataError(f"{key}: tokenizer dir {tokenizer} does not exist (pass data.tokenizer=<your LLM's HF "
                        "tokenizer dir>, or re-run the prep that stores one)")
    for entry in shards:
        check_shard(Path(d.path), entry, d.verify_sha256)
    index = load_index(d.path, d.tokenizer, d.prompt_format.value, d.system_prompt,
                       need_sizes=cfg.vision.anyres() is not None)
    for split in (d.train_split, d.val_split):
        check_shard_contents(Path(d.path), manifest.split_shards(split), index.split(split))


def check_shard_contents(root: Path, shards: list[ShardEntry], index: SplitIndex) -> None:
    """Each shard holds, at the byte spans the index records, the samples the index names (first and last of the
    shard, by record id): a shard replaced by, or swapped with, another of the same size passes the size check but
    not this one. Reads two samples per shard."""
    reader = ShardReader(root, shards)
    for position, entry in enumerate(shards):
        where = np.flatnonzero(index.shard == position)
        for i in {int(where[0]), int(where[-1])} if where.size else ():
            try:
                raw = reader.at(position, int(index.start[i]), int(index.end[i]))
                found = json.loads(raw["json"]).get("id")
            except (OSError, KeyError, ValueError, tarfile.TarError):
                found = None
            if str(found) != index.record_id(i):
                raise DataError(f"shard {root / entry.name} does not hold the samples {root}/index.npz expects there "
                                f"(record {index.record_id(i)!r}, found {found!r}): it was replaced or swapped with "
                                "another shard; re-run megavictor prep (or `megavictor prep index` if the shards are "
                                "right)")
