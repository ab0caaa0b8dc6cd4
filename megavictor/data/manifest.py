"""`manifest.json`: the one file that says which tar shards of a prepared data set are complete.

`megavictor prep` writes it last (atomically), so a directory without it is an unfinished prep run; the loader
reads only the shards it lists. Shard names are relative to the directory holding the manifest.

Every tar sample is `{__key__, json, image members}`: `json` holds {"id", "conversations" (LLaVA turns with
`<image>` markers), "images": [the image members' suffixes, in marker order]}; the images keep their encoded bytes
(`jpg`/`png`, or `0.jpg`, `1.png`, ... for several).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megavictor.errors import UserError

MANIFEST_NAME = "manifest.json"
# The ViT `megavictor prep digits` pretrains for the demo, beside the shards (`vision.init_from`).
VISION_ENCODER_FILE = "vision_encoder.safetensors"
FORMAT = "megavictor-shards/1"


class DataError(UserError, ValueError):
    """A prepared data set is missing, incomplete or inconsistent; the message names the file and the fix."""


@dataclass
class ShardEntry:
    name: str  # path relative to the output root
    split: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardEntry]
    source: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> record ids
    tokenizer: str | None = None  # HF tokenizer dir relative to the root, when prep built one
    format: str = FORMAT

    def split_shards(self, split: str) -> list[ShardEntry]:
        """The shards of one split in write order; raises DataError naming the splits that exist."""
        shards = [s for s in self.shards if s.split == split]
        if not shards:
            known = sorted({s.split for s in self.shards})
            raise DataError(f"split {split!r} has no shards in this data set (splits: {', '.join(known) or 'none'})")
        return shards

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n"

    def save(self, root: Path) -> None:
        """Write atomically (temp file + rename) so a crash never leaves a half-written manifest."""
        tmp = root / (MANIFEST_NAME + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, root / MANIFEST_NAME)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: {root} is not a prepared data set or its prep run did not finish "
                        f"(run `megavictor prep digits --out {root}` or `megavictor prep llava ... --out {root}`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc}): truncated or overwritten; re-run megavictor prep") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: format {found!r} is not {FORMAT!r} (not a megavictor data set, or an older one); "
                        "re-run megavictor prep")
    try:
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        return Manifest(**data)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} is incomplete ({exc}); re-run megavictor prep") from None
