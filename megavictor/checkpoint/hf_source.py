"""What a checkpoint records of the Hugging Face side: its tokenizer, and what an export needs of the source model.

A megatron checkpoint holds weights and megavictor's config, neither of which names the tokenizer the weights were
trained with. Guessing it at export time shipped wrong tokenizers, so every checkpoint records its own, inside the
checkpoint directory (written before the atomic rename, like every other file of the checkpoint):

    hf_source/tokenizer/                  a copy of the tokenizer files (and chat template, when the source has one)
    hf_source/provenance.json             {"tokenizer": {"path", "sha256"} | null, "config": the source's HF config
                                          | null}
    hf_source/vision_tail.safetensors     ViT tensors megavictor does not run (CLIP's layers past LLaVA's feature
                                          layer, post_layernorm), exported again as they came

`convert from-hf` records the source's tokenizer (when the HF dir has one), config and ViT tail; training records
the tokenizer it tokenized with and carries the config and tail forward from the checkpoint it started from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megavictor.config import Config
from megavictor.data.manifest import DataError, load_manifest

SOURCE_DIR = "hf_source"
PROVENANCE = "provenance.json"
TOKENIZER = "tokenizer"
VISION_TAIL = "vision_tail.safetensors"
# Files of an HF tokenizer (any of the fast/slow formats) and of a processor's chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.json",
                   "chat_template.jinja")


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files present in `directory` (none: it holds no tokenizer)."""
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    has_vocab = any(f.name not in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                   "chat_template.json", "chat_template.jinja") for f in files)
    return files if has_vocab else []


def files_sha256(files: list[Path]) -> str:
    """One hash over the files' names and bytes: equal iff the same tokenizer was copied."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass
class HFSource:
    """What one checkpoint records; every field optional (a model trained from scratch has no source config)."""

    tokenizer: Path | None = None  # a directory holding the tokenizer files
    tokenizer_origin: dict[str, str] | None = None  # {"path": where it was copied from, "sha256": files_sha256}
    config: dict[str, Any] | None = None  # the source model's HF config (LlavaConfig.to_dict())
    vision_tail: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, checkpoint: Path) -> None:
        """Record into `checkpoint` (a directory being written, before its commit)."""
        root = Path(checkpoint) / SOURCE_DIR
        root.mkdir(parents=True, exist_ok=True)
        origin = self.tokenizer_origin
        if self.tokenizer is not None:
            files = tokenizer_files(self.tokenizer)
            (root / TOKENIZER).mkdir(exist_ok=True)
            for path in files:
                shutil.copyfile(path, root / TOKENIZER / path.name)
            origin = origin or {"path": str(self.tokenizer.resolve()), "sha256": files_sha256(files)}
        if self.vision_tail:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in self.vision_tail.items()}, str(root / VISION_TAIL))
        (root / PROVENANCE).write_text(json.dumps({"tokenizer": origin, "config": self.config}, indent=1))


def read_source(checkpoint: str | Path) -> HFSource:
    """What the (resolved) checkpoint at `checkpoint` recorded; an empty record for older checkpoints."""
    root = Path(checkpoint) / SOURCE_DIR
    if not (root / PROVENANCE).is_file():
        return HFSource()
    provenance = json.loads((root / PROVENANCE).read_text())
    tail: dict[str, torch.Tensor] = {}
    if (root / VISION_TAIL).is_file():
        from safetensors.torch import load_file

        tail = load_file(str(root / VISION_TAIL))
    tokenizer = root / TOKENIZER
    return HFSource(tokenizer=tokenizer if tokenizer_files(tokenizer) else None,
                    tokenizer_origin=provenance.get("tokenizer"), config=provenance.get("config"), vision_tail=tail)


def hf_dir_source(directory: str | Path, config: dict[str, Any] | None = None,
                  vision_tail: dict[str, torch.Tensor] | None = None) -> HFSource:
    """The record of an HF model dir being imported: its tokenizer if it ships one."""
    directory = Path(directory)
    return HFSource(tokenizer=directory if tokenizer_files(directory) else None, config=config,
                    vision_tail=dict(vision_tail or {}))


def training_tokenizer(cfg: Config) -> Path | None:
    """The tokenizer training reads the data with: `data.tokenizer`, else the one stored beside the data set."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    try:
        stored = load_manifest(cfg.data.path).tokenizer
    except DataError:
        return None
    return Path(cfg.data.path) / stored if stored else None


def training_source(cfg: Config, start: Path | None) -> HFSource:
    """What a training run's checkpoints record: the tokenizer it trains with, and the source config and ViT tail
    of the checkpoint it starts from (`start`: resumed or `train.init_from`; None when fresh)."""
    carried = read_source(start) if start is not None else HFSource()
    tokenizer = training_tokenizer(cfg)
    if tokenizer is not None and not tokenizer_files(tokenizer):
        tokenizer = None
    if tokenizer is None:
        return carried
    return HFSource(tokenizer=tokenizer, config=carried.config, vision_tail=carried.vision_tail)
