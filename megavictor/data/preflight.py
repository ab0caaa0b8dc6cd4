"""The checks a run makes of its data set before building anything, each failure one line naming the config key."""

from __future__ import annotations

from pathlib import Path

from megavictor.config import Config
from megavictor.data.manifest import DataError, load_manifest


def check_data_set(cfg: Config) -> None:
    """`data.path` holds a finished prep run with the configured splits, and a tokenizer is there to read them."""
    d = cfg.data
    try:
        manifest = load_manifest(d.path)
        for split in (d.train_split, d.val_split):
            manifest.split_shards(split)
    except DataError as exc:
        raise DataError(f"data.path={d.path}: {exc}") from None
    if d.tokenizer is None and manifest.tokenizer is None:
        raise DataError(f"data.path={d.path} stores no tokenizer: pass data.tokenizer=<your LLM's HF tokenizer dir>")
    tokenizer = Path(d.tokenizer) if d.tokenizer else Path(d.path) / manifest.tokenizer
    if not tokenizer.is_dir():
        key = "data.tokenizer" if d.tokenizer else "data.path"
        raise DataError(f"{key}: tokenizer dir {tokenizer} does not exist (pass data.tokenizer=<your LLM's HF "
                        "tokenizer dir>, or re-run the prep that stores one)")
